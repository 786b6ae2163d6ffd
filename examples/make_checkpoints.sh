#!/usr/bin/env bash
# Rebuild the two demo checkpoints of the bundled ARC slot model, deterministically (seed 0, one thread).
#
#   checkpoints/slot_attention.pth          SICK: no BatchNorm, lr 3e-3. Dead encoder channels by the flat
#                                           definition, slots that do not segment, accuracy below the
#                                           most-common-colour baseline.
#   checkpoints/slot_attention_healthy.pth  HEALTHY encoder: BatchNorm, lr 1e-3. No dead channels, about
#                                           50% sparse per layer (slots still do not segment in this budget).
#
# Both: 200 training grids, batch 32, 86 epochs (602 steps), a health timeline every 5 epochs. Each takes
# a few minutes on one thread. --no-optimizer-state keeps the files under 2 MB (Adam's state would double
# them); such a checkpoint resumes with a fresh optimizer. Same torch version and thread count, same bytes
# of weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
COMMON=(--threads 1 --quiet --no-optimizer-state --force)
"$PY" -m arc_model.train "${COMMON[@]}" --out checkpoints/slot_attention.pth \
    --config BATCH_NORM=false LEARNING_RATE=3e-3 NUM_EPOCHS=86 TIMELINE_EVERY=5 SEED=0
"$PY" -m arc_model.train "${COMMON[@]}" --out checkpoints/slot_attention_healthy.pth \
    --config BATCH_NORM=true LEARNING_RATE=1e-3 NUM_EPOCHS=86 TIMELINE_EVERY=5 SEED=0
