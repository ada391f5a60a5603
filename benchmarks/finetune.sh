#!/usr/bin/env bash
# LoRA vs full fine-tuning of the demo model (recipes/tiny-jargon.yaml: the 1.3 M-parameter
# tiny-fortunes model on Jargon File Q&A): median tokens/s over the steps after the first 5, and
# the process's peak resident memory (/usr/bin/time), REPEATS alternating runs of STEPS steps each.
# Needs the pretraining demo's checkpoint and the jargon data:
#   build/bin/llm-data recipes/tiny-fortunes.yaml && build/bin/llm-pretrain recipes/tiny-fortunes.yaml
#   recipes/data/jargon-qa.sh runs/tiny-jargon/data
# usage: benchmarks/finetune.sh [BUILD_DIR] [REPEATS=3] [STEPS=60]
set -euo pipefail
build=${1:-build} repeats=${2:-3} steps=${3:-60}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for i in $(seq "$repeats"); do
  for method in lora full; do
    run="$work/$method-$i"
    /usr/bin/time -f "%M" -o "$run.rss" "$build/bin/llm-finetune" recipes/tiny-jargon.yaml --set finetune.method=$method \
      --set train.run_dir="$run" --set train.steps="$steps" --set train.eval_every=0 --set train.sample_prompts=[] \
      --set checkpoint.every=0 --set checkpoint.resume=none --set train.plot=false > "$run.log"
    params=$(sed -n 's/.*method [a-z]*: \([0-9]* of [0-9]*\) parameters train.*/\1/p' "$run.log")
    tps=$(tail -n +6 "$run/metrics.jsonl" | sed 's/.*"tokens_per_s":\([0-9.e+]*\).*/\1/' | sort -g |
          awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
    echo "$method run $i: $params parameters train, median $tps tokens/s, peak RSS $(( $(cat "$run.rss") / 1024 )) MiB"
    echo "$method $tps $(cat "$run.rss")" >> "$work/all"
  done
done
for method in lora full; do
  awk -v m=$method '$1 == m { t[++n] = $2; if ($3 > r) r = $3 } END {
    asort_n = n; for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (t[j] < t[i]) { x = t[i]; t[i] = t[j]; t[j] = x }
    med = (n % 2) ? t[(n + 1) / 2] : (t[n / 2] + t[n / 2 + 1]) / 2
    printf "%s: median tokens/s %.0f over %d runs, peak RSS %.0f MiB\n", m, med, n, r / 1024 }' "$work/all"
done
