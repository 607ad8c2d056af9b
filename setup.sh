#!/usr/bin/env bash
# Create .venv and install MediSyn with its test tools, offline-safe and CPU-first.
# torch is pinned to the CPU build first (an unpinned torch pulls a multi-GB CUDA build);
# the project itself admits torch >= 2.13.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "MediSyn installed in $(pwd)/.venv"
