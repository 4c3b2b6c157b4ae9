"""What the budget fit chose, read back from an artifact: one line a tensor (its layout, its range: int5 to int8
or fp16, its frame's bytes, its bits a weight, the rows kept in fp16 and whether it moved from the range it starts
in), then the bits a weight of each group of tensors. train_gpt.py's export line gives the totals only.

    python tools/inspect_artifact.py final_model.ptz
"""
from __future__ import annotations

import math
import os
import sys

import torch
import zstandard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402

GROUPS = (("mlp", ".mlp."), ("attn", ".attn."), ("bigram", "bigram."), ("embed", "tok_emb."))  # else "other"


def inspect(path: str) -> list[dict]:
    """A row a tensor: name, group, layout, qmax (0: fp16), bytes (its frame and length field), numel, the rows
    kept in fp16 (a step of 0) and `moved`: up the ladder from train_gpt.quant_levels' range, or with fp16 rows."""
    header, frames = train_gpt.read_artifact(path)
    rows = []
    for (name, layout, qmax, shape), frame in zip(header["tensors"], frames):
        numel, fp16_rows = math.prod(shape), 0
        if layout != "fp16":
            raw = zstandard.ZstdDecompressor().decompress(frame)
            _, pos = train_gpt.read_codes(raw, layout, numel)  # then fp16: a step a row, the fp16 rows' values
            fp16_rows = ((len(raw) - pos) // 2 - shape[0]) // shape[1]
        start = train_gpt.quant_levels(name, torch.empty(shape, device="meta"))
        rows.append(dict(name=name, group=next((g for g, key in GROUPS if key in name), "other"), layout=layout,
                         qmax=qmax, bytes=4 + len(frame), numel=numel, fp16_rows=fp16_rows,
                         moved=qmax != start or fp16_rows > 0))
    return rows


def group_bits(rows: list[dict]) -> dict[str, float]:
    totals = {}
    for r in rows:
        b, n = totals.get(r["group"], (0, 0))
        totals[r["group"]] = (b + r["bytes"], n + r["numel"])
    return {g: 8 * b / n for g, (b, n) in sorted(totals.items())}


def main(path: str) -> int:
    try:
        rows = inspect(path)
    except train_gpt.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        rng = f"int{train_gpt.QMAX_LADDER.index(r['qmax']) + 5}" if r["qmax"] else "fp16"
        print(f"{r['name']} layout:{r['layout']} range:{rng} bytes:{r['bytes']} "
              f"bits_per_weight:{8 * r['bytes'] / r['numel']:.3f} fp16_rows:{r['fp16_rows']}" + r["moved"] * " moved")
    print("bits_per_weight " + " ".join(f"{g}:{v:.3f}" for g, v in group_bits(rows).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
