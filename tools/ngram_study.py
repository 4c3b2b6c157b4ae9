"""What the n-gram mixture buys on one trained artifact, for several mixers and orders, from one pass.

    EVAL_ONLY=1 ARTIFACT_PATH=run/final_model.ptz DATA_PATH=data TOKENIZER_PATH=data/tok.model \
    EVAL_SEQ_LEN=512 EVAL_STRIDE=256 DEVICE=cpu python tools/ngram_study.py --max-orders 7 16

The environment configures the eval exactly as it configures train_gpt.py. The sliding pass runs once
(train_gpt.evaluate; with --cache, its per-target scores are kept for the next run of the same setup); the n-gram tables and the mixture (train_gpt.ngram_tables, ngram_mixture) are
then computed for each mixer (fixed entropy alpha, learned) and each NGRAM_MAX_ORDER, as an EVAL_ONLY
run of train_gpt.py with those settings would compute them after the same pass. One line per
setting: final_ngram's bpb, its gain over final_sliding (negative: the mixture costs), the mean alpha
over matched targets, and the precompute and mixing seconds. Run train_gpt.py itself with a setting to
see its audit and final lines (the bpb must match this tool's line for that setting).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as T  # noqa: E402


def sliding_pass(cache: str | None):
    """The environment's eval setup, the artifact's model and its sliding pass (read from `cache` if there)."""
    args = T.Hyperparameters()
    rt = T.Runtime(args.device)
    sp = T.load_tokenizer(args.tokenizer_path, args.vocab_size)
    val = T.load_validation(args, rt)
    luts = tuple(torch.from_numpy(x).to(rt.device) for x in T.byte_luts(sp))
    model = T.load_artifact_model(args, rt)
    if cache and os.path.exists(cache):
        res = torch.load(cache, map_location=rt.device)
    else:
        res = T.evaluate(model, val, luts, args, rt, seq_len=args.eval_seq_len,
                         stride=args.eval_stride, deadline=T.Deadline(0))
        if cache:
            torch.save(res, cache)
    print(T.final_line("sliding", res), flush=True)
    return args, rt, val, luts, model, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-orders", type=int, nargs="+", default=[7, 16])
    ap.add_argument("--mixers", nargs="+", default=["fixed", "learned"])
    ap.add_argument("--cache", help="a file for the pass's per-target scores: written once, read on later runs")
    a = ap.parse_args()
    args, rt, val, luts, _, res = sliding_pass(a.cache)
    for max_order in a.max_orders:
        t0 = time.perf_counter()
        tables = T.ngram_tables(val, args.vocab_size, args.ngram_min_order, max_order, args.ngram_min_count)
        rt.sync()
        precompute_s = time.perf_counter() - t0
        matched = tables.order > 0
        for mixer in a.mixers:
            args.ngram_max_order, args.ngram_mixer = max_order, mixer
            mixed = T.ngram_mixture(res, tables, args)
            print(f"mixer:{mixer} orders:{args.ngram_min_order}-{max_order} val_bpb:{mixed['bpb_mixed']:.5f} "
                  f"gain:{res['bpb_model'] - mixed['bpb_mixed']:+.5f} matched:{float(matched[1:].double().mean()):.3f} "
                  f"mean_alpha:{float(mixed['alpha'].mean()):.3f} precompute_s:{precompute_s:.2f} "
                  f"mix_s:{mixed['mix_ms'] / 1000:.2f}", flush=True)


if __name__ == "__main__":
    main()
