"""The export's trade-off, measured: bytes, round-trip penalty and export time of one trained model under
the previous export (per-row clip search at int5/int6, one zstd frame: train_gpt.py at --baseline-rev)
and under the budget-fit export, at the previous export's size and at 90% and 75% of it.

    python tools/export_study.py --baseline-rev 0c84de6     # model, data and training time from the env

It trains the model the environment configures exactly as train_gpt.py does (warm-up, wall-clock
budget, EMA, calibration), scores the trained weights with a plain pass over the validation split
(final_prequant), then for every scheme and size exports, rebuilds a model from the artifact and scores
it the same way. The penalty is roundtrip - prequant in bits per byte. Schemes of the new export:
  uniform      every weight counts the same (no statistics), plain rounding
  fisher       steps from the calibration's Fisher information, plain rounding
  fisher+gptq  the same steps, error-compensating rounding (the default export)
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt as T  # noqa: E402


def baseline_module(rev: str):
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:train_gpt.py"], check=True, capture_output=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "train_gpt_baseline.py")
    with open(path, "wb") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("train_gpt_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", required=True, help="git revision whose train_gpt.py holds the previous export")
    a = ap.parse_args()
    args = T.Hyperparameters()
    rt = T.Runtime(args.device)
    sp = T.load_tokenizer(args.tokenizer_path, args.vocab_size)
    luts = tuple(torch.from_numpy(x).to(rt.device) for x in T.byte_luts(sp))
    val = T.load_validation(args, rt)

    def log(msg="", console=True):
        if console and not msg.startswith("hparam"):
            print(msg, flush=True)

    torch.manual_seed(args.seed)
    model = T.GPT(args).to(rt.device)
    print(f"model_params:{sum(p.numel() for p in model.parameters())} val_tokens:{len(val)}", flush=True)
    trainer = T.Trainer(args, rt, model, T.BatchLoader(T.find_shards(args.data_path, "train"), args, rt), log)
    trainer.warmup()
    stats = trainer.train()

    def score(state) -> float:
        m = T.GPT(args).to(rt.device)
        m.load_state_dict(state)
        return T.evaluate(m, val, luts, args, rt, log, label="study", seq_len=args.train_seq_len,
                          stride=args.train_seq_len, deadline=T.Deadline(0))["bpb_model"]

    def loaded(blob: bytes) -> dict:  # the weights the artifact itself gives a fresh model
        with tempfile.NamedTemporaryFile(suffix=".ptz") as f:
            f.write(blob)
            f.flush()
            return T.deserialize_artifact(f.name)[1]

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    pre = score(state)
    print(f"prequant_bpb:{pre:.5f} steps:{stats['steps']}", flush=True)
    old = baseline_module(a.baseline_rev)
    t0 = time.perf_counter()
    old_q = old.quantize_state(state)
    blob = old.serialize_artifact(old_q, args.model_config())
    old_s = time.perf_counter() - t0
    natural = len(blob)
    penalty = score(old.dequantize_state(old_q)) - pre
    print("scheme       size  bytes_model  penalty_bpb  export_s  passes", flush=True)
    print(f"{'previous':<12} {1.0:4.2f}  {natural:11d}  {penalty:+.5f}  {old_s:8.1f}  {1:6d}", flush=True)
    for frac in (1.0, 0.9, 0.75):
        for scheme, st, gptq in (("uniform", None, False), ("fisher", stats["calib"], False),
                                 ("fisher+gptq", stats["calib"], True)):
            t0 = time.perf_counter()
            blob, info = T.BudgetFit(state, st).fit(int(natural * frac), args.model_config(), gptq)
            secs = time.perf_counter() - t0
            penalty = score(loaded(blob)) - pre
            print(f"{scheme:<12} {frac:4.2f}  {len(blob):11d}  {penalty:+.5f}  {secs:8.1f}  {info['passes']:6d}", flush=True)
    print(f"limit_fraction is of the previous export's {natural} bytes; penalty = roundtrip - prequant bpb "
          f"(prequant {pre:.5f}); moved tensors are in the export lines of a train_gpt.py run", flush=True)


if __name__ == "__main__":
    main()
