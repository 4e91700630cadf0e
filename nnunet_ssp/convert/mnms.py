"""M&Ms (2020 challenge, OpenDataset release) -> nnU-Net raw dataset.

Layout of SRC: ``{Training/Labeled,Training/Unlabeled,Validation,Testing}/<Code>/<Code>_sa.nii.gz`` (4D cine) and
``<Code>_sa_gt.nii.gz`` (4D ground truth, labelled at ED and ES only; absent in Training/Unlabeled), and
``211230_M&Ms_Dataset_information_diagnosis_opendataset.csv`` (``External code``, ``Vendor`` A-D, ``Pathology``,
0-based ``ED`` and ``ES``, ...). Training/Labeled and the table are required; the other folders may be missing (a
partial download, a labelled-only share). Labels already follow the project convention (1 LV, 2 MYO, 3 RV).

As in the paper, ED and ES are recomputed from the ground truth: of its two labelled frames the one with more
foreground voxels is ED. Training and Validation subjects are training cases, Testing subjects test cases; a
Training/Unlabeled subject without ground truth only gives its cine (split ``unlabeled``, ED/ES from the table).
"""

import os
from functools import partial
from typing import List, Optional

import numpy as np

from nnunet_ssp.convert.common import (
    Subject,
    SubjectLoader,
    parse_int,
    read_image,
    read_labels,
    read_table,
    required_file,
    subject_folders,
)
from nnunet_ssp.errors import SSPError
from nnunet_ssp.raw_layout import PHASES, TEST, TRAIN, UNLABELED

DESCRIPTION = "M&Ms (2020) short-axis cine CMR"
TABLE = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
REQUIRED_FOLDER = "Training/Labeled"
FOLDERS = ((REQUIRED_FOLDER, TRAIN), ("Training/Unlabeled", UNLABELED), ("Validation", TRAIN), ("Testing", TEST))


def list_subjects(source: str) -> List[SubjectLoader]:
    table_path = os.path.join(source, TABLE)
    table = read_table(table_path, "External code", ("Vendor", "Pathology", "ED", "ES"))
    loaders, seen = [], {}
    for folder, split in FOLDERS:
        for subject_dir in subject_folders(os.path.join(source, folder), optional=folder != REQUIRED_FOLDER):
            code = os.path.basename(subject_dir)
            if code in seen:
                raise SSPError(f"{subject_dir}: subject {code} is also in {seen[code]}")
            seen[code] = subject_dir
            if code not in table:
                raise SSPError(f"{table_path}: no row for subject {code} ({subject_dir})")
            row = table[code]
            cine = required_file(os.path.join(subject_dir, f"{code}_sa.nii.gz"))
            gt = os.path.join(subject_dir, f"{code}_sa_gt.nii.gz")
            if split == UNLABELED and not os.path.isfile(gt):
                frames = tuple(parse_int(row[c], f"{c} of subject {code}", table_path) for c in PHASES)
                loaders.append(partial(_load, code, UNLABELED, row, cine, None, frames))
            else:
                loaders.append(partial(_load, code, TEST if split == TEST else TRAIN, row, cine, required_file(gt)))
    return loaders


def labelled_frames(gt_array: np.ndarray, path: str) -> tuple:
    """(ED, ES): of the two frames with any foreground, ED is the one with more foreground voxels."""
    counts = np.count_nonzero(gt_array.reshape(-1, gt_array.shape[-1]), axis=0)
    frames = np.flatnonzero(counts)
    if len(frames) != 2:
        raise SSPError(
            f"{path}: expected exactly 2 labelled frames (ED and ES), found {len(frames)}: {frames.tolist()}"
        )
    ed = int(frames[np.argmax(counts[frames])])
    return ed, int(frames[0] + frames[1] - ed)


def _load(code: str, split: str, row: dict, cine_path: str, gt_path: Optional[str], frames: tuple = None) -> Subject:
    cine = read_image(cine_path, 4)
    phases = None
    if gt_path is not None:
        gt = read_labels(gt_path, 4)
        if gt.array.shape != cine.array.shape:
            raise SSPError(
                f"{gt_path}: shape {gt.array.shape} differs from the cine's {cine.array.shape} ({cine_path})"
            )
        frames = labelled_frames(gt.array, gt_path)
        phases = {phase: (cine.frame(t), gt.frame(t)) for phase, t in zip(PHASES, frames)}
    return Subject(code, split, row["Vendor"], row["Pathology"], cine, frames[0], frames[1], phases)
