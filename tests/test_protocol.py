"""``scripts/reproduce_paper.sh``: the plan of a converted toy dataset (dry run, training seeds, shards, the
unseen-phase and unseen-vendor experiments), and a two-budget, one-split-seed, two-training-seed miniature of the whole
protocol through the stock CLIs and ``nnunet_ssp predict`` to ``nnunet_ssp report``, whose table must hold the values
of the underlying ``summary.json`` files; a second invocation must find every run done but the one whose evaluation
was removed, and one killed while fine-tuning must resume to the same report. The two experiments then run on the
miniature's dataset: their folds join the paper's, pretraining is reused, and only the other phase's or the other
vendors' test cases are evaluated."""

import csv
import glob
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_cli
from test_convert import converted, make_source, write_mnms2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "reproduce_paper.sh")


def reproduce(env, *args, check=True):
    return run_cli(["bash", SCRIPT, *args], env, check=check)


def _snapshot(root):
    return sorted(
        (os.path.relpath(os.path.join(d, f), root), os.path.getmtime(os.path.join(d, f)))
        for d, _, files in os.walk(root)
        for f in files
    )


def _planned(stdout):
    """[(phase, name)] of the runs a dry run lists."""
    return re.findall(r"^\[(\w+) \d+/\d+\] (.+?)(?: \[done\])?$", stdout, flags=re.M)


def _predicted(stdout):
    """[[(trainer, fold, output folder)] of each ``nnunet_ssp predict`` command] of a dry run."""
    return [
        re.findall(r"--run (\S+) (\d+) (\S+)", line)
        for line in stdout.splitlines()
        if line.strip().startswith("nnunet_ssp predict ")
    ]


def _trained(stdout):
    """[(phase, name)] of the pretraining and fine-tuning runs of a dry run."""
    return [
        (phase, name)
        for phase, name in _planned(stdout)
        if phase in ("pretrain", "finetune") and not name.startswith("predict and evaluate")
    ]


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory):
    """An M&Ms-2-layout toy with 6 development (vendors A, B) and 2 test subjects (vendors B, C), converted to
    Dataset641_Test; the dry runs of the module share it."""
    tmp = str(tmp_path_factory.mktemp("toy"))
    sources = [make_source(i, f"{100 + i}", "train", "AB"[i % 2], "ARR") for i in range(1, 7)]
    sources += [make_source(i, f"{280 + i}", "test", "BC"[i % 2], "FALL") for i in range(1, 3)]
    write_mnms2(os.path.join(tmp, "MnM2"), sources)
    converted(tmp, "mnms2", os.path.join(tmp, "MnM2"), 641)
    env = dict(
        os.environ,
        nnUNet_raw=os.path.join(tmp, "raw"),
        nnUNet_preprocessed=os.path.join(tmp, "pre"),
        nnUNet_results=os.path.join(tmp, "results"),
    )
    return tmp, env


def test_dry_run_lists_every_run_and_writes_nothing(toy_env):
    tmp, env = toy_env
    before = _snapshot(tmp)
    result = reproduce(env, "-d", "641", "--budgets", "2", "4", "all", "--seeds", "0", "1", "--val", "1", "--dry-run")
    assert _snapshot(tmp) == before and not os.path.exists(env["nnUNet_preprocessed"])
    runs = _planned(result.stdout)
    assert [name for phase, name in runs if phase == "prepare"] == ["plan and preprocess", "label-budget folds"]
    assert [name for phase, name in runs if phase == "pretrain"] == [
        f"ssp_pretrain {m}" for m in ("simclr", "pcl", "dino", "mim")
    ]
    finetune = [name for phase, name in runs if phase == "finetune"]
    trainers = (
        "nnUNetTrainerBaseline",
        "nnUNetTrainerSimCLR",
        "nnUNetTrainerPCL",
        "nnUNetTrainerDINO",
        "nnUNetTrainerMIM",
    )
    folds = [(s, b) for s in (0, 1) for b in ("2", "4", "all")]
    # the paper's schedule and training seed 0 by default
    expected = [
        f"{t}_paperSchedule_seed0 fold {fold} (budget {b}, seed {s}, training seed 0)"
        for fold, (s, b) in enumerate(folds)
        for t in trainers
    ]
    assert finetune == expected + ["predict and evaluate 30 runs"]  # budgets x seeds x (baseline + 4 methods)
    assert [phase for phase, _ in runs][-1] == "report"
    assert (
        "nnUNetv2_train 641 2d 0 -tr nnUNetTrainerBaseline_paperSchedule_seed0 -p nnUNetPlans -device cuda"
        in result.stdout
    )
    # then every trained run predicts the test images, without TTA, and is evaluated, all in one process
    predictions = os.path.join(env["nnUNet_results"], "Dataset641_Test", "ssp_protocol", "predictions")
    assert _predicted(result.stdout) == [
        [
            (
                f"{t}_paperSchedule_seed0",
                str(fold),
                os.path.join(predictions, f"{t}_paperSchedule_seed0", f"fold_{fold}"),
            )
            for fold in range(6)
            for t in trainers
        ]
    ]
    assert (
        f"nnunet_ssp predict -i {os.path.join(env['nnUNet_raw'], 'Dataset641_Test', 'imagesTs')} -d 641 -c 2d "
        f"-p nnUNetPlans -device cuda --disable_tta --continue --evaluate -np 2 --run "
    ) in result.stdout
    assert "nnUNetv2_predict" not in result.stdout and "ssp_pretrain -d 641 --method mim" in result.stdout
    # --jobs 2: two processes share the predictions
    jobs = reproduce(
        env, "-d", "641", "--budgets", "2", "4", "all", "--seeds", "0", "1", "--val", "1", "--jobs", "2", "--dry-run"
    )
    assert [name for _, name in _planned(jobs.stdout) if name.startswith("predict")] == [
        "predict and evaluate 15 runs (process 1/2)",
        "predict and evaluate 15 runs (process 2/2)",
    ]
    assert sorted(sum(_predicted(jobs.stdout), [])) == sorted(_predicted(result.stdout)[0])

    # the iteration budget: each fold's labelled slices (counted here from the images), at the paper's batch 32
    # before planning, 1000 epochs; the nnU-Net schedule is 250 iterations per epoch at every budget
    from nnunet_ssp.splits import make_folds

    raw = os.path.join(env["nnUNet_raw"], "Dataset641_Test")
    cases = sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(os.path.join(raw, "imagesTr")))
    planned, _, _ = make_folds(cases, {"budgets": ["2", "4", "all"], "seeds": [0, 1], "num_val": 1}, raw)
    slices = [
        sum(sitk.ReadImage(os.path.join(raw, "imagesTr", f"{c}_0000.nii.gz")).GetSize()[2] for c in fold["train"])
        for fold in planned
    ]
    assert (
        "fine-tuning iterations per run (1000 epochs, batch 32: the paper's, until nnUNetv2_plan_and_preprocess "
        "has planned):" in result.stdout
    )
    for (seed, budget), n in zip(folds, slices):
        assert (
            f"  budget {budget}, seed {seed}: {n} labelled slices -> paper {math.ceil(n / 32) * 1000:,}, nnunet 250,000"
        ) in result.stdout
    total = sum(math.ceil(n / 32) * 1000 for n in slices) * 5
    assert (
        f"all 30 fine-tuning runs (training seed 0): paper {total:,}, nnunet {30 * 250_000:,} iterations; this "
        f"plan runs --schedule paper"
    ) in result.stdout


