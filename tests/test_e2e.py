"""End to end through the stock CLIs, as a user runs them, on a tiny phantom (see conftest.phantom_workspace):

1. a MIM contract checkpoint written through the public save API and exported as nnUNet_ssp_checkpoint: refused by
   nnUNetv2_train -tr nnUNetTrainerSimCLR, loaded by -tr nnUNetTrainerSSP -> nnUNetv2_predict (no SSP file present)
   -> nnUNetv2_evaluate_folder;
2. ssp_pretrain --method mim -> nnUNetv2_train -tr nnUNetTrainerMIM_paperSchedule (the paper's epoch: one pass over
   the fold's labelled slices) -> predict -> evaluate;
3. ssp_pretrain --method simclr/pcl/dino -> nnUNetv2_train -tr nnUNetTrainer<Method>: encoder loaded, decoder not;
4. a checkpoint for other plans, refused by nnUNetv2_train before anything is written.
"""

import hashlib
import json
import math
import os
import shutil

import pytest
import SimpleITK as sitk
import torch
from conftest import PHANTOM_DATASET as DATASET
from conftest import PHANTOM_ID as DATASET_ID
from conftest import run_cli as run

from nnunet_ssp.checkpoint import default_checkpoint_folder, load_checkpoint, save_checkpoint
from nnunet_ssp.network import PlannedConfiguration


def _digest(tensor):
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _fold(env, trainer, fold):
    return os.path.join(env["nnUNet_results"], DATASET, f"{trainer}__nnUNetPlans__2d", f"fold_{fold}")


def _train_and_check_start(env, trainer, fold, checkpoint, parts, schedule="1 epochs x 2 iterations"):
    """nnUNetv2_train; the network's tensors right after loading (read back from the trainer's own network and
    recorded in ssp_init.json) must equal the checkpoint's, for every tensor of the loaded parts; the training log
    states the ``schedule``."""
    run(["nnUNetv2_train", str(DATASET_ID), "2d", str(fold), "-tr", trainer, "-device", "cpu"], env)
    folder = _fold(env, trainer, fold)
    assert os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))
    record = json.load(open(os.path.join(folder, "ssp_init.json")))
    assert record["loaded"]["parts"] == list(parts)
    after_load = record["network_tensor_sha256_after_load"]
    expected = {k: _digest(v) for k, v in checkpoint["network_weights"].items()}
    assert {k: after_load[k] for k in expected} == expected
    assert all(k.split(".")[0] in parts for k in expected) and len(expected) == sum(
        record["loaded"]["tensors"].values()
    )
    log = open(next(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("training_log"))).read()
    assert "Loaded SSP checkpoint" in log and schedule in log
    return record


def _predict_and_evaluate(root, env, trainer, fold):
    raw = os.path.join(env["nnUNet_raw"], DATASET)
    pred = str(root / f"pred_{trainer}_{fold}")
    run(
        [
            "nnUNetv2_predict",
            "-i",
            os.path.join(raw, "imagesTs"),
            "-o",
            pred,
            "-d",
            str(DATASET_ID),
            "-c",
            "2d",
            "-f",
            str(fold),
            "-tr",
            trainer,
            "-device",
            "cpu",
            "-npp",
            "1",
            "-nps",
            "1",
            "--disable_tta",
        ],
        env,
    )
    assert sorted(f for f in os.listdir(pred) if f.endswith(".nii.gz")) == sorted(
        f.replace("_0000.nii.gz", ".nii.gz") for f in os.listdir(os.path.join(raw, "imagesTs"))
    )
    run(
        [
            "nnUNetv2_evaluate_folder",
            os.path.join(raw, "labelsTs"),
            pred,
            "-djfile",
            os.path.join(pred, "dataset.json"),
            "-pfile",
            os.path.join(pred, "plans.json"),
            "-np",
            "1",
        ],
        env,
    )
    summary = json.load(open(os.path.join(pred, "summary.json")))
    for label in ("1", "2", "3"):
        assert 0.0 <= summary["mean"][label]["Dice"] <= 1.0
    return summary


def test_exported_checkpoint_is_refused_by_another_methods_trainer_and_loaded_by_the_generic_one(phantom_env):
    """nnUNet_ssp_checkpoint exported to a MIM checkpoint (written through the public save API): the SimCLR trainer
    stops with one line and writes no fold folder; nnUNetTrainerSSP fine-tunes from it, then predicts without it."""
    root, env = phantom_env
    target = PlannedConfiguration.from_preprocessed(str(DATASET_ID))
    torch.manual_seed(7)
    path = str(root / "api_checkpoint" / "mim.pth")
    checkpoint = save_checkpoint(
        path,
        target.network_spec.build(num_output_channels=1),
        target,
        "mim",
        ("encoder", "decoder"),
        pretraining={"note": "random weights written by the e2e test"},
    )
    exported = dict(env, nnUNet_ssp_checkpoint=path)
    refused = run(
        ["nnUNetv2_train", str(DATASET_ID), "2d", "1", "-tr", "nnUNetTrainerSimCLR", "-device", "cpu"],
        exported,
        check=False,
    )
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"nnunet_ssp error: {path}: checkpoint pretrained with 'mim', but nnUNetTrainerSimCLR fine-tunes from "
        f"'simclr' checkpoints; unset nnUNet_ssp_checkpoint, or train with nnUNetTrainerSSP to load any method's "
        f"checkpoint"
    )
    assert not os.path.exists(_fold(env, "nnUNetTrainerSimCLR", 1))
    record = _train_and_check_start(exported, "nnUNetTrainerSSP", 1, checkpoint, ("encoder", "decoder"))
    assert record["method"] == "mim"
    os.rename(path, path + ".moved")  # inference must not need the SSP file
    _predict_and_evaluate(root, env, "nnUNetTrainerSSP", 1)


