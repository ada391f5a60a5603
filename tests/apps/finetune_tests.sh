#!/usr/bin/env bash
# Fine-tuning end to end: pretrain a tiny base -> llm-finetune (LoRA) on Jargon File Q&A (the
# demo's data; dict-jargon) -> held-out loss falls -> llm-export (merged HF + PEFT adapter, with
# the chat template) -> packed rows train and resume exactly ->
# llm-eval gives the same loss on the checkpoint and the export -> llm-generate with and without
# the KV cache answers the same (greedy) -> the LoRA checkpoint holds only its adapters.
# usage: finetune_tests.sh BIN_DIR SRC_DIR PRETRAIN_RECIPE WORK_DIR -- [--set ...] (the pretraining data sets)
set -euo pipefail
. "$(dirname "$0")/free_port.sh"
bin=$1 src=$2 recipe=$3 work=$4; shift 5
rm -rf "$work" && mkdir -p "$work"
fail() { echo "FAILED: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -25 "$f"; done; exit 1; }

# A base with room for chat examples (160 positions).
"$bin/llm-pretrain" "$recipe" "$@" --set train.run_dir="$work/base" --set model.max_seq_len=160 \
  --set train.sample_prompts=[] > "$work/base.log" 2>&1 || fail "pretraining the base"
base="$work/base/checkpoints/step-00000004"

# Short examples: the fixture sentences as answers, under a few prompts (>= 20 examples, so that
# valid_every: 10 holds some out).
n=0; while IFS= read -r line; do n=$((n + 1)); [ -n "$line" ] || continue
  for ask in "Say sentence %d." "Repeat line %d, please." "What is sentence number %d?" "Quote %d."; do
    printf "{\"prompt\": \"$ask\", \"response\": \"%s\"}\n" "$n" "$(printf '%s' "$line" | sed 's/["\\]/\\&/g')"
  done
done < "$src/tests/fixtures/eval.txt" > "$work/short.jsonl"
# For packed rows of 160 positions: shorter ones (~75 tokens with the template, two to a row) and
# some of the above (~110 tokens, alone in a row).
n=0; while IFS= read -r line; do n=$((n + 1)); [ -n "$line" ] || continue
  for ask in "Say %d." "Quote %d."; do
    printf "{\"prompt\": \"$ask\", \"response\": \"%s\"}\n" "$n" "$(printf '%s' "$line" | cut -d' ' -f1-3 | sed 's/["\\]/\\&/g')"
  done
done < "$src/tests/fixtures/eval.txt" > "$work/shorter.jsonl"
head -n 8 "$work/short.jsonl" >> "$work/shorter.jsonl"
if [ -e /usr/share/dictd/jargon.index ]; then
  "$src/recipes/data/jargon-qa.sh" "$work/data" > "$work/data.log" 2>&1 || fail "jargon-qa.sh"
  head -n 200 "$work/data/jargon.jsonl" > "$work/chat.jsonl"
else  # without dict-jargon
  cp "$work/short.jsonl" "$work/chat.jsonl"
fi

