"""Width-scaled plans (nnunet_ssp/plans.py, ``nnunet_ssp plans``) on a private copy of the phantom workspace: the
written file, the network it builds, nnUNetv2_train and ssp_pretrain with it on the base plans' preprocessed data, the
SSP checkpoint contract, CLI errors, and the protocol's ``--width`` plan."""

import copy
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from conftest import PHANTOM_DATASET, PHANTOM_ID, run_cli
from test_protocol import _planned, reproduce

from nnunet_ssp import cli, workspace
from nnunet_ssp.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from nnunet_ssp.errors import SSPError
from nnunet_ssp.network import PlannedConfiguration
from nnunet_ssp.plans import WIDTH_KEY, plans_width, width_plans_identifier, write_width_plans
from nnunet_ssp.runner import PARALLEL_RUN_ENV
from pretraining.methods import METHODS

WIDTH_PLANS = "nnUNetPlans_w025"


@pytest.fixture(scope="module")
def width_workspace(phantom_workspace, tmp_path_factory):
    """A private copy of the phantom workspace with a one-fold split and ``WIDTH_PLANS`` written by the CLI; tiny
    runs (1 epoch x 2 iterations, no data-loading workers, no final validation). (root, env, the CLI's output)."""
    source, _ = phantom_workspace
    root = tmp_path_factory.mktemp("width")
    env = workspace.workspace_env(
        str(root),
        nnUNet_n_proc_DA="0",
        nnUNet_def_n_proc="1",
        nnUNet_ssp_num_epochs="1",
        nnUNet_ssp_iters_per_epoch="2",
        nnUNet_ssp_skip_final_validation="1",
        **PARALLEL_RUN_ENV,
    )
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(os.path.join(source, name), env[name], dirs_exist_ok=True)
    folder = os.path.join(env["nnUNet_preprocessed"], PHANTOM_DATASET)
    cases = sorted(
        f[: -len(".b2nd")]
        for f in os.listdir(os.path.join(folder, "nnUNetPlans_2d"))
        if f.endswith(".b2nd") and not f.endswith("_seg.b2nd")
    )
    save_json([{"train": cases[:-1], "val": cases[-1:]}], os.path.join(folder, "splits_final.json"))
    written = run_cli(["nnunet_ssp", "plans", "-d", str(PHANTOM_ID), "--width", "0.25"], env)
    return root, env, written.stdout


@pytest.fixture
def width_env(width_workspace, monkeypatch):
    """The width workspace's nnU-Net variables in this process; its preprocessed dataset folder."""
    _, env, _ = width_workspace
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, env[name])
    return os.path.join(env["nnUNet_preprocessed"], PHANTOM_DATASET)


def _load(folder, plans):
    with open(os.path.join(folder, f"{plans}.json"), encoding="utf-8") as f:
        return json.load(f)


def _conv_channels(network):
    """(out, in) channels of every convolution of the encoder's stages, stage by stage."""
    return [
        [tuple(m.weight.shape[:2]) for m in stage.modules() if isinstance(m, torch.nn.Conv2d)]
        for stage in network.encoder.stages
    ]


@pytest.mark.parametrize(
    "width, identifier",
    [(0.25, "nnUNetPlans_w025"), (0.5, "nnUNetPlans_w05"), (0.125, "nnUNetPlans_w0125"), (2, "nnUNetPlans_w2")],
)
def test_identifier_of_a_width(width, identifier):
    assert width_plans_identifier("nnUNetPlans", width) == identifier


