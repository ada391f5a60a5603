#!/usr/bin/env python3
"""The reference for train_bench.cpp --config 1b on a GPU: the same ~1B LLaMA as transformers'
LlamaForCausalLM (SDPA attention), torch.optim.AdamW(fused=True) with decay on matrices only,
clipping by global norm, random tokens; eager or torch.compile. --precision bf16: bf16 weights
updated in bf16 (no master copy: less work than libllm's); amp: fp32 weights under
torch.autocast(bf16), the fp32-master numerics libllm's bf16 training has. One JSON line."""
import argparse, json, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--mode", choices=["eager", "compile"], default="eager")
p.add_argument("--precision", choices=["bf16", "amp"], default="bf16")
p.add_argument("--micro-batch", type=int, default=4)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--peak-tflops", type=float, default=989.0)
a = p.parse_args()

V, D, L, H, KV, F, T = 32000, 2048, 16, 32, 8, 8192, 2048
cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                  num_key_value_heads=KV, max_position_embeddings=T, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  attn_implementation="sdpa")
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16 if a.precision == "bf16" else torch.float32)
model.config.use_cache = False
decay = [w for n, w in model.named_parameters() if w.dim() >= 2 and "embed_tokens" not in n]
other = [w for n, w in model.named_parameters() if not (w.dim() >= 2 and "embed_tokens" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                        lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
fwd = torch.compile(model) if a.mode == "compile" else model
params = list(model.parameters())
B = a.micro_batch

def step():
    t = torch.randint(0, V, (B, T + 1), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.precision == "amp"):
        logits = fwd(input_ids=t[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), t[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)

for _ in range(a.warmup):
    step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
for _ in range(a.steps):
    step()
torch.cuda.synchronize()
s = time.perf_counter() - t0
n = sum(w.numel() for w in params)
n_embed = model.model.embed_tokens.weight.numel()
tok_s = a.steps * B * T / s
flops = 6.0 * (n - n_embed) + 12.0 * L * H * (D // H) * T
impl = f"transformers-{a.mode}" + ("-amp" if a.precision == "amp" else "")
print(json.dumps({"impl": impl, "config": "1b", "device": "cuda", "dtype": a.precision,
                  "micro_batch": B, "params": n, "tokens_per_s": round(tok_s, 1),
                  "mfu": round(tok_s * flops / (a.peak_tflops * 1e12), 4),
                  "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  "torch": torch.__version__}), flush=True)
