"""Build a small dataset in the challenge's real format: text -> SentencePiece BPE -> shards.

    python tools/build_corpus.py --out data/demo --synthetic 3000            # generated English-like text
    python tools/build_corpus.py --out data/mine --text a.txt b.txt          # your own files
    python tools/build_corpus.py --out data/docs --python-docs 24 --shuffle  # 24 MB of docstrings

--python-docs collects the docstrings (of at least 200 characters) of every module, class and function
in the Python installation that runs it, standard library first, then the installed packages: English
technical prose that any machine with Python has, the GPU machines included.

Documents: one per paragraph of each text file (paragraphs are separated by a blank line or by a
line holding only '%', the format of fortune(6) files). The first --val-docs documents
go to fineweb_val_000000.bin, the rest to fineweb_train_*.bin; each document is stored as
[BOS=1] + tokens, as the challenge's exporter does. The tokenizer uses the challenge's sp1024 trainer
options (BPE, byte fallback, split digits, nmt_nfkc, no dummy prefix, pad/bos/eos/unk = 0/1/2/3).
"""
from __future__ import annotations

import argparse
import ast
import multiprocessing
import os
import random
import re
import sysconfig

import numpy as np
import sentencepiece as spm

MAGIC, VERSION, BOS = 20240520, 1, 1

_SUBJECTS = ["the river", "a small dog", "my neighbour", "the old train", "every student", "the committee",
             "a quiet village", "the new library", "our teacher", "the weather", "this recipe", "the museum"]
_VERBS = ["opens", "remembers", "carries", "describes", "follows", "changes", "watches", "builds", "finds",
          "explains", "visits", "needs"]
_OBJECTS = ["the morning light", "three red apples", "a long letter", "the city walls", "an honest answer",
            "the winter market", "twelve blue chairs", "a forgotten song", "the bridge", "fresh bread"]
_TAILS = ["before noon", "in 1987", "after the storm", "with great care", "near the station", "every Sunday",
          "for 42 minutes", "without a word", "at 7:30 pm", "despite the rain"]
_EXOTIC = ["café", "naïve", "Zürich", "déjà vu", "São Paulo", "☃ snowman", "日本語", "emoji 🚀", "Ωmega", "ﬁne"]


def synthetic_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Deterministic English-like documents with digits, punctuation and some non-ASCII text (so the
    tokenizer needs byte-fallback pieces)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 9)):
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            if rng.random() < 0.08:
                s += f", said {rng.choice(_EXOTIC)}"
            sentences.append(s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?"]))
        docs.append(" ".join(sentences))
    return docs


def read_documents(paths: list[str]) -> list[str]:
    docs = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            docs += [p.strip() for p in re.split(r"\n[ \t]*\n|\n%\n", f.read()) if p.strip()]
    return docs


def _docstrings(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return [d.strip() for d in docs if d and len(d.strip()) >= 200]


def python_documents(max_mb: float) -> list[str]:
    """Distinct docstrings of the installed Python, in a fixed order, until max_mb MB of text."""
    paths = sysconfig.get_paths()
    files = []
    for root in [paths["stdlib"]] + sorted({paths["purelib"], paths["platlib"]}):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "test", "tests"))
            files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    docs, seen, size = [], set(), 0
    with multiprocessing.Pool() as pool:
        for found in pool.imap(_docstrings, files, chunksize=16):
            for d in found:
                if d not in seen:
                    seen.add(d)
                    docs.append(d)
                    size += len(d.encode("utf-8"))
            if size >= max_mb * 1e6:
                pool.terminate()
                break
    return docs


def train_tokenizer(docs: list[str], prefix: str, vocab_size: int) -> spm.SentencePieceProcessor:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
        character_coverage=0.999, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
        num_threads=2, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def write_shard(path: str, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (MAGIC, VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def encode_documents(sp: spm.SentencePieceProcessor, docs: list[str]) -> np.ndarray:
    out = []
    for ids in sp.encode(docs):
        out += [BOS] + ids
    return np.asarray(out, dtype=np.uint16)


def build(docs: list[str], out_dir: str, vocab_size: int, val_docs: int, shard_tokens: int) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    sp = train_tokenizer(docs[val_docs:] or docs, os.path.join(out_dir, f"tok_{vocab_size}_bpe"), vocab_size)
    val = encode_documents(sp, docs[:val_docs])
    train = encode_documents(sp, docs[val_docs:])
    write_shard(os.path.join(out_dir, "fineweb_val_000000.bin"), val)
    n_train = 0
    for i, start in enumerate(range(0, len(train), shard_tokens)):
        write_shard(os.path.join(out_dir, f"fineweb_train_{i:06d}.bin"), train[start:start + shard_tokens])
        n_train += 1
    return {"tokenizer": os.path.join(out_dir, f"tok_{vocab_size}_bpe.model"), "vocab_size": sp.vocab_size(),
            "val_tokens": len(val), "train_tokens": len(train), "train_shards": n_train}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder for shards and tokenizer")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", help="UTF-8 text files; paragraphs become documents")
    ap.add_argument("--shuffle", action="store_true", help="shuffle documents (seeded) before the val split")
    src.add_argument("--synthetic", type=int, help="number of generated documents")
    src.add_argument("--python-docs", type=float, metavar="MB", help="MB of docstrings of the installed Python")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--val-docs", type=int, default=200)
    ap.add_argument("--shard-tokens", type=int, default=10**8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.python_docs:
        docs = python_documents(a.python_docs)
    else:
        docs = read_documents(a.text) if a.text else synthetic_documents(a.synthetic, a.seed)
    if a.shuffle:
        random.Random(a.seed).shuffle(docs)
    if len(docs) <= a.val_docs:
        ap.error(f"only {len(docs)} documents: need more than --val-docs={a.val_docs}")
    info = build(docs, a.out, a.vocab_size, a.val_docs, a.shard_tokens)
    print(" ".join(f"{k}:{v}" for k, v in info.items()))


if __name__ == "__main__":
    main()
