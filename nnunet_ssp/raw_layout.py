"""The raw dataset layout: the one owner of the folder names, the label map, ``subjects.csv`` and ``dataset.json``
that the phantom, the converters and ``merge`` write and that splits, evaluation and the pretraining cache read.

``$nnUNet_raw/DatasetID_NAME``:
- ``imagesTr``/``labelsTr``: ED and ES of each labelled training subject as separate cases ``{subject}_ED`` and
  ``{subject}_ES`` (images with nnU-Net's ``_0000`` channel suffix); ``imagesTs``/``labelsTs`` likewise for the test
  subjects;
- ``cineTr/{subject}_0000.nii.gz``: the 4D cine (X, Y, Z, T) of every training subject, labelled or not;
- ``dataset.json``: nnU-Net's, plus ``cine_folder`` and ``subjects_table``;
- ``subjects.csv``: one row per subject, SUBJECT_COLUMNS first, then any further columns (the phantom's volumes,
  ``merge``'s ``source_dataset``).
Labels: 0 background, 1 LV blood pool, 2 LV myocardium, 3 RV blood pool. Slice 0 is the base.
"""

import csv
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import write_error

LV_BLOODPOOL, LV_MYOCARDIUM, RV_BLOODPOOL = 1, 2, 3
LABELS = {"background": 0, "LV_bloodpool": LV_BLOODPOOL, "LV_myocardium": LV_MYOCARDIUM, "RV_bloodpool": RV_BLOODPOOL}
CHANNEL_NAMES = {"0": "cineMRI"}
FILE_ENDING = ".nii.gz"
IMAGES_TR, LABELS_TR, IMAGES_TS, LABELS_TS, CINE_FOLDER = "imagesTr", "labelsTr", "imagesTs", "labelsTs", "cineTr"
SUBFOLDERS = (IMAGES_TR, LABELS_TR, IMAGES_TS, LABELS_TS, CINE_FOLDER)
SUBJECTS_TABLE = "subjects.csv"
TRAIN, TEST, UNLABELED = "train", "test", "unlabeled"
PHASES = ("ED", "ES")
BASE_FIRST, REVERSED = "base_first", "reversed"
_OLD_COLUMN_NAMES = {"phenotype": "pathology"}  # the phantom's tables before the column sets were unified
_INTEGER_COLUMNS = ("num_frames", "ed_frame", "es_frame", "num_slices")
_SPACING_COLUMNS = ("spacing_x_mm", "spacing_y_mm", "spacing_z_mm")
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass
class SubjectRow:
    """One row of ``subjects.csv``: absent values are None (integers, spacing) or "" (text); ``extra`` holds the
    further columns by name, as text."""

    subject: str
    split: str = ""
    vendor: str = ""
    pathology: str = ""
    num_frames: Optional[int] = None
    ed_frame: Optional[int] = None
    es_frame: Optional[int] = None
    num_slices: Optional[int] = None
    spacing_mm: Optional[Tuple[float, float, float]] = None
    slice_order: str = ""
    extra: Dict[str, str] = field(default_factory=dict)


SUBJECT_COLUMNS = ("subject", "split", "vendor", "pathology", *_INTEGER_COLUMNS, *_SPACING_COLUMNS, "slice_order")


def _format_spacing(value: float) -> str:
    """At most 6 decimals, trailing zeros dropped: 1.484375, 9, 6.5."""
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


def _cells(row: SubjectRow) -> Dict[str, str]:
    cells = {
        "subject": row.subject,
        "split": row.split,
        "vendor": row.vendor,
        "pathology": row.pathology,
        "slice_order": row.slice_order,
    }
    cells.update({c: "" if getattr(row, c) is None else str(getattr(row, c)) for c in _INTEGER_COLUMNS})
    cells.update(
        zip(_SPACING_COLUMNS, (_format_spacing(s) for s in row.spacing_mm) if row.spacing_mm else ("", "", ""))
    )
    return {**cells, **row.extra}


def write_subjects(folder: str, rows: Sequence[SubjectRow]) -> str:
    """Writes ``folder/subjects.csv``: SUBJECT_COLUMNS, then the rows' extra columns in order of appearance."""
    columns = list(SUBJECT_COLUMNS)
    for row in rows:
        columns += [c for c in row.extra if c not in columns]
    path = os.path.join(folder, SUBJECTS_TABLE)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(_cells(row) for row in rows)
    return path


def _parse_row(path: str, cells: Dict[str, str]) -> SubjectRow:
    subject = cells.pop("subject")

    def integer(column: str) -> Optional[int]:
        text = cells.pop(column, "")
        if text in ("", "nan", "NaN", "None"):
            return None
        try:
            return int(float(text))
        except ValueError:
            raise SSPError(f"{path}: {column} of subject {subject} is not a number: {text!r}") from None

    numbers = {c: integer(c) for c in _INTEGER_COLUMNS}
    spacing = [cells.pop(c, "") for c in _SPACING_COLUMNS]
    try:
        spacing_mm = tuple(float(s) for s in spacing) if all(spacing) else None
    except ValueError:
        raise SSPError(f"{path}: the spacing of subject {subject} is not a number: {', '.join(spacing)}") from None
    text = {c: cells.pop(c, "") for c in ("split", "vendor", "pathology", "slice_order")}
    return SubjectRow(subject, **text, **numbers, spacing_mm=spacing_mm, extra=cells)


