#!/usr/bin/env bash
# Create the project's virtual environment (.venv, or $DFLASH_VENV) and install the project.
# torch is installed first and pinned, because an unpinned torch may pull a multi-GB build;
# set DFLASH_TORCH to another requirement (for example "torch==2.9.1") to choose your own,
# or create the venv yourself with the torch you want before running this.
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
