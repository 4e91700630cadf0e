#!/usr/bin/env bash
# Reproduces the paper's protocol with the stock commands on converted datasets (GPU scale, real data):
#   merge (several datasets) -> nnUNetv2_plan_and_preprocess -> nnunet_ssp splits -> ssp_pretrain (4 methods)
#   -> for each budget x split seed x training seed (--train-seeds, default 0) x {baseline, 4 methods}: nnUNetv2_train
#      of the seeded trainer (<trainer>_seed<K>; --train-seeds none: nnU-Net's unseeded ones); then nnunet_ssp predict
#      --evaluate (imagesTs, many trained runs per process)
#   -> nnunet_ssp report.
# Resumable (finished runs are skipped), shardable (--shard i/n), --dry-run prints the plan.
# --experiment unseen-phase [--train-phase ED] / unseen-vendor --train-vendors A B: fine-tune on one phase or some
# vendors and test on the others, with the same pretraining, into $nnUNet_results/<Dataset>/ssp_protocol_<experiment>.
# Example: bash scripts/reproduce_paper.sh -d 511 512 --splits-yaml ssp-cmr-cine-segmentation/data/subject_splits/*.yaml
# All options: bash scripts/reproduce_paper.sh --help
set -euo pipefail
if ! command -v nnunet_ssp >/dev/null 2>&1; then
  source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
else
  eval "$(nnunet_ssp env | grep '^export')"
fi
exec python -m nnunet_ssp.protocol "$@"
