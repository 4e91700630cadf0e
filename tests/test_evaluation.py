"""Evaluation: HD95, clinical measures and agreement against hand arithmetic, and ``nnunet_ssp evaluate``."""

import csv
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATASET_JSON, make_plans, run_cli
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from scipy import ndimage

from nnunet_ssp.errors import SSPError
from nnunet_ssp.evaluation.clinical import agreement, clinical_measures, hd95, label_volumes_ml
from nnunet_ssp.evaluation.evaluate import evaluate_predictions, method_of_run, results_fold_folder

SPACING = (8.0, 1.5, 1.5)  # mm, array order (z, y, x)
VOXEL_ML = 8.0 * 1.5 * 1.5 / 1000  # 0.018 ml
DATASET_ID, DATASET = 992, "Dataset992_EvalUnit"


def write_seg(path, seg, spacing=SPACING):
    image = sitk.GetImageFromArray(seg.astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing[::-1]])
    sitk.WriteImage(image, str(path))


def heart(lv_rows, rv_rows, shape=(6, 32, 32)):
    """LV blood pool 40 voxels per row, a 2-row myocardium below it (80 voxels), RV 32 voxels per row."""
    seg = np.zeros(shape, np.uint8)
    seg[1:5, 4 : 4 + lv_rows, 4:14] = 1
    seg[1:5, 4 + lv_rows : 6 + lv_rows, 4:14] = 2
    seg[1:5, 4 : 4 + rv_rows, 16:24] = 3
    return seg


# ---------------------------------------------------------------- volumes, EF, mass


def test_volumes_ef_and_mass_of_boxes_read_back_with_nnunet_reader(tmp_path):
    write_seg(tmp_path / "ed.nii.gz", heart(10, 10))
    write_seg(tmp_path / "es.nii.gz", heart(5, 6))
    volumes = {}
    for phase in ("ed", "es"):
        seg, props = SimpleITKIO().read_seg(str(tmp_path / f"{phase}.nii.gz"))
        assert list(props["spacing"]) == list(SPACING)
        volumes[phase] = label_volumes_ml(seg[0], props["spacing"])
    assert volumes["ed"] == pytest.approx({1: 400 * 0.018, 2: 80 * 0.018, 3: 320 * 0.018})
    m = clinical_measures(volumes["ed"], volumes["es"])
    assert m["lv_edv_ml"] == pytest.approx(7.2) and m["lv_esv_ml"] == pytest.approx(3.6)
    assert m["lv_ef_pct"] == pytest.approx(50.0)
    assert m["rv_edv_ml"] == pytest.approx(5.76) and m["rv_esv_ml"] == pytest.approx(192 * 0.018)
    assert m["rv_ef_pct"] == pytest.approx(100 * (320 - 192) / 320)
    assert m["lv_myo_mass_g"] == pytest.approx(1.44 * 1.05)


def test_a_subject_with_one_phase_gets_the_measures_it_can():
    only_ed = clinical_measures({1: 100.0, 2: 50.0, 3: 120.0}, None)
    assert only_ed["lv_edv_ml"] == 100.0 and only_ed["lv_myo_mass_g"] == pytest.approx(52.5)
    assert all(math.isnan(only_ed[k]) for k in ("lv_esv_ml", "lv_ef_pct", "rv_esv_ml", "rv_ef_pct"))
    only_es = clinical_measures(None, {1: 40.0, 2: 50.0, 3: 60.0})
    assert only_es["lv_esv_ml"] == 40.0 and only_es["rv_esv_ml"] == 60.0
    assert math.isnan(only_es["lv_myo_mass_g"]) and math.isnan(only_es["lv_ef_pct"])
    assert math.isnan(clinical_measures({1: 0.0, 2: 1.0, 3: 1.0}, {1: 0.0, 2: 1.0, 3: 1.0})["lv_ef_pct"])


# ---------------------------------------------------------------- HD95