def test_width_plans_scale_the_features_only_and_build_the_narrow_network(width_workspace, width_env):
    base, scaled = _load(width_env, "nnUNetPlans"), _load(width_env, WIDTH_PLANS)
    expected, summary = copy.deepcopy(base), []
    for name, configuration in expected["configurations"].items():  # 2d and 3d_fullres (planned, not preprocessed)
        arch_kwargs = configuration["architecture"]["arch_kwargs"]
        planned = arch_kwargs["features_per_stage"]
        arch_kwargs["features_per_stage"] = narrow = [max(1, round(f / 4)) for f in planned]
        summary.append(f"{name} {' '.join(map(str, planned))} -> {' '.join(map(str, narrow))}")
    assert scaled == {**expected, "plans_name": WIDTH_PLANS, WIDTH_KEY: {"base": "nnUNetPlans", "width": 0.25}}
    assert scaled["configurations"]["2d"]["data_identifier"] == "nnUNetPlans_2d"  # the preprocessed data is reused
    assert plans_width(scaled) == 0.25 and plans_width(base) is None
    path = os.path.join(width_env, f"{WIDTH_PLANS}.json")
    assert width_workspace[2] == f"{path}: features per stage {'; '.join(summary)}\n"
    before = open(path, "rb").read()
    assert write_width_plans(str(PHANTOM_ID), 0.25) == path and open(path, "rb").read() == before  # idempotent

    full, small = (
        PlannedConfiguration.from_preprocessed(str(PHANTOM_ID), plans).network_spec.build(4)
        for plans in ("nnUNetPlans", WIDTH_PLANS)
    )
    channels = _conv_channels(small)
    narrow = scaled["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"]
    assert [{out for out, _ in stage} for stage in channels] == [{n} for n in narrow]
    # every convolution a quarter as wide as the planned network's, but for the image's one input channel
    assert channels == [
        [(out // 4, 1 if into == 1 else into // 4) for out, into in stage] for stage in _conv_channels(full)
    ]
    assert small.state_dict().keys() == full.state_dict().keys()


def test_a_width_scaled_checkpoint_fits_its_plans_only(width_env, tmp_path, seeded):
    small, full = (
        PlannedConfiguration.from_preprocessed(str(PHANTOM_ID), plans) for plans in (WIDTH_PLANS, "nnUNetPlans")
    )
    path = str(tmp_path / "mim.pth")
    save_checkpoint(path, small.network_spec.build(num_output_channels=1), small, "mim", METHODS["mim"].parts)
    checkpoint = load_checkpoint(path)
    assert checkpoint["plans"]["plans_name"] == WIDTH_PLANS
    assert checkpoint["plans"]["data_identifier"] == "nnUNetPlans_2d"
    assert verify_checkpoint(checkpoint, small, ["encoder", "decoder"], path) == []
    with pytest.raises(
        SSPError,
        match=f"checkpoint built for other plans \\({WIDTH_PLANS} .* does not fit nnUNetPlans .*features_per_stage",
    ):
        verify_checkpoint(checkpoint, full, ["encoder"], path)
    with pytest.raises(SSPError, match="do not fit"):  # nor does a full-width network save as the narrow plans'
        save_checkpoint(str(tmp_path / "x.pth"), full.network_spec.build(1), small, "mim", METHODS["mim"].parts)


def test_nnunetv2_train_and_ssp_pretrain_run_with_the_width_plans(width_workspace):
    """The stock commands with -p nnUNetPlans_w025: the baseline's fine-tuning beside ssp_pretrain --method mim, then
    nnUNetTrainerMIM fine-tuning from that checkpoint, found where the trainers look. nnU-Net's narrow checkpoints in
    their Trainer__Plans__2d folders; no second preprocessed folder."""
    _, env, _ = width_workspace
    results = os.path.join(env["nnUNet_results"], PHANTOM_DATASET)
    preprocessed = os.path.join(env["nnUNet_preprocessed"], PHANTOM_DATASET)

    def train(trainer):
        run_cli(
            ["nnUNetv2_train", str(PHANTOM_ID), "2d", "0", "-p", WIDTH_PLANS, "-tr", trainer, "-device", "cpu"], env
        )
        return os.path.join(results, f"{trainer}__{WIDTH_PLANS}__2d", "fold_0")

    def pretrain_and_fine_tune():
        run_cli(
            [
                "ssp_pretrain",
                "-d",
                str(PHANTOM_ID),
                "--method",
                "mim",
                "-p",
                WIDTH_PLANS,
                "--epochs",
                "1",
                "--iters-per-epoch",
                "1",
                "--batch-size",
                "4",
                "--num-workers",
                "0",
                "--probe-slices",
                "0",
                "--no-seg-probe",
                "--device",
                "cpu",
            ],
            env,
        )
        return train("nnUNetTrainerMIM")

    with ThreadPoolExecutor(2) as pool:
        baseline, mim = pool.submit(train, "nnUNetTrainerBaseline"), pool.submit(pretrain_and_fine_tune)
        folds = {"baseline": baseline.result(), "mim": mim.result()}

    for fold in folds.values():
        trained = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
        plans = trained["init_args"]["plans"]
        assert plans["plans_name"] == WIDTH_PLANS
        features = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"]
        assert trained["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"].shape[0] == features[0] < 32
    assert not os.path.exists(os.path.join(preprocessed, f"{WIDTH_PLANS}_2d"))

    path = os.path.join(results, "ssp", f"mim__{WIDTH_PLANS}__2d", "checkpoint_final.pth")
    checkpoint = load_checkpoint(path)
    assert checkpoint["plans"]["plans_name"] == WIDTH_PLANS
    assert checkpoint["network"]["arch_kwargs"]["features_per_stage"] == features
    record = json.load(open(os.path.join(folds["mim"], "ssp_init.json")))
    assert record["checkpoint"] == path and record["loaded"]["parts"] == ["encoder", "decoder"]


def test_plans_errors_are_one_line_and_write_nothing(width_env, capsys):
    before = sorted(os.listdir(width_env))
    cases = [
        (["--width", "0"], "--width 0: must be a positive number"),
        (["--width", "-0.5"], "--width -0.5: must be a positive number"),
        (["--width", "nan"], "--width nan: must be a positive number"),
        (
            ["--width", "0.5", "-p", "missingPlans"],
            f"{os.path.join(width_env, 'missingPlans.json')}: plans not found; run nnUNetv2_plan_and_preprocess",
        ),
        (["--width", "0.5", "-p", WIDTH_PLANS], f"{os.path.join(width_env, WIDTH_PLANS)}.json: already width-scaled"),
    ]
    for arguments, message in cases:
        assert cli.main(["plans", "-d", str(PHANTOM_ID), *arguments]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, (arguments, err)
    assert sorted(os.listdir(width_env)) == before
    other = os.path.join(width_env, "nnUNetPlans_w05.json")  # a file of that name with other contents is kept
    save_json({"plans_name": "mine"}, other)
    assert cli.main(["plans", "-d", str(PHANTOM_ID), "--width", "0.5"]) == 2
    assert "exists and is not width 0.5 plans of nnUNetPlans" in capsys.readouterr().err
    assert _load(width_env, "nnUNetPlans_w05") == {"plans_name": "mine"}
    os.remove(other)


def test_protocol_width_adds_the_plans_run_and_every_later_run_uses_them(phantom_workspace, tmp_path):
    """A dry run before anything but the raw dataset exists: the width-scaled plans are a prepare run, and every
    pretraining, fine-tuning and prediction command uses them."""
    source, _ = phantom_workspace
    env = workspace.workspace_env(str(tmp_path))
    shutil.copytree(os.path.join(source, "nnUNet_raw"), env["nnUNet_raw"], dirs_exist_ok=True)
    common = [
        "-d",
        str(PHANTOM_ID),
        "--budgets",
        "2",
        "--seeds",
        "0",
        "--val",
        "1",
        "--methods",
        "mim",
        "--device",
        "cpu",
        "--dry-run",
    ]
    result = reproduce(env, *common, "--width", "0.25")
    assert not os.listdir(env["nnUNet_preprocessed"]) and not os.listdir(env["nnUNet_results"])
    assert [name for phase, name in _planned(result.stdout) if phase == "prepare"] == [
        "plan and preprocess",
        "width-scaled plans",
        "label-budget folds",
    ]
    commands = [line.strip() for line in result.stdout.splitlines() if line.startswith("    ")]
    assert f"nnunet_ssp plans -d {PHANTOM_ID} -p nnUNetPlans --width 0.25" in commands
    for command in ("ssp_pretrain", "nnUNetv2_train", "nnunet_ssp predict"):
        using = [c for c in commands if c.startswith(command)]
        assert using and all(f" -p {WIDTH_PLANS} " in c for c in using), command
    assert (
        f"nnUNetv2_train {PHANTOM_ID} 2d 0 -tr nnUNetTrainerBaseline_paperSchedule_seed0 -p {WIDTH_PLANS} -device cpu"
    ) in commands
    bad = reproduce(env, *common, "--width", "0", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --width 0: must be a positive number")
