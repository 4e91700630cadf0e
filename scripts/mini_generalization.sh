#!/usr/bin/env bash
# The paper's two generalization experiments on the mini-paper's phantom, CPU-sized, after scripts/mini_paper.sh,
# whose pretraining checkpoints, dataset and folds it reuses:
#   unseen phase:  fine-tune on the ED cases of 2 and 4 subjects, test on the ES test cases;
#   unseen vendor: fine-tune on every training subject of vendors A and B, test on the other vendors;
# each with split seeds DEMO_SEEDS (0-5: 6 folds per budget) and training seeds DEMO_TRAIN_SEEDS (0); the baseline and
# the MIM encoder at the baseline's lr (mim_baselineLR_encoderOnly), the paper's schedule scaled to DEMO_EPOCHS (40)
# epochs: 24 + 12 fine-tuning runs (1,440 + 2,880 iterations, as their dry runs count them). Reports in
# $DEMO_DIR/nnUNet_results/Dataset502_CinePhantom/ssp_protocol_unseen-*/report.
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
read -r -a SEEDS <<< "${DEMO_SEEDS:-0 1 2 3 4 5}"
read -r -a TRAIN_SEEDS <<< "${DEMO_TRAIN_SEEDS:-0}"
COMMON=(-d "$ID" --methods mim --recipes baselineLR_encoderOnly --device cpu --num-processes 1 --jobs 2
        --val "${DEMO_VAL:-2}" --seeds "${SEEDS[@]}" --train-seeds "${TRAIN_SEEDS[@]}")
python -m nnunet_ssp.protocol "${COMMON[@]}" --experiment unseen-phase --budgets 2 4 "$@"
python -m nnunet_ssp.protocol "${COMMON[@]}" --experiment unseen-vendor --train-vendors A B "$@"
