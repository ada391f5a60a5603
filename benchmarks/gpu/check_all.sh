#!/usr/bin/env bash
# One pass over a GPU machine: build against the pip torch (scripts/build-gpu.sh), the GPU and
# parity tests, the ~1B benchmark (benchmarks/gpu/run.sh), then the whole CTest suite. Logs go to
# LOG_DIR (default build-gpu/logs); each stage has a time limit so the pass ends in ~10 minutes.
# usage: benchmarks/gpu/check_all.sh [LOG_DIR]
set -uo pipefail
logs=${1:-build-gpu/logs}
mkdir -p "$logs"
deps=${DEPS_PREFIX:-$PWD/.deps/usr}
export LD_LIBRARY_PATH=$deps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
stage() { echo "=== $1 ($(date +%T))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
tp=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ls -d "$tp/include/gloo" 2>/dev/null || echo "no gloo headers in the torch wheel"
stage build
BUILD_KEEP_GOING=1 timeout 300 scripts/build-gpu.sh build-gpu > "$logs/build.log" 2>&1
rc=$?
grep -E "error|Error|libllm:" "$logs/build.log" | grep -v "^--" | head -40
[ $rc = 0 ] || { tail -30 "$logs/build.log"; echo "BUILD FAILED rc=$rc"; exit 1; }
stage "gpu + parity tests"
timeout 150 ctest --test-dir build-gpu -L "gpu|parity" --output-on-failure -j4 > "$logs/ctest-gpu.log" 2>&1
grep -E "tests passed|Failed|\*\*\*" "$logs/ctest-gpu.log" | head -20
if [ -x build-gpu/bin/libllm_parity_tests ]; then  # the parity figures (ctest shows them only on failure)
  LIBLLM_PARITY_DIR=build-gpu/parity build-gpu/bin/libllm_parity_tests --success > "$logs/parity.log" 2>&1
  grep -E "fp32 |bf16 |on (cpu|cuda)" "$logs/parity.log" | sed 's/^ *//' | sort -u
  python3 tests/parity/check_export.py build-gpu/parity 2>/dev/null | tail -1
fi

stage benchmark
BENCH_OUT="$logs/bench.jsonl" timeout 300 benchmarks/gpu/run.sh build-gpu "${BENCH_REPEATS:-1}" 10 4 2>&1 | tee "$logs/bench.log" | tail -8
stage "llm-eval and llm-generate on cuda"  # the same perplexity as on the CPU (1e-4), and a greedy answer
for d in cpu cuda; do
  build-gpu/bin/llm-eval --checkpoint tests/fixtures/tiny-mixtral --data tests/fixtures/eval.txt --device $d 2>&1 | tail -n 1 |
    sed "s/^/$d: /"
done
build-gpu/bin/llm-generate --checkpoint tests/fixtures/tiny-llama --prompt "Hello" --temperature 0 --max-new-tokens 8 \
  --device cuda 2>&1 | tail -n 2
stage "all tests"
timeout "${ALL_TESTS_S:-200}" ctest --test-dir build-gpu -LE "gpu|parity" --output-on-failure -j16 > "$logs/ctest-all.log" 2>&1
grep -E "tests passed|Failed|\(Failed\)|Timeout" "$logs/ctest-all.log" | head -30
stage done
