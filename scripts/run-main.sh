#!/usr/bin/env bash
# Set up the environment if needed, then generate with the default model and draft.
# Extra arguments go to `dflash generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
exec "${DFLASH_VENV:-.venv}/bin/dflash" generate "$@"
