#!/usr/bin/env bash
# Create or reuse the project's virtual environment in .venv and install genrec into it.
# Idempotent: reinstalls only when pyproject.toml changed since the last install.
# torch: on a machine without torch we install torch==2.13.0 (the CPU build this project is
# tested with). GPU users: install your CUDA build of torch into .venv first
# (.venv/bin/pip install torch --index-url ...); this script keeps whatever torch is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.genrec-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[bootstrap] installing torch==2.13.0 (CPU)"
  .venv/bin/python -m pip install -q torch==2.13.0
fi
echo "[bootstrap] installing genrec and its dependencies into .venv"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
