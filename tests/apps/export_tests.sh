#!/usr/bin/env bash
# llm-export's output folders (each is replaced as a whole): --out is never the --checkpoint folder,
# inside it or around it, --adapter never --out; a folder that is not an earlier export (a run
# folder with checkpoints) is never replaced; all of these fail before anything is written. "out/"
# names the folder out, and an earlier export there is replaced; nothing is left beside it.
# usage: export_tests.sh BIN_DIR SRC_DIR WORK_DIR
set -euo pipefail
bin=$1 src=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
work=$(cd "$work" && pwd)
fail() { echo "FAILED: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -20 "$f"; done; exit 1; }
cp -r "$src/tests/fixtures/tiny-llama" "$work/model"  # a copy: a failing check must not cost the fixture
snapshot() { (cd "$1" && find . -type f -exec md5sum {} + | sort); }
refused() {  # refused NAME REGEX ARGS...: llm-export exits non-zero with an error line matching REGEX
  local name=$1 regex=$2 rc
  shift 2
  set +e
  "$bin/llm-export" "$@" > "$work/$name.log" 2>&1
  rc=$?
  set -e
  [ "$rc" -ne 0 ] || fail "$name: exited 0"
  grep -qE -- "error: .*$regex" "$work/$name.log" || fail "$name: no error line matching '$regex'"
  echo "$name: $(grep "error:" "$work/$name.log")"
}

before=$(snapshot "$work/model")
refused out-is-checkpoint "--out: .* is also the --checkpoint folder" --checkpoint "$work/model" --out "$work/model/"
refused out-in-checkpoint "--out: .* is inside the --checkpoint folder" --checkpoint "$work/model" --out "$work/model/hf"
refused out-around-checkpoint "--out: .* contains the --checkpoint folder" --checkpoint "$work/model" --out "$work"
refused adapter-is-out "--adapter: .* is also the --out folder" --checkpoint "$work/model" --out "$work/x" --adapter "$work/x/"
[ "$(snapshot "$work/model")" = "$before" ] || fail "the checkpoint folder changed"
[ ! -e "$work/model/hf" ] && [ ! -e "$work/x" ] || fail "an output folder was written"

# A run folder (checkpoints, metrics) is not an export: it is not replaced.
mkdir -p "$work/run/checkpoints/step-00000004"
echo '{}' > "$work/run/checkpoints/step-00000004/trainer.json"
echo '{}' > "$work/run/metrics.jsonl"
refused out-is-run "/run: is not empty and not an earlier Hugging Face export .*so it is not replaced" \
  --checkpoint "$work/model" --out "$work/run"
[ -s "$work/run/checkpoints/step-00000004/trainer.json" ] && [ -s "$work/run/metrics.jsonl" ] || fail "the run folder changed"

# "hf/" is the folder hf; exporting there again replaces the earlier export.
"$bin/llm-export" --checkpoint "$work/model" --out "$work/hf/" --dtype float32 > "$work/first.log" 2>&1 || fail "export to hf/"
[ -s "$work/hf/config.json" ] && [ -s "$work/hf/model.safetensors" ] || fail "hf/ holds no export"
grep -q '"torch_dtype": "float32"' "$work/hf/config.json" || fail "hf/config.json"
"$bin/llm-export" --checkpoint "$work/model" --out "$work/hf" --dtype bfloat16 > "$work/second.log" 2>&1 || fail "export to hf again"
grep -q '"torch_dtype": "bfloat16"' "$work/hf/config.json" || fail "the earlier export was not replaced"
leftovers=$(find "$work" "$work/hf" -mindepth 1 -maxdepth 1 \( -name '*.partial.*' -o -name '*.old.*' \))
[ -z "$leftovers" ] || fail "left behind: $leftovers"

# An HF source keeps its own end-of-sequence id (a chat model's end-of-turn token), not
# tokenizer.model's 2: config.json and generation_config.json list all of them (transformers and
# vLLM stop at each).
python3 -c 'import json, sys; p = sys.argv[1]; c = json.load(open(p)); c["eos_token_id"] = [7, 2]; json.dump(c, open(p, "w"))' \
  "$work/model/config.json"
"$bin/llm-export" --checkpoint "$work/model" --out "$work/eos" > "$work/eos.log" 2>&1 || fail "export with eos 7"
python3 -c 'import json, sys
for f, want in (("config.json", [7, 2]), ("generation_config.json", [7, 2])):
    assert json.load(open(sys.argv[1] + "/" + f))["eos_token_id"] == want, f' "$work/eos" || fail "the source's eos was not kept"
echo "export folders ok"
