"""The records' levers (issue 26) on real English on the CPU: train_gpt.py with the defaults and with each lever
switched back, several seeds a cell, at equal wall clock, and each lever's cost in step time; plus the FLOP ratio
an 8xH100 step of the full-size model would see. Each run is a real `python train_gpt.py` (one thread, NGRAM=0),
scored by its final_sliding (the artifact's round trip, windows of EVAL_SEQ_LEN) and final_prequant.

    python tools/lever_study.py --data runs/english/debdocs/data --out runs/levers/debdocs --seconds 240
    python tools/lever_study.py --pool runs/levers/debdocs/results.jsonl [more.jsonl ...]   # the table again
    python tools/lever_study.py --flops                                                       # full-size ratios

The validation split is cut to --val-tokens (a copy of the shards under --out), so that the eval of a run
stays short next to its training; the cut is the same for every run. A cell's difference from the defaults
is paired by seed (the same data order and initial draw), its standard error over the seeds.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

# each lever switched back to what the script did before issue 26 (the defaults have every lever on)
LEVERS = {
    "defaults": {},
    "xsa_last_4": {"XSA_LAST_N": "4"},
    "qk_gain_1.5": {"QK_GAIN_INIT": "1.5"},
    "qk_gain_2.5": {"QK_GAIN_INIT": "2.5"},  # between the two, where 5 costs on the CPU
    "qk_gain_4": {"QK_GAIN_INIT": "4.0"},
    "no_row_normalize": {"MUON_ROW_NORMALIZE": "0"},
    "no_parallel": {"PARALLEL_START_LAYER": "99"},
    "no_recurrence": {"RECUR_LAYERS": ""},
    "untied_mlp": {"RECUR_UNTIED_MLP": "1"},
}
# a 10-layer model, as the record's: the repeat (layers 4, 5) and the parallel layers (7-9) at the record's places.
# The study's baseline has every lever on, the repeat too (the default when the study ran; off since, README).
MODEL = {"NUM_LAYERS": "10", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "3",
         "ROPE_DIMS": "16", "BIGRAM_VOCAB_SIZE": "1024", "BIGRAM_DIM": "32", "VOCAB_SIZE": "1024", "RECUR_LAYERS": "4,5"}
COMMON = {"DEVICE": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NGRAM": "0", "TTT": "0",
          "TRAIN_SEQ_LEN": "256", "TRAIN_BATCH_TOKENS": "4096", "GRAD_ACCUM_STEPS": "1", "ITERATIONS": "100000",
          "WARMUP_STEPS": "2", "WARMDOWN_ITERS": "0", "WARMDOWN_FRAC": "0.4", "EMA_DECAY": "0.95",
          "MUON_MOMENTUM_WARMUP_STEPS": "100", "TRAIN_LOG_EVERY": "50", "EVAL_SEQ_LEN": "256",
          "EVAL_STRIDE": "128", "EVAL_BATCH_SEQS": "16", "EVAL_BUDGET_SECONDS": "0"}
FINAL = re.compile(r"^final_(\w+) val_loss:(\S+) val_bpb:(\S+)", re.M)
STEP = re.compile(r"^step:(\d+)/\d+ .*step_ms:(\S+) .*train_time_ms:(\d+)$", re.M)
SWITCH = re.compile(r"^recurrence:on step:(\d+) train_time_ms:(\d+)$", re.M)


def cut_validation(data: str, out: str, tokens: int) -> str:
    """A copy of `data` (links to its train shards and tokenizer) whose validation is its first `tokens` tokens."""
    import build_corpus
    import train_gpt as T
    dst = os.path.join(out, "data")
    if os.path.isdir(dst):
        return dst
    os.makedirs(dst)
    for path in glob.glob(os.path.join(data, "*")):
        if "fineweb_val_" not in os.path.basename(path):
            os.symlink(os.path.abspath(path), os.path.join(dst, os.path.basename(path)))
    val = np.concatenate([T.shard_tokens(p) for p in T.find_shards(data, "val")])[:tokens]
    build_corpus.write_shard(os.path.join(dst, "fineweb_val_000000.bin"), val)
    return dst


def parse(stdout: str) -> dict:
    steps = STEP.findall(stdout)
    out = {kind: float(bpb) for kind, _, bpb in FINAL.findall(stdout)}
    last_step, _, last_ms = steps[-1] if steps else ("0", "0", "0")
    out.update(steps=int(last_step), train_ms=int(last_ms))
    switch = SWITCH.search(stdout)
    if switch and steps:  # the mean step time before and after the switch
        s, t = int(switch.group(1)), int(switch.group(2))
        out.update(ms_before=t / max(s, 1), ms_after=(int(last_ms) - t) / max(int(last_step) - s, 1))
    else:
        out.update(ms_before=int(last_ms) / max(int(last_step), 1))
    return out


def run_one(data: str, out: str, lever: str, seed: int, seconds: float, extra: dict) -> dict:
    d = os.path.join(out, f"{lever}_seed{seed}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    env.update(COMMON, **MODEL, **extra, **LEVERS[lever], SEED=str(seed), MAX_WALLCLOCK_SECONDS=str(seconds),
               DATA_PATH=data, TOKENIZER_PATH=os.path.join(data, "tok_1024_bpe.model"), RUN_ID="run", LOG_DIR=d,
               ARTIFACT_PATH=os.path.join(d, "final_model.ptz"), SUBMISSION_PATH=os.path.join(d, "submission.json"))
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py")], cwd=d, env=env, capture_output=True,
                          text=True)
    with open(os.path.join(d, "train.out"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    row = dict(lever=lever, seed=seed, seconds=seconds, rc=proc.returncode, wall_s=round(time.time() - t0),
               **parse(proc.stdout))
    os.remove(os.path.join(d, "final_model.ptz")) if os.path.exists(os.path.join(d, "final_model.ptz")) else None
    return row


def table(rows: list[dict]) -> str:
    """Per (corpus tag, seconds, lever): mean +- s.e. of final_sliding and final_prequant; the paired difference
    from the defaults of the same seeds; steps; ms a step (before/after the switch)."""
    out, keys = [], sorted({(r.get("tag", ""), r["seconds"]) for r in rows})
    for tag, secs in keys:
        cell = [r for r in rows if r.get("tag", "") == tag and r["seconds"] == secs and r["rc"] == 0]
        base = {r["seed"]: r for r in cell if r["lever"] == "defaults"}
        out.append(f"== {tag} seconds:{secs:g} (bpb: mean +- standard error over seeds; diff: lever - defaults, "
                   "paired by seed; positive: the lever switched back is worse, i.e. the default helps)")
        for lever in LEVERS:
            rs = [r for r in cell if r["lever"] == lever]
            if not rs:
                continue

            def stat(xs):
                m = statistics.fmean(xs)
                se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan
                return f"{m:.5f} +- {se:.5f}"
            line = (f"{lever:17s} n:{len(rs)} sliding:{stat([r['sliding'] for r in rs])} "
                    f"prequant:{stat([r['prequant'] for r in rs])}")
            paired = [(r["sliding"] - base[r["seed"]]["sliding"], r["prequant"] - base[r["seed"]]["prequant"])
                      for r in rs if r["seed"] in base]
            if lever != "defaults" and paired:
                line += (f" diff_sliding:{stat([p[0] for p in paired])} diff_prequant:{stat([p[1] for p in paired])}"
                         f" sliding_better_with_default:{sum(p[0] > 0 for p in paired)}/{len(paired)}")
            ms = [r["ms_before"] for r in rs]
            after = [r["ms_after"] for r in rs if "ms_after" in r]
            line += (f" steps:{statistics.fmean([r['steps'] for r in rs]):.0f} ms_step:{statistics.fmean(ms):.0f}"
                     + (f"/{statistics.fmean(after):.0f} (after the switch)" if after else ""))
            out.append(line)
    out += gap_changes(rows)
    return "\n".join(out)


def gap_changes(rows: list[dict]) -> list[str]:
    """Where a corpus ran at two lengths: each lever's paired difference at the longer minus that at the shorter,
    per seed that ran all four runs (defaults and lever at both lengths), signed so that negative means the gap
    shrinks with steps (its sign is the shorter length's mean difference)."""
    out = []
    for tag in sorted({r.get("tag", "") for r in rows}):
        ok = {(r["seconds"], r["lever"], r["seed"]): r["sliding"] for r in rows if r.get("tag", "") == tag
              and r["rc"] == 0}
        lengths = sorted({k[0] for k in ok})
        if len(lengths) < 2:
            continue
        short, long_ = lengths[0], lengths[-1]
        out.append(f"== {tag} gap change {short:g} s -> {long_:g} s (diff_sliding at {long_:g} s minus at {short:g} s, "
                   "paired by seed, times the sign of the shorter; negative: the gap to the defaults shrinks with steps)")
        for lever in LEVERS:
            seeds = sorted(s for (t, lv, s) in ok if t == short and lv == lever != "defaults"
                           and all((t2, lv2, s) in ok for t2 in (short, long_) for lv2 in (lever, "defaults")))
            if len(seeds) < 2:
                continue
            diff = {t: [ok[t, lever, s] - ok[t, "defaults", s] for s in seeds] for t in (short, long_)}
            sign = math.copysign(1.0, statistics.fmean(diff[short]))
            change = [sign * (b - a) for a, b in zip(diff[short], diff[long_])]
            mean = statistics.fmean(change)
            se = statistics.stdev(change) / math.sqrt(len(change))
            out.append(f"{lever:17s} seeds:{seeds} diff_sliding {statistics.fmean(diff[short]):+.5f} -> "
                       f"{statistics.fmean(diff[long_]):+.5f} change:{mean:+.5f} +- {se:.5f}"
                       + (f" ({mean / se:+.1f} s.e.)" if se else ""))
    return out


def flop_ratios() -> str:
    """Matmul and attention FLOPs a token of the full-size model costs in a training step, with the records' repeat
    (layers 4 and 5 twice) and without; the other levers change no matrix product."""
    import train_gpt as T
    os.environ["RECUR_LAYERS"] = "4,5"
    args = T.Hyperparameters()
    model = T.GPT(args)
    T_ = args.train_seq_len

    def per_token(order):
        flops = 0
        for i, p in order:
            b = model.blocks[i]
            mlp = b.mlp if p == 0 or b.repeat is None else b.repeat["mlp"]
            matmul = sum(m.weight.numel() for m in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.attn.proj, mlp.fc, mlp.proj))
            attention = 2 * 2 * (T_ / 2) * args.model_dim  # q.k and a.v over the mean causal context
            flops += 6 * matmul + 3 * attention
        return flops + 6 * model.tok_emb.weight.numel()  # the head (tied embedding)
    plain, repeat = per_token(model.orders[False]), per_token(model.orders[True])
    return (f"full-size (10x512, seq {T_}): forward+backward FLOPs a token, no repeat {plain / 1e6:.1f}M, with the "
            f"repeat (layers {args.recur_layers}) {repeat / 1e6:.1f}M: ratio {repeat / plain:.3f}; XSA, QK gain, "
            "parallel residuals and row normalization change no matrix product (ratio 1.000; row normalization adds "
            "a norm over each Muon matrix once a step)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--tag", default="", help="a name for the corpus in the table")
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    ap.add_argument("--val-tokens", type=int, default=200_000)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--set", nargs="*", default=[], help="more KEY=VALUE for every run")
    ap.add_argument("--pool", nargs="+")
    ap.add_argument("--flops", action="store_true")
    a = ap.parse_args()
    if a.flops:
        print(flop_ratios())
        return
    if a.pool:
        rows = [json.loads(line) for p in a.pool for line in open(p) if line.strip()]
        print(table(rows))
        return
    a.out = os.path.abspath(a.out)
    os.makedirs(a.out, exist_ok=True)
    data = cut_validation(a.data, a.out, a.val_tokens)
    extra = dict(kv.split("=", 1) for kv in a.set)
    todo = [(lever, seed) for seed in a.seeds for lever in a.levers]
    results = os.path.join(a.out, "results.jsonl")
    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} data:{a.data} val_tokens:{a.val_tokens} "
          f"seconds:{a.seconds:g} seeds:{a.seeds} jobs:{a.jobs} model:{MODEL} common:{COMMON} extra:{extra}",
          flush=True)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(a.jobs) as pool:
        for row in pool.map(lambda job: run_one(data, a.out, *job, a.seconds, extra), todo):
            row["tag"] = a.tag
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table([json.loads(line) for line in open(results) if line.strip()]))


if __name__ == "__main__":
    main()
