#!/usr/bin/env bash
# Runs libllm's and plain PyTorch's training step REPEATS times each, alternating, and prints the
# median tokens/s of both and their ratio. Needs the benchmarks built
# (cmake -DLIBLLM_BUILD_BENCHMARKS=ON) and Debian's python3-torch.
# usage: benchmarks/run.sh [BUILD_DIR] [CONFIG=tiny|100m] [REPEATS=5] [STEPS=20]
set -euo pipefail
build=${1:-build} config=${2:-tiny} repeats=${3:-5} steps=${4:-20}
here=$(dirname "$0")
out=$(mktemp)
for i in $(seq "$repeats"); do
  "$build/bin/train-bench" --config "$config" --steps "$steps" | tail -1 | tee -a "$out"
  /usr/bin/python3 "$here/train_bench.py" --config "$config" --steps "$steps" --threads 1 | tee -a "$out"
done
/usr/bin/python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = {impl: statistics.median(r["tokens_per_s"] for r in rows if r["impl"] == impl) for impl in ("libllm", "pytorch")}
rss = {impl: max(r["peak_rss_mib"] for r in rows if r["impl"] == impl) for impl in ("libllm", "pytorch")}
print(f"median tokens/s: libllm {med['libllm']:.0f}, pytorch {med['pytorch']:.0f}, ratio {med['libllm']/med['pytorch']:.2f}x; "
      f"peak RSS MiB: libllm {rss['libllm']:.0f}, pytorch {rss['pytorch']:.0f}")
PY
