#!/usr/bin/env bash
# The main job on the embedded cine phantom: the paper's protocol (scripts/reproduce_paper.sh), scaled down to CPU:
#   nnunet_ssp phantom -> nnUNetv2_plan_and_preprocess -> nnunet_ssp splits (budgets 2 and 6 subjects, seeds 0 and 1)
#   -> ssp_pretrain --method simclr, pcl, dino, mim
#   -> per budget x seed x {Baseline, SimCLR, PCL, DINO, MIM}: nnUNetv2_train; then nnunet_ssp predict --evaluate
#      (the test set, many trained runs per process)
#   -> nnunet_ssp report (Dice table, per-class, clinical errors, Wilcoxon, label-efficiency and Bland-Altman plots).
# Idempotent: finished runs are reused. Usage: bash scripts/demo.sh
# Knobs (CPU-sized defaults): DEMO_DIR (./demo_output), DEMO_DATASET_ID (501), DEMO_SUBJECTS (10),
#   DEMO_TEST_SUBJECTS (4), DEMO_SIZE (64 px), DEMO_BUDGETS ("2 6"), DEMO_SEEDS ("0 1"), DEMO_VAL (1 subject),
#   DEMO_METHODS ("simclr pcl dino mim"), DEMO_PRETRAIN_EPOCHS (3), DEMO_PRETRAIN_ITERS (10), DEMO_PRETRAIN_BATCH (16),
#   DEMO_EPOCHS (5), DEMO_ITERS (10 per epoch).
set -euo pipefail
START=$SECONDS
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/workspace_env.sh" "${DEMO_DIR:-}" demo_output
ID="${DEMO_DATASET_ID:-501}"
# CPU-sized fine-tuning: short schedules
export nnUNet_ssp_num_epochs="${DEMO_EPOCHS:-5}" nnUNet_ssp_iters_per_epoch="${DEMO_ITERS:-10}"

echo "== phantom: $nnUNet_raw/Dataset${ID}_CinePhantom"
nnunet_ssp phantom -d "$ID" -n CinePhantom --subjects "${DEMO_SUBJECTS:-10}" \
  --test-subjects "${DEMO_TEST_SUBJECTS:-4}" --size "${DEMO_SIZE:-64}" --seed 0

read -r -a BUDGETS <<< "${DEMO_BUDGETS:-2 6}"
read -r -a SEEDS <<< "${DEMO_SEEDS:-0 1}"
read -r -a METHODS <<< "${DEMO_METHODS:-simclr pcl dino mim}"
python -m nnunet_ssp.protocol -d "$ID" --budgets "${BUDGETS[@]}" --seeds "${SEEDS[@]}" --val "${DEMO_VAL:-1}" \
  --methods "${METHODS[@]}" --device cpu --num-processes 1 --jobs 2 \
  --pretrain-args "--epochs ${DEMO_PRETRAIN_EPOCHS:-3} --iters-per-epoch ${DEMO_PRETRAIN_ITERS:-10} \
--batch-size ${DEMO_PRETRAIN_BATCH:-16} --num-workers 1 --probe-slices 128" \
  -o "$WORK/protocol"

echo
cat "$WORK/protocol/report/report.md"
echo "demo finished in $((SECONDS - START)) s; report, tables and plots in $WORK/protocol/report"
