#!/usr/bin/env bash
# Builds libllm against the LibTorch inside a pip or conda torch (2.x, with CUDA), for machines
# without Debian's -dev packages. The other dependencies (yaml-cpp, fmt, sentencepiece, Catch2,
# nlohmann-json) come from a prefix: the system's, or one made on a Debian machine with
# ../shared/gpu/make-deps-prefix.sh-style extraction (DEPS_PREFIX, default .deps/usr).
# usage: scripts/build-gpu.sh [BUILD_DIR=build-gpu]   then: ctest --test-dir BUILD_DIR -L gpu
# (CMAKE_ARGS="-DNCCL_INCLUDE_DIR=..." passes more options to CMake)
set -euo pipefail
build=${1:-build-gpu}
py=${PYTHON:-python3}
deps=${DEPS_PREFIX:-$PWD/.deps/usr}
tp=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')
arch=$("$py" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>/dev/null || echo 90)
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
export LD_LIBRARY_PATH=$deps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# The NCCL LibTorch was built with (CMake refuses an nccl.h of another version).
nccl=$("$py" -c 'import torch; print(".".join(map(str, torch.cuda.nccl.version()[:3])))' 2>/dev/null || true)
gen=(); keep=(); command -v ninja >/dev/null && gen=(-G Ninja) && keep=(${BUILD_KEEP_GOING:+-k 0})
cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$tp;$deps" \
      -DCMAKE_CUDA_ARCHITECTURES="$arch" -DLIBLLM_BUILD_BENCHMARKS=ON ${nccl:+-DLIBLLM_TORCH_NCCL_VERSION=$nccl} \
      ${CMAKE_ARGS:-}
cmake --build "$build" -j"$(nproc)" ${BUILD_TARGETS:+--target $BUILD_TARGETS} -- "${keep[@]}"
echo "built in $build (LibTorch from $tp); LD_LIBRARY_PATH needs $deps/lib/x86_64-linux-gnu"