def test_schedule_and_tta_switch(toy_env):
    tmp, env = toy_env
    result = reproduce(
        env,
        "-d",
        "641",
        "--budgets",
        "2",
        "--seeds",
        "0",
        "--val",
        "1",
        "--methods",
        "mim",
        "--schedule",
        "nnunet",
        "--tta",
        "--dry-run",
    )
    assert "nnUNetv2_train 641 2d 0 -tr nnUNetTrainerMIM_seed0 -p nnUNetPlans -device cuda" in result.stdout
    assert "_paperSchedule" not in result.stdout and "--disable_tta" not in result.stdout
    assert len(_predicted(result.stdout)[0]) == 2 and "this plan runs --schedule nnunet" in result.stdout
    recipes = reproduce(
        env,
        "-d",
        "641",
        "--budgets",
        "2",
        "--seeds",
        "0",
        "--val",
        "1",
        "--methods",
        "mim",
        "dino",
        "--recipes",
        "paper",
        "baselineLR",
        "warmup",
        "baselineLR_encoderOnly",
        "--dry-run",
    )
    assert [name.split("_seed0 fold")[0] for phase, name in _trained(recipes.stdout) if phase == "finetune"] == [
        "nnUNetTrainerBaseline_paperSchedule",
        "nnUNetTrainerMIM_paperSchedule",
        "nnUNetTrainerDINO_paperSchedule",
        # the baseline has the scratch lr already
        "nnUNetTrainerMIM_baselineLR_paperSchedule",
        "nnUNetTrainerDINO_baselineLR_paperSchedule",
        "nnUNetTrainerBaseline_warmup_paperSchedule",
        "nnUNetTrainerMIM_warmup_paperSchedule",
        "nnUNetTrainerDINO_warmup_paperSchedule",
        "nnUNetTrainerMIM_baselineLR_encoderOnly_paperSchedule",
    ]  # DINO loads the encoder alone anyway


def test_every_budget_methods_recipe_controls_and_per_method_pretraining_arguments(toy_env):
    tmp, env = toy_env
    result = reproduce(
        env,
        "-d",
        "641",
        "--budgets",
        "4",
        "2",
        "--seeds",
        "0",
        "--val",
        "1",
        "--methods",
        "dino",
        "mim",
        "--every-budget",
        "mim",
        "--recipes",
        "baselineLR",
        "--pretrain-args-of",
        "mim",
        "--mask-patch-size 16 --skip-features masked",
        "--dry-run",
    )
    # fold 0 is budget 4, fold 1 budget 2 (the smallest): DINO fine-tunes there only; a recipe that leaves the
    # baseline unchanged is compared with the paper's baseline
    assert [name.split(" (")[0] for phase, name in _trained(result.stdout) if phase == "finetune"] == [
        "nnUNetTrainerBaseline_paperSchedule_seed0 fold 0",
        "nnUNetTrainerMIM_baselineLR_paperSchedule_seed0 fold 0",
        "nnUNetTrainerBaseline_paperSchedule_seed0 fold 1",
        "nnUNetTrainerDINO_baselineLR_paperSchedule_seed0 fold 1",
        "nnUNetTrainerMIM_baselineLR_paperSchedule_seed0 fold 1",
    ]
    assert re.search(
        r"all 5 fine-tuning runs \(training seed 0\): paper [\d,]+, nnunet 1,250,000 iterations", result.stdout
    )
    pretrain = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("ssp_pretrain ")]
    assert pretrain == [
        "ssp_pretrain -d 641 --method dino -c 2d -p nnUNetPlans --device cuda",
        "ssp_pretrain -d 641 --method mim -c 2d -p nnUNetPlans --device cuda --mask-patch-size 16 "
        "--skip-features masked",
    ]
    for bad, message in (
        (["--every-budget", "pcl"], "--every-budget pcl: not one of --methods dino mim"),
        (["--pretrain-args-of", "pcl", "--epochs 2"], "--pretrain-args-of pcl: not one of --methods dino mim"),
    ):
        refused = reproduce(
            env,
            "-d",
            "641",
            "--budgets",
            "2",
            "--seeds",
            "0",
            "--val",
            "1",
            "--methods",
            "dino",
            "mim",
            *bad,
            "--dry-run",
            check=False,
        )
        assert refused.returncode == 2 and refused.stderr.strip() == f"error: {message}"


