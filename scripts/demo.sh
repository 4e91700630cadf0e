#!/usr/bin/env bash
# The main job on the embedded cine phantom: the paper's low-label comparison (MIM against training from scratch),
# scaled to a 2-core CPU, through scripts/reproduce_paper.sh's protocol:
#   nnunet_ssp phantom (24 + 8 subjects, 64 px) -> nnUNetv2_plan_and_preprocess -> nnunet_ssp splits (budget 2
#   subjects, split seeds 0-5: 6 folds, 2 validation subjects) -> ssp_pretrain --method mim --seed 0
#   -> per fold and training seed (0): nnUNetv2_train of the seeded baseline and of MIM's seeded trainer of each
#      recipe (12 fine-tuning runs), the paper's schedule scaled to DEMO_EPOCHS epochs for every run; then
#      nnunet_ssp predict --evaluate (the test set, no TTA)
#   -> nnunet_ssp report (Dice table, per class, clinical errors, Wilcoxon, label-efficiency and Bland-Altman plots).
# Six folds, since a two-sided sign-flip test over S folds cannot go below p = 2/2^S (0.031 for 6, 0.0625 for 5).
# Idempotent: finished runs are reused. Usage: bash scripts/demo.sh   (scripts/mini_paper.sh runs it with more)
# Knobs (CPU-sized defaults): DEMO_DIR (./demo_output), DEMO_DATASET_ID (501), DEMO_SUBJECTS (24),
#   DEMO_TEST_SUBJECTS (8), DEMO_SIZE (64 px), DEMO_PHANTOM_SEED (11), DEMO_BUDGETS ("2"), DEMO_SEEDS (split seeds,
#   "0 1 2 3 4 5"), DEMO_TRAIN_SEEDS (training seeds of every fine-tuning run, "0"; "none": nnU-Net's unseeded
#   trainers), DEMO_VAL (2 subjects), DEMO_METHODS ("mim"), DEMO_EVERY_BUDGET (methods fine-tuned at every budget;
#   default all), DEMO_RECIPES ("baselineLR_encoderOnly"), DEMO_EPOCHS (fine-tuning epochs of the paper schedule, 25),
#   DEMO_PRETRAIN_EPOCHS (3) x DEMO_PRETRAIN_ITERS (80) at DEMO_PRETRAIN_BATCH (32), DEMO_PRETRAIN_SEED (0),
#   DEMO_MIM_ARGS ("--lr 0.02 --mask-patch-size 16"), DEMO_WIDTH (train with width-scaled plans, e.g. 0.25: a
#   quarter of nnU-Net's features per stage, 'nnunet_ssp plans'; default: nnU-Net's plans), DEMO_JOBS (2),
#   DEMO_DRY_RUN (1: make the phantom, print the plan of runs, run nothing).
set -euo pipefail
START=$SECONDS
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/workspace_env.sh" "${DEMO_DIR:-}" demo_output
ID="${DEMO_DATASET_ID:-501}"
# the paper's schedule (an epoch is one pass over the fold's labelled slices), scaled to DEMO_EPOCHS for every run
export nnUNet_ssp_num_epochs="${DEMO_EPOCHS:-25}"

echo "== phantom: $nnUNet_raw/Dataset${ID}_CinePhantom"
nnunet_ssp phantom -d "$ID" -n CinePhantom --subjects "${DEMO_SUBJECTS:-24}" \
  --test-subjects "${DEMO_TEST_SUBJECTS:-8}" --size "${DEMO_SIZE:-64}" --seed "${DEMO_PHANTOM_SEED:-11}"

read -r -a BUDGETS <<< "${DEMO_BUDGETS:-2}"
read -r -a SEEDS <<< "${DEMO_SEEDS:-0 1 2 3 4 5}"
read -r -a TRAIN_SEEDS <<< "${DEMO_TRAIN_SEEDS:-0}"
read -r -a METHODS <<< "${DEMO_METHODS:-mim}"
read -r -a RECIPES <<< "${DEMO_RECIPES:-baselineLR_encoderOnly}"
EVERY_BUDGET=()
if [ -n "${DEMO_EVERY_BUDGET:-}" ]; then read -r -a EVERY <<< "$DEMO_EVERY_BUDGET"; EVERY_BUDGET=(--every-budget "${EVERY[@]}"); fi
DRY_RUN=()
if [ "${DEMO_DRY_RUN:-0}" = 1 ]; then DRY_RUN=(--dry-run); fi
WIDTH=()
DEMO_WIDTH="${DEMO_WIDTH:-}"
if [ -n "$DEMO_WIDTH" ] && [ "$DEMO_WIDTH" != 1 ]; then WIDTH=(--width "$DEMO_WIDTH"); fi
MIM_ARGS=()
if [[ " ${METHODS[*]} " == *" mim "* ]]; then
  MIM_ARGS=(--pretrain-args-of mim "${DEMO_MIM_ARGS:---lr 0.02 --mask-patch-size 16}")
fi
python -m nnunet_ssp.protocol -d "$ID" --budgets "${BUDGETS[@]}" --seeds "${SEEDS[@]}" \
  --train-seeds "${TRAIN_SEEDS[@]}" --val "${DEMO_VAL:-2}" \
  --methods "${METHODS[@]}" "${EVERY_BUDGET[@]}" --recipes "${RECIPES[@]}" "${WIDTH[@]}" --device cpu \
  --num-processes 1 \
  --jobs "${DEMO_JOBS:-2}" \
  --pretrain-args "--epochs ${DEMO_PRETRAIN_EPOCHS:-3} --iters-per-epoch ${DEMO_PRETRAIN_ITERS:-80} \
--batch-size ${DEMO_PRETRAIN_BATCH:-32} --seed ${DEMO_PRETRAIN_SEED:-0} --num-workers 1 --probe-slices 256" \
  "${MIM_ARGS[@]}" \
  -o "$WORK/protocol" "${DRY_RUN[@]}"
if [ "${DEMO_DRY_RUN:-0}" = 1 ]; then exit 0; fi

echo
cat "$WORK/protocol/report/report.md"
echo "demo finished in $((SECONDS - START)) s; report, tables and plots in $WORK/protocol/report"
