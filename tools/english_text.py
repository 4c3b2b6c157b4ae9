"""Plain English prose from installed Debian documentation, for tools/english_corpora.sh.

    python3 tools/english_text.py html OUT.txt FILE.html...   # HTML pages -> paragraphs
    python3 tools/english_text.py man OUT.txt FILE.N.gz...    # man pages (rendered by man(1)) -> paragraphs
    python3 tools/english_text.py split --val-bytes N FILE... # the --val-docs whose val split holds >= N bytes
    python3 tools/english_text.py split --val-docs N FILE...  # the text bytes of the split build_corpus makes
    python3 tools/english_text.py val-bytes DATA_DIR          # UTF-8 bytes of the val shard, decoded

Every output file holds one paragraph per line, paragraphs separated by a blank line, which is how
tools/build_corpus.py splits documents. Paragraphs are whitespace-collapsed; those under --min-chars
(80) characters, or with too few letters (tables of symbols, code) are dropped, and so is any
paragraph already written by an earlier call into the same --seen file (boilerplate, pages that a
package ships twice). Code listings (<pre>), navigation, tables of contents, function signatures and
the SYNOPSIS / EXAMPLES / SEE ALSO / COLOPHON sections of man pages are left out.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import multiprocessing
import os
import random
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BLOCK_TAGS = {"p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th", "tr", "table",
              "blockquote", "section", "ul", "ol", "dl", "caption", "title", "br", "hr", "figure",
              "figcaption", "article", "main", "aside", "body"}
SKIP_TAGS = {"pre", "script", "style", "head", "nav", "form", "svg", "button", "select", "textarea", "noscript"}
SKIP_CLASSES = {"navheader", "navfooter", "toc", "docnav", "related", "sphinxsidebar", "footer", "mobile-nav",
                "menu-wrapper", "headerlink", "highlight", "sig", "indexterm", "toc-backref", "contents",
                "sphinxsidebarwrapper", "version_switcher_placeholder", "language_switcher_placeholder",
                "programlisting", "screen", "synopsis", "funcsynopsis", "cmdsynopsis", "literallayout"}
SKIP_IDS = {"banner", "title", "site-footer", "searchbox"}
VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "param", "source",
             "track", "wbr"}
MAN_SKIP_SECTIONS = {"SYNOPSIS", "EXAMPLE", "EXAMPLES", "SEE ALSO", "COLOPHON", "AUTHOR", "AUTHORS",
                     "COPYRIGHT", "REPORTING BUGS", "ATTRIBUTES", "NAME", "LIBRARY", "FILES"}


class _Text(html.parser.HTMLParser):
    """Paragraph texts of one HTML page. Where the page marks a main region (role="main", Sphinx), only
    the text inside it counts; skipped elements are dropped with everything they contain."""

    def __init__(self, main_only: bool):
        super().__init__(convert_charrefs=True)
        self.main_only = main_only
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skips, opens main)
        self.skip_depth = 0
        self.main_depth = 0
        self.parts: list[str] = []
        self.paragraphs: list[str] = []

    def flush(self) -> None:
        text = " ".join("".join(self.parts).split())
        if text:
            self.paragraphs.append(text)
        self.parts = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skips = tag in SKIP_TAGS or bool(classes & SKIP_CLASSES) or a.get("id") in SKIP_IDS \
            or a.get("role") in ("navigation", "search")
        main = a.get("role") == "main"
        if tag in BLOCK_TAGS and not self.skip_depth:
            self.flush()
        if tag in VOID_TAGS:
            return
        self.stack.append((tag, skips, main))
        self.skip_depth += skips
        self.main_depth += main

    def handle_startendtag(self, tag, attrs):
        if tag in BLOCK_TAGS and not self.skip_depth:
            self.flush()

    def handle_endtag(self, tag):
        if tag in VOID_TAGS or not any(t == tag for t, _, _ in self.stack):
            return  # a stray end tag: ignore it rather than unwind the stack
        while self.stack:
            t, skips, main = self.stack.pop()
            self.skip_depth -= skips
            self.main_depth -= main
            if t == tag:
                break
        if tag in BLOCK_TAGS and not self.skip_depth:
            self.flush()

    def handle_data(self, data):
        if not self.skip_depth and (self.main_depth or not self.main_only):
            self.parts.append(data)


def html_paragraphs(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        page = f.read()
    parser = _Text(main_only='role="main"' in page)
    parser.feed(page)
    parser.close()
    parser.flush()
    return parser.paragraphs


_OVERSTRIKE = re.compile(r".\x08")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def man_paragraphs(path: str) -> list[str]:
    """man(1) renders the page (wide, unhyphenated, unjustified); sections are the unindented heading
    lines, paragraphs the blank-line-separated runs of indented lines."""
    with gzip.open(path, "rt", errors="replace") if path.endswith(".gz") else open(path, errors="replace") as f:
        if f.read(4) == ".so ":
            return []  # a link to another page, which is rendered on its own
    env = dict(os.environ, MANWIDTH="2000", MAN_KEEP_FORMATTING="0", LC_ALL="C.UTF-8")
    try:
        out = subprocess.run(["man", "--nh", "--nj", "-l", path], capture_output=True, env=env, timeout=120,
                             check=False).stdout.decode("utf-8", errors="replace")
    except subprocess.TimeoutExpired:
        return []
    lines = [_ANSI.sub("", _OVERSTRIKE.sub("", line)).rstrip() for line in out.splitlines()]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    lines = lines[1:-1]  # the page's header and footer lines
    paragraphs, current, section = [], [], ""
    for line in lines + [""]:
        if line and not line[0].isspace():  # a section heading
            if current and section not in MAN_SKIP_SECTIONS:
                paragraphs.append(" ".join(current))
            current, section = [], line.strip()
            continue
        if not line.strip():
            if current and section not in MAN_SKIP_SECTIONS:
                paragraphs.append(" ".join(current))
            current = []
            continue
        current.append(" ".join(line.split()))
    return paragraphs


def is_prose(p: str, min_chars: int) -> bool:
    if len(p) < min_chars:
        return False
    letters = sum(c.isalpha() for c in p)
    spaces = p.count(" ")
    words = p.split()
    if (letters + spaces) / len(p) < 0.82 or spaces / len(p) < 0.08:
        return False  # symbols, code, tables of numbers, long identifiers
    wordy = sum(1 for w in words if w.strip(".,;:()\"'!?").isalpha())
    return wordy / len(words) >= 0.6


def write_paragraphs(kind: str, out: str, paths: list[str], seen_path: str | None, min_chars: int, jobs: int) -> None:
    fn = html_paragraphs if kind == "html" else man_paragraphs
    paths = [p for p in paths if os.path.isfile(p)]  # dpkg -L also lists folders (some named *.html)
    seen = set()
    if seen_path and os.path.exists(seen_path):
        with open(seen_path) as f:
            seen = set(f.read().split())
    kept, dropped, dup, nbytes = 0, 0, 0, 0
    new_keys = []
    with multiprocessing.Pool(jobs) as pool, open(out, "w", encoding="utf-8") as f:
        for paragraphs in pool.imap(fn, sorted(paths), chunksize=8):
            for p in paragraphs:
                if not is_prose(p, min_chars):
                    dropped += 1
                    continue
                key = hashlib.sha1(p.lower().encode("utf-8")).hexdigest()[:20]
                if key in seen:
                    dup += 1
                    continue
                seen.add(key)
                new_keys.append(key)
                f.write(p + "\n\n")
                kept += 1
                nbytes += len(p.encode("utf-8"))
    if seen_path:
        with open(seen_path, "a") as f:
            f.write("".join(k + "\n" for k in new_keys))
    print(f"{os.path.basename(out)}: files:{len(paths)} paragraphs:{kept} bytes:{nbytes} "
          f"dropped_not_prose:{dropped} dropped_duplicate:{dup}")


def split_info(paths: list[str], val_docs: int | None, val_bytes: int | None, seed: int) -> None:
    """Replay build_corpus.py's reading and seeded shuffle exactly: with --val-bytes, the smallest
    --val-docs whose val split holds at least that many bytes of text; then the split's sizes."""
    from build_corpus import read_documents
    docs = read_documents(paths)
    random.Random(seed).shuffle(docs)
    sizes = [len(d.encode("utf-8")) for d in docs]
    if val_docs is None:
        total, val_docs = 0, 0
        while total < val_bytes:
            if val_docs == len(docs):
                sys.exit(f"error: the documents hold only {total} bytes, fewer than --val-bytes={val_bytes}")
            total += sizes[val_docs]
            val_docs += 1
    print(f"val_docs:{val_docs} val_text_bytes:{sum(sizes[:val_docs])} train_docs:{len(docs) - val_docs} "
          f"train_text_bytes:{sum(sizes[val_docs:])}")


