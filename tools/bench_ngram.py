"""Benchmark of the exact n-gram precompute (train_gpt.ngram_tables) and of the learned mixer
(train_gpt.ngram_mixture, on made-up model scores): seconds, tokens/s and peak memory.

    python tools/bench_ngram.py                      # 1M and 10M tokens on the CPU, orders 2-7 and 2-16
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
    ap.add_argument("--max-orders", type=int, nargs="+", default=[7, 16])
    a = ap.parse_args()
    device = torch.device(a.device)
    for n in a.tokens:
        tokens = torch.from_numpy(zipf_stream(n, a.vocab)).to(device)
        for max_order in a.max_orders:
            os.environ["NGRAM_MAX_ORDER"] = str(max_order)
            args = train_gpt.Hyperparameters()
            tables, seconds, peak = timed(device, lambda: train_gpt.ngram_tables(tokens, a.vocab, 2, max_order, 2))
            matched = float((tables.order[1:] > 0).float().mean())
            print(f"tokens:{n} device:{a.device} orders:2-{max_order} precompute_s:{seconds:.2f} "
                  f"tokens_per_s:{n / seconds:.0f} peak_mem_mib:{peak / 2**20:.0f} matched_frac:{matched:.3f}", flush=True)
            g = torch.Generator().manual_seed(0)
            cols = {k: torch.rand(n, generator=g, dtype=torch.float64).to(device) * s for k, s in
                    (("nll", 6.0), ("entropy", 6.0), ("top_p", 1.0))}
            res = {"stream": cols, "tokens": n - 1, "bytes": 3 * n}
            mixed, seconds, peak = timed(device, lambda: train_gpt.ngram_mixture(res, tables, args))
            print(f"tokens:{n} device:{a.device} orders:2-{max_order} learned_mixer_s:{seconds:.2f} "
                  f"refits:{len(mixed['mixer'].weights) - 1} peak_mem_mib:{peak / 2**20:.0f}", flush=True)
            tables = mixed = None  # free them before the next order


def timed(device: torch.device, fn):
    """fn's result, its seconds and its peak memory: the process's max RSS growth on the CPU (0 once an
    earlier call went higher), torch's peak allocation on CUDA."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    return out, seconds, peak


if __name__ == "__main__":
    main()
