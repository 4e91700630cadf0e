"""``nnunet_ssp predict``: one image folder predicted by many trained runs in one process, optionally evaluated.

``nnUNetv2_predict`` is one process per run: it imports torch and nnU-Net and spawns worker pools that import them
again. On a small CPU test set that start-up costs as much as the prediction (16 cases of 64 px: 25 s per run, 12 s
of them network inference). Here each run's model is loaded with nnU-Net's own
``nnUNetPredictor.initialize_from_trained_model_folder`` and predicts with its ``predict_from_files_sequential``,
which is what ``nnUNetv2_predict -npp 0 -nps 0`` runs: the same preprocessing, sliding window and export without
worker pools, so the files are those ``nnUNetv2_predict`` writes, voxel for voxel.

Each output folder is written into a temporary folder beside it and then moved in with ``plans.json`` last, after
removing the folder's old model record, ``plans.json`` and evaluation; the record of the model that made the
predictions (:func:`model_identity`: trainer, fold, training seed, the checkpoint file's sha256, a digest of the
fold's cases) is written last. A folder is complete for a model when it holds every case's prediction,
``plans.json`` and that model's record (:func:`prediction_complete`): predictions of a retrained run or a re-split
fold are not.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from nnunet_ssp.errors import SSPError

PLANS_FILE = "plans.json"
ARGS_FILE = "predict_from_raw_data_args.json"
MODEL_FILE = "ssp_model.json"


@dataclass(frozen=True)
class PredictionRun:
    """A trained run (trainer and fold of the dataset, plans and configuration) and its output folder."""

    trainer: str
    fold: str
    output: str


def image_cases(images: str, file_ending: str) -> List[str]:
    """The case identifiers of an nnU-Net image folder (files ``CASE_XXXX<file_ending>``)."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    return [str(case) for case in get_identifiers_from_splitted_dataset_folder(images, file_ending)]


def model_identity(model: str, trainer: str, fold, checkpoint: str, preprocessed_folder: str) -> dict:
    """What a prediction folder records of the model that made it (its trainer's results folder ``model``): trainer,
    fold, training seed, the checkpoint file and its sha256 (None while it does not exist), and the sha256 of the
    fold's entry in splits_final.json and its description in splits_ssp.json."""
    from nnunet_ssp.checkpoint import sha256_of_file
    from nnunet_ssp.fold_files import described_fold, fold_files
    from nnunet_ssp.io import load_json_file
    from nnunet_ssp.schedule import split_training_seed

    path = os.path.join(model, f"fold_{fold}", checkpoint)
    splits_file = fold_files(preprocessed_folder)[0]
    splits = load_json_file(splits_file, list) if os.path.isfile(splits_file) else []
    split = splits[int(fold)] if str(fold).isdigit() and int(fold) < len(splits) else None
    fold_record = json.dumps({"split": split, "description": described_fold(preprocessed_folder, fold)}, sort_keys=True)
    return {
        "trainer": trainer,
        "fold": str(fold),
        "training_seed": split_training_seed(trainer)[1],
        "checkpoint": checkpoint,
        "checkpoint_sha256": sha256_of_file(path) if os.path.isfile(path) else None,
        "fold_sha256": hashlib.sha256(fold_record.encode()).hexdigest(),
    }