cat > "$work/ft.yaml" <<YAML
finetune: {base: $base, method: lora}
lora: {rank: 8, alpha: 16, dropout: 0.0, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
chat: {files: [$work/chat.jsonl], valid_every: 10, chat_template: chatml}
optim: {lr: 0.01, weight_decay: 0.0}
schedule: {warmup_steps: 2}
train: {run_dir: $work/ft, seq_len: 128, micro_batch: 4, steps: 20, log_every: 5, eval_every: 10, eval_batches: 4,
        plot: false, sample_prompts: ['What does "hack" mean?'], sample_tokens: 8}
checkpoint: {every: 10, keep_last: 2}
YAML
"$bin/llm-finetune" "$work/ft.yaml" > "$work/ft.log" 2>&1 || fail "llm-finetune"
grep -q "method lora: [0-9]* of [0-9]* parameters train" "$work/ft.log" || fail "no trainable-parameter count"
grep -q "chat data: .* truncated" "$work/ft.log" || fail "no chat data summary"
before=$(sed -n 's/^eval before fine-tuning: //p' "$work/ft.log")
after=$(tail -n 1 "$work/ft/metrics.jsonl" | sed 's/.*"eval_loss":\([0-9.e+-]*\).*/\1/')
echo "held-out loss: $before -> $after"
awk -v a="$before" -v b="$after" 'BEGIN { exit !(b < a - 0.05) }' || fail "held-out loss did not fall: $before -> $after"
# Resuming these adapters on another base: refused from trainer.json before any model is built.
sed "s|base: $base,|base: $src/tests/fixtures/tiny-llama,|; s|steps: 20|steps: 30|; s|seq_len: 128|seq_len: 32|" "$work/ft.yaml" > "$work/ft-other.yaml"
if "$bin/llm-finetune" "$work/ft-other.yaml" > "$work/ft-other.log" 2>&1; then fail "resumed on another base"; fi
grep -q "its adapters were trained on the base .* is another model" "$work/ft-other.log" || fail "no other-base error"
if grep -q "resolved recipe" "$work/ft-other.log"; then fail "the other-base error came after the model was built"; fi

# Packed rows (chat.packed): several examples per row, each attending to itself; the data
# sequence lists every example; 4 steps + resume + 4 steps == 8 straight.
packed=(--set chat.packed=true --set chat.files=["$work/shorter.jsonl"] --set train.seq_len=160 --set train.steps=8 --set train.eval_every=0 --set train.sample_prompts=[]
        --set schedule.kind=constant --set checkpoint.every=4)
"$bin/llm-finetune" "$work/ft.yaml" "${packed[@]}" --set train.run_dir="$work/packed" > "$work/packed.log" 2>&1 ||
  fail "llm-finetune chat.packed"
grep -q "chat.packed: an epoch's [0-9]* examples fill [0-9]* rows of 160 positions" "$work/packed.log" ||
  fail "no packing summary"
used=$(grep -o '\[0,[0-9]*\]' "$work/packed/data_sequence.jsonl" | wc -l)
[ "$used" -gt 32 ] || fail "8 packed steps used $used examples, not more than their 32 rows"
"$bin/llm-finetune" "$work/ft.yaml" "${packed[@]}" --set train.run_dir="$work/packed-resumed" --set train.steps=4 \
  > "$work/packed-resumed.log" 2>&1 || fail "llm-finetune chat.packed, 4 steps"
"$bin/llm-finetune" "$work/ft.yaml" "${packed[@]}" --set train.run_dir="$work/packed-resumed" \
  >> "$work/packed-resumed.log" 2>&1 || fail "llm-finetune chat.packed, resumed"
grep -q "resumed from" "$work/packed-resumed.log" || fail "packed run did not resume"
cmp -s <(sed 's/.*"loss":\([^,]*\),.*/\1/' "$work/packed/metrics.jsonl") \
       <(sed 's/.*"loss":\([^,]*\),.*/\1/' "$work/packed-resumed/metrics.jsonl") || fail "packed resume differs"
cmp -s "$work/packed/data_sequence.jsonl" "$work/packed-resumed/data_sequence.jsonl" || fail "packed data sequence differs"
# 2 ranks over Gloo, a row each, == 1 process accumulating 2 rows (1e-6): ranks take alternate rows
# of one stream, and the data sequence gathers their differing numbers of examples.
dp=("${packed[@]}" --set train.micro_batch=1 --set train.global_batch_tokens=320 --set checkpoint.every=0)
"$bin/llm-finetune" "$work/ft.yaml" "${dp[@]}" --set train.run_dir="$work/packed-1" > "$work/packed-1.log" 2>&1 ||
  fail "llm-finetune chat.packed, 1 process"
port=$(free_port)
for r in 0 1; do
  WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port timeout 120 \
    "$bin/llm-finetune" "$work/ft.yaml" "${dp[@]}" --set train.run_dir="$work/packed-2" > "$work/packed-2.$r.log" 2>&1 &
done
wait %1 && wait %2 || fail "llm-finetune chat.packed, 2 ranks"
python3 - "$work/packed-1" "$work/packed-2" <<'PY' || fail "2 ranks differ from 1 process"
import json, sys
m1 = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
m2 = [json.loads(l) for l in open(sys.argv[2] + "/metrics.jsonl")]
s1 = [json.loads(l)["windows"] for l in open(sys.argv[1] + "/data_sequence.jsonl")]
s2 = [json.loads(l)["windows"] for l in open(sys.argv[2] + "/data_sequence.jsonl")]
assert len(m1) == len(m2) == 8, (len(m1), len(m2))
diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(m1, m2))
assert diff <= 1e-6, diff
assert all(len(w) == 2 for w in s2), "not 2 ranks"
assert any(len(w[0]) != len(w[1]) for w in s2), "ranks never differed in examples per row"
assert [w[0] for w in s1] == [w[0] + w[1] for w in s2], "data sequence differs"
print(f"packed: 2 ranks == 1 process, max |loss difference| {diff:.3g}")
PY
echo "packed: $used examples in 8 steps of 4 rows; 4 + resume + 4 steps == 8 straight"

