"""The export's trade-off, measured before and after a change: bytes, round-trip penalty and export time of one
trained model under the budget-fit export of train_gpt.py at --baseline-rev (before) and of this checkout (after),
at a cap and at 90% and 75% of it.

    python tools/export_study.py --baseline-rev ce89a1f     # model, data and training time from the env
    python tools/export_study.py --baseline-rev ce89a1f --fractions 0.9 --nearby 9 --model runs/m.pt  # reuse a model
    python tools/export_study.py --pool seed1.out seed2.out ...   # the row means of several runs' outputs, pooled

It trains the model the environment configures exactly as train_gpt.py does (warm-up, wall-clock budget, EMA,
calibration), scores the trained weights with a plain pass over the validation split (final_prequant), then for
every cap and export writes the artifact (Fisher steps + GPTQ, the default), rebuilds the weights from it with the
same revision's reader and scores them the same way. The penalty is roundtrip - prequant in bits per byte. Its
first-order part (the loss gradient times the rounding errors) has a chance sign that nearly equal plans share, and
on a briefly trained model it is as large as the effect of a few percent finer steps; so each plan is also scored
with every rounding error reversed (w - (w_rt - w)) and even_bpb = (roundtrip + mirrored) / 2 - prequant, where that
part cancels and the curvature term that finer steps shrink remains. The cap
is --cap-fraction of the baseline's finest plan (every tensor at its finest steps): 0.68 by default, the ratio of
the 16 MB limit to the full-size model's finest plan (tools/estimate_artifact.py), so the cap binds as it does there.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import statistics
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


def trained(args, rt, log) -> tuple[dict, dict]:
    """The model the environment configures, trained exactly as train_gpt.py trains it: (weights, train stats)."""
    torch.manual_seed(args.seed)
    model = T.GPT(args).to(rt.device)
    print(f"model_params:{sum(p.numel() for p in model.parameters())}", flush=True)
    trainer = T.Trainer(args, rt, model, T.BatchLoader(T.find_shards(args.data_path, "train"), args, rt), log)
    trainer.warmup()
    stats = trainer.train()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, stats


def pool(paths: list[str]) -> None:
    """Each row's means from several studies' outputs (one model each), and after - before per model: the
    first-order part's chance sign differs from model to model, so only several models show what a change is worth."""
    rows = {}
    for path in paths:
        for label, frac, kind, mean in re.findall(r"^(before|after)\s+([\d.]+) (penalty|even) mean of \d+: ([+-][\d.]+)",
                                                  open(path).read(), re.M):
            rows.setdefault((frac, kind), {}).setdefault(label, []).append(float(mean))
    print(f"{len(paths)} models: {' '.join(paths)}")
    for (frac, kind), d in rows.items():
        diffs = [x - y for x, y in zip(d["after"], d["before"])]
        sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        print(f"{frac} {kind:<7} before {statistics.mean(d['before']):+.5f}  after {statistics.mean(d['after']):+.5f}  "
              f"after - before per model: {' '.join(f'{x:+.5f}' for x in diffs)}  mean {statistics.mean(diffs):+.5f} "
              f"(standard error {sem:.5f})")