def val_bytes(data_dir: str) -> None:
    """UTF-8 bytes of the val shard decoded document by document: the text after the tokenizer's NFKC
    normalization, which is what train_gpt.py's byte count (its `bytes:` field) measures."""
    import glob

    import numpy as np
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=glob.glob(os.path.join(data_dir, "tok_*_bpe.model"))[0])
    tokens = np.fromfile(os.path.join(data_dir, "fineweb_val_000000.bin"), dtype="<u2", offset=1024)
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    docs = [tokens[a + 1:b].tolist() for a, b in zip(starts, starts[1:])]
    decoded = sum(len(t.encode("utf-8")) for t in sp.decode(docs))
    print(f"val_docs:{len(docs)} val_tokens:{len(tokens)} val_bytes_decoded:{decoded}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for kind in ("html", "man"):
        p = sub.add_parser(kind)
        p.add_argument("out")
        p.add_argument("paths", nargs="+")
        p.add_argument("--seen", help="file of paragraph hashes shared across calls (for dropping duplicates)")
        p.add_argument("--min-chars", type=int, default=80)
        p.add_argument("--jobs", type=int, default=2)
    p = sub.add_parser("split")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--val-docs", type=int)
    g.add_argument("--val-bytes", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("paths", nargs="+")
    p = sub.add_parser("val-bytes")
    p.add_argument("data_dir")
    a = ap.parse_args()
    if a.cmd in ("html", "man"):
        write_paragraphs(a.cmd, a.out, a.paths, a.seen, a.min_chars, a.jobs)
    elif a.cmd == "split":
        split_info(a.paths, a.val_docs, a.val_bytes, a.seed)
    else:
        val_bytes(a.data_dir)


if __name__ == "__main__":
    main()
