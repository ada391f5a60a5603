#!/usr/bin/env bash
# On a Debian 12 machine with package access: extracts (does not install) the -dev packages that
# a GPU machine with only a pip torch lacks, into DIR, to copy there for scripts/build-gpu.sh
# (DEPS_PREFIX=DIR/usr). About 12 MB.   usage: scripts/make-deps-prefix.sh DIR
set -euo pipefail
dir=${1:?usage: make-deps-prefix.sh DIR}
mkdir -p "$dir"
tmp=$(mktemp -d) && chmod 777 "$tmp" && trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download libyaml-cpp-dev libyaml-cpp0.7 libfmt-dev libfmt9 libsentencepiece-dev \
  libsentencepiece0 libprotobuf-lite32 catch2 nlohmann-json3-dev >/dev/null)
for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$dir"; done
echo "prefix: $dir/usr ($(du -sh "$dir" | cut -f1)); build with DEPS_PREFIX=$dir/usr scripts/build-gpu.sh"