def test_training_seeds_repeat_every_run_paired_and_none_trains_nnunets_unseeded_trainers(toy_env):
    tmp, env = toy_env
    common = ["-d", "641", "--budgets", "2", "4", "--seeds", "0", "--val", "1", "--methods", "mim", "--dry-run"]
    result = reproduce(env, *common, "--train-seeds", "0", "1")
    # each fold's baseline and method train with the same training seeds, each seeded run into its own folders
    runs = [
        (f"{t}_paperSchedule_seed{k}", fold, budget, k)
        for fold, budget in enumerate((2, 4))
        for k in (0, 1)
        for t in ("nnUNetTrainerBaseline", "nnUNetTrainerMIM")
    ]
    assert [name for phase, name in _trained(result.stdout) if phase == "finetune"] == [
        f"{trainer} fold {fold} (budget {budget}, seed 0, training seed {k})" for trainer, fold, budget, k in runs
    ]
    predictions = os.path.join(env["nnUNet_results"], "Dataset641_Test", "ssp_protocol", "predictions")
    assert _predicted(result.stdout) == [
        [(trainer, str(fold), os.path.join(predictions, trainer, f"fold_{fold}")) for trainer, fold, _, _ in runs]
    ]
    # the iteration totals count the repeats: each fold's 4 runs
    per_run = [int(n.replace(",", "")) for n in re.findall(r"labelled slices -> paper ([\d,]+),", result.stdout)]
    assert (
        len(per_run) == 2
        and (f"all 8 fine-tuning runs (training seeds 0 1): paper {4 * sum(per_run):,}, nnunet 2,000,000 iterations")
        in result.stdout
    )

    unseeded = reproduce(env, *common, "--train-seeds", "none")
    assert [name for phase, name in _trained(unseeded.stdout) if phase == "finetune"] == [
        f"{t}_paperSchedule fold {fold} (budget {budget}, seed 0, unseeded training)"
        for fold, budget in enumerate((2, 4))
        for t in ("nnUNetTrainerBaseline", "nnUNetTrainerMIM")
    ]
    assert "all 4 fine-tuning runs (unseeded training): paper " in unseeded.stdout
    for bad in (["0", "none"], ["1", "1"], ["-1"]):
        refused = reproduce(env, *common, "--train-seeds", *bad, check=False)
        assert refused.returncode == 2 and refused.stderr.strip() == (
            f"error: --train-seeds {' '.join(bad)}: expected distinct non-negative integers, or none alone"
        )


def _command_lines(stdout, command):
    return [line.strip() for line in stdout.splitlines() if line.strip().startswith(command + " ")]


def _fold_slices(raw, options):
    """[labelled slices of each fold's training cases] as nnunet_ssp.splits chooses them (the slices counted here
    from the images)."""
    from nnunet_ssp.splits import make_folds

    cases = sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(os.path.join(raw, "imagesTr")))
    planned, _, _ = make_folds(cases, options, raw)
    return [
        sum(sitk.ReadImage(os.path.join(raw, "imagesTr", f"{c}_0000.nii.gz")).GetSize()[2] for c in fold["train"])
        for fold in planned
    ]


def test_unseen_phase_plan_fine_tunes_on_one_phase_and_tests_on_the_other(toy_env):
    tmp, env = toy_env
    common = ["-d", "641", "--budgets", "2", "4", "--seeds", "0", "--val", "1", "--methods", "mim", "--dry-run"]
    paper = reproduce(env, *common)
    result = reproduce(env, *common, "--experiment", "unseen-phase")
    results = os.path.join(env["nnUNet_results"], "Dataset641_Test")
    assert f"outputs in {os.path.join(results, 'ssp_protocol_unseen-phase_ED')} (dry run" in result.stdout
    assert (
        "experiment unseen phase: trained on ED, tested on ES; pretraining is the paper experiment's" in result.stdout
    )
    assert _command_lines(result.stdout, "nnunet_ssp splits") == [
        "nnunet_ssp splits -d 641 --budgets 2 4 --seeds 0 --val 1 --phases ED"
    ]
    assert _command_lines(paper.stdout, "nnunet_ssp splits") == [
        "nnunet_ssp splits -d 641 --budgets 2 4 --seeds 0 --val 1"
    ]
    # the same pretraining runs and checkpoints as the paper experiment's
    assert (
        _command_lines(result.stdout, "ssp_pretrain")
        == _command_lines(paper.stdout, "ssp_pretrain")
        == ["ssp_pretrain -d 641 --method mim -c 2d -p nnUNetPlans --device cuda"]
    )
    predict = _command_lines(result.stdout, "nnunet_ssp predict")
    assert len(predict) == 1 and " --evaluate --phases ES -np 2 --run " in predict[0]
    assert _predicted(result.stdout) == [
        [
            (t, str(fold), os.path.join(results, "ssp_protocol_unseen-phase_ED", "predictions", t, f"fold_{fold}"))
            for fold in (0, 1)
            for t in ("nnUNetTrainerBaseline_paperSchedule_seed0", "nnUNetTrainerMIM_paperSchedule_seed0")
        ]
    ]
    assert _command_lines(result.stdout, "nnunet_ssp report") == [
        f"nnunet_ssp report {os.path.join(results, 'ssp_protocol_unseen-phase_ED', 'predictions')} -o "
        f"{os.path.join(results, 'ssp_protocol_unseen-phase_ED', 'report')}"
    ]
    # the iteration budget counts the ED slices of the unfiltered folds' subjects: half of theirs
    raw = os.path.join(env["nnUNet_raw"], "Dataset641_Test")
    both = _fold_slices(raw, {"budgets": ["2", "4"], "seeds": [0], "num_val": 1})
    for budget, n in zip((2, 4), both):
        assert (
            f"  budget {budget}, seed 0: {n // 2} labelled slices -> paper {math.ceil(n / 2 / 32) * 1000:,}, "
            f"nnunet 250,000"
        ) in result.stdout
    es = reproduce(env, *common, "--experiment", "unseen-phase", "--train-phase", "ES")
    assert _command_lines(es.stdout, "nnunet_ssp splits")[0].endswith(" --phases ES")
    assert " --evaluate --phases ED " in _command_lines(es.stdout, "nnunet_ssp predict")[0]
    assert "ssp_protocol_unseen-phase_ES" in es.stdout and "ssp_protocol_unseen-phase_ED" not in es.stdout


