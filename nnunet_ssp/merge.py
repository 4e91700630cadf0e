"""``nnunet_ssp merge``: several raw datasets in the layout of ``nnunet_ssp.raw_layout`` as one (the paper trains
on M&Ms and M&Ms-2 together).

The files of imagesTr, labelsTr, imagesTs, labelsTs and cineTr are hard-linked (copied where linking fails, e.g.
across filesystems). The sources must agree on labels, channel_names and file_ending; dataset.json gets numTraining
recounted and ``sources`` (name: description); subjects.csv is the union of the sources' rows and columns (missing
values empty) plus ``source_dataset``. A subject or file name present in two sources is refused. The folder is built
next to its destination and moved into place in one rename, so an error never leaves partial output.
"""

import json
import os
import shutil
from typing import Dict, List, Sequence

from nnunet_ssp.errors import SSPError
from nnunet_ssp.raw_layout import (
    LABELS_TR,
    SUBFOLDERS,
    SUBJECTS_TABLE,
    SubjectRow,
    build_into_place,
    make_subfolders,
    read_subjects,
    target_folder,
    write_dataset_json,
    write_subjects,
)

SOURCE_COLUMN = "source_dataset"
MATCHING_KEYS = ("labels", "channel_names", "file_ending")


def source_folder(raw_root: str, dataset: str) -> str:
    """``{raw_root}/DatasetXXX_Name`` for a dataset id (``511``) or folder name (``Dataset511_MnMs``)."""
    entries = (
        sorted(e for e in os.listdir(raw_root) if os.path.isdir(os.path.join(raw_root, e)))
        if os.path.isdir(raw_root)
        else []
    )
    if dataset.isdigit():
        matches = [e for e in entries if e.startswith(f"Dataset{int(dataset):03d}_")]
    else:
        matches = [e for e in entries if e == dataset]
    if len(matches) != 1:
        found = f"several match: {', '.join(matches)}" if matches else "not found"
        raise SSPError(f"{raw_root}: dataset {dataset!r} {found}")
    return os.path.join(raw_root, matches[0])


def _read_dataset_json(folder: str) -> dict:
    path = os.path.join(folder, "dataset.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SSPError(f"{path}: cannot read ({' '.join(str(e).split())})") from None


def _check_dataset_jsons(folders: Sequence[str], jsons: Sequence[dict]) -> None:
    """Every source has the first one's labels, channel_names and file_ending."""
    for folder, d in zip(folders, jsons):
        for key in MATCHING_KEYS:
            if key not in d:
                raise SSPError(f"{os.path.join(folder, 'dataset.json')}: no {key}")
            if d[key] != jsons[0][key]:
                raise SSPError(
                    f"{os.path.join(folder, 'dataset.json')}: {key} {d[key]} differs from {jsons[0][key]} "
                    f"in {os.path.join(folders[0], 'dataset.json')}"
                )


def _merged_subjects(folders: Sequence[str]) -> List[SubjectRow]:
    """The rows of the merged subjects.csv, each with its source; a subject in two sources is an SSPError naming both
    tables."""
    rows, seen = [], {}
    for folder in folders:
        table = os.path.join(folder, SUBJECTS_TABLE)
        for row in read_subjects(table):
            if row.subject in seen:
                raise SSPError(f"{table}: subject {row.subject} is also in {seen[row.subject]}")
            seen[row.subject] = table
            row.extra[SOURCE_COLUMN] = row.extra.get(SOURCE_COLUMN) or os.path.basename(folder)
            rows.append(row)
    return rows


def _planned_files(folders: Sequence[str]) -> Dict[str, str]:
    """{path in the merged folder relative to it: source path}; a name in two sources is an SSPError."""
    planned = {}
    for folder in folders:
        for sub in SUBFOLDERS:
            source = os.path.join(folder, sub)
            for name in sorted(os.listdir(source)) if os.path.isdir(source) else []:
                if not os.path.isfile(os.path.join(source, name)):
                    continue
                relative = os.path.join(sub, name)
                if relative in planned:
                    raise SSPError(f"{os.path.join(source, name)}: also in {planned[relative]}")
                planned[relative] = os.path.join(source, name)
    return planned


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def merge_datasets(raw_root: str, dataset_id: int, name: str, sources: Sequence[str], overwrite: bool = False) -> str:
    """Merges the raw datasets ``sources`` (ids or folder names in ``raw_root``) into
    ``{raw_root}/Dataset{dataset_id:03d}_{name}``; returns its path."""
    target = target_folder(raw_root, dataset_id, name, overwrite)
    folders = [source_folder(os.path.abspath(raw_root), s) for s in sources]
    repeated = sorted({f for f in folders if folders.count(f) > 1} | ({target} & set(folders)))
    if repeated:
        raise SSPError(f"{repeated[0]}: given twice, or both source and destination of the merge")
    jsons = [_read_dataset_json(f) for f in folders]
    _check_dataset_jsons(folders, jsons)
    rows = _merged_subjects(folders)
    files = _planned_files(folders)
    names = [os.path.basename(f) for f in folders]
    num_training = sum(1 for f in files if f.startswith(LABELS_TR + os.sep) and f.endswith(jsons[0]["file_ending"]))

    def build(folder: str) -> None:
        make_subfolders(folder)
        for relative, source in files.items():
            _link_or_copy(source, os.path.join(folder, relative))
        write_subjects(folder, rows)
        write_dataset_json(
            folder,
            name,
            f"Merged by nnunet_ssp from {', '.join(names)}",
            num_training,
            **{key: jsons[0][key] for key in MATCHING_KEYS},
            sources={n: d.get("description", "") for n, d in zip(names, jsons)},
        )

    return build_into_place(target, build)
