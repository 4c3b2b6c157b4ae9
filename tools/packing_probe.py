"""Probe for issue 19's packing: each of train_gpt's code layouts (code_layouts), framed at the export's zstd
settings, over the codes' order-0 entropy, on random 1536x512 rows (gaussian and student-t(4), per-row scale
0.5-1.5) at four step sizes (the row's max / qmax / coarse). Usage: python tools/packing_probe.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt  # noqa: E402
from estimate_artifact import entropy_bytes  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    for dist in ("gauss", "student"):
        w = torch.randn(1536, 512) if dist == "gauss" else torch.distributions.StudentT(4.0).sample((1536, 512))
        w = w * (0.5 + torch.rand(1536, 1))
        for qmax in (15, 31):
            for coarse in (1.0, 0.5, 0.25, 0.12):
                step = w.abs().amax(1) / qmax / coarse
                q = torch.clamp(torch.round(w / step[:, None]), -qmax, qmax).to(torch.int8)
                h = entropy_bytes(q)
                ratios = {k: len(train_gpt.zstd_frame(v)) / h for k, v in train_gpt.code_layouts(q).items()}
                zeros = float((q == 0).float().mean())
                print(f"{dist:8s} int{5 if qmax == 15 else 6} coarse={coarse:<5} zeros={zeros:.3f} "
                      f"bits_a_code={8 * h / q.numel():.3f} " + " ".join(f"{k}={r:.4f}" for k, r in ratios.items()))


if __name__ == "__main__":
    main()
