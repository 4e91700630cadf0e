"""Shared fixtures: small nnU-Net plans for unit tests and an environment for the stock CLIs."""

import os
import sys

import pytest
import torch

from nnunet_ssp.network import PlannedConfiguration

# The console scripts (nnunet_ssp, ssp_pretrain, nnUNetv2_*) live next to this interpreter, venv activated or not.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

DATASET_JSON = {
    "channel_names": {"0": "cineMRI"},
    "labels": {"background": 0, "LV_bloodpool": 1, "LV_myocardium": 2, "RV_bloodpool": 3},
    "numTraining": 4,
    "file_ending": ".nii.gz",
}


def make_plans(
    features=(8, 16, 32, 64),
    patch=(64, 64),
    dataset_name="Dataset990_Unit",
    plans_name="nnUNetPlans",
    network="PlainConvUNet",
) -> dict:
    """A plans dict shaped like nnU-Net's own 2D plans, with a small network for fast tests."""
    n = len(features)
    arch_kwargs = {
        "n_stages": n,
        "features_per_stage": list(features),
        "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * n,
        "strides": [[1, 1]] + [[2, 2]] * (n - 1),
        "n_conv_per_stage_decoder": [1] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if network == "PlainConvUNet":
        arch_kwargs["n_conv_per_stage"] = [2] * n
        class_name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    else:
        arch_kwargs["n_blocks_per_stage"] = [1] + [2] * (n - 1)
        class_name = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    return {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": [8.0, 1.5, 1.5],
        "original_median_shape_after_transp": [10, *patch],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "configurations": {
            "2d": {
                "data_identifier": "nnUNetPlans_2d",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch),
                "median_image_size_in_voxels": list(patch),
                "spacing": [1.5, 1.5],
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "batch_dice": True,
                "architecture": {
                    "network_class_name": class_name,
                    "arch_kwargs": arch_kwargs,
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
            }
        },
    }


@pytest.fixture
def target() -> PlannedConfiguration:
    return PlannedConfiguration(make_plans(), "2d", DATASET_JSON)


@pytest.fixture
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """nnU-Net path variables pointing into tmp_path, for code that reads them."""
    paths = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        paths[name] = str(tmp_path / name)
        os.makedirs(paths[name])
        monkeypatch.setenv(name, paths[name])
    return paths


PHANTOM_ID = 991
PHANTOM_DATASET = f"Dataset{PHANTOM_ID}_E2E"
PHANTOM_PARAMETERS = dict(subjects=4, test_subjects=1, size=64, seed=3)


def run_cli(args, env, check=True):
    """Runs a console script as a user would; on failure shows its output."""
    import subprocess

    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="session")
def phantom_workspace(tmp_path_factory):
    """A tiny phantom (4 training subjects, 64 px) planned and preprocessed by the stock CLIs, with the env that
    points nnU-Net at it and runs tiny schedules. Tests that train use their own folds or output folders."""
    from nnunet_ssp import workspace

    root = tmp_path_factory.mktemp("workspace")
    env = workspace.workspace_env(
        str(root),
        nnUNet_n_proc_DA="1",
        nnUNet_def_n_proc="1",
        nnUNet_ssp_num_epochs="1",
        nnUNet_ssp_iters_per_epoch="2",
    )
    workspace.phantom_workspace(env, PHANTOM_ID, "E2E", **PHANTOM_PARAMETERS)
    return root, env


@pytest.fixture
def phantom_env(phantom_workspace, monkeypatch):
    """The phantom workspace's nnU-Net variables in this process, for in-process API calls."""
    root, env = phantom_workspace
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, env[name])
    return root, env