def recorded_model(folder: str) -> Optional[dict]:
    """The model record of a prediction folder; None without a readable one."""
    try:
        with open(os.path.join(folder, MODEL_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def prediction_complete(folder: str, cases: Sequence[str], file_ending: str, identity: dict) -> bool:
    """Whether ``folder`` holds the prediction of every case, ``plans.json`` and the record of the model ``identity``
    (:func:`model_identity`), which this command writes last."""
    return (
        os.path.isdir(folder)
        and {c + file_ending for c in cases} | {PLANS_FILE} <= set(os.listdir(folder))
        and recorded_model(folder) == identity
    )


def use_nnunet_threads(device: str) -> None:
    """Torch's threads in this process as ``nnUNetv2_predict`` sets them for ``device``."""
    import torch

    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    elif device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)


def make_predictor(device: str = "cuda", tta: bool = True, step_size: float = 0.5, on_device: bool = True):
    """An ``nnUNetPredictor`` as ``nnUNetv2_predict`` makes it."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    return nnUNetPredictor(
        tile_step_size=step_size,
        use_gaussian=True,
        use_mirroring=tta,
        perform_everything_on_device=on_device,
        device=torch.device(device),
        allow_tqdm=False,
    )


def _model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> str:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunet_ssp.network import preprocessed_dataset_folder

    return get_output_folder(os.path.basename(preprocessed_dataset_folder(dataset)), trainer, plans, configuration)


def _file_ending(model_folder: str) -> str:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    return load_json(os.path.join(model_folder, "dataset.json"))["file_ending"]


def _check(runs: Sequence[PredictionRun], models: Sequence[str], images: str, checkpoint: str) -> None:
    """Refuses, before anything is written, runs without a trained checkpoint, an image folder without cases and two
    runs writing into one folder."""
    if not os.path.isdir(images):
        raise SSPError(f"{images}: image folder not found")
    outputs = [os.path.abspath(run.output) for run in runs]
    twice = sorted({o for o in outputs if outputs.count(o) > 1})
    if twice:
        raise SSPError(f"{twice[0]}: output folder of more than one --run")
    for run, model in zip(runs, models):
        path = os.path.join(model, f"fold_{run.fold}", checkpoint)
        if not os.path.isfile(path):
            raise SSPError(f"{path}: not found; train {run.trainer} fold {run.fold} first")
        file_ending = _file_ending(model)
        if not image_cases(images, file_ending):
            raise SSPError(f"{images}: no images (CASE_0000{file_ending})")


def _predict_into(predictor, inputs: List[List[str]], folder: str, images: str, output: str, save_probabilities: bool):
    """``build_files_into``'s step: predicts ``inputs`` into the temporary ``folder``; returns its files, ``plans.json``
    last. It removes ``output``'s old model record, ``plans.json`` and evaluation, which no longer describe the folder
    once the first new file is moved in."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    from nnunet_ssp.evaluation.evaluate import DICE_SUMMARY, OUTPUT_FILE

    predictor.predict_from_files_sequential(inputs, folder, save_probabilities=save_probabilities)
    args = load_json(os.path.join(folder, ARGS_FILE))  # the folders as nnUNetv2_predict records them, not temporaries
    args.update(list_of_lists_or_source_folder=images, output_folder_or_list_of_truncated_output_files=output)
    save_json(args, os.path.join(folder, ARGS_FILE))
    for stale in (MODEL_FILE, PLANS_FILE, OUTPUT_FILE, DICE_SUMMARY):
        if os.path.isfile(os.path.join(output, stale)):
            os.remove(os.path.join(output, stale))
    names = sorted(os.listdir(folder), key=lambda name: (name == PLANS_FILE, name))
    return None, [os.path.join(folder, name) for name in names]


def predict_run(
    predictor,
    model: str,
    run: PredictionRun,
    images: str,
    identity: dict,
    checkpoint: str = "checkpoint_final.pth",
    save_probabilities: bool = False,
) -> int:
    """Predicts every case of ``images`` with the run's model (its folder ``model``) into ``run.output`` and records
    ``identity`` there last; returns the number of cases. Any failure is one SSPError naming the output folder, which
    is then left as it was (but for its old model record, ``plans.json`` and evaluation when the failure came while
    moving the new files in)."""
    from nnunetv2.utilities.utils import create_paths_fn

    from nnunet_ssp.io import build_files_into, save_json_atomic

    output = os.path.abspath(run.output)
    try:
        predictor.initialize_from_trained_model_folder(model, [run.fold], checkpoint)
        file_ending = predictor.dataset_json["file_ending"]
        files = sorted(os.listdir(images))
        inputs = [create_paths_fn(images, files, file_ending, case) for case in image_cases(images, file_ending)]
        build_files_into(
            output, lambda folder: _predict_into(predictor, inputs, folder, images, output, save_probabilities)
        )
        save_json_atomic(identity, os.path.join(output, MODEL_FILE))
    except SSPError:
        raise
    except Exception as e:  # nnU-Net's errors, on one line
        message = " ".join(str(e).split())
        raise SSPError(
            f"{output}: predicting with {run.trainer} fold {run.fold} failed "
            f"({type(e).__name__}{': ' + message if message else ''})"
        ) from e
    return len(inputs)


def predict_runs(
    runs: Sequence[PredictionRun],
    images: str,
    dataset: str,
    configuration: str = "2d",
    plans: str = "nnUNetPlans",
    device: str = "cuda",
    tta: bool = True,
    checkpoint: str = "checkpoint_final.pth",
    step_size: float = 0.5,
    on_device: bool = True,
    save_probabilities: bool = False,
    skip_complete: bool = False,
    evaluate: bool = False,
    reference: Optional[str] = None,
    num_processes: Optional[int] = None,
    vendors: Optional[Sequence[str]] = None,
    phases: Optional[Sequence[str]] = None,
) -> None:
    """Predicts ``images`` with each run in turn (the arguments are ``nnUNetv2_predict``'s); with ``evaluate``, each
    output folder is then evaluated as ``nnunet_ssp evaluate`` does (``tta`` recorded; the reference cases of
    ``vendors`` and ``phases`` only, if given). ``skip_complete``: a run whose folder is complete for its model
    (:func:`prediction_complete`) is not predicted again, and not evaluated again if it has its evaluation of the same
    cases."""
    import time

    from nnunet_ssp.evaluation.evaluate import evaluate_predictions, evaluated_with, summary_lines
    from nnunet_ssp.network import preprocessed_dataset_folder

    images = os.path.abspath(images)
    models = [_model_folder(dataset, run.trainer, plans, configuration) for run in runs]
    _check(runs, models, images, checkpoint)
    preprocessed = preprocessed_dataset_folder(dataset)
    predictor = make_predictor(device, tta, step_size, on_device)
    for number, (run, model) in enumerate(zip(runs, models), 1):
        label = f"[{number}/{len(runs)}] {run.trainer} fold {run.fold}"
        file_ending = _file_ending(model)
        identity = model_identity(model, run.trainer, run.fold, checkpoint, preprocessed)
        complete = skip_complete and prediction_complete(
            run.output, image_cases(images, file_ending), file_ending, identity
        )
        if complete:
            print(f"{label}: predictions complete in {run.output}", flush=True)
        else:
            if skip_complete and recorded_model(run.output) not in (None, identity):
                print(
                    f"{label}: {run.output} holds another model's predictions (retrained or re-split fold); "
                    f"predicting again",
                    flush=True,
                )
            start = time.time()
            cases = predict_run(predictor, model, run, images, identity, checkpoint, save_probabilities)
            print(f"{label}: {cases} cases predicted in {time.time() - start:.1f} s -> {run.output}", flush=True)
        if evaluate and not (complete and evaluated_with(run.output, vendors, phases)):
            evaluation, dice = evaluate_predictions(
                run.output,
                dataset,
                reference,
                run.trainer,
                run.fold,
                vendors,
                num_processes,
                configuration,
                tta,
                phases,
            )
            print("\n".join(summary_lines(evaluation, dice)), flush=True)
