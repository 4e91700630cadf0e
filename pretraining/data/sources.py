"""What ``ssp_pretrain`` pretrains on: the sources of a raw dataset (its cines, else its imagesTr volumes) and extra
folders, found and checked from the image headers alone."""

import glob
import json
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_ssp.errors import SSPError, first_line
from nnunet_ssp.raw_layout import CINE_FOLDER, IMAGES_TR, SUBJECTS_TABLE, SubjectRow, read_subjects

NIFTI = ".nii.gz"


@dataclass(frozen=True)
class CineSource:
    """One subject's images: a cine (4D, T frames) or a 3D volume (one frame), possibly split into channel files.

    ``paths`` holds one file, or for an imagesTr case its channel files ``_0000``, ``_0001``, ... in order.
    """

    paths: Tuple[str, ...]
    subject: str
    ed_frame: int
    kind: str  # "cineTr", "imagesTr" or "extra"
    ndim: int  # 3 or 4
    num_frames: int
    size: Tuple[int, int, int]  # (x, y, z) voxels, from the header

    def as_dict(self) -> dict:
        d = asdict(self)
        d["paths"], d["size"] = list(self.paths), list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CineSource":
        return cls(
            tuple(d["paths"]),
            d["subject"],
            int(d["ed_frame"]),
            d["kind"],
            int(d["ndim"]),
            int(d["num_frames"]),
            tuple(int(n) for n in d["size"]),
        )


def max_slices(sources: Sequence[CineSource], transpose_forward: Sequence[int]) -> int:
    """An upper bound of the 2D slices the cache of ``sources`` holds, from the headers alone (nnU-Net's 2D
    preprocessing never adds slices along the first axis after transpose_forward; cropping may remove some)."""
    return sum(s.num_frames * s.size[::-1][transpose_forward[0]] for s in sources)


