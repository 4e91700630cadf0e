"""What the converters share: reading NIfTI volumes and tables with one-line errors, and writing one raw dataset in
the layout of ``nnunet_ssp.raw_layout`` atomically.

Geometry is the source's: the voxel-to-world affine of each file (a 3D ED/ES volume taken from a 4D file keeps the
spatial part) and the frame interval of a cine; direction cosines that are not orthonormal, which ITK (nnU-Net's
reader) refuses, become the nearest rotation. Label files get the geometry of their image. Slice 0 is the base: a
subject stored apex first is reversed with its world geometry kept (see ``nnunet_ssp.convert.orientation``).
"""

import csv
import os
import sys
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ssp.convert.orientation import APEX_FIRST, reverse_slice_axis, stored_order
from nnunet_ssp.errors import SSPError, first_line
from nnunet_ssp.io import check_intensities
from nnunet_ssp.raw_layout import (
    BASE_FIRST,
    LABELS,
    PHASES,
    REVERSED,
    TEST,
    TRAIN,
    SubjectRow,
    build_into_place,
    case_files,
    cine_file,
    make_subfolders,
    write_dataset_json,
    write_subjects,
)

MAX_LABEL = max(LABELS.values())
IDENTITY_LABELS = tuple(range(MAX_LABEL + 1))
_AXES = {3: "X, Y, Z", 4: "X, Y, Z, T"}


@dataclass
class Volume:
    """A NIfTI image: ``array`` in file index order (X, Y, Z[, T]), ``affine`` voxel -> world (mm) as nibabel reads
    it, the cine's ``frame_interval`` and ``units`` (space, time), and the ``path`` it was read from."""

    array: np.ndarray
    affine: np.ndarray
    path: str
    frame_interval: float = 1.0
    units: Tuple[str, str] = ("mm", "sec")

    @property
    def spacing(self) -> Tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def frame(self, index: int) -> "Volume":
        """Frame ``index`` of a 4D volume as a 3D volume with the same spatial geometry."""
        return replace(self, array=self.array[..., index])


@dataclass
class Subject:
    """One subject as a converter hands it over. ``phases`` maps ED and ES to (image, labels), None for a subject
    without ground truth (split UNLABELED); ``ed_frame`` and ``es_frame`` are 0-based cine frame indices."""

    subject: str
    split: str
    vendor: str
    pathology: str
    cine: Volume
    ed_frame: int
    es_frame: int
    phases: Optional[Dict[str, Tuple[Volume, Volume]]]


SubjectLoader = Callable[[], Subject]


