"""Writes a random LLaMA as a Hugging Face folder (config.json + pytorch_model.bin, fp32) with
Debian's python3-torch: the source model of benchmarks/torch_bin.sh and benchmarks/export.sh.
usage: random_llama.py OUT_DIR DIM FFN VOCAB LAYERS HEADS KV_HEADS"""
import json, os, sys

import torch

out = sys.argv[1]
D, F, V, L, H, KV = (int(a) for a in sys.argv[2:8])
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
           "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2},
          open(os.path.join(out, "config.json"), "w"))
torch.manual_seed(0)
kv = D // H * KV
sd = {"model.embed_tokens.weight": torch.randn(V, D) * 0.02, "model.norm.weight": torch.ones(D),
      "lm_head.weight": torch.randn(V, D) * 0.02}
for i in range(L):
    p = f"model.layers.{i}."
    for n, rows in [("q_proj", D), ("k_proj", kv), ("v_proj", kv), ("o_proj", D)]:
        sd[p + "self_attn." + n + ".weight"] = torch.randn(rows, D) * 0.02
    sd[p + "mlp.gate_proj.weight"] = torch.randn(F, D) * 0.02
    sd[p + "mlp.up_proj.weight"] = torch.randn(F, D) * 0.02
    sd[p + "mlp.down_proj.weight"] = torch.randn(D, F) * 0.02
    sd[p + "input_layernorm.weight"] = torch.ones(D)
    sd[p + "post_attention_layernorm.weight"] = torch.ones(D)
torch.save(sd, os.path.join(out, "pytorch_model.bin"))
print(f"model: {sum(t.numel() for t in sd.values()) / 1e9:.3f} B parameters, fp32")
