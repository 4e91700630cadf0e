"""Writes a cohort of simulated subjects as an nnU-Net v2 raw dataset (atomically), plus the 4D cines of the
training subjects for unlabeled pretraining and a per-subject table of volumes."""
import csv
import errno
import json
import os
import re
import secrets
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import write_error
from nnunet_ssp.phantom.anatomy import MAX_SIZE, MIN_SIZE
from nnunet_ssp.phantom.subject import DEFAULT_SIZE, VOLUME_KEYS, simulate_subject, subject_rng

PHANTOM_VERSION = 1
LABELS = {"background": 0, "LV_bloodpool": 1, "LV_myocardium": 2, "RV_bloodpool": 3}
CHANNEL_NAMES = {"0": "cineMRI"}
FILE_ENDING = ".nii.gz"
CINE_FOLDER = "cineTr"
SUBJECTS_TABLE = "subjects.csv"
CSV_COLUMNS = ("subject", "split", "vendor", "phenotype", "num_frames", "ed_frame", "es_frame", "num_slices",
               "spacing_x_mm", "spacing_y_mm", "spacing_z_mm") + VOLUME_KEYS
MAX_SUBJECTS = 9999
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_COMPRESSION_LEVEL = 1


def subject_ids(num_subjects: int, num_test_subjects: int) -> List[str]:
    """``ph001``, ``ph002``, ...: training subjects first, then the test subjects."""
    return [f"ph{i:03d}" for i in range(1, num_subjects + num_test_subjects + 1)]


def _write_image(array: np.ndarray, spacing, path: str, dtype) -> None:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype, copy=False)), isVector=False)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([0.0] * img.GetDimension())   # identity direction, same geometry for images and labels
    try:
        sitk.WriteImage(img, path, useCompression=True, compressionLevel=_COMPRESSION_LEVEL)
    except RuntimeError as e:  # how SimpleITK reports a failed write (disk full, no permission)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise OSError(errno.EIO, lines[-1] if lines else "write failed", path) from None


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def _fmt_spacing(value: float) -> str:
    """Exact for the phantom's spacings (multiples of 1/64 mm): 1.484375, 9, 6.5."""
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


def _write_subject(folder: str, index: int, seed: int, size: int, test: bool) -> Dict[str, str]:
    """Simulates subject ``index`` (1-based) and writes its files into ``folder``; returns its table row."""
    sid = f"ph{index:03d}"
    subject = simulate_subject(subject_rng(seed, index), sid, size)
    images, labels = ("imagesTs", "labelsTs") if test else ("imagesTr", "labelsTr")
    for phase, frame in (("ED", subject.ed_frame), ("ES", subject.es_frame)):
        _write_image(subject.cine[frame], subject.spacing, os.path.join(folder, images, f"{sid}_{phase}_0000.nii.gz"),
                     np.int16)
        _write_image(subject.labels[frame], subject.spacing, os.path.join(folder, labels, f"{sid}_{phase}.nii.gz"),
                     np.uint8)
    if not test:
        _write_image(subject.cine, tuple(subject.spacing) + (subject.frame_interval_ms,),
                     os.path.join(folder, CINE_FOLDER, f"{sid}_0000.nii.gz"), np.int16)
    sx, sy, sz = subject.spacing
    row = dict(subject=sid, split="test" if test else "train", vendor=subject.vendor, phenotype=subject.phenotype,
               num_frames=str(subject.num_frames), ed_frame=str(subject.ed_frame), es_frame=str(subject.es_frame),
               num_slices=str(subject.num_slices), spacing_x_mm=_fmt_spacing(sx), spacing_y_mm=_fmt_spacing(sy),
               spacing_z_mm=_fmt_spacing(sz))
    row.update({k: _fmt(v) for k, v in subject.volumes.items()})
    return row


def _phantom_record(seed, size, num_subjects, num_test_subjects) -> dict:
    return {"seed": seed, "size": size, "num_subjects": num_subjects, "num_test_subjects": num_test_subjects,
            "version": PHANTOM_VERSION}


def _dataset_json(name: str, record: dict) -> dict:
    return {
        "name": name,
        "description": "Synthetic 2D short-axis cine CMR phantom (nnunet-ssp): ED and ES volumes as separate "
                       "cases, 4D cines of the training subjects in cineTr for unlabeled pretraining",
        "channel_names": dict(CHANNEL_NAMES),
        "labels": dict(LABELS),
        "numTraining": 2 * record["num_subjects"],
        "file_ending": FILE_ENDING,
        "cine_folder": CINE_FOLDER,
        "subjects_table": SUBJECTS_TABLE,
        "phantom": record,
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


def write_phantom_dataset(raw_root: str, dataset_id: int, name: str, num_subjects: int, num_test_subjects: int,
                          seed: int = 0, size: int = DEFAULT_SIZE, overwrite: bool = False, *,
                          workers: Optional[int] = None) -> str:
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
    if not 1 <= dataset_id <= 9999:
        raise SSPError(f"{raw_root}: dataset id must be in 1..9999, got {dataset_id}")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SSPError(f"{raw_root}: dataset name must be letters, digits, '_' or '-' (starting with a letter or "
                       f"digit), got {name!r}")
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
    if os.path.exists(raw_root) and not os.path.isdir(raw_root):
        raise SSPError(f"{raw_root}: exists and is not a folder")

    folder = f"Dataset{dataset_id:03d}_{name}"
    target = os.path.join(raw_root, folder)
    prefix = f"Dataset{dataset_id:03d}_"
    if os.path.isdir(raw_root):
        for entry in sorted(os.listdir(raw_root)):
            if entry.startswith(prefix) and entry != folder and os.path.isdir(os.path.join(raw_root, entry)):
                raise SSPError(f"{os.path.join(raw_root, entry)}: dataset id {dataset_id} is already used by this "
                               f"dataset; nnU-Net needs unique ids, choose another id for {folder}")
    record = _phantom_record(seed, size, num_subjects, num_test_subjects)
    if os.path.lexists(target):
        if not overwrite:
            existing = _existing_record(target)
            if existing == record:
                print(f"{target}: already written with these parameters, reusing it", file=sys.stderr)
                return target
            what = "different phantom parameters" if existing else "other content (not this phantom)"
            raise SSPError(f"{target}: already exists with {what}; pass overwrite=True (--overwrite) to replace it")
        if not os.path.isdir(target) or os.path.islink(target):
            raise SSPError(f"{target}: exists and is not a dataset folder; remove it first")

    tmp = os.path.join(raw_root, f".{folder}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(raw_root, exist_ok=True)
        os.mkdir(tmp)
    except OSError as e:
        raise write_error(target, e) from None
    try:
        _build(tmp, name, record, workers)
        if os.path.lexists(target):
            trash = os.path.join(raw_root, f".{folder}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(target, e) from None
        raise
    return target


def _build(folder: str, name: str, record: dict, workers: Optional[int]) -> None:
    num_train, num_test = record["num_subjects"], record["num_test_subjects"]
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", CINE_FOLDER):
        os.makedirs(os.path.join(folder, sub))
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
    with open(os.path.join(folder, SUBJECTS_TABLE), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(_dataset_json(name, record), f, indent=2)
        f.write("\n")
