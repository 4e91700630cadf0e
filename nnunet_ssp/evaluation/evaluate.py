"""``nnunet_ssp evaluate``: a folder of ``nnUNetv2_predict`` outputs against reference label maps.

3D Dice comes from nnU-Net's own ``compute_metrics_on_folder`` and goes to ``PRED/summary.json`` in nnU-Net's
format; HD95 per case and class, the clinical measures per subject and their agreement go to
``PRED/ssp_evaluation.json``. Every case is read and checked before anything is written, so bad input leaves
neither file behind. ``--vendors`` and ``--phases`` evaluate some reference cases only; the evaluation records them
(``run.vendors``, ``run.phases``) beside what the run's fold was trained on (``run.train_vendors``,
``run.train_phases``, from splits_ssp.json).
"""

import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_ssp.checkpoint import SSP_INIT_FILE
from nnunet_ssp.env import find_trainer_class, nnunet_path
from nnunet_ssp.errors import SSPError
from nnunet_ssp.evaluation.clinical import MEASURES, agreement, clinical_measures, hd95, label_volumes_ml
from nnunet_ssp.fold_files import described_fold
from nnunet_ssp.io import atomic_path, save_json_atomic
from nnunet_ssp.network import preprocessed_dataset_folder
from nnunet_ssp.plans import plans_width
from nnunet_ssp.raw_layout import SUBJECTS_TABLE, read_vendor_table
from nnunet_ssp.schedule import split_training_seed
from nnunet_ssp.splits import normalized_phases, phase_of_case, subject_of_case

FORMAT = "nnunet_ssp.evaluation"
FORMAT_VERSION = 1
OUTPUT_FILE = "ssp_evaluation.json"
DICE_SUMMARY = "summary.json"
SIDES = ("reference", "prediction")
BASELINE = "baseline"


def results_fold_folder(dataset_name: str, trainer: str, plans_name: str, configuration: str, fold) -> Optional[str]:
    """The run's nnU-Net results folder (``$nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>/fold_X``),
    None when the fold or ``nnUNet_results`` is not known."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if fold is None or not nnUNet_results.is_set():
        return None
    return get_output_folder(dataset_name, trainer, plans_name, configuration, fold)


def method_of_run(trainer: str, fold_folder: Optional[str]) -> str:
    """The SSP method of a fine-tuned run, from what the run recorded, never from the trainer's name: the method of
    the checkpoint it loaded (``ssp_init.json`` in its results ``fold_folder``), else the trainer class's
    ``ssp_method`` (found as nnU-Net finds trainers); ``baseline`` for a trainer that loads no SSP checkpoint."""
    record = os.path.join(fold_folder, SSP_INIT_FILE) if fold_folder else None
    if record and os.path.isfile(record):
        return load_json(record)["method"]
    trainer_class = find_trainer_class(trainer)
    if not hasattr(trainer_class, "ssp_method"):
        return BASELINE
    if trainer_class.ssp_method is None:
        raise SSPError(
            f"{record or trainer}: not found; {trainer} loads any method's checkpoint, so the method is read "
            f"from its run's {SSP_INIT_FILE} (give -f and -c of the run)"
        )
    return trainer_class.ssp_method


def schedule_of_run(fold_folder: Optional[str]) -> Optional[dict]:
    """The fine-tuning schedule the run recorded in nnU-Net's ``debug.json`` (name, epochs, iterations per epoch,
    initial lr), None without one. Stock trainers, which have no schedule name, ran nnU-Net's."""
    path = os.path.join(fold_folder, "debug.json") if fold_folder else None
    if not path or not os.path.isfile(path):
        return None
    debug = load_json(path)
    try:
        return {
            "name": debug.get("schedule_name", "nnunet"),
            "num_epochs": int(debug["num_epochs"]),
            "iterations_per_epoch": int(debug["num_iterations_per_epoch"]),
            "initial_lr": float(debug["initial_lr"]),
        }
    except (KeyError, ValueError):
        raise SSPError(
            f"{path}: not nnU-Net's debug.json (no num_epochs, num_iterations_per_epoch, initial_lr)"
        ) from None


