"""Probe for issue 19's packing: zstd-22 frame bytes over the codes' order-0 entropy, one byte per code (today's
layout) against magnitudes (int5: two 4-bit magnitudes a byte) + sign bits of the nonzero codes, each stream in
blocks of its own, on random 1536x512 rows (gaussian and student-t(4), per-row scale 0.5-1.5) at four step sizes
(the row's max / qmax / coarse). Usage: python tools/packing_probe.py
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt  # noqa: E402


def entropy_bytes(x: np.ndarray) -> float:
    _, counts = np.unique(x, return_counts=True)
    return float(-(counts * np.log2(counts / counts.sum())).sum() / 8)


def main() -> None:
    torch.manual_seed(0)
    for dist in ("gauss", "student"):
        w = torch.randn(1536, 512) if dist == "gauss" else torch.distributions.StudentT(4.0).sample((1536, 512))
        w = w * (0.5 + torch.rand(1536, 1))
        for qmax in (15, 31):
            for coarse in (1.0, 0.5, 0.25, 0.12):
                step = w.abs().amax(1) / qmax / coarse
                q = torch.clamp(torch.round(w / step[:, None]), -qmax, qmax).to(torch.int8).numpy().ravel()
                h = entropy_bytes(q)
                today = len(train_gpt.zstd_frame([q.tobytes()]))
                mag, nonzero = np.abs(q).astype(np.uint8), q != 0
                signs = np.packbits(q[nonzero] < 0).tobytes()
                if qmax == 15:
                    mag = np.append(mag, np.uint8(0)) if len(mag) % 2 else mag
                    mag = (mag[0::2] << 4 | mag[1::2]).astype(np.uint8)
                packed = len(train_gpt.zstd_frame([mag.tobytes(), signs]))  # signs first cost up to 10%: see the log
                print(f"{dist:8s} int{5 if qmax == 15 else 6} coarse={coarse:<5} zeros={1 - nonzero.mean():.3f} "
                      f"entropy_bytes={h:9.0f} one_byte_a_code={today / h:.4f} "
                      f"{'nibble_pairs' if qmax == 15 else 'magnitudes'}+signs={packed / h:.4f}")


if __name__ == "__main__":
    main()
