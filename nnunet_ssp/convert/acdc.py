"""ACDC (2017) -> nnU-Net raw dataset.

Layout of SRC: ``{training,testing}/patientNNN/patientNNN_4d.nii.gz`` (4D cine), ``patientNNN_frameXX.nii.gz`` and
``patientNNN_frameXX_gt.nii.gz`` (3D) for the ED and ES frames, and ``Info.cfg`` with ``ED: n`` and ``ES: n``
(1-based frame numbers, XX above), ``Group`` (NOR, MINF, DCM, HCM, RV), ``Height``, ``Weight``, ``NbFrame``.

ACDC labels (1 RV, 2 MYO, 3 LV) are remapped to the project convention (1 LV, 2 MYO, 3 RV). ACDC is single-vendor
(Siemens, vendor code A). training subjects are training cases, testing subjects test cases.
"""

import os
from functools import partial
from typing import Dict, List

from nnunet_ssp.convert.common import (
    Subject,
    SubjectLoader,
    parse_int,
    read_image,
    read_phases,
    required_file,
    subject_folders,
)
from nnunet_ssp.errors import SSPError
from nnunet_ssp.raw_layout import PHASES, TEST, TRAIN

DESCRIPTION = "ACDC (2017) short-axis cine CMR"
FOLDERS = (("training", TRAIN), ("testing", TEST))
VENDOR = "A"
ACDC_TO_PROJECT_LABELS = (0, 3, 2, 1)


def list_subjects(source: str) -> List[SubjectLoader]:
    loaders = []
    for folder, split in FOLDERS:
        for subject_dir in subject_folders(os.path.join(source, folder)):
            patient = os.path.basename(subject_dir)
            if not patient.startswith("patient"):
                continue
            cfg_path = required_file(os.path.join(subject_dir, "Info.cfg"))
            info = read_info(cfg_path)
            numbers = [parse_int(info[phase], phase, cfg_path) for phase in PHASES]
            paths = [required_file(os.path.join(subject_dir, f"{patient}_4d.nii.gz"))]
            for number in numbers:
                frame = os.path.join(subject_dir, f"{patient}_frame{number:02d}")
                paths += [required_file(f"{frame}.nii.gz"), required_file(f"{frame}_gt.nii.gz")]
            loaders.append(partial(_load, patient, split, info["Group"], [n - 1 for n in numbers], *paths))
    return loaders


def read_info(path: str) -> Dict[str, str]:
    """The ``key: value`` lines of an Info.cfg; ED, ES and Group are required."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            info = dict(tuple(part.strip() for part in line.split(":", 1)) for line in f if ":" in line)
    except OSError as e:
        raise SSPError(f"{path}: cannot read ({e})") from None
    missing = [key for key in (*PHASES, "Group") if not info.get(key)]
    if missing:
        raise SSPError(f"{path}: no {', '.join(missing)} line")
    return info


def _load(
    patient: str,
    split: str,
    group: str,
    frames: List[int],
    cine_path: str,
    ed_path: str,
    ed_gt_path: str,
    es_path: str,
    es_gt_path: str,
) -> Subject:
    phases = read_phases(ed_path, ed_gt_path, es_path, es_gt_path, ACDC_TO_PROJECT_LABELS)
    return Subject(patient, split, VENDOR, group, read_image(cine_path, 4), frames[0], frames[1], phases)
