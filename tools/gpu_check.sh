#!/usr/bin/env bash
# One command that checks the whole pipeline on one GPU (H100/H200), sized to take under 8 minutes:
#   1. a corpus from what the machine already has (docstrings of its Python packages) -> sp1024 -> shards
#   2. the full-size default model trained with the real schedule for GPU_CHECK_TRAIN_SECONDS (120),
#      calibrated and exported by the budget fit, round-tripped, scored by sliding window + n-gram, audited
#   3. the `cuda` tests (among them: training steps under torch.cuda.set_sync_debug_mode("error")),
#      train_gpt.Muon against torch.optim.Muon, the n-gram precompute and learned mixer at the full
#      validation size (62,021,846 tokens), orders 2-7 and 2-16, and the TTT pass's rate on the full-size
#      model, projected to the 62M validation tokens on 8 GPUs
#   4. a summary: ms/step (forward+backward, optimizer, rest), and before and after the repeat's switch (its
#      layers run twice from RECUR_START_FRAC of the budget on), peak memory, the warm-up's time (it compiles
#      both graphs, with and without the repeat), eval times, bytes, the calibration's time against what the
#      stop rule reserved for it, the margin left under the cap and the artifact's bits a weight by group
#
#   bash tools/gpu_check.sh          # on the GPU machine; everything lands in runs/gpu_check/
#   bash tools/gpu_check.sh --dry    # the same steps at toy size on the CPU, to show the script is sound
#
# Needs nothing from the network. Where python3 cannot import zstandard, a wheel of it must be in .whl/
# at the repository root (tools/README: the device machines lack it).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${GPU_CHECK_DIR:-$root/runs/gpu_check}
dry=0
[ "${1:-}" = "--dry" ] && dry=1
rm -rf "$out/data" "$out/logs" && mkdir -p "$out"
t0=$SECONDS
stage() { echo "== [$((SECONDS - t0)) s] $*"; }

if ! python3 -c "import zstandard" 2>/dev/null; then
  ls "$root"/.whl/zstandard-*.whl >/dev/null 2>&1 || { echo "error: no zstandard module and no .whl/zstandard-*.whl"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --target "$out/site" "$root"/.whl/zstandard-*.whl || exit 1
  export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ $dry = 1 ]; then  # toy sizes, CPU
  docs_mb=1 val_docs=100 ngram_tokens=1000000 ttt_args="--docs 4 --mean-len 100"
  run_env=(DEVICE=cpu NUM_LAYERS=2 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=2 ROPE_DIMS=8 RECUR_LAYERS=0,1
           BIGRAM_VOCAB_SIZE=256 BIGRAM_DIM=16 TRAIN_SEQ_LEN=128 TRAIN_BATCH_TOKENS=2048 GRAD_ACCUM_STEPS=1
           WARMUP_STEPS=2 MAX_WALLCLOCK_SECONDS=${GPU_CHECK_TRAIN_SECONDS:-10} TRAIN_LOG_EVERY=10
           EVAL_SEQ_LEN=128 EVAL_STRIDE=64 NGRAM_AUDIT_POSITIONS=64)
else  # the default (record) model and schedule, with the records' repeat (off by default) to time its switch;
  # only the wall-clock budget is shorter
  docs_mb=24 val_docs=4000 ngram_tokens=62021846 ttt_args="--docs 256"
  run_env=(MAX_WALLCLOCK_SECONDS=${GPU_CHECK_TRAIN_SECONDS:-120} TRAIN_LOG_EVERY=25 RECUR_LAYERS=4,5)
fi

