#!/usr/bin/env bash
# Set up everything the server and the tests need, from this repository's own files:
# a virtual environment in .venv, torch, this package with its dev extras, and the
# tiny default models in ./models. Safe to run again: each step skips what is done.
#
#   TORCH_SPEC   torch requirement to pre-install when .venv has no torch
#                (default: the CPU build torch==2.13.0 without a GPU, else plain `torch`)
#   PYTHON       interpreter for the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -z "${TORCH_SPEC:-}" ]; then
        # A loose `torch` pulls a multi-GB CUDA build: take the CPU build unless there is a GPU.
        if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch"; else TORCH_SPEC="torch==2.13.0"; fi
    fi
    echo "setup: installing $TORCH_SPEC"
    "${PIP[@]}" "$TORCH_SPEC"
fi

echo "setup: installing serve_app and its dependencies"
"${PIP[@]}" -e ".[dev]"
.venv/bin/python -c "import serve_app.app" # fails loudly if the install did not work

echo "setup: building the tiny default models in ./models"
HF_HUB_OFFLINE=1 .venv/bin/python -m serve_app.tiny_models ./models