def brute_force_hd95(a, b, spacing):
    """All pairwise distances between surface voxel centres (surface: a 6-neighbour outside, image edge = outside);
    the larger of the two directed 95th percentiles."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(3):
            for step in (1, -1):
                inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    pa, pb = surface_points(a), surface_points(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)


def test_hd95_matches_brute_force_on_random_shapes():
    rng = np.random.default_rng(0)
    pooled_differs = False
    for _ in range(12):
        shape = tuple(rng.integers(4, 13, size=3))
        spacing = tuple(rng.uniform(0.5, 9.0, size=3))
        a, b = (ndimage.gaussian_filter(rng.normal(size=shape), 1.0) > 0.1 for _ in range(2))
        if not (a.any() and b.any()):
            continue
        a_to_b, b_to_a = brute_force_hd95(a, b, spacing)
        expected = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
        assert hd95(a, b, spacing) == pytest.approx(expected, rel=1e-9, abs=1e-9)
        pooled_differs |= not math.isclose(expected, np.percentile(np.concatenate([a_to_b, b_to_a]), 95))
    assert pooled_differs  # the shapes tell the chosen definition from the pooled one


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_hd95_of_a_box_shifted_along_one_axis(axis, k):
    """A box one voxel thick along ``axis``, shifted by k voxels along it: every surface voxel is k spacings away."""
    a = np.zeros((12, 12, 12), bool)
    box = [slice(3, 9)] * 3
    box[axis] = slice(2, 3)
    a[tuple(box)] = True
    b = np.roll(a, k, axis=axis)
    assert hd95(a, b, SPACING) == pytest.approx(k * SPACING[axis])
    assert hd95(a, a, SPACING) == 0.0


def test_hd95_is_nan_when_a_mask_is_empty():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    b[1, 1, 1] = True
    assert math.isnan(hd95(a, b, SPACING)) and math.isnan(hd95(b, a, SPACING)) and math.isnan(hd95(a, a, SPACING))


# ---------------------------------------------------------------- agreement, trainer names


def test_agreement_against_hand_computation():
    got = agreement([10.0, 20.0, 30.0, float("nan")], [12.0, 18.0, 33.0, 5.0])  # differences 2, -2, 3
    sd = math.sqrt(((2 - 1) ** 2 + (-2 - 1) ** 2 + (3 - 1) ** 2) / 2)
    assert got == pytest.approx(
        {"n": 3, "mae": 7 / 3, "bias": 1.0, "sd": sd, "loa_low": 1 - 1.96 * sd, "loa_high": 1 + 1.96 * sd}
    )
    one = agreement([1.0], [3.0])
    assert one["n"] == 1 and one["bias"] == 2.0 and one["mae"] == 2.0 and math.isnan(one["sd"])
    assert agreement([], [])["n"] == 0 and math.isnan(agreement([], [])["mae"])


# ---------------------------------------------------------------- nnunet_ssp evaluate

REFERENCE = {"s01_ED": heart(10, 10), "s01_ES": heart(5, 6), "s02_ED": heart(12, 10), "s02_ES": heart(6, 4)}


def _prediction():
    """s01 perfect; s02_ED misses one LV row (40 of 480 voxels), s02_ES misses the whole RV."""
    pred = {case: seg.copy() for case, seg in REFERENCE.items()}
    pred["s02_ED"][1:5, 15, 4:14] = 0
    pred["s02_ES"][pred["s02_ES"] == 3] = 0
    return pred


@pytest.fixture
def workspace(nnunet_env, tmp_path, monkeypatch):
    from trainers import EXT_TRAINER_DIR

    monkeypatch.setenv("nnUNet_extTrainer", EXT_TRAINER_DIR)  # the plugin's trainers, for the method lookup
    raw = os.path.join(nnunet_env["nnUNet_raw"], DATASET)
    os.makedirs(os.path.join(raw, "labelsTs"))
    dataset_json = dict(DATASET_JSON, name="EvalUnit")
    with open(os.path.join(raw, "dataset.json"), "w") as f:
        json.dump(dataset_json, f)
    with open(os.path.join(raw, "subjects.csv"), "w") as f:
        f.write("subject,split,vendor\ns01,test,A\ns02,test,B\n")
    for case, seg in REFERENCE.items():
        write_seg(os.path.join(raw, "labelsTs", f"{case}.nii.gz"), seg)
    preprocessed = os.path.join(nnunet_env["nnUNet_preprocessed"], DATASET)
    os.makedirs(preprocessed)
    with open(os.path.join(preprocessed, "splits_ssp.json"), "w") as f:
        json.dump({"folds": {"5": {"budget": 2, "seed": 1, "subjects": ["s03", "s04"]}}, "val_subjects": ["s05"]}, f)
    pred = tmp_path / "pred"
    pred.mkdir()
    with open(pred / "dataset.json", "w") as f:
        json.dump(dataset_json, f)
    with open(pred / "plans.json", "w") as f:
        json.dump(make_plans(dataset_name=DATASET), f)
    for case, seg in _prediction().items():
        write_seg(pred / f"{case}.nii.gz", seg)
    return pred, dict(os.environ)


def _load(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def test_cli_evaluate_writes_nnunet_dice_hd95_and_clinical_measures(workspace):
    pred, env = workspace
    fold = os.path.join(env["nnUNet_results"], DATASET, "nnUNetTrainerMIM_warmup__nnUNetPlans__2d", "fold_5")
    os.makedirs(fold)
    with open(os.path.join(fold, "debug.json"), "w") as f:  # as nnU-Net writes it: every attribute as a string
        json.dump(
            {
                "schedule_name": "paper",
                "num_epochs": "1000",
                "num_iterations_per_epoch": "8",
                "initial_lr": "0.005",
                "batch_size": "32",
            },
            f,
        )
    result = run_cli(
        [
            "nnunet_ssp",
            "evaluate",
            str(pred),
            "-d",
            str(DATASET_ID),
            "-tr",
            "nnUNetTrainerMIM_warmup",
            "-f",
            "5",
            "-np",
            "1",
            "--tta",
            "off",
        ],
        env,
    )
    assert "Dice" in result.stdout and "MAE: LV EF" in result.stdout

    summary = _load(pred, "summary.json")
    dice = {
        os.path.basename(c["prediction_file"]): {k: v["Dice"] for k, v in c["metrics"].items()}
        for c in summary["metric_per_case"]
    }
    assert all(os.path.isfile(c["prediction_file"]) for c in summary["metric_per_case"])
    assert dice["s01_ED.nii.gz"] == dice["s01_ES.nii.gz"] == {"1": 1.0, "2": 1.0, "3": 1.0}
    assert dice["s02_ED.nii.gz"] == pytest.approx({"1": 2 * 440 / (480 + 440), "2": 1.0, "3": 1.0})
    assert dice["s02_ES.nii.gz"] == {"1": 1.0, "2": 1.0, "3": 0.0}
    assert summary["mean"]["1"]["Dice"] == pytest.approx((3 + 880 / 920) / 4)

    ev = _load(pred, "ssp_evaluation.json")
    assert (
        ev["format"] == "nnunet_ssp.evaluation" and ev["format_version"] == 1 and ev["dice_summary"] == "summary.json"
    )
    assert ev["run"] == {
        "dataset": DATASET,
        "trainer": "nnUNetTrainerMIM_warmup",
        "method": "mim",
        "recipe": "warmup",
        "fold": 5,
        "training_seed": None,
        "budget": 2,
        "seed": 1,
        "num_train_subjects": 2,
        "tta": False,
        "plans": "nnUNetPlans",
        "width": None,
        "schedule": {"name": "paper", "num_epochs": 1000, "iterations_per_epoch": 8, "initial_lr": 0.005},
        "prediction_folder": str(pred),
        "reference_folder": os.path.join(env["nnUNet_raw"], DATASET, "labelsTs"),
        "vendors": None,
        "phases": None,
        "train_vendors": None,
        "train_phases": None,
    }
    assert ev["labels"] == {"1": "LV_bloodpool", "2": "LV_myocardium", "3": "RV_bloodpool"}
    assert ev["hd95_per_case"]["s01_ED"] == {"1": 0.0, "2": 0.0, "3": 0.0}
    assert ev["hd95_per_case"]["s02_ED"]["1"] == pytest.approx(1.5)  # the missing row is one 1.5 mm step
    assert ev["hd95_per_case"]["s02_ES"]["3"] is None and ev["hd95_undefined"] == {"1": 0, "2": 0, "3": 1}
    assert ev["hd95_mean"]["1"] == pytest.approx(1.5 / 4) and ev["hd95_mean"]["3"] == 0.0

    ref2, pred2 = ev["clinical_per_subject"]["s02"]["reference"], ev["clinical_per_subject"]["s02"]["prediction"]
    assert ref2 == pytest.approx(
        {
            "lv_edv_ml": 480 * VOXEL_ML,
            "lv_esv_ml": 240 * VOXEL_ML,
            "lv_ef_pct": 50.0,
            "rv_edv_ml": 320 * VOXEL_ML,
            "rv_esv_ml": 128 * VOXEL_ML,
            "rv_ef_pct": 60.0,
            "lv_myo_mass_g": 80 * VOXEL_ML * 1.05,
        }
    )
    pred_lv_ef = 100 * (440 - 240) / 440
    assert pred2 == pytest.approx(
        dict(ref2, lv_edv_ml=440 * VOXEL_ML, lv_ef_pct=pred_lv_ef, rv_esv_ml=0.0, rv_ef_pct=100.0)
    )
    assert ev["clinical_per_subject"]["s01"]["reference"] == ev["clinical_per_subject"]["s01"]["prediction"]
    lv_ef = ev["clinical_agreement"]["lv_ef_pct"]
    diff = pred_lv_ef - 50.0  # s01 agrees exactly
    assert lv_ef == pytest.approx(
        {
            "n": 2,
            "mae": abs(diff) / 2,
            "bias": diff / 2,
            "sd": abs(diff) / math.sqrt(2),
            "loa_low": diff / 2 - 1.96 * abs(diff) / math.sqrt(2),
            "loa_high": diff / 2 + 1.96 * abs(diff) / math.sqrt(2),
        }
    )
    assert set(ev["clinical_agreement"]) == set(ref2)

    run_cli(["nnunet_ssp", "evaluate", str(pred), "-d", DATASET, "--vendors", "B", "-np", "1"], env)
    summary = _load(pred, "summary.json")
    assert sorted(os.path.basename(c["reference_file"]) for c in summary["metric_per_case"]) == [
        "s02_ED.nii.gz",
        "s02_ES.nii.gz",
    ]
    ev = _load(pred, "ssp_evaluation.json")
    assert sorted(ev["hd95_per_case"]) == ["s02_ED", "s02_ES"] and list(ev["clinical_per_subject"]) == ["s02"]
    assert ev["run"]["vendors"] == ["B"] and ev["run"]["fold"] is None and ev["run"]["budget"] is None


def _scored_cases(folder):
    """The reference cases in nnU-Net's summary.json, as nnU-Net's evaluation wrote it."""
    return sorted(
        os.path.basename(c["reference_file"])[: -len(".nii.gz")]
        for c in _load(folder, "summary.json")["metric_per_case"]
    )


def test_cli_evaluate_phases_scores_that_phase_only(workspace):
    """``--phases ES`` on a model of an ED-only fold: nnU-Net scores the ES cases alone; the evaluation records the
    test filter and the fold's training filter; EF, which needs both phases, is undefined, the ES volumes are not."""
    pred, env = workspace
    sidecar = os.path.join(env["nnUNet_preprocessed"], DATASET, "splits_ssp.json")
    with open(sidecar, "w") as f:
        json.dump(
            {
                "folds": {
                    "5": {
                        "budget": 2,
                        "seed": 1,
                        "subjects": ["s03", "s04"],
                        "phases": ["ED"],
                        "group": "budgets phases=ED",
                    }
                },
                "groups": {},
            },
            f,
        )
    result = run_cli(["nnunet_ssp", "evaluate", str(pred), "-d", DATASET, "-f", "5", "--phases", "ES", "-np", "1"], env)
    assert _scored_cases(pred) == ["s01_ES", "s02_ES"] and ", phases ES" in result.stdout
    ev = _load(pred, "ssp_evaluation.json")
    assert sorted(ev["hd95_per_case"]) == ["s01_ES", "s02_ES"]
    assert {k: ev["run"][k] for k in ("phases", "vendors", "train_phases", "train_vendors", "budget")} == {
        "phases": ["ES"],
        "vendors": None,
        "train_phases": ["ED"],
        "train_vendors": None,
        "budget": 2,
    }
    s02 = ev["clinical_per_subject"]["s02"]["reference"]
    assert s02["lv_esv_ml"] == pytest.approx(240 * VOXEL_ML) and s02["lv_ef_pct"] is None and s02["lv_edv_ml"] is None
    assert ev["clinical_agreement"]["lv_ef_pct"]["n"] == 0 and ev["clinical_agreement"]["lv_ef_pct"]["mae"] is None
    assert ev["clinical_agreement"]["rv_esv_ml"]["n"] == 2

    evaluation, _ = evaluate_predictions(str(pred), DATASET, vendors=["B"], phases=["ED"], num_processes=1)
    assert _scored_cases(pred) == ["s02_ED"] and (evaluation["run"]["vendors"], evaluation["run"]["phases"]) == (
        ["B"],
        ["ED"],
    )
    os.remove(os.path.join(env["nnUNet_raw"], DATASET, "labelsTs", "s02_ED.nii.gz"))
    with pytest.raises(
        SSPError,
        match=r"labelsTs: no reference cases of phase\(s\) ED \(<subject>_ED\.nii\.gz\) "
        r"of vendor\(s\) B$",
    ):
        evaluate_predictions(str(pred), DATASET, vendors=["B"], phases=["ED"], num_processes=1)


