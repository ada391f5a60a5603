#!/usr/bin/env bash
# Sharded data parallel on the CPU: 2 ranks over Gloo (one LibTorch thread each) train the demo's
# data with a wider, deeper model (dim 256, 12 layers, 10.5 M parameters, fp32) under each
# train.sharding, with and without activation checkpointing. Prints, per run, the median tokens/s
# of the steps after the second and rank 0's peak parameters + gradients + optimizer state
# (the trainer's "state_mib", counted from the live tensors), and rank 0's peak host memory once
# the model is built (events.jsonl's built_rss_mib: ZeRO-2/3 build the model deferred).
# usage: benchmarks/sharding.sh BUILD_DIR [STEPS=12]
# Needs the demo's data: build/bin/llm-data recipes/tiny-fortunes.yaml
set -euo pipefail
build=${1:?usage: sharding.sh BUILD_DIR [STEPS]} steps=${2:-12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -d runs/tiny-fortunes/shards/train ] || { echo "run: $build/bin/llm-data recipes/tiny-fortunes.yaml"; exit 1; }
common=(--set model.dim=256 --set model.n_layers=12 --set model.ffn_dim=768 --set train.steps="$steps"
        --set train.micro_batch=8 --set train.global_batch_tokens=4096 --set train.threads=1
        --set train.eval_every=0 --set train.sample_tokens=0 --set train.plot=false --set checkpoint.every=0
        --set checkpoint.resume=none --set schedule.warmup_steps=2)
port=$((20000 + $$ % 20000))
printf "%-8s %-5s %12s %12s %12s\n" sharding ckpt "tokens/s" "state MiB" "built MiB"
for run in none:false zero1:false zero2:false none:true zero2:true zero3:true; do
  sharding=${run%:*} ckpt=${run#*:} port=$((port + 1))
  for r in 0 1; do
    WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      "$build/bin/llm-pretrain" recipes/tiny-fortunes.yaml "${common[@]}" --set train.sharding="$sharding" \
      --set train.activation_checkpointing="$ckpt" --set train.run_dir="$work/$sharding-$ckpt" > "$work/$r.log" 2>&1 &
  done
  wait %1 && wait %2 || { tail -n 5 "$work"/*.log; exit 1; }
  m="$work/$sharding-$ckpt/metrics.jsonl"
  tps=$(tail -n +3 "$m" | sed -E 's/.*"tokens_per_s":([^,}]*).*/\1/' | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
  mib=$(sed -E 's/.*"state_mib":([^,}]*).*/\1/' "$m" | sort -g | tail -n 1)
  rss=$(sed -n -E 's/.*"built_rss_mib":([^,}]*).*/\1/p' "$work/$sharding-$ckpt/events.jsonl" | head -n 1)
  printf "%-8s %-5s %12.0f %12.1f %12.0f\n" "$sharding" "$ckpt" "$tps" "$mib" "$rss"
done
