#!/usr/bin/env bash
# Create .venv with everything the project, its tests and the offline model need. Idempotent:
# it reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
# torch goes first and pinned: with nothing installed, a bare requirement pulls a multi-GB CUDA
# build. 2.13.0 is the CPU build on this kind of machine; set TORCH_SPEC to choose another.
torch_spec=${TORCH_SPEC:-torch==2.13.0}

# Each step says what it does and how long it took, on stderr.
step() {
    local started=$SECONDS
    echo "bootstrap: [$1/4] $2 ..." >&2
    shift 2
    "$@"
    echo "bootstrap:       done in $((SECONDS - started)) s" >&2
}

stamp=.venv/.textgen-installed
want=$(cat pyproject.toml deployments/bootstrap.sh | sha256sum | cut -c1-16)-$torch_spec
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    [ -x .venv/bin/python ] || step 1 "creating .venv with $python" "$python" -m venv .venv
    step 2 "upgrading pip" .venv/bin/python -m pip install --quiet --upgrade "pip>=25.1"
    step 3 "installing $torch_spec (CPU build, before anything can pull a CUDA one)" \
        .venv/bin/python -m pip install --quiet "$torch_spec"
    # setuptools warns of every editable install, about folders named like the package: these
    # are the package.
    step 4 "installing the project, Prefect, MLflow, transformers and the test tools" \
        env PYTHONWARNINGS="ignore:Editable installation" \
        .venv/bin/python -m pip install --quiet --editable ".[gguf,team]" --group dev
    echo "$want" > "$stamp"
    echo "bootstrap: .venv is ready" >&2
fi
