#!/usr/bin/env bash
# Host memory and time of llm-export on a model larger than a small machine wants to hold twice:
# writes a random LLaMA of TinyLlama-1.1B's shape (dim 2048, 22 layers, 32 heads, 4 kv heads, FFN
# 5632, vocab 32000; fp32, 4.4 GB) with Debian's python3-torch as pytorch_model.bin, then times
# (/usr/bin/time: seconds, peak resident memory)
#   1. .bin -> safetensors, fp32;
#   2. safetensors fp32 -> bf16;
#   3. a LoRA fine-tune of it (llm-finetune, 1 step, rank 16 on every projection: a checkpoint
#      that holds only the adapters) -> merged HF folder, bf16.
# llm-export reads, merges, converts and writes one weight at a time, so its peak should stay near
# one fp32 weight (the 262 MB embedding) plus the process itself, whatever the model's size.
# OLD_BUILD=DIR repeats the exports with another build's llm-export (e.g. one from before the
# streaming export) and checks that both write the same bytes.
# usage: benchmarks/export.sh [BUILD_DIR]   (from the repository root; needs python3-torch and ~18 GB
#        of /tmp with OLD_BUILD, ~13 GB without)
set -euo pipefail
build=$(realpath "${1:-build}")
old=${OLD_BUILD:+$(realpath "$OLD_BUILD")}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/bin"
cp tests/fixtures/tokenizer.model "$work/bin/"
/usr/bin/python3 benchmarks/random_llama.py "$work/bin" 2048 5632 32000 22 32 4
/usr/bin/python3 -c 'import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(16): f.write(json.dumps({"prompt": f"Say the number {i}.", "response": f"The number is {i}."}) + "\n")' \
  "$work/chat.jsonl"

timed() {  # timed LABEL BUILD ARGS...: runs BUILD's llm-export, prints seconds and peak RSS
  local label=$1 b=$2
  shift 2
  /usr/bin/time -f "%e %M" -o "$work/t" "$b/bin/llm-export" "$@" > "$work/export.log" 2>&1 ||
    { cat "$work/export.log"; exit 1; }
  read -r s kb < "$work/t"
  echo "$label: $s s, peak RSS $((kb / 1024)) MiB"
}

timed ".bin -> safetensors fp32" "$build" --checkpoint "$work/bin" --out "$work/st" --dtype float32
echo "  (model.safetensors: $(( $(stat -c %s "$work/st/model.safetensors") / 1000000 )) MB)"
timed "safetensors fp32 -> bf16" "$build" --checkpoint "$work/st" --out "$work/bf16" --dtype bfloat16

"$build/bin/llm-finetune" recipes/tiny-jargon.yaml --set finetune.base="$work/st" \
  --set "chat.files=[$work/chat.jsonl]" --set chat.valid_every=0 --set chat.packed=false \
  --set train.seq_len=64 --set train.micro_batch=1 --set train.steps=1 --set train.eval_every=0 \
  --set train.dtype=bf16 --set "train.sample_prompts=[]" --set train.plot=false --set checkpoint.resume=none \
  --set train.run_dir="$work/ft" > "$work/ft.log" 2>&1 || { cat "$work/ft.log"; exit 1; }
ck="$work/ft/checkpoints/step-00000001"
echo "LoRA checkpoint (adapters only): $(du -sm "$ck" | cut -f1) MB"
timed "LoRA checkpoint -> merged bf16" "$build" --checkpoint "$ck" --out "$work/merged" --dtype bfloat16

if [ -n "$old" ]; then
  timed "OLD_BUILD: safetensors fp32 -> bf16" "$old" --checkpoint "$work/st" --out "$work/bf16-old" --dtype bfloat16
  timed "OLD_BUILD: LoRA checkpoint -> merged bf16" "$old" --checkpoint "$ck" --out "$work/merged-old" --dtype bfloat16
  # Same values (the tensors' order within a file may differ: compare through a reader).
  /usr/bin/python3 - "$work" <<'PY'
import glob, json, mmap, struct, sys
def tensors(d):  # name -> (dtype, shape, the bytes as a memoryview of the mapped file)
    out = {}
    for p in sorted(glob.glob(d + "/*.safetensors")):
        f = open(p, "rb")
        m = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        n = struct.unpack("<Q", m[:8])[0]
        header = json.loads(bytes(m[8:8 + n]))
        header.pop("__metadata__", None)
        for k, v in header.items():
            b, e = v["data_offsets"]
            out[k] = (v["dtype"], v["shape"], m[8 + n + b:8 + n + e])
    return out
for new, old in [("bf16", "bf16-old"), ("merged", "merged-old")]:
    a, b = tensors(sys.argv[1] + "/" + new), tensors(sys.argv[1] + "/" + old)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), new + " differs from " + old
    print(f"{new}: the same {len(a)} tensors, byte for byte, as OLD_BUILD's")
PY
fi
