"""The fold files of a preprocessed dataset: nnU-Net's ``splits_final.json`` (fold k is entry k) and the sidecar
``splits_ssp.json`` that describes the folds nnunet_ssp wrote there::

    {"folds": {"<index>": {"budget": 10, "seed": 0, "subjects": [...], "group": "budgets", ...}},
     "groups": {"budgets": {"val_subjects": [...]}, "vendors A+B": {"val_subjects": [...],
                                                                  "test_cases_by_vendor": {...}}}}

Each description names its group (``nnunet_ssp.splits.fold_group``); groups coexist. Writing a group's folds
replaces only that group's: in place when the new folds are as many as the old, truncated and appended when the old
ones are the last entries, appended when the group is new; other folds (other groups', nnU-Net's own) keep their
indices, and a fold that would change while a run trained on it is refused. Sidecars written before groups (no
``group``, their entries at the top level) are read as one group named from their descriptions: ``yaml`` (they have a
``source``), ``vendors <V>`` (they have ``vendors``) or ``budgets``.
"""

import glob
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import load_json_file, save_json_atomic

SPLITS_FILE = "splits_final.json"
SIDECAR = "splits_ssp.json"


def fold_files(preprocessed_folder: str) -> Tuple[str, str]:
    """(splits_final.json, sidecar) of a preprocessed dataset."""
    return os.path.join(preprocessed_folder, SPLITS_FILE), os.path.join(preprocessed_folder, SIDECAR)


def _legacy_group(description: dict) -> str:
    """The group of a description written before groups existed (one mode, no phases)."""
    if "source" in description:
        return "yaml"
    return "vendors " + "+".join(description["vendors"]) if "vendors" in description else "budgets"


def read_sidecar(sidecar_file: str, num_folds: Optional[int] = None) -> dict:
    """``{"folds": {index: description}, "groups": {group: entries}}`` of a sidecar (empty without one), an older
    sidecar read as one group. ``num_folds``: descriptions of folds beyond splits_final.json's are dropped."""
    data = load_json_file(sidecar_file, dict) if os.path.isfile(sidecar_file) else {}
    try:
        folds = {int(i): d for i, d in data.get("folds", {}).items()}
        groups = data.get("groups")
        if groups is None:  # written before groups: one group, its entries at the top level
            entries = {k: v for k, v in data.items() if k != "folds"}
            groups = {d.setdefault("group", _legacy_group(d)): entries for d in folds.values()}
        folds = {i: d for i, d in folds.items() if num_folds is None or i < num_folds}
        return {
            "folds": folds,
            "groups": {g: e for g, e in groups.items() if any(d["group"] == g for d in folds.values())},
        }
    except (AttributeError, KeyError, TypeError, ValueError):
        raise SSPError(f"{sidecar_file}: not a fold description written by nnunet_ssp; remove or restore it") from None


def described_fold(preprocessed_folder: str, fold) -> dict:
    """The sidecar's description of ``fold`` ({} when it describes none)."""
    return read_sidecar(fold_files(preprocessed_folder)[1])["folds"].get(int(fold), {}) if str(fold).isdigit() else {}


def _current(preprocessed_folder: str) -> Tuple[str, list, dict]:
    """(splits_final.json's path, its folds, the sidecar read against them)."""
    splits_file, sidecar_file = fold_files(preprocessed_folder)
    existing = load_json_file(splits_file, list) if os.path.isfile(splits_file) else []
    return splits_file, existing, read_sidecar(sidecar_file, len(existing))


def _placement(splits_file: str, num_folds: int, sidecar: dict, group: str, count: int) -> Tuple[List[int], List[int]]:
    """(old, new) fold indices of ``group`` (see the module docstring); SSPError when other folds follow its old
    ones and their number changes."""
    old = sorted(i for i, d in sidecar["folds"].items() if d["group"] == group)
    if len(old) == count:
        return old, old
    if old and old != list(range(num_folds - len(old), num_folds)):
        raise SSPError(
            f"{splits_file}: the {len(old)} folds of '{group}' (folds {old[0]}-{old[-1]}) are followed by "
            f"other folds, so {count} cannot replace them; remove the file and {SIDECAR} to start over"
        )
    first = old[0] if old else num_folds
    return old, list(range(first, first + count))


