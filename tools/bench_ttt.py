"""Speed of the score-first TTT pass (train_gpt.ttt_scores) on the model the environment configures (default:
the full-size record model, random weights), on made-up documents of FineWeb-like lengths, and what it
projects for the 62,021,846 validation tokens split over N ranks. Rank-independent by construction (every
rank runs the same code on its own batches), so one device's rate times N is the projection.

    python tools/bench_ttt.py                          # CPU or GPU; 64 documents
    python tools/bench_ttt.py --docs 256 --ranks 8     # on a GPU: a longer measurement

The first batch (allocation and, where used, compilation) is timed apart and counted once in the projection.
Then the audit's replay (train_gpt.ttt_audit_rows) of --audit positions drawn uniformly over the targets, one
rank's share of NGRAM_AUDIT_POSITIONS (256 / 8 = 32), as the eval replays them: its time is added once (every
rank replays its share at the same time).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as T  # noqa: E402

VAL_TOKENS = 62_021_846


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--mean-len", type=int, default=1240, help="mean document length (FineWeb val: ~1240 tokens)")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--audit", type=int, default=32, help="positions replayed (one rank's share of the audit)")
    a = ap.parse_args()
    args = T.Hyperparameters()
    args.ttt = True
    rt = T.Runtime(args.device)
    torch.manual_seed(0)
    model = T.GPT(args).to(rt.device).eval()
    with torch.no_grad():  # trained-looking scales rather than the zero-initialised projections
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    rng = np.random.default_rng(0)
    lengths = np.minimum(np.maximum(rng.exponential(a.mean_len, a.docs).astype(int), 2), 8 * a.mean_len)
    parts = [np.concatenate(([T.BOS_ID], rng.integers(2, args.vocab_size, n))) for n in lengths]
    val = torch.from_numpy(np.concatenate(parts)).to(rt.device)
    docs = T.documents(val)
    first = T.ttt_batches(docs, args.ttt_docs)[0]
    t0 = time.perf_counter()
    sub = torch.cat([val[docs[d][0]:docs[d][1]] for d in sorted(first)] + [val[-1:]])  # the first batch: warm-up
    T.ttt_scores(model, sub, args, rt, T.Deadline(0))
    rt.sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, adapted, _ = T.ttt_scores(model, val, args, rt, T.Deadline(0))
    rt.sync()
    secs = time.perf_counter() - t0
    picks = (rng.choice(len(val) - 1, size=min(a.audit, len(val) - 1), replace=False) + 1).tolist()
    t0 = time.perf_counter()
    T.ttt_audit_rows(model, val, picks, args, rt, adapted)
    rt.sync()
    replay = time.perf_counter() - t0
    rate = (len(val) - 1) / secs
    peak = f" peak_mib:{torch.cuda.max_memory_allocated() / 2**20:.0f}" if rt.is_cuda else ""
    print(f"device:{rt.device} params:{sum(p.numel() for p in model.parameters())} docs:{len(docs)} "
          f"tokens:{len(val) - 1} rank:{args.ttt_rank} chunk:{args.ttt_chunk} docs_per_batch:{args.ttt_docs} "
          f"warmup_s:{warm:.1f} pass_s:{secs:.1f} tok_s:{rate:.0f} us_per_token:{1e6 / rate:.1f}{peak}", flush=True)
    print(f"projection: {VAL_TOKENS} tokens on {a.ranks} ranks at this rate: {VAL_TOKENS / (a.ranks * rate) + warm:.0f} s "
          f"(warm-up counted once)", flush=True)
    print(f"replay: {len(picks)} audit positions in {replay:.1f} s (these documents; FineWeb's run longer)", flush=True)


if __name__ == "__main__":
    main()
