#!/usr/bin/env bash
# The fine-tuning-recipe ablation on the cine phantom (CPU-sized): which recipe lets the MIM-pretrained network beat
# training from scratch with few labels. Runs scripts/reproduce_paper.sh with several --recipes, so every recipe
# gets its own trainers and report rows (mim, mim_baselineLR, ...) and the Wilcoxon test against the baseline.
#   nnunet_ssp phantom -> plan/preprocess -> splits (ABL_BUDGETS x ABL_SEEDS) -> ssp_pretrain mim
#   -> per fold: baseline and MIM under each recipe, the paper's schedule scaled to ABL_EPOCHS epochs -> report
# Usage: bash scripts/ablation.sh   (idempotent; knobs below, results in $ABL_DIR/protocol/report)
# ABL_PRETRAIN_LR: the pretraining lr (default: the method's, scaled to the batch: MIM 0.01 x 32/128 = 0.0025)
set -euo pipefail
START=$SECONDS
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/workspace_env.sh" "${ABL_DIR:-}" ablation_output
ID="${ABL_DATASET_ID:-701}"
# the paper's schedule (an epoch = one pass over the fold's labelled slices), scaled to ABL_EPOCHS epochs for every run
export nnUNet_ssp_num_epochs="${ABL_EPOCHS:-300}"

if [ ! -f "$nnUNet_raw/Dataset${ID}_Ablation/dataset.json" ]; then
  nnunet_ssp phantom -d "$ID" -n Ablation --subjects "${ABL_SUBJECTS:-24}" --test-subjects "${ABL_TEST_SUBJECTS:-8}" \
    --size "${ABL_SIZE:-64}" --seed "${ABL_PHANTOM_SEED:-11}"
fi
read -r -a BUDGETS <<< "${ABL_BUDGETS:-1}"
read -r -a SEEDS <<< "${ABL_SEEDS:-0 1 2}"
read -r -a RECIPES <<< "${ABL_RECIPES:-paper baselineLR}"
python -m nnunet_ssp.protocol -d "$ID" --budgets "${BUDGETS[@]}" --seeds "${SEEDS[@]}" --val "${ABL_VAL:-2}" \
  --methods mim --recipes "${RECIPES[@]}" --device cpu --num-processes 1 --jobs 2 \
  --pretrain-args "--epochs ${ABL_PRETRAIN_EPOCHS:-20} --iters-per-epoch ${ABL_PRETRAIN_ITERS:-100} \
--batch-size ${ABL_PRETRAIN_BATCH:-32} --mask-patch-size ${ABL_MASK:-8} --num-workers 1${ABL_PRETRAIN_LR:+ --lr $ABL_PRETRAIN_LR}" \
  -o "$WORK/protocol"
echo
cat "$WORK/protocol/report/report.md"
echo "ablation finished in $((SECONDS - START)) s; report in $WORK/protocol/report"
