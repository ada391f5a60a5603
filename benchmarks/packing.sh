#!/usr/bin/env bash
# Padded vs packed chat rows (chat.packed) in LoRA fine-tuning on the demo's Jargon File Q&A at
# train.seq_len 512. The base is the demo's model (recipes/tiny-fortunes.yaml, 1.3 M parameters)
# with room for 512 positions, pretrained BASE_STEPS steps. Per mode, REPEATS alternating runs of
# STEPS steps: the median over the steps after the first 5 of target tokens/s (the tokens that
# train) and of tokens/s (positions computed, padding included); and the rows an epoch takes.
# Needs the demo's shards and dict-jargon:
#   build/bin/llm-data recipes/tiny-fortunes.yaml; recipes/data/jargon-qa.sh runs/tiny-jargon/data
# usage: benchmarks/packing.sh [BUILD_DIR] [REPEATS=3] [STEPS=40] [MICRO_BATCH=8] [BASE_STEPS=100]
set -euo pipefail
build=${1:-build} repeats=${2:-3} steps=${3:-40} micro=${4:-8} base_steps=${5:-100}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$build/bin/llm-pretrain" recipes/tiny-fortunes.yaml --set model.max_seq_len=512 --set train.steps="$base_steps" \
  --set train.run_dir="$work/base" --set train.sample_prompts=[] --set train.plot=false --set checkpoint.every=0 \
  --set checkpoint.resume=none > "$work/base.log"
base="$work/base/checkpoints/$(ls "$work/base/checkpoints" | tail -n 1)"
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
field() { tail -n +6 "$1" | sed "s/.*\"$2\":\([0-9.e+]*\).*/\1/" | median; }
for i in $(seq "$repeats"); do
  for packed in false true; do
    run="$work/$packed-$i"
    "$build/bin/llm-finetune" recipes/tiny-jargon.yaml --set finetune.base="$base" --set chat.packed=$packed \
      --set train.seq_len=512 --set train.micro_batch="$micro" --set train.steps="$steps" --set train.eval_every=0 \
      --set train.sample_prompts=[] --set checkpoint.every=0 --set checkpoint.resume=none --set train.plot=false \
      --set train.run_dir="$run" > "$run.log"
    targets=$(field "$run/metrics.jsonl" target_tokens_per_s)
    tokens=$(field "$run/metrics.jsonl" tokens_per_s)
    echo "packed=$packed run $i: median $targets target tokens/s, $tokens tokens/s"
    echo "$packed $targets $tokens" >> "$work/all"
  done
done
sed -n 's/^chat data: \(.*\)/chat data: \1/p' "$work/false-1.log" | head -n 1
sed -n 's/^\(chat.packed: .*\)/\1/p' "$work/true-1.log" | head -n 1
for packed in false true; do
  t=$(awk -v p=$packed '$1 == p { print $2 }' "$work/all" | median)
  s=$(awk -v p=$packed '$1 == p { print $3 }' "$work/all" | median)
  printf "packed=%s: median %.0f target tokens/s, %.0f tokens/s over %d runs\n" "$packed" "$t" "$s" "$repeats"
done
