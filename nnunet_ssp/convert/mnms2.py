"""M&Ms-2 -> nnU-Net raw dataset.

Layout of SRC: ``dataset/<NNN>/<NNN>_SA_CINE.nii.gz`` (4D cine), ``<NNN>_SA_ED.nii.gz``, ``<NNN>_SA_ED_gt.nii.gz``,
``<NNN>_SA_ES.nii.gz``, ``<NNN>_SA_ES_gt.nii.gz`` (3D; the long-axis ``<NNN>_LA_*`` files are ignored) and
``dataset_information.csv`` (``SUBJECT_CODE`` 1-360, ``DISEASE``, ``VENDOR``, ``SCANNER``, ``FIELD``; blank padding
rows). Labels already follow the project convention (1 LV, 2 MYO, 3 RV). Vendors: Siemens A, Philips B, GE C.

As in the paper, subjects with pathology NOR, HCM or LV are dropped (they may also be in M&Ms), and the ED/ES frame
indices are those of the cine frames equal to the ED/ES volumes. The challenge's training and validation subjects
(001-200) are training cases, its test subjects (201-360) test cases: after the exclusion, the paper's development
subjects 101-160 and 176-200 and test subjects 281-360.
"""

import os
import re
from functools import partial
from typing import List

import numpy as np

from nnunet_ssp.convert.common import (
    Subject,
    SubjectLoader,
    Volume,
    parse_int,
    read_image,
    read_phases,
    read_table,
    required_file,
    subject_folders,
)
from nnunet_ssp.errors import SSPError
from nnunet_ssp.raw_layout import PHASES, TEST, TRAIN

DESCRIPTION = "M&Ms-2 short-axis cine CMR (pathologies NOR, HCM and LV excluded)"
TABLE = "dataset_information.csv"
EXCLUDED_PATHOLOGIES = ("NOR", "HCM", "LV")
LAST_DEVELOPMENT_SUBJECT = 200
VENDOR_CODES = (("siemens", "A"), ("philips", "B"), ("ge", "C"))
# a matching cine frame may differ from the ED/ES volume by this fraction of the volume's intensity range (mean |d|)
MATCH_TOLERANCE = 1e-3


def list_subjects(source: str) -> List[SubjectLoader]:
    table_path = os.path.join(source, TABLE)
    table = {
        f"{parse_int(code, 'SUBJECT_CODE', table_path):03d}": row
        for code, row in read_table(table_path, "SUBJECT_CODE", ("DISEASE", "VENDOR")).items()
    }
    loaders = []
    for subject_dir in subject_folders(os.path.join(source, "dataset")):
        sid = os.path.basename(subject_dir)
        if not re.fullmatch(r"\d{3}", sid):
            continue
        if sid not in table:
            raise SSPError(f"{table_path}: no row for subject {sid} ({subject_dir})")
        pathology = table[sid]["DISEASE"]
        if pathology in EXCLUDED_PATHOLOGIES:
            continue
        paths = [
            required_file(os.path.join(subject_dir, f"{sid}_SA_{part}.nii.gz"))
            for part in ("CINE", "ED", "ED_gt", "ES", "ES_gt")
        ]
        split = TRAIN if int(sid) <= LAST_DEVELOPMENT_SUBJECT else TEST
        vendor = vendor_code(table[sid]["VENDOR"], f"{table_path}: subject {sid}")
        loaders.append(partial(_load, sid, split, vendor, pathology, *paths))
    return loaders


def vendor_code(vendor: str, where: str) -> str:
    """A, B or C for a manufacturer name such as ``SIEMENS``, ``Philips Medical Systems`` or ``GE MEDICAL SYSTEMS``."""
    for prefix, code in VENDOR_CODES:
        if vendor.lower().startswith(prefix):
            return code
    raise SSPError(f"{where}: unknown vendor {vendor!r} (expected Siemens, Philips or GE)")


def matching_frame(cine: Volume, volume: Volume) -> int:
    """The index of the cine frame equal to ``volume`` (to MATCH_TOLERANCE)."""
    if volume.array.shape != cine.array.shape[:3]:
        raise SSPError(
            f"{volume.path}: shape {volume.array.shape} differs from the cine's {cine.array.shape[:3]} ({cine.path})"
        )
    target = volume.array.astype(np.float64)
    differences = [np.mean(np.abs(cine.array[..., t] - target)) for t in range(cine.array.shape[3])]
    best = int(np.argmin(differences))
    if differences[best] > MATCH_TOLERANCE * max(float(np.ptp(target)), 1.0):
        raise SSPError(
            f"{volume.path}: equals no frame of {cine.path} (closest: frame {best}, mean absolute "
            f"difference {differences[best]:.4g})"
        )
    return best


def _load(
    sid: str,
    split: str,
    vendor: str,
    pathology: str,
    cine_path: str,
    ed_path: str,
    ed_gt_path: str,
    es_path: str,
    es_gt_path: str,
) -> Subject:
    cine = read_image(cine_path, 4)
    phases = read_phases(ed_path, ed_gt_path, es_path, es_gt_path)
    ed, es = (matching_frame(cine, phases[phase][0]) for phase in PHASES)
    return Subject(sid, split, vendor, pathology, cine, ed, es, phases)
