#!/usr/bin/env bash
# Set up (idempotent) and run the main job: train EHI on SciFact with the defaults, evaluate it
# against exact search and Faiss-IVF at equal fraction of the corpus visited, then run the
# side-by-side comparison with the dual-encoder baselines (DE + exact / Faiss-IVF / ScaNN).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/datasets/scifact}
OUT=${OUT:-runs/scifact}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
if [ ! -x .venv/bin/ehi ]; then
  # pip's own notices (about this machine's package indexes, say) go to a log, not the job's
  echo "[ehi] installing into .venv (pip's output: .venv/pip.log)"
  python3 -m venv .venv
  if ! { .venv/bin/pip install --quiet torch==2.13.0 && .venv/bin/pip install --quiet -e ".[test]"; } > .venv/pip.log 2>&1; then
    tail -20 .venv/pip.log >&2
    exit 1
  fi
fi
# --overwrite: a rerun replaces the model this job wrote before (never a folder that is not a model)
.venv/bin/ehi train --data "$DATA" --out "$OUT" --overwrite "$@"
.venv/bin/ehi evaluate "$OUT" --data "$DATA" --split test --json "$OUT.eval.json"
.venv/bin/ehi benchmark --data "$DATA" --out "${REPORT:-reports/main}" --seeds "${SEEDS:-1}" --no-progress
