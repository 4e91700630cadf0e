"""Writes a cohort of simulated subjects as a raw dataset in the layout of ``nnunet_ssp.raw_layout`` (atomically):
ED/ES cases, the 4D cines of the training subjects for unlabeled pretraining, and subjects.csv with each subject's
ground-truth volumes."""

import errno
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from typing import List, Optional

import numpy as np
import SimpleITK as sitk

from nnunet_ssp.errors import SSPError, first_line
from nnunet_ssp.evaluation.clinical import MEASURES as VOLUME_KEYS
from nnunet_ssp.phantom.anatomy import MAX_SIZE, MIN_SIZE
from nnunet_ssp.phantom.subject import DEFAULT_SIZE, simulate_subject, subject_rng
from nnunet_ssp.raw_layout import (
    BASE_FIRST,
    PHASES,
    SUBJECT_COLUMNS,
    TEST,
    TRAIN,
    SubjectRow,
    build_into_place,
    case_files,
    cine_file,
    make_subfolders,
    target_folder,
    write_dataset_json,
    write_subjects,
)

PHANTOM_VERSION = 1
CSV_COLUMNS = SUBJECT_COLUMNS + VOLUME_KEYS
MAX_SUBJECTS = 9999
_COMPRESSION_LEVEL = 1


def subject_ids(num_subjects: int, num_test_subjects: int) -> List[str]:
    """``ph001``, ``ph002``, ...: training subjects first, then the test subjects."""
    return [f"ph{i:03d}" for i in range(1, num_subjects + num_test_subjects + 1)]


def _write_image(array: np.ndarray, spacing, path: str, dtype) -> None:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype, copy=False)), isVector=False)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([0.0] * img.GetDimension())  # identity direction, same geometry for images and labels
    try:
        sitk.WriteImage(img, path, useCompression=True, compressionLevel=_COMPRESSION_LEVEL)
    except RuntimeError as e:  # how SimpleITK reports a failed write (disk full, no permission)
        raise OSError(errno.EIO, first_line(e), path) from None


def _write_subject(folder: str, index: int, seed: int, size: int, test: bool) -> SubjectRow:
    """Simulates subject ``index`` (1-based) and writes its files into ``folder``; returns its table row."""
    sid = f"ph{index:03d}"
    subject = simulate_subject(subject_rng(seed, index), sid, size)
    split = TEST if test else TRAIN
    for phase in PHASES:
        image_file, labels_file = case_files(split, f"{sid}_{phase}")
        image, labels = subject.phase(phase)
        _write_image(image, subject.spacing, os.path.join(folder, image_file), np.int16)
        _write_image(labels, subject.spacing, os.path.join(folder, labels_file), np.uint8)
    if not test:
        _write_image(
            subject.cine,
            tuple(subject.spacing) + (subject.frame_interval_ms,),
            os.path.join(folder, cine_file(sid)),
            np.int16,
        )
    return SubjectRow(
        sid,
        split,
        subject.vendor,
        subject.phenotype,
        subject.num_frames,
        subject.ed_frame,
        subject.es_frame,
        subject.num_slices,
        tuple(subject.spacing),
        BASE_FIRST,
        {k: f"{v:.3f}" for k, v in subject.volumes.items()},
    )


def _phantom_record(seed, size, num_subjects, num_test_subjects) -> dict:
    return {
        "seed": seed,
        "size": size,
        "num_subjects": num_subjects,
        "num_test_subjects": num_test_subjects,
        "version": PHANTOM_VERSION,
    }


def _as_int(value, what: str, where: str) -> int:
    if isinstance(value, bool):
        raise SSPError(f"{where}: {what} must be an integer, got {value!r}")
    try:
        return int(value.__index__())
    except (AttributeError, TypeError):
        raise SSPError(f"{where}: {what} must be an integer, got {value!r}") from None


