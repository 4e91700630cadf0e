#!/usr/bin/env bash
# The main job on the embedded cine phantom, with ssp_pretrain and the stock nnU-Net commands:
#   phantom -> plan/preprocess -> label-budget split -> ssp_pretrain --method simclr, pcl, dino, mim
#   -> nnUNetv2_train -tr nnUNetTrainer{SimCLR,PCL,DINO,MIM} and -tr nnUNetTrainerBaseline (same small label budget)
#   -> nnUNetv2_predict -> nnUNetv2_evaluate_folder -> one Dice table.
# Idempotent: finished steps are reused. Usage: bash scripts/demo.sh
# Knobs (CPU-sized defaults): DEMO_DIR (./demo_output), DEMO_DATASET_ID (501), DEMO_SUBJECTS (10),
#   DEMO_TEST_SUBJECTS (4), DEMO_SIZE (96 px), DEMO_BUDGET (2 labeled subjects), DEMO_METHODS ("simclr pcl dino mim"),
#   DEMO_PRETRAIN_EPOCHS (3), DEMO_PRETRAIN_ITERS (10), DEMO_PRETRAIN_BATCH (16), DEMO_EPOCHS (10),
#   DEMO_ITERS (10 per epoch).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
cd "$REPO_ROOT"
START=$SECONDS

WORK="${DEMO_DIR:-$REPO_ROOT/demo_output}"
export nnUNet_raw="${nnUNet_raw:-$WORK/nnUNet_raw}"
export nnUNet_preprocessed="${nnUNet_preprocessed:-$WORK/nnUNet_preprocessed}"
export nnUNet_results="${nnUNet_results:-$WORK/nnUNet_results}"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
ID="${DEMO_DATASET_ID:-501}"
DATASET="Dataset${ID}_CinePhantom"
read -r -a METHODS <<< "${DEMO_METHODS:-simclr pcl dino mim}"
declare -A TRAINER_OF=([simclr]=nnUNetTrainerSimCLR [pcl]=nnUNetTrainerPCL [dino]=nnUNetTrainerDINO [mim]=nnUNetTrainerMIM)
TRAINERS=(nnUNetTrainerBaseline)
for METHOD in "${METHODS[@]}"; do TRAINERS+=("${TRAINER_OF[$METHOD]}"); done

echo "== 1/7 phantom: $nnUNet_raw/$DATASET"
nnunet_ssp phantom -d "$ID" -n CinePhantom --subjects "${DEMO_SUBJECTS:-10}" \
  --test-subjects "${DEMO_TEST_SUBJECTS:-4}" --size "${DEMO_SIZE:-96}" --seed 0

echo "== 2/7 nnUNetv2_plan_and_preprocess -c 2d"
if [ ! -f "$nnUNet_preprocessed/$DATASET/nnUNetPlans.json" ]; then
  nnUNetv2_plan_and_preprocess -d "$ID" -c 2d -np 2 -npfp 2 --verify_dataset_integrity
fi

echo "== 3/7 label budget: ${DEMO_BUDGET:-2} labeled subjects (nnunet_ssp splits)"
FOLD=$(nnunet_ssp splits -d "$ID" --budgets "${DEMO_BUDGET:-2}" --seeds 0 --val 2 | awk '/^fold/ {sub(":", "", $2); print $2; exit}')
echo "fold $FOLD"

for METHOD in "${METHODS[@]}"; do
  SSP_DIR="$nnUNet_results/$DATASET/ssp/${METHOD}__nnUNetPlans__2d"
  echo "== 4/7 ssp_pretrain --method $METHOD -> $SSP_DIR"
  if [ ! -f "$SSP_DIR/checkpoint_final.pth" ]; then
    CONTINUE=(); [ -f "$SSP_DIR/checkpoint_latest.pth" ] && CONTINUE=(--continue)
    ssp_pretrain -d "$ID" --method "$METHOD" --epochs "${DEMO_PRETRAIN_EPOCHS:-3}" \
      --iters-per-epoch "${DEMO_PRETRAIN_ITERS:-10}" --batch-size "${DEMO_PRETRAIN_BATCH:-16}" --device cpu \
      --num-workers 1 --probe-slices 128 "${CONTINUE[@]}"
  fi
done

for TRAINER in "${TRAINERS[@]}"; do
  FOLDER="$nnUNet_results/$DATASET/${TRAINER}__nnUNetPlans__2d/fold_$FOLD"
  echo "== 5/7 nnUNetv2_train $ID 2d $FOLD -tr $TRAINER"
  if [ ! -f "$FOLDER/checkpoint_final.pth" ]; then
    nnUNet_ssp_num_epochs="${DEMO_EPOCHS:-10}" nnUNet_ssp_iters_per_epoch="${DEMO_ITERS:-10}" \
      nnUNetv2_train "$ID" 2d "$FOLD" -tr "$TRAINER" -device cpu
  fi
  PRED="$WORK/predictions/$TRAINER"
  echo "== 6/7 nnUNetv2_predict -tr $TRAINER -> $PRED"
  nnUNetv2_predict -i "$nnUNet_raw/$DATASET/imagesTs" -o "$PRED" -d "$ID" -c 2d -f "$FOLD" -tr "$TRAINER" \
    -device cpu -npp 1 -nps 1 --disable_tta > "$WORK/predict_$TRAINER.log" 2>&1
  echo "== 7/7 nnUNetv2_evaluate_folder -> $PRED/summary.json"
  nnUNetv2_evaluate_folder "$nnUNet_raw/$DATASET/labelsTs" "$PRED" -djfile "$PRED/dataset.json" \
    -pfile "$PRED/plans.json" -np 2 >/dev/null
done

python - "$WORK/predictions" "${TRAINERS[@]}" <<'PY'
import json, os, sys
root, trainers = sys.argv[1], sys.argv[2:]
names = {"1": "LV blood pool", "2": "LV myocardium", "3": "RV blood pool"}
summaries = {t: json.load(open(os.path.join(root, t, "summary.json"))) for t in trainers}
print("\n3D Dice on the held-out phantom subjects")
print(f"{'':16s}" + "".join(f"{t.replace('nnUNetTrainer', ''):>10s}" for t in trainers))
for label, name in names.items():
    print(f"{name:16s}" + "".join(f"{summaries[t]['mean'][label]['Dice']:10.3f}" for t in trainers))
print(f"{'mean':16s}" + "".join(f"{summaries[t]['foreground_mean']['Dice']:10.3f}" for t in trainers))
PY
echo "demo finished in $((SECONDS - START)) s; outputs in $WORK"
