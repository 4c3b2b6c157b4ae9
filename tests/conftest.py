"""Shared fixtures: a generated corpus in the challenge's real shard format, a tiny configuration,
and helpers that run train_gpt.py as a subprocess (one process or torchrun with gloo)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_gpt.py")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import build_corpus  # noqa: E402

VOCAB = 512


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU; skipped, with the reason, where there is none")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

# A model small enough for a 2-core CPU; every architectural part stays switched on, the repeat too (off by
# default: README, levers). DEVICE=cpu so the suite computes the same things on a machine with a GPU; the `cuda`
# tests ask for the GPU themselves.
TINY = {
    "DEVICE": "cpu", "VOCAB_SIZE": str(VOCAB), "NUM_LAYERS": "2", "MODEL_DIM": "96", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "MLP_MULT": "2", "ROPE_DIMS": "8", "BIGRAM_VOCAB_SIZE": "64", "BIGRAM_DIM": "16", "RECUR_LAYERS": "0,1",
    "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "ITERATIONS": "10", "WARMUP_STEPS": "2",
    "WARMDOWN_ITERS": "5", "TRAIN_LOG_EVERY": "1", "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "16",
    "EVAL_BATCH_SEQS": "16", "NGRAM_AUDIT_POSITIONS": "32", "NGRAM_MIX_FIRST": "256", "NGRAM_MIX_CHUNK": "2048", "EMA_DECAY": "0.5", "MAX_WALLCLOCK_SECONDS": "0",
}


def tiny_args(**overrides):
    """A Hyperparameters built in-process from TINY (+ overrides), restoring the environment after."""
    import train_gpt
    saved = dict(os.environ)
    try:
        os.environ.update(TINY)
        os.environ.update({k: str(v) for k, v in overrides.items()})
        return train_gpt.Hyperparameters()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """1,500 generated documents (100 for validation), a 512-piece BPE with byte fallback, shards."""
    out = tmp_path_factory.mktemp("corpus")
    docs = build_corpus.synthetic_documents(1500, seed=0)
    info = build_corpus.build(docs, str(out), VOCAB, val_docs=100, shard_tokens=40_000)
    info.update(path=str(out), docs=docs, val_docs=docs[:100])
    return info


def script_env(corpus, cwd, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "PYTHONPATH", "LANG")}
    env.update(TINY)
    env.update(DATA_PATH=corpus["path"], TOKENIZER_PATH=corpus["tokenizer"], LOG_DIR=os.path.join(cwd, "logs"),
               ARTIFACT_PATH=os.path.join(cwd, "final_model.ptz"), SUBMISSION_PATH=os.path.join(cwd, "submission.json"),
               RUN_ID="test", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def command(script: str, nproc: int, *argv: str) -> list[str]:
    """How to run `script`: plain python, or (nproc > 1) torchrun with gloo on the CPU, under the NCCL contract
    (tests/nccl_contract.py), which stops the run on any collective NCCL would reject and records them all."""
    if nproc == 1:
        return [sys.executable, script, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            os.path.join(ROOT, "tests", "nccl_contract.py"), script, *argv]


def contract_record(cwd, nproc: int) -> dict:
    """The collectives a finished multi-process run made, {name: count}, after checking that every rank made
    the same ones in the same order with the same shapes and dtypes (NCCL hangs otherwise)."""
    import json
    records = [json.load(open(os.path.join(str(cwd), f"nccl_contract.rank{r}.json"))) for r in range(nproc)]
    for r, rec in enumerate(records[1:], 1):
        assert len(rec) == len(records[0]), f"rank {r} made {len(rec)} collectives, rank 0 {len(records[0])}"
        for i, (a, b) in enumerate(zip(records[0], rec)):
            assert a == b, f"collective {i}: rank 0 {a}, rank {r} {b}"
    counts = {}
    for name, *_ in records[0]:
        counts[name] = counts.get(name, 0) + 1
    return counts


def run_script(corpus, cwd, nproc: int = 1, timeout: int = 240, script: str = SCRIPT, argv=(),
               **overrides) -> subprocess.CompletedProcess:
    """Run train_gpt.py (or a tool) in `cwd` with the tiny config; nproc > 1 goes through torchrun (gloo on CPU)
    under the NCCL contract, and a successful run's record of collectives is checked and kept as `.collectives`."""
    proc = subprocess.run(command(script, nproc, *argv), cwd=str(cwd), env=script_env(corpus, str(cwd), **overrides),
                          capture_output=True, text=True, timeout=timeout)
    if nproc > 1 and proc.returncode == 0:
        proc.collectives = contract_record(cwd, nproc)
    return proc


FINAL_RE = re.compile(r"^final_(\w+) val_loss:(\S+) val_bpb:(\S+) tokens:(\d+) bytes:(\d+) coverage:(\S+) eval_ms:(\d+)$", re.M)


def finals(stdout: str) -> dict:
    """{kind: {val_loss, val_bpb, tokens, bytes, coverage, eval_ms}} from the fixed-format final lines."""
    out = {}
    for kind, loss, bpb, tokens, nbytes, cov, ms in FINAL_RE.findall(stdout):
        out[kind] = {"val_loss": float(loss), "val_bpb": float(bpb), "tokens": int(tokens), "bytes": int(nbytes),
                     "coverage": float(cov), "eval_ms": int(ms)}
    return out


def step_losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step:\d+/\d+ train_loss:(\S+)", stdout, re.M)]


@pytest.fixture(scope="session")
def trained_run(corpus, tmp_path_factory):
    """One tiny end-to-end run (train, export, round trip, sliding + n-gram eval, dump), shared by tests."""
    cwd = tmp_path_factory.mktemp("trained")
    proc = run_script(corpus, cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dump = run_script(corpus, cwd, script=os.path.join(ROOT, "tools", "eval_dump.py"), argv=[str(cwd / "dump.npz")])
    assert dump.returncode == 0, dump.stdout[-3000:] + dump.stderr[-3000:]
    return {"cwd": cwd, "stdout": proc.stdout, "finals": finals(proc.stdout), "artifact": cwd / "final_model.ptz",
            "dump": cwd / "dump.npz", "dump_finals": finals(dump.stdout),
            "dump_stdout": dump.stdout, "log": cwd / "logs" / "test.txt"}
