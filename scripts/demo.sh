#!/usr/bin/env bash
# Command 1 of the README: set up, then generate with SpecExec on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${SPECEXEC_VENV:-.venv}/bin/activate"
exec specexec-rt generate --model smollm2-135m --draft default --method specexec --compare \
  --max-new-tokens 96 --prompt "${1:-Explain in three sentences why the sky is blue.}"
