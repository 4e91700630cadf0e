"""``nnunet_ssp merge``: several raw datasets in the phantom/converter layout as one (the paper trains on M&Ms and
M&Ms-2 together).

The files of imagesTr, labelsTr, imagesTs, labelsTs and cineTr are hard-linked (copied where linking fails, e.g.
across filesystems). The sources must agree on labels, channel_names and file_ending; dataset.json gets numTraining
recounted and ``sources`` (name: description); subjects.csv is the union of the sources' rows and columns (missing
values empty) plus ``source_dataset``. A subject or file name present in two sources is refused. The folder is built
next to its destination and moved into place in one rename, so an error never leaves partial output.
"""
import csv
import json
import os
import shutil
from typing import Dict, List, Sequence, Tuple

from nnunet_ssp.convert.common import SUBFOLDERS, build_into_place, target_folder
from nnunet_ssp.errors import SSPError
from nnunet_ssp.phantom.dataset import CINE_FOLDER, SUBJECTS_TABLE

SOURCE_COLUMN = "source_dataset"
MATCHING_KEYS = ("labels", "channel_names", "file_ending")


def source_folder(raw_root: str, dataset: str) -> str:
    """``{raw_root}/DatasetXXX_Name`` for a dataset id (``511``) or folder name (``Dataset511_MnMs``)."""
    entries = sorted(e for e in os.listdir(raw_root) if os.path.isdir(os.path.join(raw_root, e))) \
        if os.path.isdir(raw_root) else []
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


def _read_subjects(folder: str) -> Tuple[List[str], List[Dict[str, str]]]:
    """(columns, rows) of a source's subjects.csv."""
    path = os.path.join(folder, SUBJECTS_TABLE)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (OSError, csv.Error) as e:
        raise SSPError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
    if "subject" not in columns:
        raise SSPError(f"{path}: no column 'subject' (columns: {', '.join(columns)})")
    return columns, rows


def _check_dataset_jsons(folders: Sequence[str], jsons: Sequence[dict]) -> None:
    """Every source has the first one's labels, channel_names and file_ending."""
    for folder, d in zip(folders, jsons):
        for key in MATCHING_KEYS:
            if key not in d:
                raise SSPError(f"{os.path.join(folder, 'dataset.json')}: no {key}")
            if d[key] != jsons[0][key]:
                raise SSPError(f"{os.path.join(folder, 'dataset.json')}: {key} {d[key]} differs from {jsons[0][key]} "
                               f"in {os.path.join(folders[0], 'dataset.json')}")


def _merged_subjects(folders: Sequence[str]) -> Tuple[List[str], List[Dict[str, str]]]:
    """(columns, rows) of the merged subjects.csv; a subject in two sources is an SSPError naming both tables."""
    columns, rows, seen = [], [], {}
    for folder in folders:
        source_columns, source_rows = _read_subjects(folder)
        columns += [c for c in source_columns if c not in columns]
        name = os.path.basename(folder)
        for row in source_rows:
            if row["subject"] in seen:
                raise SSPError(f"{os.path.join(folder, SUBJECTS_TABLE)}: subject {row['subject']} is also in "
                               f"{os.path.join(seen[row['subject']], SUBJECTS_TABLE)}")
            seen[row["subject"]] = folder
            rows.append({**row, SOURCE_COLUMN: row.get(SOURCE_COLUMN) or name})
    return columns + [SOURCE_COLUMN] * (SOURCE_COLUMN not in columns), rows


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


def _merged_dataset_json(name: str, folders: Sequence[str], jsons: Sequence[dict], files: Dict[str, str]) -> dict:
    """The sources' labels, channel_names and file_ending, numTraining counted in ``files``, the sources with
    their descriptions."""
    names = [os.path.basename(f) for f in folders]
    ending = jsons[0]["file_ending"]
    return {
        "name": name,
        "description": f"Merged by nnunet_ssp from {', '.join(names)}",
        "channel_names": jsons[0]["channel_names"],
        "labels": jsons[0]["labels"],
        "numTraining": sum(1 for f in files if f.startswith("labelsTr" + os.sep) and f.endswith(ending)),
        "file_ending": ending,
        "cine_folder": CINE_FOLDER,
        "subjects_table": SUBJECTS_TABLE,
        "sources": {n: d.get("description", "") for n, d in zip(names, jsons)},
    }


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
    columns, rows = _merged_subjects(folders)
    files = _planned_files(folders)
    dataset_json = _merged_dataset_json(name, folders, jsons, files)

    def build(folder: str) -> None:
        for sub in SUBFOLDERS:
            os.mkdir(os.path.join(folder, sub))
        for relative, source in files.items():
            _link_or_copy(source, os.path.join(folder, relative))
        with open(os.path.join(folder, SUBJECTS_TABLE), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore",
                                    lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as f:
            json.dump(dataset_json, f, indent=2)
            f.write("\n")
    return build_into_place(target, build)
