"""Artifact size of the full-size default model without training it.

    python tools/estimate_artifact.py            # default config from the environment (10L, 512 wide)

The script's own export (quantize_state + serialize_artifact, zstd-22) runs on weights drawn to
resemble trained ones. That is an assumption, stated here: a trained model's compressed size depends
on its weight statistics, which random draws only approximate. Two draws bracket it:
  - gaussian:  every matrix i.i.d. normal, rows scaled to RMS 1/sqrt(fan_in) (a Muon-trained matrix has a
               flat spectrum and roughly this RMS);
  - student-t: the same with Student-t (4 degrees of freedom) entries, the heavier tails seen in trained
               weights; per-row clipping then leaves most values near zero, which zstd packs tighter.
Vectors and scalars keep their init values; the embedding is N(0, 0.005^2) in both (stored fp16).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402


def draw(model: train_gpt.GPT, kind: str, seed: int) -> None:
    torch.manual_seed(seed)  # the Chi2 draw uses the global generator
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2 or name == "tok_emb.weight" or p.numel() <= train_gpt.FP16_MAX_ELEMENTS:
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
    with open(train_gpt.__file__, "rb") as f:
        code_bytes = len(f.read())
    print(f"model_params:{n_params} bytes_code:{code_bytes}")
    for kind in ("gaussian", "student-t"):
        draw(model, kind, seed=0)
        blob = train_gpt.serialize_artifact(train_gpt.quantize_state(model.state_dict()), args.model_config())
        total = code_bytes + len(blob)
        print(f"weights:{kind} bytes_model:{len(blob)} bytes_total:{total} bytes_per_param:{len(blob) / n_params:.4f} "
              f"headroom:{args.artifact_limit_bytes - total}")


if __name__ == "__main__":
    main()
