#!/usr/bin/env bash
# The whole pipeline on a CPU in about 75 s: generated corpus -> tokenizer -> shards -> train a
# small model (60 s cap) -> export -> round trip -> sliding + n-gram eval -> log and submission.json.
#   bash tools/cpu_demo.sh            # writes everything under runs/cpu_demo/
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${DEMO_DIR:-$root/runs/cpu_demo}
mkdir -p "$out"
echo "== building a generated corpus, tokenizer and shards in $out/data"
python3 "$root/tools/build_corpus.py" --out "$out/data" --synthetic 4000 --val-docs 200 --vocab-size 512
cd "$out"
echo "== training, export, round trip and evaluation (log: $out/logs/cpu_demo.txt)"
env DEVICE=cpu RUN_ID=cpu_demo DATA_PATH=data TOKENIZER_PATH=data/tok_512_bpe.model VOCAB_SIZE=512 \
  NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 ROPE_DIMS=16 \
  BIGRAM_VOCAB_SIZE=512 BIGRAM_DIM=32 TRAIN_SEQ_LEN=128 TRAIN_BATCH_TOKENS=4096 GRAD_ACCUM_STEPS=1 \
  ITERATIONS=1000 MAX_WALLCLOCK_SECONDS=60 WARMUP_STEPS=2 WARMDOWN_ITERS=150 EMA_DECAY=0.98 \
  TRAIN_LOG_EVERY=25 EVAL_SEQ_LEN=128 EVAL_STRIDE=32 EVAL_BATCH_SEQS=32 \
  "$@" python3 "$root/train_gpt.py" 2>&1 | grep -v '^hparam '
echo "== done: $out/logs/cpu_demo.txt, $out/final_model.ptz, $out/submission.json"