def test_cli_missing_prediction_is_one_line_and_writes_nothing(workspace):
    pred, env = workspace
    os.remove(pred / "s01_ES.nii.gz")
    result = run_cli(["nnunet_ssp", "evaluate", str(pred), "-d", DATASET, "-np", "1"], env, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and str(pred / "s01_ES.nii.gz") in result.stderr
    assert not (pred / "summary.json").exists() and not (pred / "ssp_evaluation.json").exists()


def _replace(path, seg, spacing=SPACING):
    os.remove(path)
    write_seg(path, seg, spacing)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("unknown label", "label(s) 7 not in dataset.json"),
        ("shape", "shape (6, 32, 30) differs"),
        ("spacing", "spacing [8.0, 1.5, 2.0] differs"),
    ],
)
def test_bad_prediction_is_refused_before_anything_is_written(workspace, problem, message):
    pred, _ = workspace
    bad = pred / "s02_ES.nii.gz"
    seg = REFERENCE["s02_ES"].copy()
    if problem == "unknown label":
        seg[0, 0, 0] = 7
        _replace(bad, seg)
    elif problem == "shape":
        _replace(bad, seg[:, :, :30])
    else:
        _replace(bad, seg, (8.0, 1.5, 2.0))
    with pytest.raises(SSPError, match=re.escape(message)) as info:
        evaluate_predictions(str(pred), DATASET, num_processes=1)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert not (pred / "summary.json").exists() and not (pred / "ssp_evaluation.json").exists()


