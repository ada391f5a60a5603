#!/usr/bin/python3
"""The same training step as train_bench.cpp in plain PyTorch (Debian's python3-torch, the same
LibTorch 1.13 underneath): a LLaMA with GQA written as a straightforward nn.Module, fp32,
torch.optim.AdamW(foreach=True) with decay on matrices only, clipping by global norm.
Prints one JSON line like train_bench.cpp."""
import argparse, json, math, resource, time
import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIGS = {  # same table as train_bench.cpp
    "tiny": dict(vocab=2048, dim=128, layers=4, heads=4, kv=2, ffn=384, seq=128, batch=16),
    "100m": dict(vocab=32000, dim=768, layers=12, heads=12, kv=4, ffn=2048, seq=256, batch=4),
}

class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__(); self.weight = nn.Parameter(torch.ones(d)); self.eps = eps
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

def rope(T, d, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = torch.outer(torch.arange(T).float(), inv)
    emb = torch.cat([ang, ang], -1)
    return emb.cos(), emb.sin()

def rot(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, self.h, self.kv = c["dim"], c["heads"], c["kv"]; self.hd = d // self.h
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.q = nn.Linear(d, self.h * self.hd, bias=False); self.k = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v = nn.Linear(d, self.kv * self.hd, bias=False); self.o = nn.Linear(self.h * self.hd, d, bias=False)
        self.g = nn.Linear(d, c["ffn"], bias=False); self.u = nn.Linear(d, c["ffn"], bias=False)
        self.dn = nn.Linear(c["ffn"], d, bias=False)
    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        y = self.n1(x)
        q = rot(self.q(y).view(B, T, self.h, self.hd).transpose(1, 2), cos, sin)
        k = rot(self.k(y).view(B, T, self.kv, self.hd).transpose(1, 2), cos, sin).repeat_interleave(self.h // self.kv, 1)
        v = self.v(y).view(B, T, self.kv, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kv, 1)
        a = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        a = a.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.o((a @ v).transpose(1, 2).reshape(B, T, -1))
        y = self.n2(x)
        return x + self.dn(F.silu(self.g(y)) * self.u(y))

class LM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.emb = nn.Embedding(c["vocab"], c["dim"]); self.blocks = nn.ModuleList(Block(c) for _ in range(c["layers"]))
        self.norm = RMSNorm(c["dim"]); self.head = nn.Linear(c["dim"], c["vocab"], bias=False)
        self.hd = c["dim"] // c["heads"]
    def forward(self, t):
        T = t.shape[1]; cos, sin = rope(T, self.hd)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        x = self.emb(t)
        for b in self.blocks: x = b(x, cos, sin, mask)
        return self.head(self.norm(x))

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny"); ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3); ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(); c = CONFIGS[a.config]
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    m = LM(c)
    for n, p in m.named_parameters():
        (nn.init.ones_ if p.dim() == 1 else lambda t: nn.init.normal_(t, 0, 0.02))(p.data)
    decay = [p for n, p in m.named_parameters() if p.dim() >= 2 and "emb" not in n]
    other = [p for n, p in m.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    B, T = c["batch"], c["seq"]
    def step():
        t = torch.randint(0, c["vocab"], (B, T + 1))
        loss = F.cross_entropy(m(t[:, :-1]).reshape(-1, c["vocab"]), t[:, 1:].reshape(-1))
        loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(a.warmup): step()
    t0 = time.perf_counter()
    for _ in range(a.steps): step()
    s = time.perf_counter() - t0
    n = sum(p.numel() for p in m.parameters())
    print(json.dumps({"impl": "pytorch", "config": a.config, "params": n, "tokens_per_s": round(a.steps * B * T / s, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "threads": a.threads}))

if __name__ == "__main__":
    main()
