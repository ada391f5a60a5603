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
/usr/bin/python3 - "$work/bin" <<'PY'
import json, os, sys, torch
out = sys.argv[1]
D, F, V, L = 1024, 2816, 32000, 12
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
           "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": 16, "num_key_value_heads": 16,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2},
          open(os.path.join(out, "config.json"), "w"))
torch.manual_seed(0)
sd = {"model.embed_tokens.weight": torch.randn(V, D) * 0.02, "model.norm.weight": torch.ones(D),
      "lm_head.weight": torch.randn(V, D) * 0.02}
for i in range(L):
    p = f"model.layers.{i}."
    for n in ["q_proj", "k_proj", "v_proj", "o_proj"]:
        sd[p + "self_attn." + n + ".weight"] = torch.randn(D, D) * 0.02
    sd[p + "mlp.gate_proj.weight"] = torch.randn(F, D) * 0.02
    sd[p + "mlp.up_proj.weight"] = torch.randn(F, D) * 0.02
    sd[p + "mlp.down_proj.weight"] = torch.randn(D, F) * 0.02
    sd[p + "input_layernorm.weight"] = torch.ones(D)
    sd[p + "post_attention_layernorm.weight"] = torch.ones(D)
torch.save(sd, os.path.join(out, "pytorch_model.bin"))
PY
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
