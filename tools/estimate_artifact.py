"""Artifact size and export time of the full-size default model without training it.

    python tools/estimate_artifact.py            # default config from the environment (10L, 512 wide)

The script's own export (train_gpt.BudgetFit: calibration statistics, bisection, GPTQ, zstd-22) runs
on weights drawn to resemble trained ones. That is an assumption, stated here: a trained model's
compressed size depends on its weight statistics, which random draws only approximate. Two draws:
  - gaussian:  every matrix i.i.d. normal, rows scaled to RMS 1/sqrt(fan_in) (a Muon-trained matrix has a
               flat spectrum and roughly this RMS);
  - student-t: the same with Student-t (4 degrees of freedom) entries, the heavier tails seen in trained
               weights.
Vectors, scalars and the embedding keep their init values (the embedding N(0, 0.005^2), fitted with the rest). The
calibration statistics come from one 2048-token sequence of random tokens (what it costs is real; the
Fisher of random text is not that of FineWeb). For each draw it prints the finest plan's size (every
tensor int8 at its clip-search step, the embedding fp16; what the export would write with no cap) and the
fitted artifact, then per group of tensors: the frames' real bytes, the fit's estimate of them (zstd level-1
frames, BudgetFit.estimate) and the order-0 entropy of the same streams (codes, low and high bytes of the fp16 part).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402
import inspect_artifact  # noqa: E402


def draw(model: train_gpt.GPT, kind: str, seed: int) -> None:
    torch.manual_seed(seed)  # the Chi2 draw uses the global generator
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not train_gpt.quant_levels(name, p) or name == "tok_emb.weight":
                continue
            if kind == "gaussian":
                w = torch.randn(p.shape, generator=g)
            else:
                df = 4.0
                chi2 = torch.distributions.Chi2(df).sample(p.shape)
                w = torch.randn(p.shape, generator=g) / torch.sqrt(chi2 / df)
            p.copy_(w / w.pow(2).mean(dim=1, keepdim=True).sqrt() / p.shape[1] ** 0.5)


def entropy_bytes(b: torch.Tensor) -> float:
    """Order-0 entropy of each byte plane, in bytes: the bound each group's frames are measured against."""
    total = 0.0
    for plane in b.contiguous().view(-1).view(torch.uint8).view(-1, b.element_size()).T:
        counts = torch.bincount(plane.long(), minlength=256).double()
        total += float((counts * (len(plane) / counts).log2()).nansum()) / 8
    return total


def by_group(info: dict, blob: bytes) -> str:
    """real / estimated / entropy bytes per group: mlp, attn, bigram, embed, other (tools/inspect_artifact.py's
    groups), and its real bits a weight."""
    out, sizes = {}, [4 + len(f) for f in train_gpt.split_frames(blob)[1:]]
    for (name, (kind, _, q, s)), size in zip(info["quantized"].items(), sizes):
        group = next((g for g, key in inspect_artifact.GROUPS if key in name), "other")
        # the fit's estimate of an int tensor (BudgetFit.estimate, before the rescale); fp16 tensors are measured
        estimate = size if s is None else 4 + len(train_gpt.tensor_frame(q, s, train_gpt.ZSTD_SIZING)[1])
        row = (size, estimate,
               4 + entropy_bytes(q) + (0 if s is None else entropy_bytes(s)), q.numel())
        out[group] = [a + b for a, b in zip(out.get(group, (0, 0, 0, 0)), row)]
    return " ".join(f"{g}:{r:.0f}/{e:.0f}/{h:.0f}({r / h:.4f},{8 * r / n:.3f}b)"
                    for g, (r, e, h, n) in sorted(out.items()))


def main() -> None:
    args = train_gpt.Hyperparameters()
    torch.manual_seed(0)  # the embedding keeps its N(0, 0.005^2) init: fix it too
    model = train_gpt.GPT(args)
    model.recur_on = bool(args.recur_layers)  # as a trained model ends, with the repeat on (calibration sees it)
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
        config = args.model_config(model.layer_order())
        blob, info = fit.fit(limit, config, args.export_gptq)
        t2 = time.perf_counter()
        finest = len(train_gpt.serialize_artifact(fit.quantize(math.exp(fit.bounds[0]), False), config))
        print(f"weights:{kind} finest_bytes_model:{finest} bytes_model:{len(blob)} "
              f"bytes_total:{code_bytes + len(blob)} under_cap:{args.artifact_limit_bytes - code_bytes - len(blob)} "
              f"passes:{info['passes']} c:{info['c']:.4e} calibration_s:{t1 - t0:.1f} export_s:{t2 - t1:.1f} "
              f"bytes_per_param:{len(blob) / n_params:.4f}", flush=True)
        print(f"  bytes real/estimate/entropy(real over entropy) {by_group(info, blob)}", flush=True)
        t3 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "a.ptz"), "wb") as f:
                f.write(blob)
            train_gpt.deserialize_artifact(os.path.join(d, "a.ptz"))
        print(f"  decode_s:{time.perf_counter() - t3:.2f}", flush=True)


if __name__ == "__main__":
    main()
