#!/usr/bin/env bash
# Create .venv with everything the project, its tests and the offline model need. Idempotent:
# it reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
# torch goes first and pinned: with nothing installed, a bare requirement pulls a multi-GB CUDA
# build. 2.13.0 is the CPU build on this kind of machine; set TORCH_SPEC to choose another.
torch_spec=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.textgen-installed
want=$(cat pyproject.toml deployments/bootstrap.sh | sha256sum | cut -c1-16)-$torch_spec
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade "pip>=25.1"
    .venv/bin/python -m pip install --quiet "$torch_spec"
    .venv/bin/python -m pip install --quiet --editable ".[gguf,team]" --group dev
    echo "$want" > "$stamp"
fi
