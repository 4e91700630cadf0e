#!/usr/bin/env bash
# The main job on the embedded cine phantom, with the stock nnU-Net commands: bash scripts/demo.sh
# generate -> plan/preprocess -> contract checkpoint -> fine-tune (nnUNetv2_train -tr nnUNetTrainerMIM)
# -> predict -> evaluate -> Dice. Idempotent: finished steps are reused.
# Knobs: DEMO_DIR (default ./demo_output), DEMO_DATASET_ID (501), DEMO_SUBJECTS (12), DEMO_TEST_SUBJECTS (4),
#        DEMO_EPOCHS (5), DEMO_ITERS (25 iterations per epoch).
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
TRAINER=nnUNetTrainerMIM

echo "== 1/6 phantom: $nnUNet_raw/$DATASET"
nnunet_ssp phantom -d "$ID" -n CinePhantom --subjects "${DEMO_SUBJECTS:-12}" \
  --test-subjects "${DEMO_TEST_SUBJECTS:-4}" --seed 0

echo "== 2/6 nnUNetv2_plan_and_preprocess -c 2d"
if [ ! -f "$nnUNet_preprocessed/$DATASET/nnUNetPlans.json" ]; then
  nnUNetv2_plan_and_preprocess -d "$ID" -c 2d -np 2 -npfp 2 --verify_dataset_integrity
fi

SSP_DIR="$nnUNet_results/$DATASET/ssp/mim__nnUNetPlans__2d"
echo "== 3/6 SSP checkpoint: $SSP_DIR/checkpoint_final.pth"
if [ ! -f "$SSP_DIR/checkpoint_final.pth" ]; then
  # ssp_pretrain is not implemented yet: write a contract checkpoint of the plans' network (random init)
  # through the public API, so the fine-tuning path runs end to end.
  python - "$ID" "$SSP_DIR/checkpoint_final.pth" <<'PY'
import sys, torch
from nnunet_ssp.checkpoint import save_checkpoint
from nnunet_ssp.network import PlansTarget
target = PlansTarget.from_preprocessed(sys.argv[1])
torch.manual_seed(0)
save_checkpoint(sys.argv[2], target.network_spec.build(num_output_channels=1), target, "mim",
                pretraining={"note": "placeholder: random init, not pretrained"})
print("wrote", sys.argv[2])
PY
fi

FOLD="$nnUNet_results/$DATASET/${TRAINER}__nnUNetPlans__2d/fold_0"
echo "== 4/6 nnUNetv2_train $ID 2d 0 -tr $TRAINER"
if [ ! -f "$FOLD/checkpoint_final.pth" ]; then
  nnUNet_ssp_num_epochs="${DEMO_EPOCHS:-5}" nnUNet_ssp_iters_per_epoch="${DEMO_ITERS:-25}" \
    nnUNetv2_train "$ID" 2d 0 -tr "$TRAINER" -device cpu
fi

PRED="$WORK/predictions/$TRAINER"
echo "== 5/6 nnUNetv2_predict -> $PRED"
nnUNetv2_predict -i "$nnUNet_raw/$DATASET/imagesTs" -o "$PRED" -d "$ID" -c 2d -f 0 -tr "$TRAINER" \
  -device cpu -npp 1 -nps 1 --disable_tta

echo "== 6/6 nnUNetv2_evaluate_folder"
nnUNetv2_evaluate_folder "$nnUNet_raw/$DATASET/labelsTs" "$PRED" -djfile "$PRED/dataset.json" \
  -pfile "$PRED/plans.json" -np 2 >/dev/null
python - "$PRED/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
names = {"1": "LV blood pool", "2": "LV myocardium", "3": "RV blood pool"}
print("3D Dice on the held-out phantom subjects:")
for label, name in names.items():
    print(f"  {name:14s} {s['mean'][label]['Dice']:.3f}")
print(f"  {'mean':14s} {s['foreground_mean']['Dice']:.3f}")
PY
echo "demo finished in $((SECONDS - START)) s; outputs in $WORK"