stage "environment"
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
[ $dry = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

stage "corpus: $docs_mb MB of docstrings of this machine's Python -> 1024-piece tokenizer -> shards"
python3 "$root/tools/build_corpus.py" --out "$out/data" --python-docs $docs_mb --shuffle --val-docs $val_docs \
  --vocab-size 1024 || exit 1

stage "train_gpt.py: train, calibrate, export, round trip, sliding + n-gram eval, audit (log: $out/logs/gpu_check.txt)"
cd "$out"
env "${run_env[@]}" RUN_ID=gpu_check DATA_PATH=data TOKENIZER_PATH=data/tok_1024_bpe.model \
  python3 "$root/train_gpt.py" 2>&1 | grep -v '^hparam '
rc=$?

stage "cuda tests"
(cd "$root" && python3 -m pytest -v -rs -m cuda -p no:cacheprovider tests); tests_rc=$?

stage "Muon: train_gpt.Muon against torch.optim.Muon on the model's matrices (ms and ops per step)"
env "${run_env[@]}" python3 "$root/tools/bench_step.py" --muon --steps 3

stage "n-gram precompute and learned mixer, orders 2-7 and 2-16, on $ngram_tokens tokens"
python3 "$root/tools/bench_ngram.py" --tokens $ngram_tokens --device "$([ $dry = 1 ] && echo cpu || echo cuda)"

stage "TTT: the pass's rate on the configured model (full size on the GPU), projected to 62M tokens on 8 GPUs"
# shellcheck disable=SC2086
env "${run_env[@]}" python3 "$root/tools/bench_ttt.py" $ttt_args --ranks 8 | tee "$out/bench_ttt.txt"

stage "summary"
[ -f final_model.ptz ] && python3 "$root/tools/inspect_artifact.py" final_model.ptz | tail -1  # bits a weight by group
python3 - logs/gpu_check.txt bench_ttt.txt <<'EOF'
import re, sys
text, ttt = open(sys.argv[1]).read(), open(sys.argv[2]).read()
steps = re.findall(r"^step:(\d+)/\d+ .*step_ms:(\S+) fwd_bwd_ms:(\S+) opt_ms:(\S+) other_ms:(\S+) .*", text, re.M)
if steps:
    n, step, fb, opt, other = steps[-1]
    print(f"steps:{n} ms/step:{step} (forward+backward {fb}, optimizer {opt}, rest {other})")
switch = re.search(r"^recurrence:on step:(\d+) train_time_ms:(\d+)$", text, re.M)
last = re.findall(r"^step:(\d+)/\d+ .*train_time_ms:(\d+)$", text, re.M)
if switch and last:
    (s, t), (n, tn) = (int(x) for x in switch.groups()), (int(x) for x in last[-1])
    before, after = t / max(s, 1), (tn - t) / max(n - s, 1)
    print(f"recurrence: on from step {s} ({t} ms): ms/step {before:.1f} before, {after:.1f} after "
          f"(x{after / before:.3f}), both graphs compiled in the warm-up (warmup_ms below)")
for pat in (r"^warmup_steps:.*", r"^stopping_early.*", r"^calibration .*", r"^peak_memory_mib:.*", r"^export .*",
            r"^artifact .*", r"^final_\w+ .*", r"^ngram_mix .*", r"^ngram_audit .*", r"^eval_time .*"):
    for line in re.findall(pat, text, re.M):
        print(line)
times = dict(re.findall(r"(\w+)_ms:(\d+)", (re.findall(r"^eval_time .*", text, re.M) or [""])[-1]))
val = re.search(r"^val_tokens:(\d+)", text, re.M)
proj, replay = re.search(r"^projection: .*: (\d+) s", ttt, re.M), re.search(r"^replay: \d+ audit positions in (\S+) s", ttt, re.M)
if times and val and proj and replay:  # the sliding pass splits over 8 ranks; every rank builds the n-gram tables whole
    scale = 62021846 / int(val.group(1))
    before = (int(times["load"]) + (int(times["roundtrip"]) + int(times["sliding"])) * scale / 8
              + int(times.get("ngram_precompute", 0)) * scale) / 1000
    print(f"projected 8-GPU eval with TTT=1: {before:.0f} s before the TTT pass (this run's times scaled to 62M tokens) "
          f"+ {proj.group(1)} s pass + {replay.group(1)} s replay = {before + int(proj.group(1)) + float(replay.group(1)):.0f} s "
          "of the 600 (mixing and the sliding audit rows not counted)")
calib = re.search(r"^calibration tokens:\d+ ms:(\d+) reserved_ms:(\d+) train_total_ms:(\d+)$", text, re.M)
cap = re.search(r"^hparam max_wallclock_seconds:(\S+)$", text, re.M)
if calib and cap:
    took, reserved, total = (int(x) for x in calib.groups())
    print(f"stop rule: calibration took {took} ms after the last step, {reserved} ms reserved (timed in warm-up); "
          f"train_total_ms {total} of the {1000 * float(cap.group(1)):.0f} ms cap, margin {1000 * float(cap.group(1)) - total:.0f} ms")
EOF
echo "train_gpt rc:$rc cuda_tests rc:$tests_rc total_s:$((SECONDS - t0))"
[ $rc = 0 ] && [ $tests_rc = 0 ]
