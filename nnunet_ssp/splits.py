"""Folds for nnU-Net: label budgets, the paper's split files and vendor subsets, optionally of one cardiac phase.

Folds go into ``$nnUNet_preprocessed/<Dataset>/splits_final.json`` (nnU-Net reads fold k from entry k). Subjects, not
cases, are assigned, so the ED and ES cases (``<subject>_ED``, ``<subject>_ES``) of a subject stay together. One mode
per call (``options`` holds exactly one of these keys):

- ``budgets`` (+ ``seeds``, ``num_val``): one fold per (seed, budget), budgets nested within a seed
  (10 ⊂ 15 ⊂ 25 ⊂ 50 ⊂ all), one fixed validation set. Description ``{budget, seed, subjects}``; the group's
  entries hold ``val_subjects``.
- ``from_yaml``: one fold per split file of the paper (``data/subject_splits/*.yaml`` of ssp-cmr-cine-segmentation:
  top-level ``test``, ``train``, ``valid``, each mapping a dataset key such as ``mm1`` or ``mm2`` to subject IDs).
  ``train`` and ``valid`` are used as they are; a file without them splits the development set (every training
  subject of the dataset) as qcardia-data's ``split_data_from_config`` does: sorted, shuffled by
  ``np.random.seed(0); np.random.shuffle``, the first round(0.2·n) for validation. qcardia-data sorts
  ``<dataset key>-<subject>`` strings; we sort bare subject IDs (a subject's dataset key is unknown here), which gives
  the same split for a file with one dataset key but not for M&Ms + M&Ms-2 together. Test subjects must not be
  training cases of the dataset; they are recorded, not written (nnU-Net folds have train and val only).
  Description ``{budget, seed, [vendors], subjects, source, yaml_test_subjects}``, budget and seed from the file
  name (``-nr10`` -> 10, ``-seed2`` -> 2, ``-Vendor-A_B`` -> ``"vendors:A+B"``, "all" for a default or full split or
  a file without train/valid, else the number of train subjects; seed null unless named).
- ``vendors`` (+ ``seeds``, ``num_val``): the domain-shift folds: per seed, every training subject of those vendors
  (``$nnUNet_raw/<Dataset>/subjects.csv``) minus one fixed validation set of them. Description
  ``{budget: "vendors:A+B", seed, vendors, subjects}``; the group's entries hold ``val_subjects`` and
  ``test_cases_by_vendor`` (the imagesTs cases of each vendor's test subjects).

``phases`` (ED and/or ES, with any mode: the paper's ``special_mode: ed_only | es_only``) keeps only the
``<subject>_<phase>`` cases of those phases in train and val; the subjects are those the mode chooses without it, so
budgets stay nested and an ED fold has its unfiltered fold's subjects. Its descriptions add ``phases``.

Every description names its **group**, the options without seeds and budgets: ``budgets``, ``budgets phases=ED``,
``vendors A+B``, ``vendors A+B phases=ED``, ``yaml`` (:func:`fold_group`). Groups coexist in one splits_final.json:
writing replaces only the folds of its own group, and folds of other groups and nnU-Net's own folds keep their
indices, so re-running with the same options changes nothing. The sidecar ``splits_ssp.json`` holds the descriptions
by fold index and each group's entries (``val_subjects``, ``test_cases_by_vendor``)::

    {"folds": {"<index>": {..., "group": "budgets"}}, "groups": {"budgets": {"val_subjects": [...]}}}

``nnunet_ssp/fold_files.py`` owns both files: where a group's folds go, older sidecars, trained folds.
"""

import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ssp.errors import SSPError
from nnunet_ssp.fold_files import files_match, planned_indices, write_folds
from nnunet_ssp.io import load_json_file
from nnunet_ssp.raw_layout import PHASES

