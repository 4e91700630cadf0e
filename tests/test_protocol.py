"""``scripts/reproduce_paper.sh``: the plan of a converted toy dataset (dry run, shards), and a two-budget, one-seed
miniature of the whole protocol through the stock CLIs to ``nnunet_ssp report``, whose table must hold the values
of the underlying ``summary.json`` files; a second invocation must find every run done."""
import csv
import json
import os
import re
import subprocess

import pytest

from conftest import run_cli
from test_convert import converted, make_source, write_mnms2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "reproduce_paper.sh")


def reproduce(env, *args, check=True):
    return run_cli(["bash", SCRIPT, *args], env, check=check)


def _snapshot(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getmtime(os.path.join(d, f)))
                  for d, _, files in os.walk(root) for f in files)


def _planned(stdout):
    """[(phase, name)] of the runs a dry run lists."""
    return re.findall(r"^\[(\w+) \d+/\d+\] (.+?)(?: \[done\])?$", stdout, flags=re.M)


@pytest.fixture
def toy_env(tmp_path):
    """An M&Ms-2-layout toy with 6 development and 2 test subjects, converted to Dataset641_Test."""
    tmp = str(tmp_path)
    sources = [make_source(i, f"{100 + i}", "train", "AB"[i % 2], "ARR") for i in range(1, 7)]
    sources += [make_source(i, f"{280 + i}", "test", "C", "FALL") for i in range(1, 3)]
    write_mnms2(os.path.join(tmp, "MnM2"), sources)
    converted(tmp, "mnms2", os.path.join(tmp, "MnM2"), 641)
    env = dict(os.environ, nnUNet_raw=os.path.join(tmp, "raw"), nnUNet_preprocessed=os.path.join(tmp, "pre"),
               nnUNet_results=os.path.join(tmp, "results"))
    return tmp, env


def test_dry_run_lists_every_run_and_writes_nothing(toy_env):
    tmp, env = toy_env
    before = _snapshot(tmp)
    result = reproduce(env, "-d", "641", "--budgets", "2", "4", "all", "--seeds", "0", "1", "--val", "1", "--dry-run")
    assert _snapshot(tmp) == before and not os.path.exists(env["nnUNet_preprocessed"])
    runs = _planned(result.stdout)
    assert [name for phase, name in runs if phase == "prepare"] == ["plan and preprocess", "label-budget folds"]
    assert [name for phase, name in runs if phase == "pretrain"] == [f"ssp_pretrain {m}"
                                                                      for m in ("simclr", "pcl", "dino", "mim")]
    finetune = [name for phase, name in runs if phase == "finetune"]
    assert len(finetune) == 3 * 2 * 5  # budgets x seeds x (baseline + 4 methods)
    trainers = ("nnUNetTrainerBaseline", "nnUNetTrainerSimCLR", "nnUNetTrainerPCL", "nnUNetTrainerDINO",
                "nnUNetTrainerMIM")
    expected = [f"{t} fold {fold} (budget {b}, seed {s})"
                for fold, (s, b) in enumerate((s, b) for s in (0, 1) for b in ("2", "4", "all")) for t in trainers]
    assert finetune == expected
    assert [phase for phase, _ in runs][-1] == "report"
    assert "nnUNetv2_train 641 2d 0 -tr nnUNetTrainerBaseline -p nnUNetPlans -device cuda" in result.stdout
    assert "ssp_pretrain -d 641 --method mim" in result.stdout


