#!/usr/bin/env bash
# Set up everything the server and the tests need, from this repository's own files:
# a virtual environment in .venv, torch, this package with its dev extras, and the
# tiny default models in ./models. Safe to run again: it skips the venv, torch and the
# models already there, and reinstalls the package (a changed pyproject.toml takes effect).
#
#   TORCH_SPEC   torch requirement to pre-install when .venv has no torch (default without
#                a GPU: the CPU build torch==2.13.0+cpu from PyTorch's CPU index or a local
#                wheel; with a GPU: plain `torch`, PyPI's CUDA build)
#   TORCH_INDEX  extra index torch is taken from (default without a GPU: PyTorch's CPU index)
#   PYTHON       interpreter for the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
NEW_ENOUGH='sys.exit(sys.version_info < (3, 11))'  # after the imports it checks
# A venv made before (by any interpreter) is kept if it is new enough and has pip; one left
# half-made (no pip) or too old is made again.
if [ -x .venv/bin/python ] && ! .venv/bin/python -c "import sys, pip; $NEW_ENOUGH" 2>/dev/null; then
    echo "setup.sh: .venv is older than Python 3.11 or has no pip: making it again" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    # ensurepip too: Debian/Ubuntu ship `venv` itself but leave ensurepip to python3.X-venv.
    if ! "$PYTHON" -c "import sys, venv, ensurepip; $NEW_ENOUGH" 2>/dev/null; then
        echo "setup.sh: $PYTHON is missing, older than Python 3.11, or cannot make a venv (Debian/Ubuntu:" >&2
        echo "          the python3.X-venv package of that Python); set PYTHON=python3.11 (or newer)" >&2
        exit 1
    fi
    "$PYTHON" -m venv .venv || { rm -rf .venv; exit 1; }  # no half-made venv left
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -z "${TORCH_SPEC:-}" ]; then
        # A loose `torch` pulls a multi-GB CUDA build: take the CPU build unless there is a GPU.
        # PyPI's torch for Linux is the CUDA build; the CPU build lives on PyTorch's own index.
        if command -v nvidia-smi >/dev/null 2>&1; then
            TORCH_SPEC="torch"
        else
            TORCH_SPEC="torch==2.13.0+cpu"
            TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
        fi
    fi
    echo "setup: installing $TORCH_SPEC"
    # torch alone from its index; its dependencies come with the package's, from the usual index.
    "${PIP[@]}" --no-deps ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH_SPEC"
fi

echo "setup: installing serve_app and its dependencies"
"${PIP[@]}" -e ".[dev]"
.venv/bin/python -c "import serve_app.app" # fails loudly if the install did not work

echo "setup: building the tiny default models in ./models"
HF_HUB_OFFLINE=1 .venv/bin/python -m serve_app.tiny_models ./models