def main() -> None:
    if sys.argv[1:2] == ["--pool"]:
        return pool(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", required=True, help="git revision whose train_gpt.py holds the export before")
    ap.add_argument("--cap-fraction", type=float, default=0.68, help="the cap, as a fraction of the finest plan")
    ap.add_argument("--nearby", type=int, default=1,
                    help="caps per row, --spacing apart around it: the penalty of nearly equal plans scatters by more "
                         "than a small change moves it, so each row also reports the mean and its standard error")
    ap.add_argument("--spacing", type=float, default=0.002, help="relative distance of neighbouring caps in a row")
    ap.add_argument("--fractions", default="1.0,0.9,0.75", help="the rows: caps as fractions of --cap-fraction's")
    ap.add_argument("--model", help="a file holding the trained weights and calibration: read if it exists, else "
                                    "written after training, so one model can serve several studies")
    a = ap.parse_args()
    args = T.Hyperparameters()
    rt = T.Runtime(args.device)
    sp = T.load_tokenizer(args.tokenizer_path, args.vocab_size)
    luts = tuple(torch.from_numpy(x).to(rt.device) for x in T.byte_luts(sp))
    val = T.load_validation(args, rt)

    def log(msg="", console=True):
        if console and not msg.startswith("hparam"):
            print(msg, flush=True)

    if a.model and os.path.exists(a.model):
        state, stats = torch.load(a.model)
        print(f"model: {a.model} ({stats['steps']} steps) val_tokens:{len(val)}", flush=True)
    else:
        state, stats = trained(args, rt, log)
        print(f"val_tokens:{len(val)}", flush=True)
        if a.model:
            torch.save((state, stats), a.model)

    def score(state) -> float:
        m = T.GPT(args).to(rt.device)
        m.load_state_dict(state)
        return T.evaluate(m, val, luts, args, rt, seq_len=args.train_seq_len,
                          stride=args.train_seq_len, deadline=T.Deadline(0))["bpb_model"]

    def loaded(module, blob: bytes) -> dict:  # the weights the artifact itself gives a fresh model
        with tempfile.NamedTemporaryFile(suffix=".ptz") as f:
            f.write(blob)
            f.flush()
            return module.deserialize_artifact(f.name)[1]

    pre = score(state)
    print(f"prequant_bpb:{pre:.5f} steps:{stats['steps']}", flush=True)
    old, config = baseline_module(a.baseline_rev), args.model_config()
    fit = old.BudgetFit(state, stats["calib"])
    finest = len(old.serialize_artifact(fit.quantize(math.exp(fit.bounds[0]), False), config))
    cap = int(a.cap_fraction * finest)

    def mirrored(back: dict) -> dict:  # every weight's rounding error reversed: w - (w_rt - w)
        return {k: 2 * state[k].float() - v.float() if v.is_floating_point() else v for k, v in back.items()}

    def summary(label: str, frac: float, name: str, xs: list[float]) -> None:
        sem = statistics.stdev(xs) / math.sqrt(len(xs))
        print(f"{label:<7} {frac:4.2f} {name} mean of {len(xs)}: {statistics.mean(xs):+.5f} (standard error {sem:.5f}, "
              f"min {min(xs):+.5f}, max {max(xs):+.5f})", flush=True)

    print("export  cap     bytes_model  penalty_bpb  even_bpb  export_s  passes  c (the plan's step scale: smaller is "
          "finer)", flush=True)
    for frac in map(float, a.fractions.split(",")):
        for label, module in (("before", old), ("after", T)):
            penalties, evens = [], []
            for j in range(a.nearby):
                f = frac * (1 + a.spacing * (j - (a.nearby - 1) / 2))
                t0 = time.perf_counter()
                blob, info = module.BudgetFit(state, stats["calib"]).fit(int(cap * f), config, args.export_gptq)
                secs = time.perf_counter() - t0
                back = loaded(module, blob)
                penalties.append(score(back) - pre)
                evens.append((penalties[-1] + score(mirrored(back)) - pre) / 2)
                print(f"{label:<7} {f:6.4f}  {len(blob):11d}  {penalties[-1]:+.5f}  {evens[-1]:+.5f}  {secs:8.1f}  "
                      f"{info['passes']:6d}  {info['c']:.5e}", flush=True)
            if a.nearby > 1:
                summary(label, frac, "penalty", penalties)
                summary(label, frac, "even", evens)
    print(f"cap = {a.cap_fraction:g} x the baseline's finest plan ({finest} bytes) = {cap} bytes; penalty = roundtrip "
          f"- prequant bpb (prequant {pre:.5f}); before: train_gpt.py at {a.baseline_rev}", flush=True)


if __name__ == "__main__":
    main()