def _existing_record(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, "dataset.json"), encoding="utf-8") as f:
            record = json.load(f).get("phantom")
        return record if isinstance(record, dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def _default_workers(num_total: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4, num_total // 3))


def write_phantom_dataset(
    raw_root: str,
    dataset_id: int,
    name: str,
    num_subjects: int,
    num_test_subjects: int,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    overwrite: bool = False,
    *,
    workers: Optional[int] = None,
) -> str:
    """Writes $raw_root/Dataset{dataset_id:03d}_{name} and returns its path.

    Layout: imagesTr/labelsTr with the ED and ES volumes of each training subject as separate cases
    ({subject}_ED, {subject}_ES), imagesTs/labelsTs likewise for the test subjects, cineTr/{subject}_0000.nii.gz
    with the 4D cine (X, Y, Z, T) of each training subject, dataset.json and subjects.csv. Subject k is simulated
    from (seed, k) alone, so a subject does not depend on the cohort size; the folder is built next to its
    destination and moved into place in one rename. Re-running with the same parameters reuses the dataset;
    ``overwrite`` replaces an existing one. ``workers``: processes (default: up to 4, by the CPUs available)."""
    raw_root = os.path.abspath(os.fspath(raw_root))
    dataset_id = _as_int(dataset_id, "dataset_id", raw_root)
    num_subjects = _as_int(num_subjects, "num_subjects", raw_root)
    num_test_subjects = _as_int(num_test_subjects, "num_test_subjects", raw_root)
    seed = _as_int(seed, "seed", raw_root)
    size = _as_int(size, "size", raw_root)
    if num_subjects < 1:
        raise SSPError(f"{raw_root}: num_subjects must be at least 1, got {num_subjects}")
    if num_test_subjects < 0:
        raise SSPError(f"{raw_root}: num_test_subjects must be at least 0, got {num_test_subjects}")
    if num_subjects + num_test_subjects > MAX_SUBJECTS:
        raise SSPError(f"{raw_root}: at most {MAX_SUBJECTS} subjects in all, got {num_subjects + num_test_subjects}")
    if seed < 0:
        raise SSPError(f"{raw_root}: seed must be non-negative, got {seed}")
    if size < MIN_SIZE:
        raise SSPError(f"{raw_root}: size {size} is too small; the phantom needs at least {MIN_SIZE} pixels")
    if size > MAX_SIZE:
        raise SSPError(f"{raw_root}: size {size} is too large; at most {MAX_SIZE} pixels")
    target = target_folder(raw_root, dataset_id, name, overwrite=True)
    record = _phantom_record(seed, size, num_subjects, num_test_subjects)
    if os.path.lexists(target) and not overwrite:
        existing = _existing_record(target)
        if existing == record:
            print(f"{target}: already written with these parameters, reusing it", file=sys.stderr)
            return target
        what = "different phantom parameters" if existing else "other content (not this phantom)"
        raise SSPError(f"{target}: already exists with {what}; pass overwrite=True (--overwrite) to replace it")
    return build_into_place(target, lambda folder: _build(folder, name, record, workers))


def _build(folder: str, name: str, record: dict, workers: Optional[int]) -> None:
    num_train, num_test = record["num_subjects"], record["num_test_subjects"]
    make_subfolders(folder)
    total = num_train + num_test
    jobs = [(folder, i, record["seed"], record["size"], i > num_train) for i in range(1, total + 1)]
    workers = _default_workers(total) if workers is None else max(1, int(workers))
    if workers == 1 or total == 1:
        rows = [_write_subject(*job) for job in jobs]
    else:
        # Each subject depends on (seed, index) only, so the result does not depend on scheduling. fork where the
        # platform has it: it works from unguarded scripts too (spawn re-imports the caller's __main__) and the
        # workers use only numpy, scipy and SimpleITK.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=min(workers, total), mp_context=get_context(method)) as pool:
            rows = list(pool.map(_write_subject, *zip(*jobs)))
    write_subjects(folder, rows)
    write_dataset_json(
        folder,
        name,
        "Synthetic 2D short-axis cine CMR phantom (nnunet-ssp): ED and ES volumes as "
        "separate cases, 4D cines of the training subjects in cineTr for unlabeled pretraining",
        2 * num_train,
        phantom=record,
    )