ck="$work/ft/checkpoints/step-00000020"
# The base's generation settings (as a released model's generation_config.json) go with the export.
echo '{"temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}' > "$base/generation_config.json"
"$bin/llm-export" --checkpoint "$ck" --out "$work/merged" --adapter "$work/adapter" --dtype float32 \
  > "$work/export.log" 2>&1 || fail "llm-export"
python3 -c 'import json, sys; g = json.load(open(sys.argv[1])); assert g["temperature"] == 0.6 and g["top_p"] == 0.9, g' \
  "$work/merged/generation_config.json" || fail "the base's generation settings were not kept"
for f in merged/config.json merged/model.safetensors merged/tokenizer.model adapter/adapter_model.safetensors \
         adapter/adapter_config.json adapter/tokenizer.model adapter/tokenizer_config.json; do
  [ -s "$work/$f" ] || fail "missing $f"
done
# The adapter folder carries the tokenizer files the merged export has, its chat template included.
cmp -s "$work/merged/tokenizer_config.json" "$work/adapter/tokenizer_config.json" ||
  fail "the adapter's tokenizer_config.json differs from the merged export's"
grep -q '"peft_type": "LORA"' "$work/adapter/adapter_config.json" || fail "adapter_config.json"
# The chat template it was fine-tuned with goes with the export (what transformers' apply_chat_template uses).
grep -q '"chat_template": "{{ bos_token }}.*<|im_start|>' "$work/merged/tokenizer_config.json" ||
  fail "no chatml chat_template in tokenizer_config.json"
grep -q "chat template chatml (as fine-tuned)" "$work/export.log" || fail "export did not report the chat template"
"$bin/llm-export" --checkpoint "$ck" --out "$work/merged-system" --dtype float32 --system "Be terse." \
  > "$work/export-system.log" 2>&1 || fail "llm-export --system"
grep -q "set system_message = 'Be terse.'" "$work/merged-system/tokenizer_config.json" || fail "--system not in the template"
# llm-generate on an export prompts with the folder's template and system prompt; a template
# libllm does not render is an error naming it (unless --template chooses one).
"$bin/llm-generate" --checkpoint "$work/merged-system" --chat --prompt "hi" --max-new-tokens 2 > "$work/gen-hf.txt" 2>&1 ||
  fail "llm-generate on the export"
grep -q "chat template chatml (from tokenizer_config.json), system prompt 'Be terse.'" "$work/gen-hf.txt" ||
  fail "llm-generate did not take the export's chat template: $(cat "$work/gen-hf.txt")"
cp -r "$work/merged-system" "$work/foreign"
python3 -c "import json, sys; p = sys.argv[1]; c = json.load(open(p)); c['chat_template'] = '{{ messages }}'; json.dump(c, open(p, 'w'))" \
  "$work/foreign/tokenizer_config.json"
if "$bin/llm-generate" --checkpoint "$work/foreign" --chat --prompt "hi" --max-new-tokens 2 > "$work/gen-foreign.txt" 2>&1; then
  fail "a foreign chat template was accepted"
fi
grep -q "tokenizer_config.json: chat_template: is not a template libllm renders" "$work/gen-foreign.txt" ||
  fail "foreign template error: $(cat "$work/gen-foreign.txt")"