def planned_indices(preprocessed_folder: str, group: str, count: int) -> List[int]:
    """The fold indices that writing ``count`` folds of ``group`` would use (also before any file exists)."""
    splits_file, existing, sidecar = _current(preprocessed_folder)
    return _placement(splits_file, len(existing), sidecar, group, count)[1]


def updated_files(
    preprocessed_folder: str, folds: Sequence[dict], descriptions: Sequence[dict], entries: dict
) -> Tuple[list, dict, List[int]]:
    """(splits_final.json, sidecar, fold indices) once ``folds`` replace those of their descriptions' group."""
    splits_file, existing, sidecar = _current(preprocessed_folder)
    group = descriptions[0]["group"]
    old, new = _placement(splits_file, len(existing), sidecar, group, len(folds))
    splits = list(existing) if new == old else existing[: new[0]] + [None] * len(folds)
    for index, fold in zip(new, json.loads(json.dumps(list(folds)))):
        splits[index] = fold
    described = {i: d for i, d in sidecar["folds"].items() if i not in old}
    described.update(zip(new, descriptions))
    updated = {
        "folds": {str(i): described[i] for i in sorted(described)},
        "groups": {**sidecar["groups"], group: entries},
    }
    return splits, json.loads(json.dumps(updated)), new


def files_match(preprocessed_folder: str, folds: Sequence[dict], descriptions: Sequence[dict], entries: dict) -> bool:
    """Whether both files exist and hold exactly what write_folds would write."""
    splits_file, sidecar_file = fold_files(preprocessed_folder)
    if not (os.path.isfile(splits_file) and os.path.isfile(sidecar_file)):
        return False
    splits, sidecar, _ = updated_files(preprocessed_folder, folds, descriptions, entries)
    return load_json_file(splits_file) == splits and load_json_file(sidecar_file) == sidecar


def write_folds(
    preprocessed_folder: str, folds: Sequence[dict], descriptions: Sequence[dict], entries: dict
) -> Dict[int, dict]:
    """Writes ``folds`` in place of their group's and the sidecar (``descriptions`` by fold index, ``entries`` by
    group); returns {fold index: description}."""
    splits, sidecar, indices = updated_files(preprocessed_folder, folds, descriptions, entries)
    splits_file, sidecar_file = fold_files(preprocessed_folder)
    _refuse_to_change_trained_folds(splits_file, splits, os.path.basename(preprocessed_folder))
    save_json_atomic(splits, splits_file)
    save_json_atomic(sidecar, sidecar_file)
    return dict(zip(indices, descriptions))


def _refuse_to_change_trained_folds(splits_file: str, new_folds: Sequence[dict], dataset_name: str) -> None:
    """nnU-Net results are found by fold number alone: a fold that changes its cases while a run trained on the old
    ones is in ``$nnUNet_results/<dataset>/*/fold_N`` would let that run pass for the new fold (the protocol would
    skip it as done). Raises SSPError naming the first such run."""
    results = os.environ.get("nnUNet_results")
    if not (results and os.path.isfile(splits_file)):
        return
    old_folds = load_json_file(splits_file, list)
    new_folds = json.loads(json.dumps(list(new_folds)))
    for index, old in enumerate(old_folds):
        if index < len(new_folds) and new_folds[index] == old:
            continue
        trained = sorted(glob.glob(os.path.join(results, dataset_name, "*", f"fold_{index}")))
        if trained:
            raise SSPError(
                f"{splits_file}: fold {index} would change its cases, but {trained[0]} was trained on the "
                f"old ones; move that dataset's results away (or use another dataset id) first"
            )
