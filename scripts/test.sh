#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite (slow tests included).
# Extra arguments go to pytest, for example `-m "not slow"` for the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
exec "${DFLASH_VENV:-.venv}/bin/python" -m pytest "$@"
