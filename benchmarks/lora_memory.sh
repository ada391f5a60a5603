#!/usr/bin/env bash
# Host memory of LoRA fine-tuning without activation checkpointing, where the adapters' saved
# inputs add to the base's activations: a random LLaMA of 0.14 B parameters (dim 1024, 8 layers,
# 16 heads, FFN 2816, vocab 32000, written by Debian's python3-torch), bf16, rank 16 on every
# projection, 4 packed chat rows of 1024 positions a step, lora.dropout 0.05 and 0. Prints each
# run's peak resident memory (/usr/bin/time) and median tokens/s over steps 2..STEPS.
# OLD_BUILD=DIR runs the same with another build's llm-finetune, alternating, and checks that
# both builds log the same losses.
# usage: benchmarks/lora_memory.sh [BUILD_DIR] [REPEATS=2] [STEPS=4]   (from the repository root)
set -euo pipefail
build=$(realpath "${1:-build}") repeats=${2:-2} steps=${3:-4}
old=${OLD_BUILD:+$(realpath "$OLD_BUILD")}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/base"
cp tests/fixtures/tokenizer.model "$work/base/"
/usr/bin/python3 benchmarks/random_llama.py "$work/base" 1024 2816 32000 8 16 16 > /dev/null
/usr/bin/python3 -c 'import json, random, sys
random.seed(0)
words = "the a model data train word language text token loss value small large first every world order".split()
with open(sys.argv[1], "w") as f:
    for i in range(600):
        say = lambda n: " ".join(random.choice(words) for _ in range(n))
        f.write(json.dumps({"prompt": say(random.randint(10, 60)), "response": say(random.randint(20, 120))}) + "\n")' \
  "$work/chat.jsonl"

run() {  # run LABEL BUILD DROPOUT: one fine-tuning run; prints its peak RSS and median tokens/s
  local label=$1 b=$2 p=$3 dir="$work/run-$RANDOM"
  /usr/bin/time -f "%M" -o "$work/rss" "$b/bin/llm-finetune" recipes/tiny-jargon.yaml --set finetune.base="$work/base" \
    --set "chat.files=[$work/chat.jsonl]" --set chat.valid_every=0 --set lora.dropout="$p" \
    --set train.seq_len=1024 --set train.micro_batch=4 --set train.steps="$steps" --set train.eval_every=0 \
    --set train.dtype=bf16 --set train.activation_checkpointing=false --set "train.sample_prompts=[]" \
    --set train.plot=false --set checkpoint.every=0 --set checkpoint.resume=none --set train.run_dir="$dir" \
    > "$work/log" 2>&1 || { cat "$work/log"; exit 1; }
  tps=$(tail -n +2 "$dir/metrics.jsonl" | sed 's/.*"tokens_per_s":\([0-9.e+]*\).*/\1/' | sort -g |
        awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
  sed 's/.*"loss":\([0-9.e+-]*\).*/\1/' "$dir/metrics.jsonl" > "$work/loss-$label-$p"
  echo "$label, lora.dropout $p: peak RSS $(( $(cat "$work/rss") / 1024 )) MiB, median $tps tokens/s"
}

for i in $(seq "$repeats"); do
  for p in 0.05 0; do
    run new "$build" "$p"
    if [ -n "$old" ]; then
      run old "$old" "$p"
      cmp -s "$work/loss-new-$p" "$work/loss-old-$p" || { echo "losses differ:"; paste "$work/loss-new-$p" "$work/loss-old-$p"; }
    fi
  done
done
