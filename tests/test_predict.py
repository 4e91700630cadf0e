"""``nnunet_ssp predict`` on the tiny phantom (conftest.phantom_workspace) with a model trained by the stock CLI: its
folders hold nnUNetv2_predict's files, voxel for voxel, and their evaluation; ``--continue`` skips them while they
record the current model, and predicts again once the checkpoint changed; a run that was not trained fails in one line
before anything is written; a failure while predicting leaves no output folder."""

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import PHANTOM_DATASET as DATASET
from conftest import PHANTOM_ID as DATASET_ID
from conftest import run_cli as run

from nnunet_ssp.schedule import SKIP_FINAL_VALIDATION_ENV

TRAINER, FOLD = "nnUNetTrainerBaseline_paperSchedule", "3"


@pytest.fixture(scope="module")
def trained(phantom_workspace):
    root, env = phantom_workspace
    run(
        ["nnUNetv2_train", str(DATASET_ID), "2d", FOLD, "-tr", TRAINER, "-device", "cpu"],
        dict(env, **{SKIP_FINAL_VALIDATION_ENV: "1"}),
    )
    return env, os.path.join(env["nnUNet_raw"], DATASET, "imagesTs")


def _predict(env, images, *args, check=True):
    return run(
        ["nnunet_ssp", "predict", "-i", images, "-d", str(DATASET_ID), "-device", "cpu", "--disable_tta", *args],
        env,
        check=check,
    )


def _snapshot(folder):
    return sorted((name, os.path.getmtime(os.path.join(folder, name))) for name in os.listdir(folder))


def test_predictions_equal_nnunetv2_predicts_and_continue_skips_them(trained, tmp_path):
    env, images = trained
    stock = str(tmp_path / "stock")
    run(
        [
            "nnUNetv2_predict",
            "-i",
            images,
            "-o",
            stock,
            "-d",
            str(DATASET_ID),
            "-c",
            "2d",
            "-f",
            FOLD,
            "-tr",
            TRAINER,
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
    ours = [str(tmp_path / "a"), str(tmp_path / "b")]
    result = _predict(
        env, images, "--run", TRAINER, FOLD, ours[0], "--run", TRAINER, FOLD, ours[1], "--evaluate", "-np", "1"
    )
    cases = sorted(f for f in os.listdir(stock) if f.endswith(".nii.gz"))
    assert len(cases) == len(os.listdir(images)) == 2
    labels = set()
    for folder in ours:
        assert sorted(os.listdir(folder)) == sorted(
            os.listdir(stock) + ["summary.json", "ssp_evaluation.json", "ssp_model.json"]
        )
        for case in cases:
            expected, got = sitk.ReadImage(os.path.join(stock, case)), sitk.ReadImage(os.path.join(folder, case))
            assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(expected)), case
            assert (got.GetSpacing(), got.GetOrigin(), got.GetDirection()) == (
                expected.GetSpacing(),
                expected.GetOrigin(),
                expected.GetDirection(),
            )
            labels |= set(np.unique(sitk.GetArrayFromImage(got)).tolist())
        for name in ("dataset.json", "plans.json"):
            assert json.load(open(os.path.join(folder, name))) == json.load(open(os.path.join(stock, name)))
        args = json.load(open(os.path.join(folder, "predict_from_raw_data_args.json")))
        assert (args["list_of_lists_or_source_folder"], args["output_folder_or_list_of_truncated_output_files"]) == (
            images,
            folder,
        )
        evaluation = json.load(open(os.path.join(folder, "ssp_evaluation.json")))["run"]
        assert (evaluation["trainer"], evaluation["fold"], evaluation["tta"]) == (TRAINER, int(FOLD), False)
        assert f"{TRAINER} fold {FOLD}: 2 cases predicted in " in result.stdout
    assert len(labels) > 1  # the comparison is not between two empty or constant label maps
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "stock"]  # no temporary folder left beside them

    before = [_snapshot(folder) for folder in ours]
    again = _predict(
        env, images, "--run", TRAINER, FOLD, ours[0], "--run", TRAINER, FOLD, ours[1], "--evaluate", "--continue"
    )
    assert [_snapshot(folder) for folder in ours] == before
    assert again.stdout.count("predictions complete in") == 2 and "Dice" not in again.stdout

    # an evaluation of other cases is not the one asked for: evaluated again, the predictions kept
    es_only = _predict(
        env, images, "--run", TRAINER, FOLD, ours[0], "--evaluate", "--continue", "--phases", "ES", "-np", "1"
    )
    assert "predictions complete in" in es_only.stdout and ", phases ES" in es_only.stdout
    summary = json.load(open(os.path.join(ours[0], "summary.json")))
    assert [os.path.basename(c["reference_file"]) for c in summary["metric_per_case"]] == [
        c for c in cases if c.endswith("_ES.nii.gz")
    ]
    assert json.load(open(os.path.join(ours[0], "ssp_evaluation.json")))["run"]["phases"] == ["ES"]


