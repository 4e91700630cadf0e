"""One checkpoint, many datasets, end to end through the stock CLIs: ssp_pretrain on phantom dataset A (conftest's
workspace) plus dataset B's cines as an extra unlabeled folder, on a seeded half of the subjects
(--subjects-fraction); dataset B (another image size) takes A's plans as nnU-Net documents it
(nnUNetv2_plan_and_preprocess --no_pp, nnUNetv2_move_plans_between_datasets, nnUNetv2_preprocess), and
nnUNetv2_train fine-tunes B from A's checkpoint: every tensor loads, and what differs is recorded as warnings in
ssp_init.json."""

import hashlib
import json
import os

from conftest import PHANTOM_DATASET as SOURCE
from conftest import PHANTOM_ID as SOURCE_ID
from conftest import run_cli as run

from nnunet_ssp.checkpoint import load_checkpoint

TARGET_ID, TARGET = 961, "Dataset961_Other"
MOVED_PLANS = "nnUNetPlans_fromE2E"


def _digest(tensor):
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def test_pretrain_on_a_pooled_fraction_then_finetune_another_dataset_through_moved_plans(phantom_env):
    root, env = phantom_env
    run(
        [
            "nnunet_ssp",
            "phantom",
            "-d",
            str(TARGET_ID),
            "-n",
            "Other",
            "--subjects",
            "3",
            "--test-subjects",
            "1",
            "--size",
            "48",
            "--seed",
            "5",
        ],
        env,
    )
    target_cines = os.path.join(env["nnUNet_raw"], TARGET, "cineTr")
    output = str(root / "pooled_half_mim")
    run(
        [
            "ssp_pretrain",
            "-d",
            str(SOURCE_ID),
            "--method",
            "mim",
            "--data",
            target_cines,
            "--subjects-fraction",
            "0.5",
            "-o",
            output,
            "--epochs",
            "1",
            "--iters-per-epoch",
            "2",
            "--batch-size",
            "4",
            "--num-workers",
            "1",
            "--device",
            "cpu",
        ],
        env,
    )
    checkpoint_path = os.path.join(output, "checkpoint_final.pth")
    checkpoint = load_checkpoint(checkpoint_path)
    data = checkpoint["data"]
    assert checkpoint["pretraining"]["subjects_fraction"] == 0.5
    assert (data["num_subjects_available"], data["num_subjects"]) == (4 + 3, 4)  # round(3.5) = 4 of A's 4 and B's 3
    assert len(data["subjects"]) == 4 and set(data["subjects"]) <= {f"ph{i:03d}" for i in range(7)} | {
        f"cineTr/{n[: -len('.nii.gz')]}" for n in os.listdir(target_cines)
    }

    # fingerprint and plan B (no preprocessing: this also puts B's dataset.json where nnUNetv2_preprocess reads
    # it, which nnUNetv2_extract_fingerprint alone does not), move A's plans to B, preprocess B with them
    run(
        ["nnUNetv2_plan_and_preprocess", "-d", str(TARGET_ID), "-c", "2d", "--no_pp", "-np", "1"],
        dict(env, nnUNet_n_proc_DA="1"),
    )
    run(
        [
            "nnUNetv2_move_plans_between_datasets",
            "-s",
            str(SOURCE_ID),
            "-t",
            str(TARGET_ID),
            "-sp",
            "nnUNetPlans",
            "-tp",
            MOVED_PLANS,
        ],
        env,
    )
    run(
        ["nnUNetv2_preprocess", "-d", str(TARGET_ID), "-plans_name", MOVED_PLANS, "-c", "2d", "-np", "1"],
        dict(env, nnUNet_n_proc_DA="1"),
    )
    finetune_env = dict(env, nnUNet_ssp_checkpoint=checkpoint_path)
    run(
        ["nnUNetv2_train", str(TARGET_ID), "2d", "0", "-tr", "nnUNetTrainerMIM", "-p", MOVED_PLANS, "-device", "cpu"],
        finetune_env,
    )

    fold = os.path.join(env["nnUNet_results"], TARGET, f"nnUNetTrainerMIM__{MOVED_PLANS}__2d", "fold_0")
    record = json.load(open(os.path.join(fold, "ssp_init.json")))
    expected = {k: _digest(v) for k, v in checkpoint["network_weights"].items()}
    assert {k: record["network_tensor_sha256_after_load"][k] for k in expected} == expected
    assert record["loaded"]["parts"] == ["encoder", "decoder"]
    assert record["warnings"] == [
        f"{checkpoint_path}: pretrained with dataset_name {SOURCE}, fine-tuning uses {TARGET}",
        f"{checkpoint_path}: pretrained with plans_name nnUNetPlans, fine-tuning uses {MOVED_PLANS}",
    ]
    log = open(next(os.path.join(fold, f) for f in os.listdir(fold) if f.startswith("training_log"))).read()
    assert f"WARNING: {record['warnings'][0]}" in log
