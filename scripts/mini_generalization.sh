#!/usr/bin/env bash
# The paper's two generalization experiments on the mini-paper's phantom, CPU-sized (about 50 min on 2 cores), after
# scripts/mini_paper.sh, whose pretraining checkpoints, dataset and folds it reuses:
#   unseen phase:  fine-tune on the ED cases of 2 and 4 subjects (seeds 0 1), test on the ES test cases;
#   unseen vendor: fine-tune on every training subject of vendors A and B (seed 0), test on the other vendors;
# the baseline and the MIM encoder at the baseline's lr (mim_baselineLR_encoderOnly), the paper's schedule scaled to
# DEMO_EPOCHS (40) epochs. Reports in $DEMO_DIR/nnUNet_results/Dataset502_CinePhantom/ssp_protocol_unseen-*/report.
# Extra arguments go to both protocol runs (e.g. --dry-run).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/workspace_env.sh" "${DEMO_DIR:-}" mini_paper_output
ID="${DEMO_DATASET_ID:-502}"
MIM_CHECKPOINT="$nnUNet_results/Dataset${ID}_CinePhantom/ssp/mim__nnUNetPlans__2d/checkpoint_final.pth"
if [ ! -f "$MIM_CHECKPOINT" ]; then
  echo "error: $MIM_CHECKPOINT not found; run bash scripts/mini_paper.sh first" >&2
  exit 1
fi
export nnUNet_ssp_num_epochs="${DEMO_EPOCHS:-40}"
read -r -a SEEDS <<< "${DEMO_SEEDS:-0 1}"
COMMON=(-d "$ID" --methods mim --recipes baselineLR_encoderOnly --device cpu --num-processes 1 --jobs 2
        --val "${DEMO_VAL:-2}")
python -m nnunet_ssp.protocol "${COMMON[@]}" --experiment unseen-phase --budgets 2 4 --seeds "${SEEDS[@]}" "$@"
python -m nnunet_ssp.protocol "${COMMON[@]}" --experiment unseen-vendor --train-vendors A B --seeds 0 "$@"
