#!/usr/bin/env bash
# Loading pytorch_model.bin (torch.save) against safetensors: writes a random 220 M-parameter
# LLaMA (dim 1024, 12 layers, FFN 2816, vocab 32000, fp32: 879 MB) with Debian's python3-torch
# as one pytorch_model.bin, converts it to safetensors with llm-export (and checks that a second
# conversion, from the safetensors, is byte-identical), then times REPEATS alternating runs of
# llm-generate (load the fp32 model, one token) from each folder, and Python's torch.load of the
# .bin, with peak resident memory (/usr/bin/time).
# usage: benchmarks/torch_bin.sh [BUILD_DIR] [REPEATS=3]
set -euo pipefail
build=$(realpath "${1:-build}") repeats=${2:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/bin"
cp tests/fixtures/tokenizer.model "$work/bin/"
/usr/bin/python3 benchmarks/random_llama.py "$work/bin" 1024 2816 32000 12 16 16 > /dev/null
"$build/bin/llm-export" --checkpoint "$work/bin" --out "$work/st" --dtype float32 > /dev/null
"$build/bin/llm-export" --checkpoint "$work/st" --out "$work/st2" --dtype float32 > /dev/null
cmp "$work/st/model.safetensors" "$work/st2/model.safetensors"  # the .bin and its conversion load the same
for i in $(seq "$repeats"); do
  for src in bin st; do
    /usr/bin/time -f "%e %M" -o "$work/t" "$build/bin/llm-generate" --checkpoint "$work/$src" --prompt a \
      --max-new-tokens 1 --temperature 0 > /dev/null
    read -r s kb < "$work/t"
    echo "llm-generate (load + one token) from $src run $i: $s s, peak RSS $((kb / 1024)) MiB"
  done
  /usr/bin/time -f "%e %M" -o "$work/t" /usr/bin/python3 -c "import torch; torch.load('$work/bin/pytorch_model.bin')"
  read -r s kb < "$work/t"
  echo "python3 torch.load run $i: $s s (interpreter start included), peak RSS $((kb / 1024)) MiB"
done
