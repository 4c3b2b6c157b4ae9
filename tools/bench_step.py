"""Time of one training step of the model the environment configures (default: the full-size record
model), on random tokens, split into forward+backward and optimizer (Muon + AdamW) time.

    python tools/bench_step.py                       # 1 sequence of 2048 tokens, 2 steps, CPU or GPU
    python tools/bench_step.py --seqs 48 --steps 5   # a 98,304-token micro-batch (8xH100 record: 1 per rank)

On CUDA it uses bf16 autocast and, with --compile, torch.compile, as train_gpt.py does; the first step
includes compilation and is reported separately.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    args = train_gpt.Hyperparameters()
    rt = train_gpt.Runtime(args.device)
    torch.manual_seed(0)
    model = train_gpt.GPT(args).to(rt.device)
    optimizers = train_gpt.build_optimizers(model, args)
    fwd = torch.compile(model, fullgraph=True) if a.compile else model
    x = torch.randint(0, args.vocab_size, (a.seqs, args.train_seq_len), device=rt.device)
    y = torch.randint(0, args.vocab_size, (a.seqs, args.train_seq_len), device=rt.device)
    print(f"device:{rt.device} params:{sum(p.numel() for p in model.parameters())} tokens_per_step:{x.numel()}")
    for step in range(a.steps):
        rt.sync()
        t0 = time.perf_counter()
        with rt.autocast():
            loss = fwd(x, y)
        loss.backward()
        rt.sync()
        t1 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        rt.sync()
        t2 = time.perf_counter()
        print(f"step:{step} loss:{loss.item():.4f} fwd_bwd_ms:{1000 * (t1 - t0):.0f} optimizer_ms:{1000 * (t2 - t1):.0f} "
              f"total_ms:{1000 * (t2 - t0):.0f}{' (includes compilation)' if step == 0 and a.compile else ''}", flush=True)
    if rt.is_cuda:
        print(f"peak_memory_mib:{torch.cuda.max_memory_allocated() / 2**20:.0f}")


if __name__ == "__main__":
    main()
