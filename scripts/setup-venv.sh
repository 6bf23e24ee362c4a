#!/usr/bin/env bash
# Create the project's virtual environment (.venv, or $DFLASH_VENV) and install the project.
# torch is installed first, pinned to 2.13.0, unless the venv already has one. From PyPI on
# Linux x86_64 that is a CUDA build of several GB; machines with a local CPU wheel of it
# (found through pip's find-links) install that instead. Set DFLASH_TORCH to another pip
# requirement, or create the venv yourself with the torch you want before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DFLASH_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/pip" install --quiet "${DFLASH_TORCH:-torch==2.13.0}"
fi
"$venv/bin/pip" install --quiet -e ".[test]"