def test_unseen_vendor_plan_fine_tunes_on_the_vendors_and_tests_on_the_others(toy_env):
    tmp, env = toy_env
    common = ["-d", "641", "--seeds", "0", "1", "--val", "1", "--methods", "mim", "--dry-run"]
    result = reproduce(env, *common, "--experiment", "unseen-vendor", "--train-vendors", "A", "B")
    results = os.path.join(env["nnUNet_results"], "Dataset641_Test", "ssp_protocol_unseen-vendor_A+B")
    assert f"outputs in {results} (dry run" in result.stdout
    assert _command_lines(result.stdout, "nnunet_ssp splits") == [
        "nnunet_ssp splits -d 641 --vendors A B --seeds 0 1 --val 1"
    ]
    assert _command_lines(result.stdout, "ssp_pretrain") == [  # the paper experiment's (the unseen-phase test)
        "ssp_pretrain -d 641 --method mim -c 2d -p nnUNetPlans --device cuda"
    ]
    # every method at the one budget of each seed: all training subjects of A and B
    assert [name for phase, name in _trained(result.stdout) if phase == "finetune"] == [
        f"{t}_paperSchedule_seed0 fold {seed} (budget vendors:A+B, seed {seed}, training seed 0)"
        for seed in (0, 1)
        for t in ("nnUNetTrainerBaseline", "nnUNetTrainerMIM")
    ]
    predict = _command_lines(result.stdout, "nnunet_ssp predict")
    assert len(predict) == 1 and " --evaluate --vendors C -np 2 --run " in predict[0]  # B was trained on
    assert all(folder.startswith(os.path.join(results, "predictions")) for _, _, folder in _predicted(result.stdout)[0])
    raw = os.path.join(env["nnUNet_raw"], "Dataset641_Test")
    for seed, n in zip((0, 1), _fold_slices(raw, {"vendors": ["A", "B"], "seeds": [0, 1], "num_val": 1})):
        assert f"  budget vendors:A+B, seed {seed}: {n} labelled slices -> paper " in result.stdout
    only_a = reproduce(env, *common, "--experiment", "unseen-vendor", "--train-vendors", "A")
    assert " --evaluate --vendors B C " in _command_lines(only_a.stdout, "nnunet_ssp predict")[0]
    assert "ssp_protocol_unseen-vendor_A" + os.sep in only_a.stdout


@pytest.mark.parametrize(
    "options, message",
    [
        (["--train-vendors", "A"], "--train-vendors A: only with --experiment unseen-vendor"),
        (["--train-phase", "ES"], "--train-phase ES: only with --experiment unseen-phase"),
        (
            ["--experiment", "unseen-vendor"],
            "--experiment unseen-vendor: give the training vendors with --train-vendors (e.g. A B)",
        ),
        (
            ["--experiment", "unseen-vendor", "--train-vendors", "A", "--budgets", "2"],
            "--budgets: not with --experiment unseen-vendor, which fine-tunes on every training subject of "
            "--train-vendors",
        ),
        (
            ["--experiment", "unseen-phase", "--splits-yaml", "split.yaml"],
            "--splits-yaml: only with --experiment paper",
        ),
        (
            ["--experiment", "unseen-vendor", "--train-vendors", "A", "E"],
            "--train-vendors E: no training subjects of that vendor in {raw}/subjects.csv (training vendors: A, B)",
        ),
        (
            ["--experiment", "unseen-vendor", "--train-vendors", "C"],  # a vendor of test subjects only
            "--train-vendors C: no training subjects of that vendor in {raw}/subjects.csv (training vendors: A, B)",
        ),
    ],
)
def test_experiment_options_that_do_not_fit_are_one_line_errors(toy_env, options, message):
    tmp, env = toy_env
    refused = reproduce(env, "-d", "641", "--seeds", "0", "--dry-run", *options, check=False)
    raw = os.path.join(env["nnUNet_raw"], "Dataset641_Test")
    assert refused.returncode == 2 and refused.stderr.strip() == "error: " + message.format(raw=raw)
    assert refused.stdout == ""


