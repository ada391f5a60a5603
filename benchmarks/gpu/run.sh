#!/usr/bin/env bash
# The GPU issue's benchmark: the ~1B LLaMA (dim 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192,
# vocab 32000, seq 2048) trained in bf16 on one GPU by libllm (train-bench) and by transformers
# (eager and torch.compile with bf16 weights; torch.compile with fp32 weights under bf16 autocast,
# impl transformers-compile-amp, libllm's fp32-master numerics), alternating (libllm with and
# without the fused loss: impl libllm and libllm-plain-loss), REPEATS times; prints the median of
# each and the ratio. HF_RUNS="eager:bf16 compile:bf16" leaves the amp run out.
# usage: benchmarks/gpu/run.sh BUILD_DIR [REPEATS=2] [STEPS=10] [MICRO_BATCH=4]
set -euo pipefail
build=${1:?usage: run.sh BUILD_DIR [REPEATS] [STEPS] [MICRO_BATCH]} repeats=${2:-2} steps=${3:-10} mb=${4:-4}
here=$(dirname "$0")
out=${BENCH_OUT:-$(mktemp)}
errors=${out%.jsonl}.errors.log
: > "$errors"
# One failed run (out of memory, a missing package) is reported and the others still run: its
# errors go to $errors, and the summary counts the runs each median is of.
for i in $(seq "$repeats"); do
  for loss in "" --plain-loss; do  # the fused LM head + loss (train.fused_loss), then the plain one
    "$build/bin/train-bench" --config 1b --device cuda --dtype bf16 --micro-batch "$mb" --steps "$steps" \
      --peak-tflops 989 $loss 2>>"$errors" | tail -1 | tee -a "$out" || echo "train-bench $loss failed: see $errors"
  done
  for run in ${HF_RUNS:-eager:bf16 compile:bf16 compile:amp}; do
    python3 "$here/hf_bench.py" --mode "${run%%:*}" --precision "${run##*:}" --micro-batch "$mb" --steps "$steps" \
      2>>"$errors" | tail -1 | tee -a "$out" || echo "hf_bench $run failed: see $errors"
  done
done
if [ -s "$errors" ]; then
  echo "--- stderr of the runs ($errors; warnings too):"
  grep -vE "^\s*$" "$errors" | tail -5 || true
fi
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
impls = sorted({r["impl"] for r in rows}, key=lambda s: (s != "libllm", s))
med = {i: statistics.median(r["tokens_per_s"] for r in rows if r["impl"] == i) for i in impls}
for i in impls:
    rs = [r for r in rows if r["impl"] == i]
    print(f"{i:24s} tokens/s {med[i]:9.0f}  mfu {statistics.median(r['mfu'] for r in rs):6.1%}  "
          f"peak {max(r['gpu_peak_gib'] for r in rs):6.2f} GiB  (n={len(rs)})")
if "libllm" in med:
    for i in impls:
        if i != "libllm":
            print(f"libllm / {i}: {med['libllm'] / med[i]:.2f}x")
PY