VALIDATION_SEED = 12345
YAML_VALIDATION_SEED = 0  # qcardia-data's valid_split_seed
YAML_VALIDATION_FRACTION = 0.2  # qcardia-data's valid_partition
SPLIT_KEYS = ("test", "train", "valid")
MODES = ("budgets", "from_yaml", "vendors")
_PHASE_SUFFIX = re.compile(r"_(ED|ES)$")
_NAME_BUDGET = re.compile(r"-nr(\d+)(?=-|$)")
_NAME_SEED = re.compile(r"-seed(\d+)(?=-|$)")
_NAME_VENDORS = re.compile(r"-vendor-([a-z0-9]+(?:_[a-z0-9]+)*)(?=-|$)", re.IGNORECASE)
_NAME_FULL = re.compile(r"(^|-)(default|full)(-|$)")


def subject_of_case(case: str) -> str:
    """``ph001_ED`` -> ``ph001``; a case without an ED/ES suffix is its own subject."""
    return _PHASE_SUFFIX.sub("", case)


def phase_of_case(case: str) -> Optional[str]:
    """``ph001_ED`` -> ``ED``; None for a case without an ED/ES suffix."""
    match = _PHASE_SUFFIX.search(case)
    return match.group(1) if match else None


def normalized_phases(phases: Optional[Sequence[str]]) -> Optional[List[str]]:
    """Phases in ED, ES order without repeats; None for none. An unknown phase is an SSPError."""
    unknown = [p for p in phases or () if p not in PHASES]
    if unknown:
        raise SSPError(f"--phases {unknown[0]}: not a cardiac phase (expected {' or '.join(PHASES)})")
    return [p for p in PHASES if p in (phases or ())] or None


def cases_by_subject(cases: Sequence[str]) -> "OrderedDict[str, List[str]]":
    grouped = OrderedDict()
    for case in sorted(cases):
        grouped.setdefault(subject_of_case(case), []).append(case)
    return grouped


def _few(items: Sequence[str], shown: int = 3) -> str:
    """``a, b, c and 4 more``."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _budget(value):
    """A budget as given (``"10"``, 10 or ``"all"``) -> 10 or "all"."""
    if value == "all":
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SSPError(f"budget {value!r}: expected a number of subjects or 'all'") from None


def _budget_identities(budgets: Sequence, seeds: Sequence[int]) -> List[dict]:
    return [{"budget": _budget(b), "seed": int(s)} for s in seeds for b in budgets]


def _vendor_identity(vendors: Sequence[str], seed) -> dict:
    return {"budget": "vendors:" + "+".join(vendors), "seed": seed, "vendors": list(vendors)}


def make_budget_splits(cases: Sequence[str], budgets: Sequence, seeds: Sequence[int], num_val: int = None):
    """(folds, descriptions, validation subjects): one fold per (seed, budget), budgets an int or 'all'."""
    grouped = cases_by_subject(cases)
    subjects = list(grouped)
    num_val = max(1, round(0.2 * len(subjects))) if num_val is None else num_val
    if not 0 < num_val < len(subjects):
        raise SSPError(
            f"--val {num_val}: needs at least one validation and one training subject ({len(subjects)} subjects)"
        )
    order = np.random.default_rng(VALIDATION_SEED).permutation(len(subjects))
    val_subjects = sorted(subjects[i] for i in order[:num_val])
    pool = [s for s in subjects if s not in set(val_subjects)]
    identities = _budget_identities(budgets, seeds)
    too_big = [d["budget"] for d in identities if d["budget"] != "all" and not 0 < d["budget"] <= len(pool)]
    if too_big:
        raise SSPError(
            f"budget {too_big[0]}: only {len(pool)} training subjects are left after {num_val} validation subjects"
        )
    val_cases = [c for s in val_subjects for c in grouped[s]]
    ranked = {d["seed"]: [pool[i] for i in np.random.default_rng(d["seed"]).permutation(len(pool))] for d in identities}
    folds, descriptions = [], []
    for identity in identities:
        size = len(pool) if identity["budget"] == "all" else identity["budget"]
        train_subjects = sorted(ranked[identity["seed"]][:size])
        folds.append({"train": [c for s in train_subjects for c in grouped[s]], "val": val_cases})
        descriptions.append({**identity, "subjects": train_subjects})
    return folds, descriptions, val_subjects


# ------------------------------------------------------------------------------------------------ split files
def read_split_file(path: str) -> Dict[str, List[str]]:
    """The sections (test, train, valid) of a split YAML, each with the subject IDs of all its dataset keys."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SSPError(f"{path}: cannot read split file ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict) or not data or not set(data) <= set(SPLIT_KEYS):
        got = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__ if data is not None else ""
        raise SSPError(f"{path}: expected top-level keys test, train, valid (got {got or 'nothing'})")
    split = {}
    for section, datasets in data.items():
        if not (
            isinstance(datasets, dict)
            and all(isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in datasets.values())
        ):
            raise SSPError(f"{path}: '{section}' must map dataset keys (mm1, mm2, ...) to lists of quoted subject IDs")
        split[section] = sorted({i for ids in datasets.values() for i in ids})
    if ("train" in split) != ("valid" in split):
        raise SSPError(
            f"{path}: has '{'train' if 'train' in split else 'valid'}' without "
            f"'{'valid' if 'train' in split else 'train'}'; give both, or neither to split the "
            f"development set 80/20"
        )
    return split


