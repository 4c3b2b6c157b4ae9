"""Artifact size and export time of the full-size default model without training it.

    python tools/estimate_artifact.py            # default config from the environment (10L, 512 wide)

The script's own export (train_gpt.BudgetFit: calibration statistics, bisection, GPTQ, zstd-22) runs
on weights drawn to resemble trained ones. That is an assumption, stated here: a trained model's
compressed size depends on its weight statistics, which random draws only approximate. Two draws:
  - gaussian:  every matrix i.i.d. normal, rows scaled to RMS 1/sqrt(fan_in) (a Muon-trained matrix has a
               flat spectrum and roughly this RMS);
  - student-t: the same with Student-t (4 degrees of freedom) entries, the heavier tails seen in trained
               weights.
Vectors and scalars keep their init values; the embedding is N(0, 0.005^2) in both (stored fp16). The
calibration statistics come from one 2048-token sequence of random tokens (what it costs is real; the
Fisher of random text is not that of FineWeb). For each draw it prints the finest plan's size (every
tensor int6 at its clip-search step; what the export would write with no cap) and the fitted artifact.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402


def draw(model: train_gpt.GPT, kind: str, seed: int) -> None:
    torch.manual_seed(seed)  # the Chi2 draw uses the global generator
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not train_gpt.quant_levels(name, p):
                continue
            if kind == "gaussian":
                w = torch.randn(p.shape, generator=g)
            else:
                df = 4.0
                chi2 = torch.distributions.Chi2(df).sample(p.shape)
                w = torch.randn(p.shape, generator=g) / torch.sqrt(chi2 / df)
            p.copy_(w / w.pow(2).mean(dim=1, keepdim=True).sqrt() / p.shape[1] ** 0.5)


def main() -> None:
    args = train_gpt.Hyperparameters()
    torch.manual_seed(0)  # the embedding keeps its N(0, 0.005^2) init: fix it too
    model = train_gpt.GPT(args)
    n_params = sum(p.numel() for p in model.parameters())
    code_bytes = os.path.getsize(train_gpt.__file__)
    limit = args.artifact_limit_bytes - code_bytes
    print(f"model_params:{n_params} bytes_code:{code_bytes} limit_model:{limit} gptq:{int(args.export_gptq)}")
    rt = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext, sync=lambda: None,
                               all_reduce=lambda t, op=None: t)
    tokens = torch.randint(0, args.vocab_size, (1, args.train_seq_len), generator=torch.Generator().manual_seed(1))
    for kind in ("gaussian", "student-t"):
        draw(model, kind, seed=0)
        t0 = time.perf_counter()
        stats = train_gpt.calibrate(model, [(tokens, None)], rt, math.inf)
        t1 = time.perf_counter()
        fit = train_gpt.BudgetFit(model.state_dict(), stats)
        blob, info = fit.fit(limit, args.model_config(), args.export_gptq)
        t2 = time.perf_counter()
        finest = len(train_gpt.serialize_artifact(fit.quantize(math.exp(fit.bounds[0]), False), args.model_config()))
        print(f"weights:{kind} finest_bytes_model:{finest} bytes_model:{len(blob)} bytes_total:{code_bytes + len(blob)} "
              f"under_cap:{args.artifact_limit_bytes - code_bytes - len(blob)} passes:{info['passes']} "
              f"calibration_s:{t1 - t0:.1f} export_s:{t2 - t1:.1f} bytes_per_param:{len(blob) / n_params:.4f}", flush=True)


if __name__ == "__main__":
    main()