def read_subjects(path: str, required: Sequence[str] = ("subject",)) -> List[SubjectRow]:
    """The rows of a ``subjects.csv`` (old tables with ``phenotype`` read as ``pathology``); an SSPError naming
    ``path`` when it cannot be read, lacks a ``required`` column, or lists a subject twice."""
    if not os.path.isfile(path):
        raise SSPError(f"{path}: not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [_OLD_COLUMN_NAMES.get(c.strip(), c.strip()) for c in next(reader, [])]
            lines = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SSPError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
    missing = [c for c in ("subject", *required) if c not in header]
    if missing:
        raise SSPError(
            f"{path}: no column {', '.join(repr(c) for c in dict.fromkeys(missing))} (columns: {', '.join(header)})"
        )
    rows, seen = [], set()
    for line in lines:
        cells = {c: (line[i].strip() if i < len(line) else "") for i, c in enumerate(header)}
        if not cells["subject"]:
            continue
        if cells["subject"] in seen:
            raise SSPError(f"{path}: subject {cells['subject']} appears twice")
        seen.add(cells["subject"])
        rows.append(_parse_row(path, cells))
    return rows


def read_vendor_table(path: str, vendors: Sequence[str]) -> Dict[str, SubjectRow]:
    """The rows of a ``subjects.csv`` by subject; an SSPError when one of ``vendors`` has no subjects in it."""
    rows = {row.subject: row for row in read_subjects(path, required=("split", "vendor"))}
    present = sorted({row.vendor for row in rows.values()})
    unknown = [v for v in vendors if v not in present]
    if unknown:
        raise SSPError(f"{path}: no subjects of vendor(s) {', '.join(unknown)} (vendors: {', '.join(present)})")
    return rows


def write_dataset_json(
    folder: str,
    name: str,
    description: str,
    num_training: int,
    *,
    channel_names: Dict[str, str] = CHANNEL_NAMES,
    labels: Dict[str, int] = LABELS,
    file_ending: str = FILE_ENDING,
    **extra,
) -> None:
    """``folder/dataset.json`` through nnU-Net's ``generate_dataset_json``, with the layout's cine folder and
    subjects table (and by default its channel, labels and file ending); ``extra``: further keys (e.g. how the data
    was made)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(
        folder,
        dict(channel_names),
        dict(labels),
        num_training,
        file_ending,
        dataset_name=name,
        description=description,
        license="see the source dataset",
        converted_by="nnunet_ssp",
        cine_folder=CINE_FOLDER,
        subjects_table=SUBJECTS_TABLE,
        **extra,
    )


def make_subfolders(folder: str) -> None:
    for sub in SUBFOLDERS:
        os.mkdir(os.path.join(folder, sub))


def case_files(split: str, case: str) -> Tuple[str, str]:
    """(image, label map) paths of ``case`` relative to the dataset folder, in imagesTs/labelsTs for the test split
    and imagesTr/labelsTr otherwise."""
    images, labels = (IMAGES_TS, LABELS_TS) if split == TEST else (IMAGES_TR, LABELS_TR)
    return os.path.join(images, f"{case}_0000{FILE_ENDING}"), os.path.join(labels, f"{case}{FILE_ENDING}")


def cine_file(subject: str) -> str:
    """The cine of ``subject`` relative to the dataset folder."""
    return os.path.join(CINE_FOLDER, f"{subject}_0000{FILE_ENDING}")


# ----------------------------------------------------------------------------------------- writing into place
def target_folder(raw_root: str, dataset_id: int, name: str, overwrite: bool) -> str:
    """Checks id, name and destination; returns ``{raw_root}/Dataset{dataset_id:03d}_{name}``. An existing
    destination is an error unless ``overwrite``."""
    raw_root = os.path.abspath(raw_root)
    if not 1 <= dataset_id <= 9999:
        raise SSPError(f"{raw_root}: dataset id must be in 1..9999, got {dataset_id}")
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
        raise SSPError(
            f"{raw_root}: dataset name must be letters, digits, '_' or '-' (starting with a letter or "
            f"digit), got {name!r}"
        )
    if os.path.exists(raw_root) and not os.path.isdir(raw_root):
        raise SSPError(f"{raw_root}: exists and is not a folder")
    folder = f"Dataset{dataset_id:03d}_{name}"
    target = os.path.join(raw_root, folder)
    others = sorted(
        e
        for e in (os.listdir(raw_root) if os.path.isdir(raw_root) else [])
        if e.startswith(f"Dataset{dataset_id:03d}_") and e != folder and os.path.isdir(os.path.join(raw_root, e))
    )
    if others:
        raise SSPError(
            f"{os.path.join(raw_root, others[0])}: dataset id {dataset_id} is already used by this "
            f"dataset; nnU-Net needs unique ids, choose another id for {folder}"
        )
    if os.path.lexists(target):
        if not overwrite:
            raise SSPError(f"{target}: already exists; pass --overwrite to replace it")
        if not os.path.isdir(target) or os.path.islink(target):
            raise SSPError(f"{target}: exists and is not a dataset folder; remove it first")
    return target


def build_into_place(target: str, build: Callable[[str], None]) -> str:
    """Runs ``build(folder)`` on a new temporary folder next to ``target``, then moves it into place (replacing an
    existing ``target``); on any error the temporary folder is removed and ``target`` is untouched. Returns
    ``target``."""
    raw_root, folder = os.path.split(target)
    tmp = os.path.join(raw_root, f".{folder}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise write_error(target, e) from None
    try:
        build(tmp)
        old = f"{tmp}.old" if os.path.lexists(target) else None
        if old:
            os.replace(target, old)
        os.replace(tmp, target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # no permission, disk full
            raise write_error(target, e) from None
        raise
    return target
