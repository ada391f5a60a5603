#!/usr/bin/env python3
"""Reference numbers from Hugging Face transformers for libllm's parity tests (test_hf_parity.cpp).

For a LLaMA with grouped-query attention and a Mixtral-style MoE, with the same random weights:
writes OUT/<kind>/ (config.json + model.safetensors in transformers' checkpoint layout, which both
sides load) and OUT/<kind>/reference.{safetensors,json}: the input ids, fp32 logits (CPU), bf16
logits (CUDA, when there is a GPU), and one training step in fp32 on the CPU: the loss, the global
gradient norm, and the loss after one torch.optim.AdamW step.
usage: hf_reference.py OUT"""
import json, math, os, sys
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

V, D, F, L, H, KV, HD, T, B = 256, 64, 160, 2, 4, 2, 16, 24, 2
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-8, 0.1


def config(kind):
    c = {"vocab_size": V, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
         "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": HD, "hidden_act": "silu",
         "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
         "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "attention_dropout": 0.0,
         "use_cache": False, "torch_dtype": "float32"}
    if kind == "llama":
        c.update(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=10000.0,
                 attention_bias=False, mlp_bias=False)
    else:
        c.update(architectures=["MixtralForCausalLM"], model_type="mixtral", rope_theta=1e6,
                 num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.001,
                 output_router_logits=False, sliding_window=None, router_jitter_noise=0.0)
    return c


def weights(kind, g):
    """Random weights in transformers' checkpoint names, scaled so activations stay O(1)."""
    def mat(o, i):
        return torch.randn(o, i, generator=g) / math.sqrt(i)
    def norm():
        return 1.0 + 0.1 * torch.randn(D, generator=g)
    w = {"model.embed_tokens.weight": torch.randn(V, D, generator=g), "model.norm.weight": norm(),
         "lm_head.weight": mat(V, D)}
    for l in range(L):
        p = f"model.layers.{l}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = mat(H * HD, D)
        w[p + "self_attn.k_proj.weight"] = mat(KV * HD, D)
        w[p + "self_attn.v_proj.weight"] = mat(KV * HD, D)
        w[p + "self_attn.o_proj.weight"] = mat(D, H * HD)
        if kind == "llama":
            w[p + "mlp.gate_proj.weight"] = mat(F, D)
            w[p + "mlp.up_proj.weight"] = mat(F, D)
            w[p + "mlp.down_proj.weight"] = mat(D, F)
        else:
            w[p + "block_sparse_moe.gate.weight"] = mat(4, D)
            for e in range(4):
                q = f"{p}block_sparse_moe.experts.{e}."
                w[q + "w1.weight"] = mat(F, D)
                w[q + "w2.weight"] = mat(D, F)
                w[q + "w3.weight"] = mat(F, D)
    return {k: v.contiguous() for k, v in w.items()}


def load(path, dtype, device):
    # (dtype is applied with .to(): transformers 4.x and 5.x name the loading option differently)
    m, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, attn_implementation="sdpa")
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        sys.exit(f"{path}: transformers did not load every weight: {bad}")
    return m.to(device, dtype)


def main():
    out = sys.argv[1]
    for kind in ("llama", "mixtral"):
        d = os.path.join(out, kind)
        os.makedirs(d, exist_ok=True)
        g = torch.Generator().manual_seed(1234 if kind == "llama" else 4321)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config(kind), f, indent=2)
        save_file(weights(kind, g), os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        ids = torch.randint(0, V, (B, T), generator=g)
        ref = {"input_ids": ids}

        m = load(d, torch.float32, "cpu").eval()
        with torch.no_grad():
            ref["logits_fp32"] = m(input_ids=ids).logits.float().contiguous()
        # One training step, fp32 on the CPU.
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        gn = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in m.parameters() if p.grad is not None)).item()
        decay = [p for n, p in m.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
        other = [p for n, p in m.named_parameters() if not (p.dim() >= 2 and "embed_tokens" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": other, "weight_decay": 0.0}],
                                lr=LR, betas=BETAS, eps=EPS, foreach=False)
        opt.step()
        with torch.no_grad():
            loss_after = m(input_ids=ids, labels=ids).loss.item()
        facts = {"kind": kind, "loss": loss.item(), "grad_norm": gn, "loss_after_step": loss_after, "lr": LR,
                 "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS, "weight_decay": WD,
                 "transformers": transformers.__version__, "torch": torch.__version__}
        if torch.cuda.is_available():
            mb = load(d, torch.bfloat16, "cuda").eval()
            with torch.no_grad():
                ref["logits_bf16"] = mb(input_ids=ids.cuda()).logits.float().cpu().contiguous()
            facts["bf16_device"] = torch.cuda.get_device_name()
        save_file(ref, os.path.join(d, "reference.safetensors"))
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump(facts, f, indent=2)
        print(json.dumps(facts))


if __name__ == "__main__":
    main()