def test_missing_or_empty_prediction_folder_is_refused(workspace):
    pred, _ = workspace
    with pytest.raises(SSPError, match="prediction folder not found"):
        evaluate_predictions(str(pred / "nope"), DATASET)
    for f in pred.glob("*.nii.gz"):
        f.unlink()
    with pytest.raises(SSPError, match=r"no predictions \(\*\.nii\.gz\)"):
        evaluate_predictions(str(pred), DATASET)


def test_unknown_vendor_is_refused(workspace):
    pred, _ = workspace
    with pytest.raises(SSPError, match=r"subjects\.csv: no subjects of vendor\(s\) Z \(vendors: A, B\)"):
        evaluate_predictions(str(pred), DATASET, vendors=["Z"])
    assert not (pred / "summary.json").exists()


def _record_run(trainer, fold, method):
    """The ssp_init.json a fine-tuning trainer writes into its nnU-Net results folder (only the method matters)."""
    folder = os.path.join(os.environ["nnUNet_results"], DATASET, f"{trainer}__nnUNetPlans__2d", f"fold_{fold}")
    os.makedirs(folder)
    with open(os.path.join(folder, "ssp_init.json"), "w") as f:
        json.dump({"trainer": trainer, "method": method}, f)


def test_the_method_is_what_the_run_recorded_never_the_trainer_name(workspace):
    def method(trainer, fold):
        return method_of_run(trainer, results_fold_folder(DATASET, trainer, "nnUNetPlans", "2d", fold))

    _record_run("nnUNetTrainerSSP", 5, "pcl")
    assert method("nnUNetTrainerSSP", 5) == "pcl"  # the checkpoint it loaded
    assert method("nnUNetTrainerMIM_warmup", 5) == "mim"  # no record: the trainer class's method
    for baseline in ("nnUNetTrainerBaseline_warmup", "nnUNetTrainer_5epochs", "nnUNetTrainer"):  # no SSP loading
        assert method(baseline, 5) == "baseline"
    with pytest.raises(SSPError, match=r"fold_6/ssp_init.json: not found; nnUNetTrainerSSP loads any method's"):
        method("nnUNetTrainerSSP", 6)
    with pytest.raises(SSPError, match=r"^trainer nnUNetTrainerNope: not found among nnU-Net's trainers"):
        method("nnUNetTrainerNope", 5)


