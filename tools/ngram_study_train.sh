#!/usr/bin/env bash
# Four CPU-trained models for the n-gram mixer study: a weak (2x128, 3 min) and a strong (6x160,
# 12 min) model on each corpus of tools/english_corpora.sh, trained one after another on one thread.
# Each run writes OUT_DIR/<name>/: train.out (full stdout+stderr), final_model.ptz, logs/<name>.txt,
# submission.json. Evaluation: NGRAM=0 (sliding window only), EVAL_BUDGET_SECONDS=0 (no limit: the
# CPU needs more than the default 600 s for 4.5 MB of validation text).
#   bash tools/english_corpora.sh                       # first: the corpora in runs/english/
#   nohup bash tools/ngram_study_train.sh > runs/english/study.out 2>&1 &
#   bash tools/ngram_study_train.sh fortunes_weak       # only the runs named (any of the four)
# Evaluation only, of the artifacts already trained (same windows; NGRAM=1 unless set; every NGRAM_*
# variable of the caller's environment is passed on; output in OUT_DIR/<name>/<EVAL_TAG>.out):
#   EVAL_ONLY=1 EVAL_TAG=fixed NGRAM_MIXER=fixed bash tools/ngram_study_train.sh debdocs_strong
# OUT_DIR (default runs/english), TRAIN_GPT (default the repository's train_gpt.py) and PYTHON can be set.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(cd "${OUT_DIR:-$root/runs/english}" && pwd)
train_gpt=$(realpath "${TRAIN_GPT:-$root/train_gpt.py}")
py=${PYTHON:-python3}
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(fortunes_weak fortunes_strong debdocs_weak debdocs_strong)

common=(DEVICE=cpu OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NGRAM=0 VOCAB_SIZE=1024 ROPE_DIMS=16
        BIGRAM_VOCAB_SIZE=1024 TRAIN_SEQ_LEN=512 GRAD_ACCUM_STEPS=1 ITERATIONS=100000 WARMUP_STEPS=0
        WARMDOWN_ITERS=0 WARMDOWN_FRAC=0.4 EMA_DECAY=0.95 TRAIN_LOG_EVERY=10
        EVAL_SEQ_LEN=512 EVAL_STRIDE=256 EVAL_BATCH_SEQS=16 EVAL_BUDGET_SECONDS=0)
# weak: ~0.46M parameters, 16 x 512 tokens a step, ~1.7 s a step
weak=(NUM_LAYERS=2 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 XSA_LAST_N=1 BIGRAM_DIM=32
      TRAIN_BATCH_TOKENS=8192 MAX_WALLCLOCK_SECONDS=180)
# strong: ~1.6M parameters, 10 x 512 tokens a step. When these models were trained, Muon's Newton-Schulz ran
# in bf16, emulated on that CPU, and grew steeply with the width (1.4-1.9 s a step at 6x160, 7.3 s at 4x256),
# so depth over width (it runs in float32 on a CPU since issue 20).
strong=(NUM_LAYERS=6 MODEL_DIM=160 NUM_HEADS=4 NUM_KV_HEADS=2 XSA_LAST_N=2 BIGRAM_DIM=48
        TRAIN_BATCH_TOKENS=5120 MAX_WALLCLOCK_SECONDS=720)

echo "# $(date -u +%FT%TZ) train_gpt: $train_gpt sha256:$(sha256sum "$train_gpt" | cut -c1-16)" \
     "repo commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null)"
status=0
for name in "${runs[@]}"; do
  corpus=${name%_*}
  case $name in
    *_weak) size=("${weak[@]}") ;;
    *_strong) size=("${strong[@]}") ;;
    *) echo "error: unknown run $name (expected <corpus>_weak or <corpus>_strong)" >&2; status=2; continue ;;
  esac
  data=$out/$corpus/data
  if [ ! -f "$data/tok_1024_bpe.model" ]; then
    echo "error: $data has no tokenizer: run tools/english_corpora.sh first" >&2; status=2; continue
  fi
  dir=$out/$name
  if [ "${EVAL_ONLY:-0}" = 1 ]; then
    tag=${EVAL_TAG:-eval}
    [ -f "$dir/final_model.ptz" ] || { echo "error: no artifact $dir/final_model.ptz" >&2; status=2; continue; }
    echo "## $(date -u +%FT%TZ) $name: evaluation only -> $dir/$tag.out" \
         "NGRAM=${NGRAM:-1} $(env | grep -E '^NGRAM_' | sort | tr '\n' ' ')"
    (cd "$dir" && env DEVICE=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" \
        EVAL_ONLY=1 ARTIFACT_PATH=final_model.ptz RUN_ID="${name}_$tag" SUBMISSION_PATH="$tag.json" \
        DATA_PATH="$data" TOKENIZER_PATH="$data/tok_1024_bpe.model" NGRAM="${NGRAM:-1}" TRAIN_SEQ_LEN=512 \
        EVAL_SEQ_LEN=512 EVAL_STRIDE=256 EVAL_BATCH_SEQS=16 EVAL_BUDGET_SECONDS=0 "$py" "$train_gpt" > "$tag.out" 2>&1)
    rc=$?
    [ $rc -eq 0 ] || status=$rc
    grep -E '^final_|^ngram_audit|^eval_time|^error' "$dir/$tag.out" || true
    echo "## $name $tag exit:$rc"
    continue
  fi
  rm -rf "$dir"
  mkdir -p "$dir"
  echo "## $(date -u +%FT%TZ) $name: ${size[*]}"
  t0=$(date +%s)
  (cd "$dir" && env "${common[@]}" "${size[@]}" RUN_ID="$name" DATA_PATH="$data" \
      TOKENIZER_PATH="$data/tok_1024_bpe.model" "$py" "$train_gpt" > train.out 2>&1)
  rc=$?
  [ $rc -eq 0 ] || status=$rc
  grep -E '^model_params|stopping_early|^final_prequant|^final_roundtrip|^final_sliding|^artifact|^error' \
    "$dir/train.out" || true
  grep -E '^step:' "$dir/train.out" | tail -1 || true
  echo "## $name exit:$rc wall_s:$(( $(date +%s) - t0 )) artifact:$dir/final_model.ptz"
done
exit $status
