#!/usr/bin/env bash
# Time and peak memory of resuming a run whose data_sequence.jsonl is large, as it is late in a 7B
# run (Amber's 4 M-token steps of 2,048 windows: ~25 KB a line, ~7 GB after 300k steps). Every
# resume, rollback and restart plan truncates that log to the resumed step.
# Runs the tiny app-test recipe for 4 steps, replaces its data_sequence.jsonl with LINES synthetic
# lines of WINDOWS windows each, and times (/usr/bin/time: seconds, peak resident memory) resuming
# at step 4 for one more step. OLD_BUILD=DIR times another build's llm-pretrain on the same files.
# usage: benchmarks/resume_log.sh [BUILD_DIR] [LINES] [WINDOWS]   (from the repository root)
set -euo pipefail
build=$(realpath "${1:-build}")
lines=${2:-40000} windows=${3:-2048}
old=${OLD_BUILD:+$(realpath "$OLD_BUILD")}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
recipe=tests/apps/tiny-pretrain.yaml
sets=(--set data_prep.output="$work/train" --set data_prep.valid_output="$work/valid" --set data.train=["$work/train"]
      --set data.valid="$work/valid" --set train.sample_prompts=[] --set train.log_every=1000)
"$build/bin/llm-data" "$recipe" "${sets[@]}" > /dev/null
"$build/bin/llm-pretrain" "$recipe" "${sets[@]}" --set train.run_dir="$work/run" > /dev/null
/usr/bin/python3 - "$work/log" "$lines" "$windows" <<'EOF'
import sys
path, lines, windows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "w") as f:
    for s in range(1, lines + 1):
        w = ",".join(f"[0,{(s * 7919 + i * 104729) % 9000000}]" for i in range(windows))
        f.write(f'{{"step":{s},"windows":[[{w}]]}}\n')
EOF
echo "data_sequence.jsonl: $lines lines of $windows windows, $(( $(stat -c %s "$work/log") / 1000000 )) MB"
timed() {  # timed LABEL BUILD
  rm -rf "$work/r" && cp -r "$work/run" "$work/r" && cp "$work/log" "$work/r/data_sequence.jsonl"
  /usr/bin/time -f "%e %M" -o "$work/t" "$2/bin/llm-pretrain" "$recipe" "${sets[@]}" --set train.run_dir="$work/r" \
    --set train.steps=5 --set checkpoint.resume="$work/r/checkpoints/step-00000004" > "$work/r.log" 2>&1 ||
    { cat "$work/r.log"; exit 1; }
  read -r s kb < "$work/t"
  [ "$(wc -l < "$work/r/data_sequence.jsonl")" -eq 5 ] || { echo "$1: the log was not truncated to 5 lines"; exit 1; }
  echo "$1: resume + 1 step $s s, peak RSS $((kb / 1024)) MiB"
}
timed "this build" "$build"
[ -z "$old" ] || timed "OLD_BUILD" "$old"
