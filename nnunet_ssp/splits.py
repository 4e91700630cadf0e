"""Label-budget splits for nnU-Net: nested subject subsets per seed, one fixed validation set.

Folds go into ``$nnUNet_preprocessed/<Dataset>/splits_final.json`` (nnU-Net reads fold k from entry k) and a
sidecar ``splits_ssp.json`` maps each fold index to its (budget, seed). Subjects, not cases, are sampled, so the
ED and ES cases of a subject stay together. Within a seed the subsets are nested (10 ⊂ 15 ⊂ 25 ⊂ 50 ⊂ all).
"""
import os
import re
from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import save_json_atomic

SIDECAR = "splits_ssp.json"
VALIDATION_SEED = 12345
_PHASE_SUFFIX = re.compile(r"_(ED|ES)$")


def subject_of_case(case: str) -> str:
    """``ph001_ED`` -> ``ph001``; a case without an ED/ES suffix is its own subject."""
    return _PHASE_SUFFIX.sub("", case)


def cases_by_subject(cases: Sequence[str]) -> "OrderedDict[str, List[str]]":
    grouped = OrderedDict()
    for case in sorted(cases):
        grouped.setdefault(subject_of_case(case), []).append(case)
    return grouped


def make_budget_splits(cases: Sequence[str], budgets: Sequence, seeds: Sequence[int], num_val: int = None):
    """(folds, descriptions, validation subjects): one fold per (seed, budget), budgets an int or 'all'."""
    grouped = cases_by_subject(cases)
    subjects = list(grouped)
    num_val = max(1, round(0.2 * len(subjects))) if num_val is None else num_val
    if not 0 < num_val < len(subjects):
        raise SSPError(f"--val {num_val}: needs at least one validation and one training subject "
                       f"({len(subjects)} subjects)")
    order = np.random.default_rng(VALIDATION_SEED).permutation(len(subjects))
    val_subjects = sorted(subjects[i] for i in order[:num_val])
    pool = [s for s in subjects if s not in set(val_subjects)]
    sizes = [len(pool) if b == "all" else int(b) for b in budgets]
    too_big = [s for s in sizes if not 0 < s <= len(pool)]
    if too_big:
        raise SSPError(f"budget {too_big[0]}: only {len(pool)} training subjects are left after {num_val} "
                       f"validation subjects")
    val_cases = [c for s in val_subjects for c in grouped[s]]
    folds, descriptions = [], []
    for seed in seeds:
        ranked = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
        for budget, size in zip(budgets, sizes):
            train_subjects = sorted(ranked[:size])
            folds.append({"train": [c for s in train_subjects for c in grouped[s]], "val": val_cases})
            descriptions.append({"budget": budget, "seed": int(seed), "subjects": train_subjects})
    return folds, descriptions, val_subjects


def write_budget_splits(preprocessed_folder: str, cases: Sequence[str], budgets: Sequence, seeds: Sequence[int],
                        num_val: int = None) -> Dict[int, dict]:
    """Writes the folds after any folds nnU-Net or a user already had; returns {fold index: description}.

    Re-running with the same arguments changes nothing; folds this tool wrote before are replaced.
    """
    splits_file = os.path.join(preprocessed_folder, "splits_final.json")
    sidecar_file = os.path.join(preprocessed_folder, SIDECAR)
    existing = load_json(splits_file) if os.path.isfile(splits_file) else []
    ours = load_json(sidecar_file)["folds"] if os.path.isfile(sidecar_file) else {}
    kept = [fold for i, fold in enumerate(existing) if str(i) not in ours]
    if len(kept) != len(existing) and any(int(i) < len(kept) for i in ours):
        raise SSPError(f"{splits_file}: folds written by nnunet_ssp are not the last entries; remove the file "
                       f"and {SIDECAR} to start over")
    folds, descriptions, val_subjects = make_budget_splits(cases, budgets, seeds, num_val)
    first = len(kept)
    sidecar = {"folds": {str(first + i): d for i, d in enumerate(descriptions)}, "val_subjects": val_subjects}
    save_json_atomic(kept + folds, splits_file)
    save_json_atomic(sidecar, sidecar_file)
    return {first + i: d for i, d in enumerate(descriptions)}