def _image_header(path: str) -> Tuple[int, Tuple[int, ...]]:
    """(dimension, size) from the image header, or SSPError naming the file."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise SSPError(f"{path}: not a readable image ({first_line(e)})") from None
    return reader.GetDimension(), tuple(reader.GetSize())


def _nifti_files(folder: str, ending: str = NIFTI) -> List[str]:
    return sorted(f for f in glob.glob(os.path.join(glob.escape(folder), "*" + ending)) if os.path.isfile(f))


def _strip(name: str, ending: str) -> str:
    return name[: -len(ending)] if name.endswith(ending) else name


def _check_frames(subjects_csv: str, path: str, num_frames: int, row: SubjectRow) -> None:
    """The table's frame count and ED/ES frame indices must fit the cine's frames."""
    if row.num_frames is not None and row.num_frames != num_frames:
        raise SSPError(
            f"{subjects_csv}: subject {row.subject} has num_frames {row.num_frames}, but {path} has {num_frames} frames"
        )
    for column in ("ed_frame", "es_frame"):
        frame = getattr(row, column)
        if frame is not None and not 0 <= frame < num_frames:
            raise SSPError(
                f"{subjects_csv}: {column} {frame} of subject {row.subject} is outside "
                f"0..{num_frames - 1} ({path} has {num_frames} frames)"
            )


def _cine_sources(cine_dir: str, subjects_csv: str) -> List[CineSource]:
    files = _nifti_files(cine_dir)
    if not files:
        raise SSPError(f"{cine_dir}: no *{NIFTI} cine files")
    table = {row.subject: row for row in read_subjects(subjects_csv)} if os.path.isfile(subjects_csv) else {}
    sources = []
    for path in files:
        dim, size = _image_header(path)
        if dim not in (3, 4):
            raise SSPError(f"{path}: a cine must be 4D (X, Y, Z, T) or 3D, not {dim}D")
        num_frames = size[3] if dim == 4 else 1
        subject = _strip(_strip(os.path.basename(path), NIFTI), "_0000")
        row = table.get(subject, SubjectRow(subject))
        _check_frames(subjects_csv, path, num_frames, row)
        sources.append(
            CineSource((os.path.abspath(path),), subject, row.ed_frame or 0, CINE_FOLDER, dim, num_frames, size[:3])
        )
    return sources


def _imagestr_sources(images_dir: str, dataset_json: dict) -> List[CineSource]:
    ending = dataset_json.get("file_ending", NIFTI)
    files = _nifti_files(images_dir, ending)
    if not files:
        raise SSPError(f"{images_dir}: no *{ending} images")
    cases: Dict[str, Dict[int, str]] = OrderedDict()
    for path in files:
        match = re.fullmatch(r"(.+)_(\d{4})", _strip(os.path.basename(path), ending))
        if match is None:
            raise SSPError(f"{path}: not named CASE_XXXX{ending} (nnU-Net's channel suffix is missing)")
        cases.setdefault(match.group(1), {})[int(match.group(2))] = path
    expected = len(dataset_json["channel_names"]) if "channel_names" in dataset_json else None
    sources = []
    for case, channels in cases.items():
        n = expected if expected is not None else max(channels) + 1
        if sorted(channels) != list(range(n)):
            raise SSPError(f"{images_dir}: case {case} has channel files {sorted(channels)}, expected 0..{n - 1}")
        paths = tuple(os.path.abspath(channels[c]) for c in range(n))
        headers = [_image_header(p) for p in paths]
        for p, (dim, _) in zip(paths, headers):
            if dim != 3:
                raise SSPError(f"{p}: imagesTr volumes must be 3D, not {dim}D")
        sources.append(CineSource(paths, case, 0, IMAGES_TR, 3, 1, headers[0][1]))
    return sources


def _extra_sources(folder: str) -> List[CineSource]:
    if not os.path.isdir(folder):
        raise SSPError(f"{folder}: extra data folder not found")
    files = _nifti_files(folder)
    if not files:
        raise SSPError(f"{folder}: no *{NIFTI} images")
    prefix = os.path.basename(os.path.normpath(folder))
    sources = []
    for path in files:
        dim, size = _image_header(path)
        if dim not in (3, 4):
            raise SSPError(f"{path}: expected a 3D volume or a 4D cine, not a {dim}D image")
        sources.append(
            CineSource(
                (os.path.abspath(path),),
                f"{prefix}/{_strip(os.path.basename(path), NIFTI)}",
                0,
                "extra",
                dim,
                size[3] if dim == 4 else 1,
                size[:3],
            )
        )
    return sources


def discover_sources(raw_dataset_folder: Optional[str], extra_folders: Sequence[str] = ()) -> List[CineSource]:
    """The images to pretrain on: the dataset's ``cineTr/*.nii.gz`` (every frame of every slice) when that folder
    exists, else its ``imagesTr`` volumes (each a 1-frame cine, channel files grouped per case); plus every
    ``*.nii.gz`` (3D or 4D) in ``extra_folders``. ED frames come from the dataset's ``subjects.csv`` (``ed_frame``)
    when present, else frame 0. ``raw_dataset_folder`` may be None to use only extra folders."""
    sources: List[CineSource] = []
    if raw_dataset_folder is not None:
        if not os.path.isdir(raw_dataset_folder):
            raise SSPError(f"{raw_dataset_folder}: raw dataset folder not found")
        cine_dir = os.path.join(raw_dataset_folder, CINE_FOLDER)
        images_dir = os.path.join(raw_dataset_folder, IMAGES_TR)
        if os.path.isdir(cine_dir):
            sources += _cine_sources(cine_dir, os.path.join(raw_dataset_folder, SUBJECTS_TABLE))
        elif os.path.isdir(images_dir):
            dataset_json_file = os.path.join(raw_dataset_folder, "dataset.json")
            dataset_json = {}
            if os.path.isfile(dataset_json_file):
                try:
                    with open(dataset_json_file, encoding="utf-8") as f:
                        dataset_json = json.load(f)
                except (OSError, ValueError) as e:
                    raise SSPError(f"{dataset_json_file}: cannot read ({e})") from None
            sources += _imagestr_sources(images_dir, dataset_json)
        else:
            raise SSPError(f"{raw_dataset_folder}: neither cineTr/ nor imagesTr/ found")
    for folder in extra_folders:
        sources += _extra_sources(folder)
    if not sources:
        raise SSPError("no pretraining images: give a raw dataset folder or extra data folders")
    return sources
