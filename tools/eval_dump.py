"""The per-target values of an artifact's evaluation, as an .npz for offline study of the n-gram mixture: one
entry per target t = 1..N-1 with `pos`, `target`, the model's `nll_model`, `entropy` and `top_p`; the n-gram's
`order`, `count` (c(ctx)), `top` (the top continuation's count) and `p_ng`; the mixture's `alpha`, `trust` and
`nll_mixed`. Where no context matched (or NGRAM=0), `p_ng`, `alpha` and `trust` are NaN and `nll_mixed` is the
model's nll. The evaluation is train_gpt.py's own (run_final_eval, audit included, TTT with TTT=1), on the
artifact alone with the environment's knobs, as EVAL_ONLY runs it; under torchrun too. It also prints the
mixture's effect by n-gram order (`ngram_orders`: targets served, mean alpha, bits per byte gained).

    ARTIFACT_PATH=final_model.ptz DATA_PATH=... TOKENIZER_PATH=... python tools/eval_dump.py dump.npz
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as T  # noqa: E402


def write_dump(path: str, val: torch.Tensor, res: dict, tables: T.NgramTables | None) -> None:
    """`res`: a scored stream (train_gpt.stream_scores), mixed by train_gpt.ngram_mixture where `tables` are given."""
    cols, n = res["stream"], len(val)
    nan = torch.full_like(cols["nll"], math.nan)
    zeros = torch.zeros(n, dtype=torch.long, device=val.device)
    tables = tables or T.NgramTables(zeros, zeros.double(), zeros, zeros)  # NGRAM=0: no context matched
    mixer, alpha, trust = res.get("mixer"), nan, nan  # mixed: alpha and the trust at the matched positions
    if mixer is not None:
        alpha, trust = nan.index_put((mixer.pos,), res["alpha"]), nan.index_put((mixer.pos,), mixer.evidence.sigmoid())
    out = {"pos": torch.arange(n), "target": val, "nll_model": cols["nll"], "entropy": cols["entropy"],
           "top_p": cols["top_p"], "order": tables.order.long(), "count": tables.count, "top": tables.top,
           "p_ng": torch.where(tables.order > 0, tables.p, math.nan), "alpha": alpha,
           "nll_mixed": res.get("nll_mixed", cols["nll"]), "trust": trust}
    np.savez(path, **{k: v[1:].cpu().numpy() for k, v in out.items()})


def order_table(res: dict, tables: T.NgramTables) -> str:
    """Per n-gram order: the targets it served, their mean alpha and the bits per byte the mixture gained on them
    (of the whole stream's bytes): where the mixture pays or costs."""
    nll, parts = res["stream"]["nll"], []
    for o in sorted(set(tables.order.unique().tolist()) - {0}):
        m = tables.order == o
        gain = float((nll[m] - res["nll_mixed"][m]).sum()) / math.log(2) / res["bytes"]
        alpha = res["alpha"][tables.order[res["mixer"].pos] == o]  # res["alpha"]: at the matched positions
        parts.append(f"{o}:{int(m.sum())}/{float(alpha.mean()):.3f}/{gain:+.5f}")
    return "ngram_orders order:targets/mean_alpha/bpb_gain " + " ".join(parts)


def main(path: str) -> int:
    os.environ["EVAL_ONLY"] = "1"
    try:
        args = T.Hyperparameters(int(os.environ.get("WORLD_SIZE", "1")))
        rt = T.Runtime(args.device)
        sp = T.load_tokenizer(args.tokenizer_path, args.vocab_size)
        val = T.load_validation(args, rt)
        luts = tuple(torch.from_numpy(a).to(rt.device) for a in T.byte_luts(sp))
        model = T.load_artifact_model(args, rt)
    except T.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def log(msg: str = "", console: bool = True) -> None:
        if rt.master and console:
            print(msg, flush=True)

    _, base, mixed = T.run_final_eval(model, val, luts, args, rt, log, T.Deadline(args.eval_budget_seconds), {})
    tables = T.ngram_tables(val, args.vocab_size, args.ngram_min_order, args.ngram_max_order,
                            args.ngram_min_count) if mixed is not None else None
    if rt.master:
        write_dump(path, val, mixed or base, tables)
        if mixed is not None and "nll_mixed" in mixed:  # mixed (an incomplete pass is not)
            print(order_table(mixed, tables))
        print(f"eval_dump path:{path} tokens:{base['tokens']}")
    if rt.world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
