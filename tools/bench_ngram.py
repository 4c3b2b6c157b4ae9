"""Benchmark of the exact n-gram precompute (train_gpt.ngram_tables): tokens/s and peak memory.

    python tools/bench_ngram.py                      # 1M and 10M tokens on the CPU
    python tools/bench_ngram.py --tokens 62021846 --device cuda    # the full val split's size on a GPU

The stream is drawn from a Zipf-like law over the vocabulary, with repeated spans copied from
earlier in the stream so that deep contexts match as they do in web text; the sort-based work is
O(N log N) whatever the match rate. Peak memory is the process's max RSS growth on the CPU and
torch's peak allocation on CUDA.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402


def zipf_stream(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, vocab + 1) ** 1.1
    tokens = rng.choice(vocab, size=n, p=probs / probs.sum())
    for _ in range(n // 2000):  # copy spans forward: repeated phrases
        length = int(rng.integers(8, 64))
        src, dst = rng.integers(0, n - length, size=2)
        if src < dst:
            tokens[dst:dst + length] = tokens[src:src + length]
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    for n in a.tokens:
        tokens = torch.from_numpy(zipf_stream(n, a.vocab)).to(device)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        order, _ = train_gpt.ngram_tables(tokens, a.vocab, 2, 7, 2)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
        matched = float((order[1:] > 0).float().mean())
        print(f"tokens:{n} device:{a.device} seconds:{seconds:.2f} tokens_per_s:{n / seconds:.0f} "
              f"peak_mem_mib:{peak / 2**20:.0f} matched_frac:{matched:.3f}", flush=True)


if __name__ == "__main__":
    main()
