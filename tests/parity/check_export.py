#!/usr/bin/env python3
"""Loads what test_hf_parity.cpp exported from a LoRA-fine-tuned libllm model into transformers
(the merged HF folder) and PEFT (the base + the adapter folder), and compares their logits with
libllm's (saved beside them). Then, for the folders exported with chat templates, transformers'
apply_chat_template (slow and fast tokenizer) must give libllm's text and token ids exactly.
usage: check_export.py OUT   (the folder hf_reference.py filled)"""
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

from transformers import AutoTokenizer
with open(os.path.join(out, "export", "libllm_chat.json"), encoding="utf-8") as f:
    chat_cases = json.load(f)
tokenizers = {}
for kind, fast in (("slow", False), ("fast", True)):
    wrong = checked = 0
    for case in chat_cases:
        key = (case["folder"], fast)
        try:
            if key not in tokenizers:
                tokenizers[key] = AutoTokenizer.from_pretrained(os.path.join(out, "export", case["folder"]), use_fast=fast)
        except (ImportError, ValueError) as e:  # no sentencepiece, or no slow tokenizers (transformers 5)
            res[f"chat_{kind}"] = f"not checked: {e}"
            break
        tok = tokenizers[key]
        args = dict(add_generation_prompt=case["add_generation_prompt"])
        text = tok.apply_chat_template(case["messages"], tokenize=False, **args)
        ids = tok.apply_chat_template(case["messages"], tokenize=True, **args)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding by default
            ids = ids["input_ids"]
        checked += 1
        if text != case["text"] or list(ids) != case["ids"]:
            wrong += 1
            print(f"chat mismatch ({kind}, {case['folder']}): transformers {text!r} {list(ids)}\n"
                  f"                      libllm {case['text']!r} {case['ids']}")
    else:
        res[f"chat_{kind}_cases"] = checked
        res[f"chat_{kind}_mismatches"] = wrong
print(json.dumps(res))
bad = [k for k, v in res.items() if k.endswith("diff") and not v <= 1e-4 * max(1.0, scale)]
bad += [k for k, v in res.items() if k.endswith("mismatches") and v != 0]
sys.exit(f"exported model differs from libllm: {bad}" if bad else 0)