def test_ssp_pretrain_mim_then_finetune_predict_evaluate(phantom_env):
    root, env = phantom_env
    run(
        [
            "ssp_pretrain",
            "-d",
            str(DATASET_ID),
            "--method",
            "mim",
            "--epochs",
            "2",
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
    ssp_folder = default_checkpoint_folder(env["nnUNet_results"], DATASET, "mim", "nnUNetPlans", "2d")
    for name in (
        "checkpoint_final.pth",
        "checkpoint_latest.pth",
        "progress.png",
        "training_log.txt",
        "previews/epoch_001.png",
    ):
        assert os.path.isfile(os.path.join(ssp_folder, name)), name
    checkpoint = load_checkpoint(os.path.join(ssp_folder, "checkpoint_final.pth"))
    assert checkpoint["method"] == "mim" and checkpoint["pretraining"]["epochs"] == 2
    assert checkpoint["pretraining"]["lr"] == 0.01 * 4 / 128  # the paper's lr, scaled linearly to the batch
    assert checkpoint["data"]["num_subjects"] == 4 and checkpoint["data"]["source_kind"] == "cineTr"
    # the paper's schedule (nnUNet_ssp_iters_per_epoch unset): an epoch is one pass over fold 0's labelled slices
    preprocessed = os.path.join(env["nnUNet_preprocessed"], DATASET)
    train_cases = json.load(open(os.path.join(preprocessed, "splits_final.json")))[0]["train"]
    slices = sum(
        sitk.ReadImage(os.path.join(env["nnUNet_raw"], DATASET, "imagesTr", f"{c}_0000.nii.gz")).GetSize()[2]
        for c in train_cases
    )
    batch = json.load(open(os.path.join(preprocessed, "nnUNetPlans.json")))["configurations"]["2d"]["batch_size"]
    iterations = math.ceil(slices / batch)
    paper_env = {k: v for k, v in env.items() if k != "nnUNet_ssp_iters_per_epoch"}
    trainer = "nnUNetTrainerMIM_paperSchedule"
    _train_and_check_start(
        paper_env,
        trainer,
        0,
        checkpoint,
        ("encoder", "decoder"),
        schedule=f"paper schedule: an epoch is one pass over the fold's {slices} labelled training "
        f"slices at batch {batch}: {iterations} iterations",
    )
    debug = json.load(open(os.path.join(_fold(env, trainer, 0), "debug.json")))
    assert (debug["schedule_name"], debug["num_iterations_per_epoch"]) == ("paper", str(iterations))
    shutil.move(ssp_folder, ssp_folder + "_moved_away")
    _predict_and_evaluate(root, env, trainer, 0)


@pytest.mark.parametrize(
    "method, trainer, options",
    [
        ("simclr", "nnUNetTrainerSimCLR", []),
        ("pcl", "nnUNetTrainerPCL", ["--position-threshold", "0.2"]),
        ("dino", "nnUNetTrainerDINO", ["--dino-out-dim", "256", "--dino-local-views", "2"]),
    ],
)
def test_ssp_pretrain_encoder_methods_then_finetune_loads_the_encoder_only(phantom_env, method, trainer, options):
    root, env = phantom_env
    run(
        [
            "ssp_pretrain",
            "-d",
            str(DATASET_ID),
            "--method",
            method,
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
            "--probe-slices",
            "16",
            *options,
        ],
        env,
    )
    ssp_folder = default_checkpoint_folder(env["nnUNet_results"], DATASET, method, "nnUNetPlans", "2d")
    checkpoint = load_checkpoint(os.path.join(ssp_folder, "checkpoint_final.pth"))
    assert checkpoint["method"] == method and checkpoint["parts"] == ["encoder"]
    assert "probe_position_mae" in open(os.path.join(ssp_folder, "training_log.txt")).read()
    record = _train_and_check_start(env, trainer, 0, checkpoint, ("encoder",))
    # the pretrained network's decoder (in the full training state) was not loaded: fine-tuning starts it at random
    state = torch.load(os.path.join(ssp_folder, "checkpoint_latest.pth"), weights_only=True)["model"]
    prefix = "student.network." if method == "dino" else "network."
    kernels = {
        k: v
        for k, v in record["network_tensor_sha256_after_load"].items()
        if k.startswith("decoder.") and state[prefix + k].ndim > 1
    }  # biases and norms start equal anyway
    assert kernels and all(_digest(state[prefix + k]) != digest for k, digest in kernels.items())
    encoder = {k for k in record["network_tensor_sha256_after_load"] if k.startswith("encoder.")}
    assert encoder == set(checkpoint["network_weights"])


def test_checkpoint_for_other_plans_is_refused_by_nnunetv2_train(phantom_env):
    root, env = phantom_env
    target = PlannedConfiguration.from_preprocessed(str(DATASET_ID))
    plans = json.loads(json.dumps(target.plans_manager.plans))
    kwargs = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [f // 2 for f in kwargs["features_per_stage"]]
    other = PlannedConfiguration(dict(plans, plans_name="otherPlans"), "2d", target.dataset_json)
    bad = str(root / "other_plans.pth")
    save_checkpoint(bad, other.network_spec.build(1), other, "simclr", ("encoder",))
    result = run(
        ["nnUNetv2_train", str(DATASET_ID), "2d", "4", "-tr", "nnUNetTrainerSimCLR", "-device", "cpu"],
        dict(env, nnUNet_ssp_checkpoint=bad),
        check=False,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert (
        last_line.startswith("nnunet_ssp error:") and "other plans" in last_line and "features_per_stage" in last_line
    )
    assert "Traceback" not in result.stderr
    assert not os.path.exists(_fold(env, "nnUNetTrainerSimCLR", 4))
