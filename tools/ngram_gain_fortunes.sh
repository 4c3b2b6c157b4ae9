#!/usr/bin/env bash
# The n-gram mixture's gain on real English text: Debian's `fortunes` package (about 2.4 MB of
# quotations and jokes) -> 1024-piece tokenizer -> shards, a small model trained for 4 minutes on
# the CPU, then final_sliding vs final_ngram. Needs: apt-get install fortunes
#   bash tools/ngram_gain_fortunes.sh          # writes runs/fortunes/, log in runs/fortunes/logs/
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT_DIR:-$root/runs/fortunes}
src=/usr/share/games/fortunes
[ -d "$src" ] || { echo "error: $src not found: apt-get install fortunes" >&2; exit 1; }
mkdir -p "$out"
files=$(find "$src" -maxdepth 1 -type f ! -name '*.dat' | sort)
python3 "$root/tools/build_corpus.py" --out "$out/data" --text $files --shuffle --val-docs 1500 --vocab-size 1024
cd "$out"
env DEVICE=cpu RUN_ID=${RUN_ID:-fortunes} DATA_PATH=data TOKENIZER_PATH=data/tok_1024_bpe.model VOCAB_SIZE=1024 \
  NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 ROPE_DIMS=16 XSA_LAST_N=2 \
  BIGRAM_VOCAB_SIZE=1024 BIGRAM_DIM=32 TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 GRAD_ACCUM_STEPS=1 \
  ITERATIONS=5000 MAX_WALLCLOCK_SECONDS=${SECONDS_BUDGET:-240} WARMUP_STEPS=2 WARMDOWN_ITERS=60 EMA_DECAY=0.95 \
  TRAIN_LOG_EVERY=10 EVAL_SEQ_LEN=256 EVAL_STRIDE=64 EVAL_BATCH_SEQS=32 \
  "$@" python3 "$root/train_gpt.py"
