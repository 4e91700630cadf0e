#!/usr/bin/env bash
# The "mini-paper" on the cine phantom: scripts/demo.sh with the paper's comparisons, still CPU-sized, so that it can
# be re-run whenever the code changes:
#   every method (SimCLR, PCL, DINO, MIM) and the baseline at the smallest budget (1 subject); MIM and the baseline
#   at budgets 1, 2 and 4; split seeds 0-5 (6 folds per budget), training seed 0; the paper's recipe (MIM: encoder +
#   decoder at lr 5e-3) and the encoder-only recipe (MIM: the encoder alone at lr 1e-2); the paper's schedule
#   scaled to 40 epochs; pretraining 3 x 100 iterations. 72 fine-tuning runs (36 at budget 1, 18 each at 2 and 4; 5,040 iterations in all,
#   as its dry run counts them).
# Usage: bash scripts/mini_paper.sh   (idempotent; results in $DEMO_DIR/protocol/report, default ./mini_paper_output;
# its own folder, since a different set of budgets renumbers the folds). Every DEMO_* knob of demo.sh applies.
export DEMO_DIR="${DEMO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mini_paper_output}"
export DEMO_DATASET_ID="${DEMO_DATASET_ID:-502}"
export DEMO_METHODS="${DEMO_METHODS:-simclr pcl dino mim}" DEMO_EVERY_BUDGET="${DEMO_EVERY_BUDGET:-mim}"
export DEMO_BUDGETS="${DEMO_BUDGETS:-1 2 4}" DEMO_RECIPES="${DEMO_RECIPES:-paper baselineLR_encoderOnly}"
export DEMO_SEEDS="${DEMO_SEEDS:-0 1 2 3 4 5}" DEMO_TRAIN_SEEDS="${DEMO_TRAIN_SEEDS:-0}"
export DEMO_EPOCHS="${DEMO_EPOCHS:-40}" DEMO_PRETRAIN_ITERS="${DEMO_PRETRAIN_ITERS:-100}"
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/demo.sh"