def _yaml_identity(path: str, split: Dict[str, List[str]]) -> dict:
    """Budget and seed of a split file from its name (see the module docstring)."""
    stem = re.sub(r"\.ya?ml$", "", os.path.basename(path), flags=re.IGNORECASE)
    seed = _NAME_SEED.search(stem)
    identity = {"budget": None, "seed": int(seed.group(1)) if seed else None}
    budget, vendors = _NAME_BUDGET.search(stem), _NAME_VENDORS.search(stem)
    if budget:
        identity["budget"] = int(budget.group(1))
    elif vendors:
        identity = _vendor_identity(vendors.group(1).split("_"), identity["seed"])
    elif "train" not in split or _NAME_FULL.search(stem.lower()):
        identity["budget"] = "all"
    else:
        identity["budget"] = len(split["train"])
    return identity


def development_split(subjects: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(train, validation) as qcardia-data splits a development set: sorted, shuffled with NumPy's legacy
    generator seeded 0, the first round(0.2·n) for validation."""
    order = sorted(subjects)
    np.random.RandomState(YAML_VALIDATION_SEED).shuffle(order)
    num_val = round(YAML_VALIDATION_FRACTION * len(order))
    return sorted(order[num_val:]), sorted(order[:num_val])


def yaml_fold(path: str, cases: Sequence[str]) -> Tuple[dict, dict]:
    """(fold, description) of one split file for a dataset's training ``cases``."""
    path = os.path.abspath(path)
    split = read_split_file(path)
    grouped = cases_by_subject(cases)
    leaked = [s for s in split.get("test", []) if s in grouped]
    if leaked:
        raise SSPError(
            f"{path}: test subject(s) {_few(leaked)} are training cases of the dataset ({len(leaked)} in all)"
        )
    if "train" in split:
        train, val = split["train"], split["valid"]
        unknown = [s for s in train + val if s not in grouped]
        if unknown:
            raise SSPError(
                f"{path}: subject(s) {_few(unknown)} are not training subjects of the dataset ({len(unknown)} in all)"
            )
        both = sorted(set(train) & set(val))
        if both:
            raise SSPError(f"{path}: subject(s) {_few(both)} are in both train and valid")
    else:
        train, val = development_split(list(grouped))
    if not train or not val:
        raise SSPError(f"{path}: needs at least one train and one valid subject")
    fold = {"train": [c for s in train for c in grouped[s]], "val": [c for s in val for c in grouped[s]]}
    return fold, {
        **_yaml_identity(path, split),
        "subjects": train,
        "source": path,
        "yaml_test_subjects": split.get("test", []),
    }


# ---------------------------------------------------------------------------------------------------- vendors
def vendor_folds(
    cases: Sequence[str],
    raw_folder: str,
    file_ending: str,
    vendors: Sequence[str],
    seeds: Sequence[int],
    num_val: int = None,
):
    """(folds, descriptions, sidecar entries) of the vendor subsets (see the module docstring)."""
    from nnunet_ssp.raw_layout import IMAGES_TS, SUBJECTS_TABLE, TEST, read_vendor_table

    table_path = os.path.join(raw_folder, SUBJECTS_TABLE)
    table = read_vendor_table(table_path, vendors)
    grouped = cases_by_subject(cases)
    missing = [s for s in grouped if s not in table]
    if missing:
        raise SSPError(f"{table_path}: no row for training subject(s) {_few(missing)} ({len(missing)} in all)")
    selected = [c for s, group in grouped.items() if table[s].vendor in vendors for c in group]
    folds, descriptions, val_subjects = make_budget_splits(selected, ["all"], seeds, num_val)
    descriptions = [{**_vendor_identity(vendors, d["seed"]), "subjects": d["subjects"]} for d in descriptions]
    test_folder = os.path.join(raw_folder, IMAGES_TS)
    suffix = "_0000" + file_ending
    test_cases = (
        sorted(f[: -len(suffix)] for f in os.listdir(test_folder) if f.endswith(suffix))
        if os.path.isdir(test_folder)
        else []
    )
    by_vendor = {}
    for case in test_cases:
        row = table.get(subject_of_case(case))
        if row and row.split == TEST:
            by_vendor.setdefault(row.vendor, []).append(case)
    return folds, descriptions, {"val_subjects": val_subjects, "test_cases_by_vendor": by_vendor}


# -------------------------------------------------------------------------------------------- modes and groups
def _mode(options: dict) -> str:
    modes = [m for m in MODES if options.get(m)]
    if len(modes) != 1:
        raise SSPError(f"give exactly one of budgets, from_yaml, vendors (got {', '.join(modes) or 'none'})")
    return modes[0]


def fold_group(options: dict) -> str:
    """The group of the folds ``options`` give: the options without seeds and budgets (see the module docstring)."""
    mode, phases = _mode(options), normalized_phases(options.get("phases"))
    name = {"budgets": "budgets", "from_yaml": "yaml"}.get(mode) or "vendors " + "+".join(options["vendors"])
    return name + (f" phases={'+'.join(phases)}" if phases else "")


def fold_identities(options: dict) -> List[dict]:
    """{budget, seed[, vendors]} of each fold ``options`` give, in fold order; needs no preprocessed data."""
    mode, seeds = _mode(options), options.get("seeds") or [0]
    if mode == "from_yaml":
        return [_yaml_identity(p, read_split_file(p)) for p in options["from_yaml"]]
    if mode == "vendors":
        return [_vendor_identity(options["vendors"], s) for s in seeds]
    return _budget_identities(options["budgets"], seeds)


def phase_folds(folds: Sequence[dict], cases: Sequence[str], phases: Sequence[str]) -> List[dict]:
    """``folds`` with only the ``<subject>_<phase>`` cases of ``phases`` of their subjects; SSPError naming the
    subjects that lack one."""
    available, filtered = set(cases), []
    for fold in folds:
        kept = {
            part: [f"{s}_{p}" for s in dict.fromkeys(map(subject_of_case, fold[part])) for p in phases]
            for part in ("train", "val")
        }
        missing = [c for part in kept.values() for c in part if c not in available]
        if missing:
            subjects = sorted({subject_of_case(c) for c in missing})
            raise SSPError(
                f"--phases {' '.join(phases)}: subject(s) {_few(subjects)} have no training case "
                f"{_few(missing)} ({len(missing)} missing)"
            )
        filtered.append(kept)
    return filtered


def _mode_folds(cases: Sequence[str], options: dict, raw_folder: str, file_ending: str):
    """make_folds without the phase filter."""
    mode, seeds, num_val = _mode(options), options.get("seeds") or [0], options.get("num_val")
    if mode == "from_yaml":
        folds, descriptions = zip(*(yaml_fold(p, cases) for p in options["from_yaml"]))
        return list(folds), list(descriptions), {}
    if mode == "vendors":
        if raw_folder is None:
            raise SSPError("vendor folds need the raw dataset: set nnUNet_raw")
        return vendor_folds(cases, raw_folder, file_ending, options["vendors"], seeds, num_val)
    folds, descriptions, val_subjects = make_budget_splits(cases, options["budgets"], seeds, num_val)
    return folds, descriptions, {"val_subjects": val_subjects}


def make_folds(cases: Sequence[str], options: dict, raw_folder: str = None, file_ending: str = ".nii.gz"):
    """(folds, descriptions, group entries) for the training ``cases`` of a dataset; ``raw_folder`` (its raw
    dataset) is needed for vendors. Each description names its group (and phases, when filtered)."""
    phases, group = normalized_phases(options.get("phases")), fold_group(options)
    folds, descriptions, entries = _mode_folds(cases, options, raw_folder, file_ending)
    if phases:
        folds = phase_folds(folds, cases, phases)
    return folds, [{**d, **({"phases": phases} if phases else {}), "group": group} for d in descriptions], entries


def training_cases(preprocessed_folder: str) -> Tuple[List[str], str]:
    """(training cases, file ending) of a preprocessed dataset, from the names in its gt_segmentations."""
    dataset_json = os.path.join(preprocessed_folder, "dataset.json")
    if not os.path.isfile(dataset_json):
        raise SSPError(
            f"{preprocessed_folder}: not preprocessed; run nnUNetv2_plan_and_preprocess for this dataset first"
        )
    ending = load_json_file(dataset_json, dict).get("file_ending")
    if not isinstance(ending, str):
        raise SSPError(f"{dataset_json}: no file_ending; re-run nnUNetv2_plan_and_preprocess")
    gt = os.path.join(preprocessed_folder, "gt_segmentations")
    cases = [f[: -len(ending)] for f in sorted(os.listdir(gt)) if f.endswith(ending)] if os.path.isdir(gt) else []
    if not cases:
        raise SSPError(f"{gt}: no training cases; run nnUNetv2_plan_and_preprocess first")
    return cases, ending


# ------------------------------------------------------------------------------------------------------ files
def write_splits(preprocessed_folder: str, raw_folder: str, options: dict) -> Dict[int, dict]:
    """Writes the folds ``options`` give for a preprocessed dataset; returns {fold index: description}."""
    cases, ending = training_cases(preprocessed_folder)
    return write_folds(preprocessed_folder, *make_folds(cases, options, raw_folder, ending))


def splits_match(preprocessed_folder: str, raw_folder: str, options: dict) -> bool:
    """Whether splits_final.json and the sidecar hold exactly what write_splits would write (False before
    preprocessing)."""
    try:
        cases, ending = training_cases(preprocessed_folder)
    except SSPError:
        return False
    return files_match(preprocessed_folder, *make_folds(cases, options, raw_folder, ending))


def planned_folds(preprocessed_folder: str, raw_folder: str, options: dict) -> List[dict]:
    """[{fold, budget, seed}] that write_splits writes (or wrote) for ``options``, also before preprocessing;
    ``raw_folder`` is not needed (same signature as splits_match)."""
    identities = fold_identities(options)
    indices = planned_indices(preprocessed_folder, fold_group(options), len(identities))
    return [{"fold": i, "budget": d["budget"], "seed": d["seed"]} for i, d in zip(indices, identities)]
