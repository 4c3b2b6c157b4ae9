"""What score-first test-time training buys on one trained artifact: one sliding pass, then one TTT pass per
setting, each scored alone and under the learned n-gram mixture (orders 2-7): first the adapted pass itself, then
behind the switch (train_gpt.switched: the posterior-weighted average of the sliding and the adapted pass), which is
what an EVAL_ONLY run of train_gpt.py with those settings reports as final_ttt and final_ngram.

    EVAL_ONLY=1 ARTIFACT_PATH=run/final_model.ptz DATA_PATH=data TOKENIZER_PATH=data/tok.model \
    EVAL_SEQ_LEN=512 EVAL_STRIDE=256 DEVICE=cpu python tools/ttt_study.py --lrs 0 1e-4 3e-4

The environment configures the eval exactly as it configures train_gpt.py (TTT_RANK, TTT_CHUNK, TTT_DOCS, ...);
--lrs sets TTT_LR per pass (0: the document-wise eval of the base model, no adaptation). Two lines per pass:
its bpb and its difference from final_sliding (positive: TTT better), the same after the n-gram mixture, and
the pass's seconds and microseconds per token on this machine; then the same behind the switch, with its final weight.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as T  # noqa: E402
from ngram_study import sliding_pass  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.0, 1e-4])
    ap.add_argument("--cache", help="a file for the sliding pass's per-target scores: written once, read later")
    a = ap.parse_args()
    args, rt, val, luts, model, sliding = sliding_pass(a.cache)
    tables = T.ngram_tables(val, args.vocab_size, args.ngram_min_order, args.ngram_max_order, args.ngram_min_count)
    base_mixed = T.ngram_mixture(sliding, tables, args)["bpb_mixed"]
    print(f"sliding+ngram val_bpb:{base_mixed:.5f} documents:{len(T.documents(val))} "
          f"val_targets:{len(val) - 1}", flush=True)
    for lr in a.lrs:
        args.ttt_lr = lr
        t0 = time.perf_counter()
        buf, adapted, _ = T.ttt_scores(model, val, args, rt, T.Deadline(0))
        secs = time.perf_counter() - t0
        res = T.stream_scores(buf, val, luts, t0)
        assert res["complete"], "the TTT pass did not score every target"
        mixed = T.ngram_mixture(res, tables, args)["bpb_mixed"]
        sw = T.switched(sliding, res)
        sw_mixed = T.ngram_mixture(sw, tables, args)["bpb_mixed"]
        print(f"ttt lr:{lr:g} rank:{args.ttt_rank} chunk:{args.ttt_chunk} docs:{args.ttt_docs} "
              f"val_bpb:{res['bpb_model']:.5f} vs_sliding:{sliding['bpb_model'] - res['bpb_model']:+.5f} "
              f"ngram_bpb:{mixed:.5f} vs_sliding_ngram:{base_mixed - mixed:+.5f} adapted:{int((adapted > 0).sum())} "
              f"seconds:{secs:.0f} us_per_token:{1e6 * secs / (len(val) - 1):.0f}", flush=True)
        print(f"  switch val_bpb:{sw['bpb_model']:.5f} vs_sliding:{sliding['bpb_model'] - sw['bpb_model']:+.5f} "
              f"ngram_bpb:{sw_mixed:.5f} vs_sliding_ngram:{base_mixed - sw_mixed:+.5f} "
              f"final_weight:{float(T.torch.sigmoid(sw['switch_evidence'][-1])):.4f}", flush=True)


if __name__ == "__main__":
    main()
