#!/usr/bin/env bash
# One pass over a GPU machine: build against the pip torch (scripts/build-gpu.sh), the GPU and
# parity tests, llm-eval/llm-generate on CUDA, the ~1B benchmark (benchmarks/gpu/run.sh), then
# the whole CTest suite. Logs go to LOG_DIR (default build-gpu/logs). The stages together take
# longer than one 10-minute device command: STAGES picks some, in this order (default: all), e.g.
#   STAGES="build gpu" check_all.sh OUT; STAGES="eval bench" check_all.sh OUT; STAGES=all-tests ...
# Each stage has a time limit (BUILD_S, GPU_S, BENCH_S, ALL_TESTS_S seconds), and no stage runs past
# DEADLINE_S (default 570) seconds from the start: a device command's 600 s hold everything chosen.
# usage: benchmarks/gpu/check_all.sh [LOG_DIR]
set -uo pipefail
logs=${1:-build-gpu/logs}
mkdir -p "$logs"
stages=" ${STAGES:-build gpu eval bench all-tests} "
for s in $stages; do
  case $s in build | gpu | eval | bench | all-tests) ;; *) echo "unknown stage '$s' (build gpu eval bench all-tests)"; exit 2 ;; esac
done
want() { [[ $stages == *" $1 "* ]]; }
# limit S: the smaller of S and the seconds left before DEADLINE_S; timed CMD...: reports a timeout.
limit() { local left=$((${DEADLINE_S:-570} - SECONDS)); echo $((left < $1 ? (left > 1 ? left : 1) : $1)); }
timed() { "$@"; local rc=$?; [ $rc = 124 ] && echo "TIMEOUT: $*" | cut -c1-160; return $rc; }
deps=${DEPS_PREFIX:-$PWD/.deps/usr}
export LD_LIBRARY_PATH=$deps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
stage() { echo "=== $1 ($(date +%T))"; }
# The versions that must agree: the driver, the toolkit nvcc is from, the wheel's CUDA and NCCL.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvcc --version 2>/dev/null | tail -n 1 || echo "no nvcc"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "available", torch.cuda.is_available(), "nccl", torch.cuda.nccl.version(), "transformers", transformers.__version__)'
tp=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ls -d "$tp/include/gloo" 2>/dev/null || echo "no gloo headers in the torch wheel"
if want build; then
  stage build
  BUILD_KEEP_GOING=1 timed timeout "$(limit "${BUILD_S:-540}")" scripts/build-gpu.sh build-gpu > "$logs/build.log" 2>&1
  rc=$?
  grep -E "error|Error|libllm:" "$logs/build.log" | grep -v "^--" | head -40
  [ $rc = 0 ] || { tail -30 "$logs/build.log"; echo "BUILD FAILED rc=$rc"; exit 1; }
fi
[ -x build-gpu/bin/llm-eval ] || { echo "no build-gpu/bin/llm-eval: run the build stage first"; exit 1; }
if want gpu; then
  stage "gpu + parity tests"
  timed timeout "$(limit "${GPU_S:-240}")" ctest --test-dir build-gpu -L "gpu|parity" --output-on-failure -j4 \
    > "$logs/ctest-gpu.log" 2>&1
  grep -E "tests passed|Failed|\*\*\*" "$logs/ctest-gpu.log" | head -20
  if [ -x build-gpu/bin/libllm_parity_tests ]; then  # the parity figures (ctest shows them only on failure)
    LIBLLM_PARITY_DIR=build-gpu/parity timed timeout "$(limit 120)" build-gpu/bin/libllm_parity_tests --success \
      > "$logs/parity.log" 2>&1
    grep -E "fp32 |bf16 |on (cpu|cuda)" "$logs/parity.log" | sed 's/^ *//' | sort -u
    timed timeout "$(limit 120)" python3 tests/parity/check_export.py build-gpu/parity 2>&1 | tail -3
  fi
fi
if want eval; then
  stage "llm-eval and llm-generate on cuda"  # the same perplexity as on the CPU (1e-4), and a greedy answer
  for d in cpu cuda; do
    timed timeout "$(limit 60)" build-gpu/bin/llm-eval --checkpoint tests/fixtures/tiny-mixtral --data tests/fixtures/eval.txt \
      --device $d 2>&1 | tail -n 1 | sed "s/^/$d: /"
  done
  timed timeout "$(limit 60)" build-gpu/bin/llm-generate --checkpoint tests/fixtures/tiny-llama --prompt "Hello" --temperature 0 \
    --max-new-tokens 8 --device cuda 2>&1 | tail -n 2
fi
if want bench; then
  stage benchmark
  rm -f "$logs/bench.jsonl"  # (run.sh appends: a previous pass's rows would enter the medians)
  BENCH_OUT="$logs/bench.jsonl" timed timeout "$(limit "${BENCH_S:-540}")" benchmarks/gpu/run.sh build-gpu "${BENCH_REPEATS:-1}" 10 4 \
    2>&1 | tee "$logs/bench.log" | tail -12
fi
if want all-tests; then
  stage "all tests"
  # (a pip torch has MKL and OpenMP, so each test process would take every core: 16 x 16 threads)
  LIBLLM_THREADS=${LIBLLM_THREADS:-1} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    timed timeout "$(limit "${ALL_TESTS_S:-540}")" ctest --test-dir build-gpu -LE "gpu|parity" --output-on-failure -j16 \
    > "$logs/ctest-all.log" 2>&1
  grep -E "tests passed|Failed|\(Failed\)|Timeout" "$logs/ctest-all.log" | head -30
fi
stage done