"$bin/llm-generate" --checkpoint "$work/foreign" --chat --template llama2 --prompt "hi" --max-new-tokens 2 \
  > /dev/null 2>&1 || fail "--template did not override a foreign chat template"

"$bin/llm-eval" --checkpoint "$ck" --data "$src/tests/fixtures/eval.txt" > "$work/eval-ck.log" 2>&1 || fail "llm-eval checkpoint"
"$bin/llm-eval" --checkpoint "$work/merged" --data "$src/tests/fixtures/eval.txt" > "$work/eval-merged.log" 2>&1 ||
  fail "llm-eval export"
l1=$(tail -n 1 "$work/eval-ck.log" | sed 's/.*"loss": \([0-9.e+-]*\).*/\1/')
l2=$(tail -n 1 "$work/eval-merged.log" | sed 's/.*"loss": \([0-9.e+-]*\).*/\1/')
echo "llm-eval loss: checkpoint $l1, merged export $l2"
awk -v a="$l1" -v b="$l2" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < 1e-5) }' || fail "export loss $l2 != $l1"

q='What does "hack" mean in hacker jargon?'  # (on the CPU, also where a GPU is: greedy tokens compared)
"$bin/llm-generate" --checkpoint "$ck" --chat --prompt "$q" --temperature 0 --max-new-tokens 24 --device cpu \
  > "$work/gen-cache.txt" 2>&1 || fail "llm-generate"
"$bin/llm-generate" --checkpoint "$ck" --chat --prompt "$q" --temperature 0 --max-new-tokens 24 --no-cache --device cpu \
  > "$work/gen-plain.txt" 2>&1 || fail "llm-generate --no-cache"
cmp -s "$work/gen-cache.txt" "$work/gen-plain.txt" || fail "KV cache output differs: $(cat "$work/gen-cache.txt") vs $(cat "$work/gen-plain.txt")"
echo "answer: $(cat "$work/gen-cache.txt")"

# A LoRA checkpoint holds only its adapters and names its base (trainer.json lora_base, absolute);
# the programs above read base + adapters. A base that moved is looked up at the recipe's
# finetune.base; when neither is there, one error names the base.
python3 - "$ck" "$base" <<'PY' || fail "the LoRA checkpoint is not adapters-only"
import json, os, struct, sys
ck, base = sys.argv[1], sys.argv[2]
with open(ck + "/model.safetensors", "rb") as f:
    names = [k for k in json.loads(f.read(struct.unpack("<Q", f.read(8))[0])) if k != "__metadata__"]
assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names
assert json.load(open(ck + "/trainer.json"))["lora_base"] == os.path.realpath(base)
print(f"LoRA checkpoint: {len(names)} adapter tensors, {os.path.getsize(ck + '/model.safetensors')} bytes "
      f"(the base's weights: {os.path.getsize(base + '/model.safetensors')} bytes)")
PY
cp -r "$ck" "$work/moved-ck"
python3 -c "import json, sys; p = sys.argv[1]; t = json.load(open(p)); t['lora_base'] = '/nonexistent/base'; json.dump(t, open(p, 'w'))" \
  "$work/moved-ck/trainer.json"
"$bin/llm-eval" --checkpoint "$work/moved-ck" --data "$src/tests/fixtures/eval.txt" > "$work/eval-moved.log" 2>&1 ||
  fail "llm-eval with the base at the recipe's finetune.base"
[ "$(tail -n 1 "$work/eval-moved.log")" = "$(tail -n 1 "$work/eval-ck.log")" ] || fail "moved base: another loss"
sed -i 's|^  base: .*|  base: /nonexistent/other|' "$work/moved-ck/recipe.yaml"
if "$bin/llm-eval" --checkpoint "$work/moved-ck" --data "$src/tests/fixtures/eval.txt" > "$work/eval-gone.log" 2>&1; then
  fail "a LoRA checkpoint without its base was read"
fi
grep -q "holds only LoRA adapters, and their base /nonexistent/base is gone (nor is /nonexistent/other here)" \
  "$work/eval-gone.log" || fail "no clear error for a missing base: $(cat "$work/eval-gone.log")"
echo "finetune pipeline ok"