def test_unseen_vendor_needs_test_subjects_of_other_vendors(tmp_path):
    from nnunet_ssp.errors import SSPError
    from nnunet_ssp.experiments import UnseenVendor
    from nnunet_ssp.raw_layout import SubjectRow, write_subjects

    table = write_subjects(
        str(tmp_path),
        [
            SubjectRow("s1", "train", "A"),
            SubjectRow("s2", "train", "B"),
            SubjectRow("s3", "test", "A"),
            SubjectRow("s4", "unlabeled", "C"),
        ],
    )
    assert UnseenVendor(["B"]).test_vendors(table) == ["A"]
    with pytest.raises(
        SSPError, match=re.escape(f"--train-vendors A: {table} has no test subjects of other vendors (test vendors: A)")
    ):
        UnseenVendor(["A"]).test_vendors(table)


def test_unseen_vendor_plan_before_the_merged_dataset_exists_says_where_the_vendors_come_from(toy_env):
    tmp, env = toy_env
    converted(tmp, "mnms2", os.path.join(tmp, "MnM2"), 642)
    result = reproduce(
        env,
        "-d",
        "641",
        "642",
        "--merged-id",
        "643",
        "--seeds",
        "0",
        "--methods",
        "mim",
        "--experiment",
        "unseen-vendor",
        "--train-vendors",
        "A",
        "--dry-run",
    )
    table = os.path.join(env["nnUNet_raw"], "Dataset643_CineSSP", "subjects.csv")
    assert (
        f"--evaluate --vendors '<the other vendors of the test subjects, from {table} once --phase prepare has "
        f"written it>' -np 2"
    ) in _command_lines(result.stdout, "nnunet_ssp predict")[0]
    assert _command_lines(result.stdout, "nnunet_ssp splits") == ["nnunet_ssp splits -d 643 --vendors A --seeds 0"]
    assert not os.path.exists(os.path.dirname(table))


