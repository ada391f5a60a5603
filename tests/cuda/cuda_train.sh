#!/usr/bin/env bash
# llm-pretrain with train.device: cuda (label gpu). On the same data and seed:
#   CUDA fp32 losses == CPU fp32 losses (1e-4 per step);
#   4 steps + resume + 4 steps == 8 steps straight on CUDA (1e-6);
#   a 1-rank NCCL process group (WORLD_SIZE=1) == no process group (1e-6);
#   a LoRA fine-tune with dropout: 4 steps + resume + 4 steps == 8 straight (1e-6);
#   bf16 on CUDA trains (finite, falling loss).
# usage: cuda_train.sh BIN_DIR RECIPE WORK_DIR -- [--set ...]
set -euo pipefail
. "$(dirname "$0")/../apps/free_port.sh"
bin=$1 recipe=$2 work=$3; shift 4
rm -rf "$work" && mkdir -p "$work"
common=(--set train.steps=8 --set train.eval_every=0 --set train.sample_tokens=0 --set train.plot=false
        --set schedule.kind=constant --set checkpoint.every=4 "$@")
run() { local name=$1; shift; "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$work/$name" "$@" \
          > "$work/$name.log" 2>&1 || { cat "$work/$name.log"; exit 1; }; }
losses() { python3 -c 'import json, sys; [print(json.loads(l)["loss"]) for l in open(sys.argv[1])]' "$work/$1/metrics.jsonl"; }
compare() {  # compare NAME_A NAME_B TOLERANCE: 8 steps, each loss finite, max |difference| <= TOLERANCE
  "$(dirname "$0")/../apps/compare_losses.py" "$work/$1" "$work/$2" 8 "$3"
}
run cpu --set checkpoint.resume=none --set train.device=cpu
run cuda --set checkpoint.resume=none --set train.device=cuda
grep -q "cuda:0" "$work/cuda.log" || { echo "did not train on cuda:0"; cat "$work/cuda.log"; exit 1; }
compare cpu cuda 1e-4
run resumed --set checkpoint.resume=none --set train.device=cuda --set train.steps=4
run resumed --set checkpoint.resume=auto --set train.device=cuda
grep -q "resumed from" "$work/resumed.log" || { echo "no resume"; exit 1; }
compare cuda resumed 1e-6
WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$(free_port) \
  run nccl --set checkpoint.resume=none --set train.device=cuda
grep -q "rank 0/1 (nccl" "$work/nccl.log" || { echo "no NCCL process group"; cat "$work/nccl.log"; exit 1; }
compare cuda nccl 1e-6
# LoRA with dropout on the GPU: the masks come from the CUDA generator, which checkpoints keep
# ("rng.cuda"), so 4 + resume + 4 steps == 8 straight.
lora=(--set finetune.base="$work/cuda/checkpoints/step-00000008" --set finetune.method=lora --set lora.dropout=0.2
      --set train.device=cuda)
ft() { local name=$1; shift; "$bin/llm-finetune" "$recipe" "${common[@]}" --set train.run_dir="$work/$name" "$@" \
         > "$work/$name.log" 2>&1 || { cat "$work/$name.log"; exit 1; }; }
ft lora "${lora[@]}" --set checkpoint.resume=none
ft lora-resumed "${lora[@]}" --set checkpoint.resume=none --set train.steps=4
ft lora-resumed "${lora[@]}" --set checkpoint.resume=auto
grep -q "resumed from" "$work/lora-resumed.log" || { echo "no LoRA resume"; exit 1; }
compare lora lora-resumed 1e-6
run bf16 --set checkpoint.resume=none --set train.device=cuda --set train.dtype=bf16
python3 - "$work/bf16/metrics.jsonl" <<'PY' || { echo "bf16 did not train"; exit 1; }
import json, math, sys
v = [json.loads(l)["loss"] for l in open(sys.argv[1])]
print(f"bf16: first {v[0]} last {v[-1]}")
assert len(v) == 8 and all(isinstance(x, float) and math.isfinite(x) for x in v) and v[-1] < v[0]
PY
