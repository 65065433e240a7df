#!/usr/bin/env bash
# Moves the tested set forward: installs the newest releases pyproject.toml allows into a fresh
# venv (`./install.sh --dev --latest`) and writes what it got to constraints/cpu.txt.
#
#   tools/freeze-constraints.sh      then run the suite (./install.sh --dev && pytest -q in a fresh
#                                    venv), and commit the diff if it passes
#
# torch stays at the version cpu.txt names (install.sh picks its build): edit that line to move it.
# constraints/gpu.txt is cpu.txt with the GPU box's torch plus bitsandbytes and liger-kernel; bring
# it along by hand and run the GPU suite against it (tools/gpu-bundle.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "cpu.txt is the set of a machine without an NVIDIA GPU: run this on one" >&2; exit 1
fi
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
PYTHON=$venv/bin/python ./install.sh --dev --latest
# pip, setuptools and tunebench itself are not pinned; torch without its local label (+cpu), so
# the line also matches the CPU build install.sh takes from PyPI's plain torch.
body=$("$venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/')
{
  echo "# The tested set for a machine with no NVIDIA GPU: every package \`./install.sh --dev\` installs"
  echo "# there, at the versions the test suite passed with. install.sh installs these by default."
  echo "# Tested on: $("$venv/bin/python" -V), $(uname -sm), CPU only, $(date +%F)."
  echo "# Regenerate: tools/freeze-constraints.sh, then run the suite and commit the diff."
  echo "$body"
} >constraints/cpu.txt
git --no-pager diff --stat -- constraints/cpu.txt
