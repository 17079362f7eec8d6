#!/usr/bin/env bash
# The test suite: lint and format checks, then pytest (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff format --check src tests bench
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest -q "$@"