def test_continue_predicts_again_when_the_model_changed(trained, tmp_path):
    """A complete folder records its model (trainer, fold, the checkpoint's sha256, ...): --continue predicts and
    evaluates it again once the checkpoint changed (a retrained run)."""
    import torch

    from nnunet_ssp.checkpoint import sha256_of_file

    env, images = trained
    folder = str(tmp_path / "out")
    run_args = ["--run", TRAINER, FOLD, folder, "--evaluate", "--continue", "-np", "1"]
    _predict(env, images, *run_args)
    checkpoint = os.path.join(
        env["nnUNet_results"], DATASET, f"{TRAINER}__nnUNetPlans__2d", f"fold_{FOLD}", "checkpoint_final.pth"
    )
    record = json.load(open(os.path.join(folder, "ssp_model.json")))
    assert {k: v for k, v in record.items() if k != "fold_sha256"} == {
        "trainer": TRAINER,
        "fold": FOLD,
        "training_seed": None,
        "checkpoint": "checkpoint_final.pth",
        "checkpoint_sha256": sha256_of_file(checkpoint),
    }
    before = _snapshot(folder)

    original = open(checkpoint, "rb").read()
    try:  # the same weights in another file: as a retrained run's, its predictions are not the folder's any more
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        torch.save({**state, "retrained": True}, checkpoint)
        again = _predict(env, images, *run_args)
        assert (
            f"{folder} holds another model's predictions (retrained or re-split fold); predicting again" in again.stdout
            and "2 cases predicted in" in again.stdout
            and "Dice" in again.stdout
        )
        assert (
            json.load(open(os.path.join(folder, "ssp_model.json")))["checkpoint_sha256"]
            == sha256_of_file(checkpoint)
            != record["checkpoint_sha256"]
        )
        assert all(os.path.getmtime(os.path.join(folder, name)) > mtime for name, mtime in before)
    finally:
        open(checkpoint, "wb").write(original)


def test_a_re_split_fold_changes_the_model_record(tmp_path):
    """The record holds a digest of the fold's entry in splits_final.json and its description in splits_ssp.json."""
    from nnunet_ssp.predict import model_identity

    preprocessed = tmp_path / "Dataset001_X"
    preprocessed.mkdir()
    splits = [{"train": ["a", "b"], "val": ["c"]}, {"train": ["a"], "val": ["c"]}]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits))

    def identity():
        return model_identity(str(tmp_path / "model"), TRAINER + "_seed2", 1, "checkpoint_final.pth", str(preprocessed))

    first = identity()
    assert first["training_seed"] == 2 and first["checkpoint_sha256"] is None and first["fold"] == "1"
    (preprocessed / "splits_final.json").write_text(json.dumps(splits + [{"train": ["d"], "val": ["c"]}]))
    assert identity() == first  # another fold's change is not this one's
    (preprocessed / "splits_final.json").write_text(json.dumps([splits[0], {"train": ["b"], "val": ["c"]}]))
    assert identity()["fold_sha256"] != first["fold_sha256"]


def test_an_untrained_run_or_a_failed_prediction_leaves_no_output(trained, tmp_path):
    env, images = trained
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    missing = _predict(env, images, "--run", TRAINER, FOLD, first, "--run", TRAINER, "2", second, check=False)
    checkpoint = os.path.join(
        env["nnUNet_results"], DATASET, f"{TRAINER}__nnUNetPlans__2d", "fold_2", "checkpoint_final.pth"
    )
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == (
        f"error: {checkpoint}: not found; train {TRAINER} fold 2 first"
    )
    assert os.listdir(tmp_path) == []
    unevaluated = _predict(env, images, "--run", TRAINER, FOLD, first, "--phases", "ES", check=False)
    assert unevaluated.returncode == 2 and unevaluated.stderr.strip() == (
        "error: --phases: only with --evaluate (it chooses the evaluated cases; every image is predicted)"
    )
    assert os.listdir(tmp_path) == []

    broken = tmp_path / "images"  # the real cases, then one that cannot be read: it fails after the others
    shutil.copytree(images, broken)
    (broken / "zz_0000.nii.gz").write_bytes(b"not an image")
    failed = _predict(env, str(broken), "--run", TRAINER, FOLD, first, check=False)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {first}: predicting with {TRAINER} fold {FOLD} failed (RuntimeError: ")
    assert str(broken / "zz_0000.nii.gz") in error
    assert sorted(os.listdir(tmp_path)) == ["images"]