@pytest.mark.parametrize(
    "script, pretrain_iterations, finetuned",
    [
        ("demo.sh", 80, {"2": ["nnUNetTrainerBaseline", "nnUNetTrainerMIM_baselineLR_encoderOnly"]}),
        (
            "mini_paper.sh",
            100,
            {
                "1": [
                    "nnUNetTrainerBaseline",
                    "nnUNetTrainerSimCLR",
                    "nnUNetTrainerPCL",
                    "nnUNetTrainerDINO",
                    "nnUNetTrainerMIM",
                    "nnUNetTrainerMIM_baselineLR_encoderOnly",
                ],
                **{
                    budget: ["nnUNetTrainerBaseline", "nnUNetTrainerMIM", "nnUNetTrainerMIM_baselineLR_encoderOnly"]
                    for budget in "24"
                },
            },
        ),
    ],
)
def test_demo_and_mini_paper_plans_with_their_defaults(tmp_path, script, pretrain_iterations, finetuned):
    """The README's main command and the mini-paper, planned with their default runs (a small phantom): six split
    seeds, training seed 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(DEMO_DIR=str(tmp_path), DEMO_SUBJECTS="7", DEMO_TEST_SUBJECTS="1", DEMO_SIZE="48", DEMO_DRY_RUN="1")
    result = run_cli(["bash", os.path.join(REPO, "scripts", script)], env)
    planned = [
        re.fullmatch(
            r"(\S+)_paperSchedule_seed0 fold (\d+) \(budget (\S+), seed (\d), training seed 0\)", name
        ).groups()
        for phase, name in _trained(result.stdout)
        if phase == "finetune"
    ]
    budgets = sorted(finetuned)
    assert planned == [
        (trainer, str(fold), budget, seed)
        for fold, (seed, budget) in enumerate((s, b) for s in "012345" for b in budgets)
        for trainer in finetuned[budget]
    ]
    assert (
        "ssp_pretrain -d 5" in result.stdout
        and "--method mim -c 2d -p nnUNetPlans --device cpu --epochs 3 "
        f"--iters-per-epoch {pretrain_iterations} --batch-size 32 --seed 0 --num-workers 1 --probe-slices 256 "
        "--lr 0.02 --mask-patch-size 16"
        in result.stdout
    )
    assert "this plan runs --schedule paper (epochs from nnUNet_ssp_num_epochs)" in result.stdout


def test_shards_split_the_runs_without_overlap(toy_env):
    tmp, env = toy_env
    common = ["-d", "641", "--budgets", "2", "4", "--seeds", "0", "--val", "1", "--train-seeds", "0", "1", "--dry-run"]
    everything = reproduce(env, *common).stdout
    shards = [reproduce(env, *common, "--shard", f"{i}/3").stdout for i in range(3)]
    assert sorted(sum(map(_trained, shards), [])) == sorted(_trained(everything)) and all(map(_trained, shards))
    assert sorted(sum(sum(map(_predicted, shards), []), [])) == sorted(_predicted(everything)[0])
    for shard in shards:  # a shard predicts the runs it trains
        trained = [
            re.fullmatch(r"(\S+) fold (\d+) .*", name).groups()
            for phase, name in _trained(shard)
            if phase == "finetune"
        ]
        assert sorted((t, f) for t, f, _ in _predicted(shard)[0]) == sorted(trained)
    assert all(not any(r[0] == "report" for r in _planned(shard)) for shard in shards)  # the report runs once
    bad = reproduce(env, *common, "--shard", "3/3", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --shard 3/3: i must be in 0..n-1"


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    """Phantom (training subjects of vendors B, B, A, B; test subjects of vendors A, B) -> reproduce_paper.sh (budgets
    1 and 2 subjects, seed 0, training seeds 0 and 1, baseline and MIM, tiny schedules with checkpoint_latest.pth after
    every epoch, a stale nnUNet_ssp_checkpoint exported), output to -o. The experiments' miniatures go on from there on
    the same dataset (training seed 0 only)."""
    from trainers import EXT_TRAINER_DIR

    tmp_path = tmp_path_factory.mktemp("miniature")
    env = dict(
        os.environ,
        nnUNet_extTrainer=EXT_TRAINER_DIR,
        nnUNet_n_proc_DA="0",
        nnUNet_def_n_proc="1",
        nnUNet_compile="false",
        nnUNet_ssp_num_epochs="2",
        nnUNet_ssp_iters_per_epoch="2",
        nnUNet_ssp_save_every="1",
    )
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(tmp_path / name)
    # a stale export: the protocol must give each trainer its own method's checkpoint anyway
    env["nnUNet_ssp_checkpoint"] = str(tmp_path / "stale" / "checkpoint_final.pth")
    run_cli(
        [
            "nnunet_ssp",
            "phantom",
            "-d",
            "994",
            "-n",
            "Protocol",
            "--subjects",
            "4",
            "--test-subjects",
            "2",
            "--size",
            "48",
            "--seed",
            "4",
        ],
        env,
    )
    common = [
        "-d",
        "994",
        "--seeds",
        "0",
        "--val",
        "1",
        "--methods",
        "mim",
        "--device",
        "cpu",
        "--num-processes",
        "1",
        "--jobs",
        "2",
        "--pretrain-args",
        "--epochs 1 --iters-per-epoch 2 --batch-size 4 --num-workers 0 --probe-slices 0",
    ]
    out = str(tmp_path / "protocol")
    args = [*common, "--budgets", "1", "2", "--train-seeds", "0", "1", "-o", out]
    first = reproduce(env, *args)
    preprocessed = os.path.join(env["nnUNet_preprocessed"], "Dataset994_Protocol")
    return {
        "env": env,
        "common": common,
        "args": args,
        "out": out,
        "first": first,
        "preprocessed": preprocessed,
        "paper_folds": json.load(open(os.path.join(preprocessed, "splits_final.json"))),
        "checkpoint": _snapshot(os.path.join(env["nnUNet_results"], "Dataset994_Protocol", "ssp")),
    }


def _fold_folder(env, trainer, fold):
    return os.path.join(env["nnUNet_results"], "Dataset994_Protocol", f"{trainer}__nnUNetPlans__2d", f"fold_{fold}")


def test_miniature_protocol_through_report(miniature):
    """The paper experiment's miniature through the report: every table cell must equal its runs' summary.json, each
    prediction folder records the checkpoint that made it, the report has its run-level tests, and a re-run must find
    everything done."""
    from nnunet_ssp.checkpoint import sha256_of_file

    env, args, out, first = (miniature[k] for k in ("env", "args", "out", "first"))
    assert first.stdout.count("$ nnUNetv2_train") == 8 and first.stdout.count("$ ssp_pretrain") == 1
    assert first.stdout.count("$ nnunet_ssp predict") == 2 and "nnUNetv2_predict" not in first.stdout  # --jobs 2

    sidecar = json.load(open(os.path.join(env["nnUNet_preprocessed"], "Dataset994_Protocol", "splits_ssp.json")))
    budgets = {int(fold): d["budget"] for fold, d in sidecar["folds"].items() if d["group"] == "budgets"}
    assert sorted(budgets.values()) == [1, 2]
    summaries = {}
    for base, method in (
        ("nnUNetTrainerBaseline_paperSchedule", "baseline"),
        ("nnUNetTrainerMIM_paperSchedule", "mim"),
    ):
        for (fold, budget), training_seed in itertools.product(budgets.items(), (0, 1)):
            trainer = f"{base}_seed{training_seed}"
            folder = os.path.join(out, "predictions", trainer, f"fold_{fold}")
            evaluation = json.load(open(os.path.join(folder, "ssp_evaluation.json")))
            assert evaluation["run"]["method"] == method and evaluation["run"]["budget"] == budget
            assert evaluation["run"]["training_seed"] == training_seed
            # the protocol predicts the test set, so nnU-Net's final validation of the fold is skipped
            fold_folder = _fold_folder(env, trainer, fold)
            checkpoint = os.path.join(fold_folder, "checkpoint_final.pth")
            assert not os.path.exists(os.path.join(fold_folder, "validation"))
            assert json.load(open(os.path.join(folder, "ssp_model.json")))["checkpoint_sha256"] == sha256_of_file(
                checkpoint
            )
            # the default protocol: the paper's schedule (its iterations here from nnUNet_ssp_iters_per_epoch), no TTA
            assert evaluation["run"]["tta"] is False and evaluation["run"]["schedule"] == {
                "name": "paper",
                "num_epochs": 2,
                "iterations_per_epoch": 2,
                "initial_lr": 0.01 if method == "baseline" else 0.005,
            }
            assert evaluation["run"]["seed"] == 0 and len(evaluation["clinical_per_subject"]) == 2
            summaries[method, budget, training_seed] = json.load(open(os.path.join(folder, "summary.json")))

    report = os.path.join(out, "report")
    assert (
        "Fine-tuning schedule: paper (2 epochs, 2 iterations per epoch). Test-time augmentation: off."
        in open(os.path.join(report, "report.md")).read()
    )
    for name in (
        "report.md",
        "dice.csv",
        "summary.csv",
        "clinical.csv",
        "run_level.csv",
        "wilcoxon.csv",
        "label_efficiency.png",
        "bland_altman_ef.png",
    ):
        assert os.path.getsize(os.path.join(report, name)) > 0, name
    with open(os.path.join(report, "run_level.csv")) as f:  # MIM against the baseline at each budget
        assert sorted((row["method"], row["budget"], row["n_repeats"]) for row in csv.DictReader(f)) == [
            ("mim", "1", "2"),
            ("mim", "2", "2"),
        ]
    table = open(os.path.join(report, "report.md")).read().split("\n\n")
    main = next(block for block in table if block.startswith("| method"))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in main.splitlines()]
    assert rows[0][1:] == ["1", "2"] and [r[0] for r in rows[2:]] == ["baseline", "mim"]
    for row in rows[2:]:  # the mean over the two training seeds' runs
        for budget, cell in zip((1, 2), row[1:]):
            dice = [summaries[row[0], budget, k]["foreground_mean"]["Dice"] for k in (0, 1)]
            assert cell == f"{np.mean(dice):.3f} ± {np.std(dice, ddof=1):.3f} (n=2)"
    with open(os.path.join(report, "dice.csv")) as f:
        for line in csv.DictReader(f):
            summary = summaries[line["method"], int(line["budget"]), int(line["training_seed"])]
            expected = (summary["foreground_mean"] if line["class"] == "mean" else summary["mean"][line["class"]])[
                "Dice"
            ]
            assert float(line["dice"]) == pytest.approx(expected, abs=1e-12)

    # a re-run trains nothing and evaluates only the folder whose evaluation is missing, in one process
    redo = os.path.join(out, "predictions", "nnUNetTrainerMIM_paperSchedule_seed1", "fold_1")
    os.remove(os.path.join(redo, "ssp_evaluation.json"))
    kept = {f: _snapshot(f) for f in glob.glob(os.path.join(out, "predictions", "*", "fold_*")) if f != redo}
    again = reproduce(env, *args)
    assert "$ nnUNetv2_train" not in again.stdout and "$ ssp_pretrain" not in again.stdout
    assert again.stdout.count("$ nnunet_ssp predict") == 1 and "$ nnunet_ssp report" in again.stdout
    assert os.path.isfile(os.path.join(redo, "ssp_evaluation.json"))
    assert {f: _snapshot(f) for f in kept} == kept


def test_a_protocol_killed_while_fine_tuning_resumes_to_the_uninterrupted_report(miniature, tmp_path):
    """One of the miniature's trained runs removed, its predictions left (now stale): the protocol is killed with
    SIGKILL, its whole process group, at the end of the run's first epoch (checkpoint_latest.pth written). Run again,
    it continues the run (--c), predicts it again (its checkpoint changed) and reports the uninterrupted run's
    numbers."""
    from nnunet_ssp.checkpoint import sha256_of_file

    env, args, out = (miniature[k] for k in ("env", "args", "out"))
    tables = ("summary.csv", "run_level.csv", "dice.csv")
    uninterrupted = {name: open(os.path.join(out, "report", name)).read() for name in tables}
    trainer, fold = "nnUNetTrainerMIM_paperSchedule_seed1", 0
    results, record = (
        _fold_folder(env, trainer, fold),
        os.path.join(out, "predictions", trainer, "fold_0", "ssp_model.json"),
    )
    stale = json.load(open(record))["checkpoint_sha256"]
    shutil.rmtree(results)

    killed = subprocess.Popen(
        ["bash", SCRIPT, *args],
        env=dict(env, NNUNET_SSP_FAULT=f"epoch_end:0=pause:{tmp_path}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not (tmp_path / "reached").exists():
            assert killed.poll() is None and time.time() < deadline, "the protocol ended before the first epoch's end"
            time.sleep(0.05)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    assert "checkpoint_latest.pth" in os.listdir(results) and "checkpoint_final.pth" not in os.listdir(results)

    again = reproduce(env, *args)
    assert again.stdout.count("$ nnUNetv2_train") == 1
    assert f"$ nnUNetv2_train 994 2d {fold} -tr {trainer} -p nnUNetPlans -device cpu --c" in again.stdout
    assert (
        json.load(open(record))["checkpoint_sha256"]
        == sha256_of_file(os.path.join(results, "checkpoint_final.pth"))
        != stale
    )
    assert {name: open(os.path.join(out, "report", name)).read() for name in tables} == uninterrupted


def _run_experiment(miniature, *options):
    """Runs an experiment of the miniature after its paper experiment: (stdout, the experiment's folder, its one
    fold's index and description). Pretraining is reused, not rerun, and the paper's folds stay as they were."""
    env = miniature["env"]
    result = reproduce(env, *miniature["common"], *options)
    assert "$ ssp_pretrain" not in result.stdout and result.stdout.count("$ nnUNetv2_train") == 2
    assert _snapshot(os.path.join(env["nnUNet_results"], "Dataset994_Protocol", "ssp")) == miniature["checkpoint"]
    folds = json.load(open(os.path.join(miniature["preprocessed"], "splits_final.json")))
    assert folds[: len(miniature["paper_folds"])] == miniature["paper_folds"]
    described = json.load(open(os.path.join(miniature["preprocessed"], "splits_ssp.json")))["folds"]
    index = max(int(fold) for fold in described)  # the experiment's fold was appended
    assert f"nnUNetv2_train 994 2d {index} -tr nnUNetTrainerMIM_paperSchedule_seed0" in result.stdout
    folder = re.search(r"; outputs in (\S+)$", result.stdout, flags=re.M).group(1)
    return result.stdout, folder, index, folds[index], described[str(index)]


def _evaluated(folder, index):
    """{trainer: (its ssp_evaluation.json, the reference cases nnU-Net's summary.json scored)} of fold ``index``."""
    evaluated = {}
    for trainer in ("nnUNetTrainerBaseline_paperSchedule_seed0", "nnUNetTrainerMIM_paperSchedule_seed0"):
        run = os.path.join(folder, "predictions", trainer, f"fold_{index}")
        summary = json.load(open(os.path.join(run, "summary.json")))
        evaluated[trainer] = (
            json.load(open(os.path.join(run, "ssp_evaluation.json"))),
            sorted(os.path.basename(c["reference_file"])[: -len(".nii.gz")] for c in summary["metric_per_case"]),
        )
    return evaluated


def _assert_experiment_report(folder, title):
    from nnunet_ssp.evaluation.report import PROVENANCE_RULE

    report = open(os.path.join(folder, "report", "report.md")).read()
    assert title in report.split(PROVENANCE_RULE, 1)[1].splitlines()[0]  # the first line below the provenance
    with open(os.path.join(folder, "report", "dice.csv")) as f:
        assert {line["experiment"] for line in csv.DictReader(f)} == {title}


def test_unseen_phase_miniature_after_the_paper_experiment(miniature):
    """--experiment unseen-phase on the paper miniature's dataset: its ED-only fold is appended next to the paper's,
    pretraining is reused, only the test subjects' ES cases are evaluated, and its report names the experiment."""
    stdout, folder, index, fold, described = _run_experiment(
        miniature, "--experiment", "unseen-phase", "--budgets", "1"
    )
    results = os.path.join(miniature["env"]["nnUNet_results"], "Dataset994_Protocol")
    assert folder == os.path.join(results, "ssp_protocol_unseen-phase_ED")
    assert described["group"] == "budgets phases=ED" and described["budget"] == 1
    assert all(case.endswith("_ED") for case in fold["train"] + fold["val"])
    labels = os.path.join(miniature["env"]["nnUNet_raw"], "Dataset994_Protocol", "labelsTs")
    es_cases = sorted(f[: -len(".nii.gz")] for f in os.listdir(labels) if f.endswith("_ES.nii.gz"))
    assert len(es_cases) == 2
    for evaluation, cases in _evaluated(folder, index).values():
        assert cases == es_cases
        assert evaluation["run"]["phases"] == ["ES"] and evaluation["run"]["train_phases"] == ["ED"]
    _assert_experiment_report(folder, "unseen phase: trained on ED, tested on ES")
    assert "$ nnunet_ssp report " + os.path.join(folder, "predictions") in stdout


def test_unseen_vendor_miniature_after_the_paper_experiment(miniature):
    """--experiment unseen-vendor --train-vendors B: every training subject of vendor B but the validation one,
    evaluated on the test subjects of vendor A only."""
    from nnunet_ssp.raw_layout import read_subjects

    stdout, folder, index, fold, described = _run_experiment(
        miniature, "--experiment", "unseen-vendor", "--train-vendors", "B"
    )
    raw = os.path.join(miniature["env"]["nnUNet_raw"], "Dataset994_Protocol")
    assert folder == os.path.join(
        miniature["env"]["nnUNet_results"], "Dataset994_Protocol", "ssp_protocol_unseen-vendor_B"
    )
    vendor = {row.subject: (row.split, row.vendor) for row in read_subjects(os.path.join(raw, "subjects.csv"))}
    assert described["group"] == "vendors B"
    assert sorted({case[:-3] for case in fold["train"] + fold["val"]}) == sorted(
        s for s, (split, v) in vendor.items() if split == "train" and v == "B"
    )
    other = sorted(
        f"{s}_{phase}" for s, (split, v) in vendor.items() if split == "test" and v != "B" for phase in ("ED", "ES")
    )
    assert len(other) == 2 and " --evaluate --vendors A " in stdout
    for evaluation, cases in _evaluated(folder, index).values():
        assert cases == other
        assert evaluation["run"]["vendors"] == ["A"] and evaluation["run"]["train_vendors"] == ["B"]
    _assert_experiment_report(folder, "unseen vendor: trained on B, tested on A")


@pytest.mark.parametrize("jobs, expected", [(1, "unset"), (2, "PASSIVE")])
def test_parallel_runs_get_passive_openmp_threads_unless_the_user_sets_them(tmp_path, monkeypatch, jobs, expected):
    from nnunet_ssp.runner import Command, Run, execute

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    show = ["python", "-c", "import os; print('policy', os.environ.get('OMP_WAIT_POLICY', 'unset'))"]
    runs = [Run("finetune", f"run {i}", [Command(show, done=lambda: False)]) for i in range(2)]
    execute([runs], str(tmp_path), jobs=jobs)
    logs = [open(tmp_path / f, encoding="utf-8").read() for f in sorted(os.listdir(tmp_path))]
    assert len(logs) == 2 and all(f"policy {expected}" in log for log in logs)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice wins
    execute([runs], str(tmp_path / "own"), jobs=jobs)
    assert all("policy ACTIVE" in open(tmp_path / "own" / f).read() for f in os.listdir(tmp_path / "own"))


def test_mini_generalization_needs_the_mini_papers_pretraining(tmp_path):
    """scripts/mini_generalization.sh reuses the mini-paper's checkpoints; without them it stops before any run (it
    would otherwise pretrain with ssp_pretrain's full defaults on a CPU)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    result = run_cli(
        ["bash", os.path.join(REPO, "scripts", "mini_generalization.sh"), "--dry-run"],
        dict(env, DEMO_DIR=str(tmp_path)),
        check=False,
    )
    checkpoint = (
        tmp_path / "nnUNet_results" / "Dataset502_CinePhantom" / "ssp" / "mim__nnUNetPlans__2d" / "checkpoint_final.pth"
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == f"error: {checkpoint} not found; run bash scripts/mini_paper.sh first"