def test_report_names_the_methods_of_a_warmup_run_and_a_baseline_variant(workspace, tmp_path):
    """Method and recipe come from the run and its trainer class; the report's row is the method, with the recipe
    when it is not the paper's."""
    from nnunet_ssp.evaluation.report import write_report

    pred, _ = workspace
    _record_run("nnUNetTrainerMIM_warmup", 5, "mim")
    expected = {
        "nnUNetTrainerMIM_warmup": ("mim", "warmup"),
        "nnUNetTrainerBaseline_warmup": ("baseline", "warmup"),
        "nnUNetTrainerBaseline_paperSchedule": ("baseline", ""),
        "nnUNetTrainerMIM_baselineLR_paperSchedule": ("mim", "baselineLR"),
    }
    for trainer, (method, recipe) in expected.items():
        folder = tmp_path / "predictions" / trainer
        shutil.copytree(pred, folder)
        evaluation, _ = evaluate_predictions(str(folder), DATASET, trainer=trainer, fold="5", num_processes=1)
        assert (evaluation["run"]["method"], evaluation["run"]["recipe"]) == (method, recipe)
    write_report([str(tmp_path / "predictions")], str(tmp_path / "report"))
    with open(tmp_path / "report" / "summary.csv") as f:
        rows = list(dict.fromkeys(row["method"] for row in csv.DictReader(f)))
    assert rows == ["baseline", "baseline_warmup", "mim_baselineLR", "mim_warmup"]
