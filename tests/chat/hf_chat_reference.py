#!/usr/bin/env python3
"""An independent reference for libllm's chat rendering: what Hugging Face transformers (4.45 to
4.57) computes for tokenizer.apply_chat_template(messages, tokenize=True) on a folder that
llm-export wrote, rebuilt from jinja2 and the sentencepiece model alone (no transformers here):

- rendering (transformers.utils.chat_template_utils._compile_jinja_template): an
  ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and the loopcontrols extension,
  the globals raise_exception and strftime_now, the tojson filter; render(messages=...,
  add_generation_prompt=..., **special_tokens_map) with the special tokens as strings.
- tokenizing (LlamaTokenizer, legacy=True, add_special_tokens=False): the text is split at the
  special tokens (a trie: the earliest match, the longest there; empty pieces are dropped), each
  special token becomes its id and every other piece is sp_model.encode(piece) on its own.

usage: hf_chat_reference.py FOLDER CASES.jsonl OUT.jsonl
  CASES: one {"messages": [...], "add_generation_prompt": bool} per line;
  OUT: one {"text": rendered text, "ids": token ids} per case, in order."""
import json
import os
import sys
from datetime import datetime

import jinja2
import sentencepiece
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def compile_template(source):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def split_on_specials(text, specials):
    """transformers' Trie.split for a few tokens: earliest match first, the longest there."""
    out, start, pos = [], 0, 0
    ordered = sorted(specials, key=len, reverse=True)
    while pos < len(text):
        hit = next((s for s in ordered if text.startswith(s, pos)), None)
        if hit is None:
            pos += 1
            continue
        out += [text[start:pos], hit]
        pos += len(hit)
        start = pos
    out.append(text[start:])
    return [piece for piece in out if piece]


def main():
    folder, cases_path, out_path = sys.argv[1:4]
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    template = compile_template(config["chat_template"])
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "unk_token") if k in config}
    specials = {v: sp.piece_to_id(v) for v in special_map.values()}
    with open(cases_path, encoding="utf-8") as f, open(out_path, "w", encoding="utf-8") as out:
        for line in f:
            case = json.loads(line)
            try:
                text = template.render(messages=case["messages"],
                                       add_generation_prompt=case["add_generation_prompt"], **special_map)
            except jinja2.exceptions.TemplateError as e:
                out.write(json.dumps({"error": str(e)}, ensure_ascii=False) + "\n")
                continue
            ids = []
            for piece in split_on_specials(text, specials):
                ids += [specials[piece]] if piece in specials else sp.encode(piece)
            out.write(json.dumps({"text": text, "ids": ids}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
