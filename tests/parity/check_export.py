#!/usr/bin/env python3
"""Loads what test_hf_parity.cpp exported from a LoRA-fine-tuned libllm model into transformers
(the merged HF folder) and PEFT (the base + the adapter folder), and compares their logits with
libllm's (saved beside them). usage: check_export.py OUT   (the folder hf_reference.py filled)"""
import json, os, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

out = sys.argv[1]
ref = load_file(os.path.join(out, "export", "libllm_logits.safetensors"))
ids, want = ref["input_ids"], ref["logits"]
scale = want.abs().max().item()
res = {}
merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "export", "merged")).float().eval()
with torch.no_grad():
    res["merged_max_abs_diff"] = (merged(input_ids=ids).logits - want).abs().max().item()
try:
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(os.path.join(out, "llama")).float()
    peft = PeftModel.from_pretrained(base, os.path.join(out, "export", "adapter")).eval()
    with torch.no_grad():
        res["peft_max_abs_diff"] = (peft(input_ids=ids).logits - want).abs().max().item()
except ImportError:
    res["peft"] = "not installed: adapter not checked"
res["logit_scale"] = scale
print(json.dumps(res))
bad = [k for k, v in res.items() if k.endswith("diff") and not v <= 1e-4 * max(1.0, scale)]
sys.exit(f"exported model differs from libllm: {bad}" if bad else 0)
