"""Time of one training step of the model the environment configures (default: the full-size record
model), on random tokens, split into forward+backward and optimizer (Muon + AdamW) time; and, with
--muon, train_gpt.Muon against torch.optim.Muon on that model's matrices and the same gradients.

    python tools/bench_step.py                       # 1 sequence of 2048 tokens, 2 steps, CPU or GPU
    python tools/bench_step.py --seqs 48 --steps 5   # a 98,304-token micro-batch (8xH100 record: 1 per rank)
    python tools/bench_step.py --muon --steps 1      # the two Muons: ms and aten ops per step

On CUDA it uses bf16 autocast and, with --compile, torch.compile, as train_gpt.py does; the first step
includes compilation and is reported separately. The op count is the number of aten operators the
step dispatches (on a GPU, about the number of kernel launches).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def compare_muon(model: train_gpt.GPT, args, rt, steps: int) -> None:
    params = train_gpt.param_groups(model)["muon"]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opts = {"ours": train_gpt.Muon(ours, lr=args.matrix_lr, weight_decay=args.muon_wd, momentum=0.95),
            "torch": torch.optim.Muon(ref, lr=args.matrix_lr, weight_decay=args.muon_wd, momentum=0.95,
                                      nesterov=True, adjust_lr_fn="original")}
    print(f"muon matrices:{len(params)} shapes:{len({p.shape for p in params})} "
          f"elements:{sum(p.numel() for p in params)}", flush=True)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps + 1):  # step 0 warms up (compilation on CUDA) and is not reported
        grads = [torch.randn(p.shape, generator=gen).to(rt.device) for p in params]
        for name, opt in opts.items():
            for p, g in zip(opt.param_groups[0]["params"], grads):
                p.grad = g.clone()
            counter = CountOps()
            rt.sync()
            t0 = time.perf_counter()
            with counter:
                opt.step()
            rt.sync()
            if step:
                print(f"step:{step} muon:{name} ms:{1000 * (time.perf_counter() - t0):.1f} ops:{counter.count}", flush=True)
    diff = max(float((a.detach() - b.detach()).abs().max() / (a.detach().abs().max() + 1e-12)) for a, b in zip(ours, ref))
    print(f"max relative difference of the parameters after {steps + 1} steps: {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--muon", action="store_true", help="compare train_gpt.Muon with torch.optim.Muon")
    a = ap.parse_args()
    args = train_gpt.Hyperparameters()
    rt = train_gpt.Runtime(args.device)
    torch.manual_seed(0)
    model = train_gpt.GPT(args).to(rt.device)
    if a.muon:
        compare_muon(model, args, rt, a.steps)
        return
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
