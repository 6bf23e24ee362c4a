#!/usr/bin/env bash
# Set up the environment if needed, then serve the default model and its shipped draft over
# gRPC on 127.0.0.1:9000 (a local Ray cluster) until interrupted. Extra arguments go to
# `dflash serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
exec "${DFLASH_VENV:-.venv}/bin/dflash" serve "$@"
