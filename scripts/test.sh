#!/usr/bin/env bash
# Command 2 of the README: set up, then run the whole test suite (CPU; CUDA tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${SPECEXEC_VENV:-.venv}/bin/activate"
python -m pytest -q "$@"
