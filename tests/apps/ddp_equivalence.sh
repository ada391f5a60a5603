#!/usr/bin/env bash
# 2 processes over Gloo (torchrun-style environment) must give the same per-step losses (1e-6)
# as 1 process with twice the gradient accumulation, on the same global batch.
# usage: ddp_equivalence.sh BIN_DIR RECIPE WORK_DIR -- [--set ...]
set -euo pipefail
. "$(dirname "$0")/free_port.sh"
bin=$1 recipe=$2 work=$3; shift 4
rm -rf "$work" && mkdir -p "$work"
common=(--set train.steps=6 --set train.micro_batch=2 --set train.seq_len=16 --set train.global_batch_tokens=64
        --set train.eval_every=0 --set train.sample_tokens=0 --set checkpoint.resume=none --set train.plot=false "$@")
"$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$work/one" > "$work/one.log" 2>&1
port=$(free_port)
for r in 0 1; do
  WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    timeout 120 "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$work/two" > "$work/two.$r.log" 2>&1 &
done
wait %1 && wait %2 || { cat "$work"/two.*.log; exit 1; }
grep -q "rank 0/2 (gloo" "$work/two.0.log" || { echo "rank 0 did not run distributed"; cat "$work/two.0.log"; exit 1; }
"$(dirname "$0")/compare_losses.py" "$work/one" "$work/two" 6 1e-6
# Rank 0 writes rank 1's generators beside its own (every rank resumes its own draws).
python3 - "$work/two" <<'PY' || { echo "the 2-rank checkpoint lacks rank 1's generator"; exit 1; }
import glob, json, struct, sys
f = sorted(glob.glob(sys.argv[1] + "/checkpoints/step-*/optimizer.safetensors"))[-1]
b = open(f, "rb").read()
header = json.loads(b[8:8 + struct.unpack("<Q", b[:8])[0]])
assert "rng.rank1.cpu" in header and "rng.rank2.cpu" not in header, sorted(header)
PY
