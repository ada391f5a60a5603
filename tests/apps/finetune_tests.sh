#!/usr/bin/env bash
# Fine-tuning end to end: pretrain a tiny base -> llm-finetune (LoRA) on Jargon File Q&A (the
# demo's data; dict-jargon) -> held-out loss falls -> llm-export (merged HF + PEFT adapter, with
# the chat template) ->
# llm-eval gives the same loss on the checkpoint and the export -> llm-generate with and without
# the KV cache answers the same (greedy).
# usage: finetune_tests.sh BIN_DIR SRC_DIR PRETRAIN_RECIPE WORK_DIR -- [--set ...] (the pretraining data sets)
set -euo pipefail
bin=$1 src=$2 recipe=$3 work=$4; shift 5
rm -rf "$work" && mkdir -p "$work"
fail() { echo "FAILED: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -25 "$f"; done; exit 1; }

# A base with room for chat examples (160 positions).
"$bin/llm-pretrain" "$recipe" "$@" --set train.run_dir="$work/base" --set model.max_seq_len=160 \
  --set train.sample_prompts=[] > "$work/base.log" 2>&1 || fail "pretraining the base"
base="$work/base/checkpoints/step-00000004"

if [ -e /usr/share/dictd/jargon.index ]; then
  "$src/recipes/data/jargon-qa.sh" "$work/data" > "$work/data.log" 2>&1 || fail "jargon-qa.sh"
  head -n 200 "$work/data/jargon.jsonl" > "$work/chat.jsonl"
else  # without dict-jargon: the fixture sentences as answers, under a few prompts (>= 20 examples,
      # so that valid_every: 10 holds some out)
  n=0; while IFS= read -r line; do n=$((n + 1)); [ -n "$line" ] || continue
    for ask in "Say sentence %d." "Repeat line %d, please." "What is sentence number %d?" "Quote %d."; do
      printf "{\"prompt\": \"$ask\", \"response\": \"%s\"}\n" "$n" "$(printf '%s' "$line" | sed 's/["\\]/\\&/g')"
    done
  done < "$src/tests/fixtures/eval.txt" > "$work/chat.jsonl"
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

ck="$work/ft/checkpoints/step-00000020"
"$bin/llm-export" --checkpoint "$ck" --out "$work/merged" --adapter "$work/adapter" --dtype float32 \
  > "$work/export.log" 2>&1 || fail "llm-export"
for f in merged/config.json merged/model.safetensors merged/tokenizer.model adapter/adapter_model.safetensors \
         adapter/adapter_config.json; do [ -s "$work/$f" ] || fail "missing $f"; done
grep -q '"peft_type": "LORA"' "$work/adapter/adapter_config.json" || fail "adapter_config.json"
# The chat template it was fine-tuned with goes with the export (what transformers' apply_chat_template uses).
grep -q '"chat_template": "{{ bos_token }}.*<|im_start|>' "$work/merged/tokenizer_config.json" ||
  fail "no chatml chat_template in tokenizer_config.json"
grep -q "chat template chatml (as fine-tuned)" "$work/export.log" || fail "export did not report the chat template"
"$bin/llm-export" --checkpoint "$ck" --out "$work/merged-system" --dtype float32 --system "Be terse." \
  > "$work/export-system.log" 2>&1 || fail "llm-export --system"
grep -q "set system_message = 'Be terse.'" "$work/merged-system/tokenizer_config.json" || fail "--system not in the template"

"$bin/llm-eval" --checkpoint "$ck" --data "$src/tests/fixtures/eval.txt" > "$work/eval-ck.log" 2>&1 || fail "llm-eval checkpoint"
"$bin/llm-eval" --checkpoint "$work/merged" --data "$src/tests/fixtures/eval.txt" > "$work/eval-merged.log" 2>&1 ||
  fail "llm-eval export"
l1=$(tail -n 1 "$work/eval-ck.log" | sed 's/.*"loss": \([0-9.e+-]*\).*/\1/')
l2=$(tail -n 1 "$work/eval-merged.log" | sed 's/.*"loss": \([0-9.e+-]*\).*/\1/')
echo "llm-eval loss: checkpoint $l1, merged export $l2"
awk -v a="$l1" -v b="$l2" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < 1e-5) }' || fail "export loss $l2 != $l1"

q='What does "hack" mean in hacker jargon?'
"$bin/llm-generate" --checkpoint "$ck" --chat --prompt "$q" --temperature 0 --max-new-tokens 24 > "$work/gen-cache.txt" 2>&1 ||
  fail "llm-generate"
"$bin/llm-generate" --checkpoint "$ck" --chat --prompt "$q" --temperature 0 --max-new-tokens 24 --no-cache \
  > "$work/gen-plain.txt" 2>&1 || fail "llm-generate --no-cache"
cmp -s "$work/gen-cache.txt" "$work/gen-plain.txt" || fail "KV cache output differs: $(cat "$work/gen-cache.txt") vs $(cat "$work/gen-plain.txt")"
echo "answer: $(cat "$work/gen-cache.txt")"
echo "finetune pipeline ok"