def read_image(path: str, ndim: int) -> Volume:
    """A ``ndim``-dimensional image (trailing axes of length 1 dropped); integer data keeps its type, scaled or
    floating-point data becomes float32."""
    import nibabel as nib

    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)
        zooms = image.header.get_zooms()
        units = image.header.get_xyzt_units()
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors ...
        raise SSPError(f"{path}: cannot read image ({first_line(e)})") from None
    while array.ndim > ndim and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != ndim:
        raise SSPError(f"{path}: expected a {ndim}D image ({_AXES[ndim]}), got shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32, copy=False)
    frame_interval = float(zooms[3]) if ndim == 4 and zooms[3] > 0 else 1.0
    volume = Volume(array, np.asarray(image.affine, dtype=np.float64), path, frame_interval, units)
    if not all(np.isfinite(s) and s > 0 for s in volume.spacing):
        raise SSPError(f"{path}: degenerate voxel-to-world affine (voxel spacing {volume.spacing})")
    return volume


def read_labels(path: str, ndim: int, mapping: Sequence[int] = IDENTITY_LABELS) -> Volume:
    """A label image as uint8 in the project convention; ``mapping[v]`` is the project label of source label v."""
    volume = read_image(path, ndim)
    array = volume.array
    bad = (array < 0) | (array > MAX_LABEL)
    if not np.issubdtype(array.dtype, np.integer):
        bad |= array != np.round(array)
    if bad.any():
        values = ", ".join(f"{v:g}" for v in np.unique(array[bad])[:5])
        raise SSPError(f"{path}: label values {values} are not in 0..{MAX_LABEL} (background, LV, MYO, RV)")
    return replace(volume, array=np.asarray(mapping, dtype=np.uint8)[array.astype(np.uint8)])


def read_phases(
    ed_image: str, ed_labels: str, es_image: str, es_labels: str, mapping: Sequence[int] = IDENTITY_LABELS
) -> Dict[str, Tuple[Volume, Volume]]:
    """ED and ES (image, labels) from 3D files; ``mapping`` as for read_labels."""
    return {
        "ED": (read_image(ed_image, 3), read_labels(ed_labels, 3, mapping)),
        "ES": (read_image(es_image, 3), read_labels(es_labels, 3, mapping)),
    }


def required_file(path: str) -> str:
    """``path`` if it is a file, else an SSPError naming it."""
    if not os.path.isfile(path):
        raise SSPError(f"{path}: not found")
    return path


def subject_folders(folder: str, optional: bool = False) -> List[str]:
    """The sub-folders of ``folder``, sorted by name; a missing ``folder`` is an error, or none if ``optional``."""
    if optional and not os.path.lexists(folder):
        return []
    if not os.path.isdir(folder):
        raise SSPError(f"{folder}: not found")
    return sorted(entry.path for entry in os.scandir(folder) if entry.is_dir())


def read_table(path: str, key: str, columns: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """CSV rows by their ``key`` column, each with the (stripped) ``columns``; rows with an empty key (spreadsheet
    padding) are skipped."""
    required_file(path)
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            rows = list(reader)
    except (OSError, csv.Error) as e:
        raise SSPError(f"{path}: cannot read ({e})") from None
    missing = [c for c in (key, *columns) if c not in header]
    if missing:
        raise SSPError(f"{path}: no column {', '.join(repr(c) for c in missing)} (columns: {', '.join(header)})")
    positions = {c: header.index(c) for c in (key, *columns)}
    table = {}
    for row in rows:
        cells = {c: row[i].strip() if i < len(row) else "" for c, i in positions.items()}
        if not cells[key]:
            continue
        if cells[key] in table:
            raise SSPError(f"{path}: {key} {cells[key]} appears twice")
        table[cells.pop(key)] = cells
    return table


def parse_int(text: str, what: str, where: str) -> int:
    """``int(text)``, or an SSPError saying that ``what`` in file ``where`` is not an integer."""
    try:
        return int(text)
    except ValueError:
        raise SSPError(f"{where}: {what} is not an integer: {text!r}") from None


# ------------------------------------------------------------------------------------------------------- writing
def write_dataset(target: str, name: str, description: str, loaders: Sequence[SubjectLoader], source: dict) -> str:
    """Loads and writes every subject, then the tables, with ``build_into_place``; returns ``target``."""

    def build(folder: str) -> None:
        rows = _write_subjects(folder, loaders)
        write_subjects(folder, rows)
        write_dataset_json(
            folder,
            name,
            description + ": ED and ES volumes as separate cases, 4D cines of the "
            "training subjects in cineTr for unlabeled pretraining",
            sum(len(PHASES) for r in rows if r.split == TRAIN),
            source=source,
        )

    return build_into_place(target, build)


def _write_subjects(folder: str, loaders: Sequence[SubjectLoader]) -> List[SubjectRow]:
    make_subfolders(folder)
    rows = []
    for load in loaders:
        rows.append(_write_subject(folder, load()))
        if sys.stderr.isatty():
            print(f"{len(rows)}/{len(loaders)}: {rows[-1].subject}", file=sys.stderr)
    return rows


def _check_subject(s: Subject) -> None:
    num_frames = s.cine.array.shape[3]
    for what, frame in (("ED", s.ed_frame), ("ES", s.es_frame)):
        if not 0 <= frame < num_frames:
            raise SSPError(f"{s.cine.path}: {what} frame {frame} of subject {s.subject} is outside 0..{num_frames - 1}")
    if s.ed_frame == s.es_frame:
        raise SSPError(f"{s.cine.path}: ED and ES of subject {s.subject} are the same frame {s.ed_frame}")
    for t in range(num_frames):
        check_intensities(s.cine.array[..., t], f"{s.cine.path} frame {t}")
    for image, labels in (s.phases or {}).values():
        check_intensities(image.array, image.path)
        if image.array.shape != s.cine.array.shape[:3]:
            raise SSPError(
                f"{image.path}: shape {image.array.shape} differs from the cine's "
                f"{s.cine.array.shape[:3]} ({s.cine.path})"
            )
        if labels.array.shape != image.array.shape:
            raise SSPError(
                f"{labels.path}: shape {labels.array.shape} differs from the image's {image.array.shape} ({image.path})"
            )
        if not np.allclose(labels.affine, image.affine, atol=1e-3):
            raise SSPError(f"{labels.path}: voxel-to-world affine differs from the image's ({image.path})")


def reverse_slices(volume: Volume) -> Volume:
    """A volume with its slice axis (Z, the third) reversed and the same world geometry."""
    array, affine = reverse_slice_axis(volume.array, volume.affine)
    return replace(volume, array=array, affine=affine)


def base_first(subject: Subject) -> Tuple[Subject, bool]:
    """The subject with slice 0 at the base (its cine, ED/ES images and labels alike) and whether it was
    reversed."""
    ed_labels = subject.phases["ED"][1].array if subject.phases else None
    if stored_order(ed_labels, subject.cine.affine, subject.cine.path) != APEX_FIRST:
        return subject, False
    phases = subject.phases and {
        phase: (reverse_slices(image), reverse_slices(labels)) for phase, (image, labels) in subject.phases.items()
    }
    return replace(subject, cine=reverse_slices(subject.cine), phases=phases), True


def _write_subject(folder: str, s: Subject) -> SubjectRow:
    """Writes the cases and cine of one subject, base first; returns its subjects.csv row."""
    _check_subject(s)
    s, reversed_ = base_first(s)
    for phase, (image, label) in (s.phases or {}).items():
        image_file, label_file = case_files(s.split, f"{s.subject}_{phase}")
        _save(image, os.path.join(folder, image_file))
        _save(replace(label, affine=image.affine), os.path.join(folder, label_file))
    if s.split != TEST:
        _save(s.cine, os.path.join(folder, cine_file(s.subject)))
    x, y, z, t = s.cine.array.shape
    return SubjectRow(
        s.subject,
        s.split,
        s.vendor,
        s.pathology,
        t,
        s.ed_frame,
        s.es_frame,
        z,
        s.cine.spacing[:3],
        REVERSED if reversed_ else BASE_FIRST,
    )


def orthonormal_affine(affine: np.ndarray) -> np.ndarray:
    """``affine`` itself if its direction cosines are orthonormal, else with the nearest rotation, spacing kept."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    if np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        return affine
    u, _, vt = np.linalg.svd(direction)
    fixed = affine.copy()
    fixed[:3, :3] = (u @ vt) * spacing
    return fixed


def _save(volume: Volume, path: str) -> None:
    import nibabel as nib

    affine = orthonormal_affine(volume.affine)
    image = nib.Nifti1Image(volume.array, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    if volume.array.ndim == 4:
        image.header.set_zooms(tuple(np.linalg.norm(affine[:3, :3], axis=0)) + (volume.frame_interval,))
    image.header.set_xyzt_units(*volume.units)
    nib.save(image, path)
