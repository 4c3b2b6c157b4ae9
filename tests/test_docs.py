"""README and docs/ say what the repository holds: every log, tool, document and anchor they name exists,
every log in docs/runs/ is indexed, and README's size line for train_gpt.py is the file's real size, inside
the ceiling (1,900 lines, 105,000 bytes, 120 characters a line) and README inside its own (220 lines, 24,000 B)."""
from __future__ import annotations

import glob
import os
import re

import pytest

from conftest import ROOT

DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# a path in backticks or a markdown link: docs/runs/x, runs/x (inside docs/), tools/x, docs/x.md, tests/x
PATH = re.compile(r"(?<![\w/.-])((?:docs/)?runs/[\w.*<>/-]+|tools/[\w.-]+|docs/[\w.-]+\.md|tests/[\w.-]+\.py)")
LINK = re.compile(r"\]\(([^)#\s]*)(?:#([\w-]+))?\)")


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def resolve(doc: str, ref: str) -> str:
    """A path as written in `doc`: repository-relative, except runs/... inside docs/, which is docs/runs/..."""
    if ref.startswith("runs/") and doc.startswith("docs/"):
        ref = "docs/" + ref
    return os.path.join(ROOT, ref)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_path_exists(doc):
    text, missing = read(doc), []
    for ref in sorted(set(PATH.findall(text))):
        ref = ref.rstrip(".")
        if "<" in ref or ref.endswith("/") or ref == "runs/cpu_demo":  # a template, a folder, a run's output dir
            continue
        if not glob.glob(resolve(doc, ref)):
            missing.append(ref)
    assert not missing, f"{doc} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_and_anchor_resolves(doc):
    text, broken = read(doc), []
    for target, anchor in LINK.findall(text):
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target)) if target else os.path.join(ROOT, doc)
        if not os.path.exists(path):
            broken.append(target)
        elif anchor and path.endswith(".md"):
            with open(path, encoding="utf-8") as f:
                anchors = {slug(m) for m in re.findall(r"^#+ (.+)$", f.read(), re.M)}
            if anchor not in anchors:
                broken.append(f"{target}#{anchor}")
    assert not broken, f"{doc} links to what does not exist: {broken}"


def test_every_log_is_indexed():
    index = read("docs/README.md")
    unlisted = [p for p in sorted(os.listdir(os.path.join(ROOT, "docs", "runs"))) if f"`{p}`" not in index]
    assert not unlisted, f"docs/runs/ files missing from docs/README.md's index: {unlisted}"


def test_readme_states_the_real_size_of_train_gpt():
    with open(os.path.join(ROOT, "train_gpt.py"), "rb") as f:
        raw = f.read()
    lines = raw.decode("utf-8").split("\n")[:-1]
    stated = re.findall(r"`train_gpt\.py` is ([\d,]+) lines and ([\d,]+)\s+bytes", read("README.md"))
    assert stated, "README.md has no line 'train_gpt.py is N lines and M bytes'"
    assert [tuple(int(x.replace(",", "")) for x in s) for s in stated] == [(len(lines), len(raw))] * len(stated)
    assert len(lines) <= 1900 and len(raw) <= 105_000, (len(lines), len(raw))
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
    assert not long, f"train_gpt.py lines over 120 characters: {long}"


def test_readme_fits_a_ten_minute_read():
    raw = read("README.md").encode("utf-8")
    assert raw.count(b"\n") <= 220 and len(raw) <= 24_000, (raw.count(b"\n"), len(raw))
