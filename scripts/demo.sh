#!/usr/bin/env bash
# The main job: MovieLens-100K end to end (fetch, prepare, baselines, Semantic IDs, SFT, RL,
# evaluation), printing the results table. Extra arguments are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/genrec run configs/ml-100k.yaml "$@"