def test_shards_split_the_runs_without_overlap(toy_env):
    tmp, env = toy_env
    common = ["-d", "641", "--budgets", "2", "4", "--seeds", "0", "--val", "1", "--dry-run"]
    everything = _planned(reproduce(env, *common).stdout)
    shards = [_planned(reproduce(env, *common, "--shard", f"{i}/3").stdout) for i in range(3)]
    heavy = [r for r in everything if r[0] in ("pretrain", "finetune")]
    shard_heavy = [[r for r in shard if r[0] in ("pretrain", "finetune")] for shard in shards]
    assert sorted(sum(shard_heavy, [])) == sorted(heavy) and all(shard_heavy)
    assert all(not any(r[0] == "report" for r in shard) for shard in shards)  # the report runs once, unsharded
    bad = reproduce(env, *common, "--shard", "3/3", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --shard 3/3: i must be in 0..n-1"


def test_miniature_protocol_through_report(tmp_path):
    """Phantom -> reproduce_paper.sh (budgets 1 and 2 subjects, seed 0, baseline and MIM, tiny schedules) ->
    report; every table cell must equal its run's summary.json, and a re-run must find everything done."""
    from trainers import EXT_TRAINER_DIR
    env = dict(os.environ, nnUNet_extTrainer=EXT_TRAINER_DIR, nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1",
               nnUNet_compile="false", nnUNet_ssp_num_epochs="1", nnUNet_ssp_iters_per_epoch="2")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(tmp_path / name)
    env.pop("nnUNet_ssp_checkpoint", None)
    run_cli(["nnunet_ssp", "phantom", "-d", "994", "-n", "Protocol", "--subjects", "4", "--test-subjects", "2",
             "--size", "48", "--seed", "4"], env)
    out = str(tmp_path / "protocol")
    args = ["-d", "994", "--budgets", "1", "2", "--seeds", "0", "--val", "1", "--methods", "mim", "--device", "cpu",
            "--num-processes", "1", "--jobs", "2", "--predict-args=--disable_tta", "-o", out, "--pretrain-args",
            "--epochs 1 --iters-per-epoch 2 --batch-size 4 --num-workers 0 --probe-slices 0"]
    first = reproduce(env, *args)
    assert first.stdout.count("$ nnUNetv2_train") == 4 and first.stdout.count("$ ssp_pretrain") == 1

    sidecar = json.load(open(os.path.join(env["nnUNet_preprocessed"], "Dataset994_Protocol", "splits_ssp.json")))
    budgets = {int(fold): d["budget"] for fold, d in sidecar["folds"].items()}
    assert sorted(budgets.values()) == [1, 2]
    summaries = {}
    for trainer, method in (("nnUNetTrainerBaseline", "baseline"), ("nnUNetTrainerMIM", "mim")):
        for fold, budget in budgets.items():
            folder = os.path.join(out, "predictions", trainer, f"fold_{fold}")
            evaluation = json.load(open(os.path.join(folder, "ssp_evaluation.json")))
            assert evaluation["run"]["method"] == method and evaluation["run"]["budget"] == budget
            assert evaluation["run"]["seed"] == 0 and len(evaluation["clinical_per_subject"]) == 2
            summaries[method, budget] = json.load(open(os.path.join(folder, "summary.json")))

    report = os.path.join(out, "report")
    for name in ("report.md", "dice.csv", "summary.csv", "clinical.csv", "wilcoxon.csv", "label_efficiency.png",
                 "bland_altman_ef.png"):
        assert os.path.getsize(os.path.join(report, name)) > 0, name
    table = open(os.path.join(report, "report.md")).read().split("\n\n")
    main = next(block for block in table if block.startswith("| method"))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in main.splitlines()]
    assert rows[0][1:] == ["1", "2"] and [r[0] for r in rows[2:]] == ["baseline", "mim"]
    for row in rows[2:]:
        for budget, cell in zip((1, 2), row[1:]):
            assert cell == f"{summaries[row[0], budget]['foreground_mean']['Dice']:.3f} (n=1)"
    with open(os.path.join(report, "dice.csv")) as f:
        for line in csv.DictReader(f):
            summary = summaries[line["method"], int(line["budget"])]
            expected = (summary["foreground_mean"] if line["class"] == "mean" else summary["mean"][line["class"]])["Dice"]
            assert float(line["dice"]) == pytest.approx(expected, abs=1e-12)

    again = reproduce(env, *args)
    assert "$ nnUNetv2_train" not in again.stdout and "$ ssp_pretrain" not in again.stdout
    assert "$ nnunet_ssp report" in again.stdout


@pytest.mark.parametrize("jobs, expected", [(1, "unset"), (2, "PASSIVE")])
def test_parallel_runs_get_passive_openmp_threads_unless_the_user_sets_them(tmp_path, monkeypatch, jobs, expected):
    from nnunet_ssp.protocol import Run, Step, execute
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    show = ["python", "-c", "import os; print('policy', os.environ.get('OMP_WAIT_POLICY', 'unset'))"]
    runs = [Run("finetune", f"run {i}", [Step(show, done=lambda: False)]) for i in range(2)]
    execute(runs, str(tmp_path), jobs=jobs)
    logs = [open(tmp_path / f, encoding="utf-8").read() for f in sorted(os.listdir(tmp_path))]
    assert len(logs) == 2 and all(f"policy {expected}" in log for log in logs)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice wins
    execute(runs, str(tmp_path / "own"), jobs=jobs)
    assert all("policy ACTIVE" in open(tmp_path / "own" / f).read() for f in os.listdir(tmp_path / "own"))
