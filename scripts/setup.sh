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
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the header above is the usage
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
NEW_ENOUGH='sys.exit(sys.version_info < (3, 11))'  # after the imports it checks
# A venv made before (by any interpreter) is kept if it works, is new enough, has pip and was
# made here; one left half-made, too old, whose interpreter is gone (a Python upgrade) or made
# at another path (a moved or copied checkout: its scripts' #! lines name the old one) is made again.
# "Here" as the shell names it or as the venv does, through any symlink (/home -> /data/home).
if [ -e .venv ] || [ -L .venv ]; then
    why=""
    pip_line="$(head -n 1 .venv/bin/pip 2>/dev/null || true)"
    if ! .venv/bin/python -c "import sys, pip; $NEW_ENOUGH" 2>/dev/null; then
        why="is older than Python 3.11, has no pip, or its interpreter is gone"
    elif [[ "$pip_line" == "#!/"* && "$pip_line" != "#!$PWD/.venv/"* && "$pip_line" != "#!$(pwd -P)/.venv/"* ]]; then
        why="was made at another path (${pip_line#\#!})"
    fi
    if [ -n "$why" ]; then
        echo "setup.sh: .venv $why: making it again" >&2
        rm -rf .venv
    fi
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
    # torch alone; its dependencies come with the package's, from the usual index. A wheel pip's
    # find-links (PIP_FIND_LINKS, pip.conf) hold first, with no index asked (an index that cannot
    # be reached costs retries); else from its index.
    if ! "${PIP[@]}" --no-deps --no-index "$TORCH_SPEC" 2>/dev/null; then
        "${PIP[@]}" --no-deps ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH_SPEC"
    fi
fi

echo "setup: installing serve_app and its dependencies"
"${PIP[@]}" -e ".[dev]"
.venv/bin/python -c "import serve_app.app" # fails loudly if the install did not work

echo "setup: building the tiny default models in ./models"
HF_HUB_OFFLINE=1 .venv/bin/python -m serve_app.tiny_models ./models
