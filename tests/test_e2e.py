"""End to end through the stock CLIs, as a user runs them, on a tiny phantom:

nnunet_ssp phantom -> nnUNetv2_plan_and_preprocess -> contract checkpoint (public save API) ->
nnUNetv2_train -tr nnUNetTrainerMIM -> nnUNetv2_predict (no SSP file present) -> nnUNetv2_evaluate_folder.
"""
import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch

from nnunet_ssp.checkpoint import default_checkpoint_folder, save_checkpoint
from nnunet_ssp.network import PlansTarget
from trainers import EXT_TRAINER_DIR

DATASET_ID = 991
DATASET = f"Dataset{DATASET_ID}_E2E"


def run(args, env, check=True):
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    env = dict(os.environ, nnUNet_extTrainer=EXT_TRAINER_DIR, nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1",
               nnUNet_compile="false", nnUNet_ssp_num_epochs="1", nnUNet_ssp_iters_per_epoch="2")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(root / name)
    env.pop("nnUNet_ssp_checkpoint", None)
    run(["nnunet_ssp", "phantom", "-d", str(DATASET_ID), "-n", "E2E", "--subjects", "4", "--test-subjects", "1",
         "--size", "64", "--seed", "3"], env)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "-npfp", "1",
         "--verify_dataset_integrity"], env)
    return root, env


def _target(env):
    old = os.environ.get("nnUNet_preprocessed")
    os.environ["nnUNet_preprocessed"] = env["nnUNet_preprocessed"]
    try:
        return PlansTarget.from_preprocessed(str(DATASET_ID))
    finally:
        if old is None:
            os.environ.pop("nnUNet_preprocessed")
        else:
            os.environ["nnUNet_preprocessed"] = old


def _digest(tensor):
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def test_finetune_from_contract_checkpoint_then_predict_and_evaluate(workspace):
    root, env = workspace
    target = _target(env)
    torch.manual_seed(7)
    network = target.network_spec.build(num_output_channels=1)
    ssp_folder = default_checkpoint_folder(env["nnUNet_results"], DATASET, "mim", "nnUNetPlans", "2d")
    checkpoint = save_checkpoint(os.path.join(ssp_folder, "checkpoint_final.pth"), network, target, "mim",
                                 pretraining={"note": "random weights written by the e2e test"})

    run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", "nnUNetTrainerMIM", "-device", "cpu"], env)
    fold = os.path.join(env["nnUNet_results"], DATASET, "nnUNetTrainerMIM__nnUNetPlans__2d", "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    record = json.load(open(os.path.join(fold, "ssp_init.json")))
    assert record["loaded"]["parts"] == ["encoder", "decoder"]
    # the network's tensors at epoch 0, read back from the trainer's network, equal the checkpoint's
    after_load = record["network_tensor_sha256_after_load"]
    assert after_load == {k: _digest(v) for k, v in checkpoint["network_weights"].items()}
    log = open(next(os.path.join(fold, f) for f in os.listdir(fold) if f.startswith("training_log"))).read()
    assert "Loaded SSP checkpoint" in log and "1 epochs x 2 iterations" in log

    shutil.move(ssp_folder, ssp_folder + "_moved_away")  # inference must not need the SSP file
    raw = os.path.join(env["nnUNet_raw"], DATASET)
    pred = str(root / "pred")
    run(["nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", pred, "-d", str(DATASET_ID), "-c", "2d",
         "-f", "0", "-tr", "nnUNetTrainerMIM", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env)
    assert sorted(f for f in os.listdir(pred) if f.endswith(".nii.gz")) == sorted(
        f.replace("_0000.nii.gz", ".nii.gz") for f in os.listdir(os.path.join(raw, "imagesTs")))
    run(["nnUNetv2_evaluate_folder", os.path.join(raw, "labelsTs"), pred, "-djfile",
         os.path.join(pred, "dataset.json"), "-pfile", os.path.join(pred, "plans.json"), "-np", "1"], env)
    summary = json.load(open(os.path.join(pred, "summary.json")))
    for label in ("1", "2", "3"):
        assert 0.0 <= summary["mean"][label]["Dice"] <= 1.0


def test_checkpoint_for_other_plans_is_refused_by_nnunetv2_train(workspace):
    root, env = workspace
    target = _target(env)
    plans = json.loads(json.dumps(target.plans_manager.plans))
    kwargs = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [f // 2 for f in kwargs["features_per_stage"]]
    other = PlansTarget(dict(plans, plans_name="otherPlans"), "2d", target.dataset_json)
    bad = str(root / "other_plans.pth")
    save_checkpoint(bad, other.network_spec.build(1), other, "simclr")
    result = run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", "nnUNetTrainerSimCLR", "-device", "cpu"],
                 dict(env, nnUNet_ssp_checkpoint=bad), check=False)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("nnunet_ssp error:") and "other plans" in last_line and "features_per_stage" in last_line
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(env["nnUNet_results"], DATASET, "nnUNetTrainerSimCLR__nnUNetPlans__2d"))