def training_seed_of_run(trainer: str) -> Optional[int]:
    """The run's training seed: the trainer class's ``training_seed``, else the ``_seed<K>`` ending its name; None
    for an unseeded trainer."""
    seed = getattr(find_trainer_class(trainer), "training_seed", None)
    return split_training_seed(trainer)[1] if seed is None else int(seed)


def _cases(folder: str, file_ending: str) -> List[str]:
    return sorted(f[: -len(file_ending)] for f in os.listdir(folder) if f.endswith(file_ending))


def _raw_dataset_folder(dataset_name: str, why: str) -> str:
    return os.path.join(nnunet_path("nnUNet_raw", why), dataset_name)


def _subjects_of_vendors(table: str, vendors: Sequence[str]) -> set:
    """Subjects of ``vendors`` in a subjects.csv."""
    return {subject for subject, row in read_vendor_table(table, vendors).items() if row.vendor in vendors}


def _selected_cases(
    reference_folder: str,
    prediction_folder: str,
    file_ending: str,
    dataset_name: str,
    vendors: Optional[Sequence[str]],
    phases: Optional[Sequence[str]],
) -> List[str]:
    """The reference cases to evaluate (of ``vendors`` and ``phases`` only, if given); each must have a
    prediction."""
    cases = _cases(reference_folder, file_ending)
    if not cases:
        raise SSPError(f"{reference_folder}: no reference label maps (*{file_ending})")
    if vendors:
        table = os.path.join(_raw_dataset_folder(dataset_name, "--vendors"), SUBJECTS_TABLE)
        subjects = _subjects_of_vendors(table, vendors)
        cases = [c for c in cases if subject_of_case(c) in subjects]
        if not cases:
            raise SSPError(f"{reference_folder}: no reference cases of vendor(s) {', '.join(vendors)} ({table})")
    if phases:
        cases = [c for c in cases if phase_of_case(c) in phases]
        if not cases:
            raise SSPError(
                f"{reference_folder}: no reference cases of phase(s) {', '.join(phases)} "
                f"(<subject>_{phases[0]}{file_ending})" + (f" of vendor(s) {', '.join(vendors)}" if vendors else "")
            )
    missing = [c for c in cases if not os.path.isfile(os.path.join(prediction_folder, c + file_ending))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SSPError(
            f"{os.path.join(prediction_folder, missing[0] + file_ending)}: no prediction for reference "
            f"case {missing[0]}{more}"
        )
    return cases


def _read_mask(reader, path: str, allowed_labels: set) -> Tuple[np.ndarray, List[float]]:
    """The label map (array order) and its spacing in mm; refuses labels that dataset.json does not define."""
    seg, properties = reader.read_seg(path)
    unknown = sorted(set(np.unique(seg).tolist()) - allowed_labels)
    if unknown:
        raise SSPError(
            f"{path}: label(s) {', '.join(f'{v:g}' for v in unknown)} not in dataset.json "
            f"(labels {', '.join(str(v) for v in sorted(allowed_labels))})"
        )
    return seg[0], [float(s) for s in properties["spacing"]]


def _evaluate_case(
    reader, reference_file: str, prediction_file: str, allowed_labels: set, hd95_labels: Sequence[int]
) -> dict:
    """HD95 per label, labels whose HD95 is undefined because one mask is empty, and label volumes per side."""
    reference, spacing = _read_mask(reader, reference_file, allowed_labels)
    prediction, prediction_spacing = _read_mask(reader, prediction_file, allowed_labels)
    if prediction.shape != reference.shape:
        raise SSPError(
            f"{prediction_file}: shape {prediction.shape} differs from the reference's "
            f"{reference.shape} ({reference_file})"
        )
    if not np.allclose(prediction_spacing, spacing, rtol=1e-4, atol=1e-6):
        raise SSPError(
            f"{prediction_file}: spacing {prediction_spacing} differs from the reference's {spacing} ({reference_file})"
        )
    distances, undefined = {}, []
    for label in hd95_labels:
        ref_mask, pred_mask = reference == label, prediction == label
        distances[label] = hd95(ref_mask, pred_mask, spacing)
        if ref_mask.any() != pred_mask.any():
            undefined.append(label)
    return {
        "hd95": distances,
        "undefined": undefined,
        "volumes": {
            "reference": label_volumes_ml(reference, spacing),
            "prediction": label_volumes_ml(prediction, spacing),
        },
    }


def _nnunet_dice(
    reference_folder: str,
    prediction_folder: str,
    cases: Sequence[str],
    file_ending: str,
    reader,
    label_manager,
    num_processes: int,
) -> dict:
    """nnU-Net's ``compute_metrics_on_folder`` on exactly ``cases``, saved as ``PRED/summary.json``.

    nnU-Net evaluates every file of the prediction folder it is given, so it gets a temporary folder of links to the
    selected predictions; the summary names the real prediction files.
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, save_summary_json

    regions_or_labels = (
        label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    )
    with tempfile.TemporaryDirectory(prefix="nnunet_ssp_evaluate_") as staging:
        for case in cases:
            os.symlink(os.path.join(prediction_folder, case + file_ending), os.path.join(staging, case + file_ending))
        result = compute_metrics_on_folder(
            reference_folder,
            staging,
            None,
            reader,
            file_ending,
            regions_or_labels,
            label_manager.ignore_label,
            max(1, min(num_processes, len(cases))),
        )
    for entry in result["metric_per_case"]:
        entry["prediction_file"] = os.path.join(prediction_folder, os.path.basename(entry["prediction_file"]))
    with atomic_path(os.path.join(prediction_folder, DICE_SUMMARY)) as tmp:
        save_summary_json(result, tmp)
    return result


def _run_info(
    dataset_name: str,
    preprocessed_folder: str,
    trainer: Optional[str],
    fold,
    plans_manager,
    configuration: str,
    tta: Optional[bool],
    prediction_folder: str,
    reference_folder: str,
    vendors: Optional[Sequence[str]],
    phases: Optional[Sequence[str]],
) -> dict:
    """The run's identity, method and schedule (what the run recorded), its fine-tuning recipe (the trainer class's;
    "" for the paper's and for stock trainers) and training seed (:func:`training_seed_of_run`), whether the
    predictions used test-time augmentation (as the caller says; None: not said), the plans and their width
    (``nnunet_ssp plans --width``; None: as nnU-Net planned them), the test cases' filter
    (``vendors``, ``phases``); budget, seed, training subjects and their filter (``train_vendors``,
    ``train_phases``) from splits_ssp.json when it describes the fold."""
    described = described_fold(preprocessed_folder, fold) if fold is not None else {}
    plans_name = plans_manager.plans_name
    fold_folder = results_fold_folder(dataset_name, trainer, plans_name, configuration, fold) if trainer else None
    return {
        "dataset": dataset_name,
        "trainer": trainer,
        "method": method_of_run(trainer, fold_folder) if trainer else None,
        "recipe": getattr(find_trainer_class(trainer), "recipe", "") if trainer else None,
        "training_seed": training_seed_of_run(trainer) if trainer else None,
        "fold": fold,
        "budget": described.get("budget"),
        "seed": described.get("seed"),
        "num_train_subjects": len(described["subjects"]) if "subjects" in described else None,
        "schedule": schedule_of_run(fold_folder),
        "tta": tta,
        "plans": plans_name,
        "width": plans_width(plans_manager.plans),
        "prediction_folder": prediction_folder,
        "reference_folder": reference_folder,
        "vendors": list(vendors) if vendors else None,
        "phases": phases,
        "train_vendors": described.get("vendors"),
        "train_phases": described.get("phases"),
    }


def _clinical_per_subject(cases: Sequence[str], volumes: Dict[str, dict]) -> Dict[str, dict]:
    """Measures per subject from its ``<subject>_ED`` / ``<subject>_ES`` cases (other cases have no phase)."""
    phases = {}
    for case in cases:
        if phase_of_case(case):
            phases.setdefault(subject_of_case(case), {})[phase_of_case(case)] = volumes[case]
    return {
        subject: {side: clinical_measures(p.get("ED", {}).get(side), p.get("ES", {}).get(side)) for side in SIDES}
        for subject, p in sorted(phases.items())
    }


def _nan_to_none(obj):
    """JSON-safe copy: NaN and inf become None, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _prediction_records(prediction_folder: str):
    """(dataset.json, PlansManager) of a folder nnUNetv2_predict wrote, which must hold predictions."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if not os.path.isdir(prediction_folder):
        raise SSPError(f"{prediction_folder}: prediction folder not found")
    for name in ("dataset.json", "plans.json"):
        if not os.path.isfile(os.path.join(prediction_folder, name)):
            raise SSPError(
                f"{os.path.join(prediction_folder, name)}: not found; PRED must be a folder written by nnUNetv2_predict"
            )
    dataset_json = load_json(os.path.join(prediction_folder, "dataset.json"))
    if not _cases(prediction_folder, dataset_json["file_ending"]):
        raise SSPError(f"{prediction_folder}: no predictions (*{dataset_json['file_ending']})")
    return dataset_json, PlansManager(os.path.join(prediction_folder, "plans.json"))


def evaluate_predictions(
    prediction_folder: str,
    dataset: str,
    reference_folder: Optional[str] = None,
    trainer: Optional[str] = None,
    fold=None,
    vendors: Optional[Sequence[str]] = None,
    num_processes: Optional[int] = None,
    configuration: str = "2d",
    tta: Optional[bool] = None,
    phases: Optional[Sequence[str]] = None,
) -> Tuple[dict, dict]:
    """Evaluates the reference cases (of ``vendors`` and cardiac ``phases`` only, if given) against their
    predictions; measures that need both phases (EF) are None where a subject has one.

    ``prediction_folder`` is what ``nnUNetv2_predict`` wrote (cases plus its dataset.json and plans.json, which give
    the labels and the image reader); ``reference_folder`` defaults to ``$nnUNet_raw/<Dataset>/labelsTs``. Writes
    ``summary.json`` (nnU-Net's Dice) and ``ssp_evaluation.json`` into ``prediction_folder`` and returns both
    contents (the evaluation with None for undefined values, nnU-Net's summary as it returns it). Predictions of
    cases without a reference are ignored. ``trainer``, ``fold`` and ``configuration`` name the run (its method and
    schedule: :func:`method_of_run`, :func:`schedule_of_run`); ``tta`` says whether the predictions used test-time
    augmentation (recorded as given).
    """
    from nnunetv2.configuration import default_num_processes

    prediction_folder, phases = os.path.abspath(prediction_folder), normalized_phases(phases)
    dataset_json, plans_manager = _prediction_records(prediction_folder)
    file_ending = dataset_json["file_ending"]
    preprocessed_folder = preprocessed_dataset_folder(dataset)
    dataset_name = os.path.basename(preprocessed_folder)
    reference_folder = os.path.abspath(
        reference_folder or os.path.join(_raw_dataset_folder(dataset_name, "the default reference folder"), "labelsTs")
    )
    if not os.path.isdir(reference_folder):
        raise SSPError(f"{reference_folder}: reference folder not found")
    cases = _selected_cases(reference_folder, prediction_folder, file_ending, dataset_name, vendors, phases)

    label_manager = plans_manager.get_label_manager(dataset_json)
    reader = plans_manager.image_reader_writer_class()
    allowed_labels = set(label_manager.all_labels) | (
        {label_manager.ignore_label} if label_manager.has_ignore_label else set()
    )
    hd95_labels = label_manager.foreground_labels
    per_case = {
        c: _evaluate_case(
            reader,
            os.path.join(reference_folder, c + file_ending),
            os.path.join(prediction_folder, c + file_ending),
            allowed_labels,
            hd95_labels,
        )
        for c in cases
    }

    dice = _nnunet_dice(
        reference_folder,
        prediction_folder,
        cases,
        file_ending,
        reader,
        label_manager,
        num_processes or default_num_processes,
    )
    clinical = _clinical_per_subject(cases, {c: r["volumes"] for c, r in per_case.items()})
    evaluation = _nan_to_none(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "run": _run_info(
                dataset_name,
                preprocessed_folder,
                trainer,
                int(fold) if str(fold).isdigit() else fold,
                plans_manager,
                configuration,
                tta,
                prediction_folder,
                reference_folder,
                vendors,
                phases,
            ),
            "dice_summary": DICE_SUMMARY,
            "labels": {
                str(value): name
                for name, value in dataset_json["labels"].items()
                if isinstance(value, int) and value in hd95_labels
            },
            "hd95_per_case": {c: {str(label): r["hd95"][label] for label in hd95_labels} for c, r in per_case.items()},
            "hd95_mean": {str(label): _nanmean([r["hd95"][label] for r in per_case.values()]) for label in hd95_labels},
            "hd95_undefined": {
                str(label): sum(label in r["undefined"] for r in per_case.values()) for label in hd95_labels
            },
            "clinical_per_subject": clinical,
            "clinical_agreement": {
                m: agreement(
                    [c["reference"][m] for c in clinical.values()], [c["prediction"][m] for c in clinical.values()]
                )
                for m in MEASURES
            },
        }
    )
    save_json_atomic(evaluation, os.path.join(prediction_folder, OUTPUT_FILE))
    return evaluation, dice


def evaluated_with(
    prediction_folder: str, vendors: Optional[Sequence[str]] = None, phases: Optional[Sequence[str]] = None
) -> bool:
    """Whether the folder holds an evaluation of exactly the cases of ``vendors`` and ``phases`` (None: every one)."""
    path = os.path.join(prediction_folder, OUTPUT_FILE)
    try:
        run = load_json(path)["run"] if os.path.isfile(path) else None
    except (ValueError, KeyError, TypeError):
        return False
    return bool(run) and (run.get("vendors"), run.get("phases")) == (
        list(vendors) if vendors else None,
        normalized_phases(phases),
    )


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def summary_lines(evaluation: dict, dice: dict) -> List[str]:
    """A short human summary: mean Dice (nnU-Net) and HD95 per class, MAE of LV EF, RV EF and LV mass."""
    run = evaluation["run"]
    lines = [
        f"{run['dataset']}: {len(evaluation['hd95_per_case'])} cases, {len(evaluation['clinical_per_subject'])} "
        f"subjects, trainer {run['trainer']}, fold {run['fold']}"
        + "".join(f", {key} {' '.join(run[key])}" for key in ("vendors", "phases") if run.get(key)),
        f"{'class':<20} {'Dice':>6} {'HD95 mm':>8}",
    ]
    for key, metrics in dice["mean"].items():
        name, hd = evaluation["labels"].get(str(key), str(key)), evaluation["hd95_mean"].get(str(key))
        lines.append(f"{name:<20} {_fmt(metrics['Dice'], '6.4f')} {_fmt(hd, '8.2f')}")
    mae = {m: evaluation["clinical_agreement"][m]["mae"] for m in ("lv_ef_pct", "rv_ef_pct", "lv_myo_mass_g")}
    lines.append(
        f"MAE: LV EF {_fmt(mae['lv_ef_pct'], '.2f')} %, RV EF {_fmt(mae['rv_ef_pct'], '.2f')} %, "
        f"LV mass {_fmt(mae['lv_myo_mass_g'], '.2f')} g"
    )
    lines.append(os.path.join(run["prediction_folder"], OUTPUT_FILE))
    return lines
