#!/usr/bin/env bash
# Host memory of a ZeRO-3 checkpoint save: 2 Gloo ranks train a 206 M-parameter fp32 LLaMA (dim
# 1024, 16 layers, FFN 2816) for one step and save it (an 825 MB model.safetensors). Rank 0 writes
# the weights as each unit is gathered, so its peak resident memory should match rank 1's, which
# writes only its optimizer shard. Prints both peaks (/usr/bin/time) and the file size.
# usage: benchmarks/zero3_save.sh BUILD_DIR   (after: BUILD_DIR/bin/llm-data tests/apps/tiny-pretrain.yaml ...,
#        i.e. the app tests' shards in BUILD_DIR/app-test-run; run from the repository root)
set -euo pipefail
build=${1:-build}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -d "$build/app-test-run/train" ] || { echo "run the tests first (ctest -R apps.data.tiny): no $build/app-test-run"; exit 1; }
. tests/apps/free_port.sh
port=$(free_port)
pids=()
for r in 0 1; do
  WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    /usr/bin/time -f "%M" -o "$work/rss-$r" "$build/bin/llm-pretrain" tests/apps/tiny-pretrain.yaml \
    --set "data.train=[$build/app-test-run/train]" --set data.valid="$build/app-test-run/valid" \
    --set model.dim=1024 --set model.n_layers=16 --set model.n_heads=8 --set model.n_kv_heads=8 --set model.ffn_dim=2816 \
    --set train.sharding=zero3 --set train.activation_checkpointing=true --set train.steps=1 --set train.eval_every=0 \
    --set train.sample_tokens=0 --set train.plot=false --set checkpoint.resume=none --set train.run_dir="$work/run" \
    > "$work/log-$r" 2>&1 &
  pids+=($!)
done
for r in 0 1; do wait "${pids[$r]}" || { echo "rank $r failed:"; tail -n 20 "$work/log-$r"; exit 1; }; done
grep "model:" "$work/log-0" | tail -n 1
echo "model.safetensors: $(stat -c %s "$work"/run/checkpoints/step-00000001/model.safetensors) bytes"
echo "peak RSS: rank 0 (writes the weights) $(( $(cat "$work/rss-0") / 1024 )) MiB, rank 1 $(( $(cat "$work/rss-1") / 1024 )) MiB"
