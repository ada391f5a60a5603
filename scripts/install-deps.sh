#!/usr/bin/env bash
# Installs libllm's build and test dependencies from Debian 12 packages (no recommends: they
# would pull GTK and Qt in with libtorch-dev). Runs apt-get through sudo when not root.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PACKAGES=(
  g++ cmake ninja-build make git pkg-config
  libtorch-dev libopenblas0-pthread   # LibTorch 1.13 (CPU); OpenBLAS: ~37x faster fp32 matmul than reference BLAS
  libsentencepiece-dev sentencepiece  # tokenizer.model
  libyaml-cpp-dev libfmt-dev nlohmann-json3-dev catch2
  libgloo-dev                         # headers c10d's Gloo process group needs
  fortunes                            # the demo corpus (/usr/share/games/fortunes)
  dict-jargon                         # the fine-tuning demo's Q&A source (/usr/share/dictd/jargon.*)
  python3-jinja2 python3-sentencepiece  # tests: the chat-template reference (tests/chat/hf_chat_reference.py)
  procps                              # tests: pgrep / ps (the supervisor tests)
)
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
echo "libllm dependencies installed"
