"""Label-budget splits: subjects kept whole, nested budgets per seed, a fixed validation set."""
import json
import os

import pytest

from nnunet_ssp.errors import SSPError
from nnunet_ssp.splits import SIDECAR, make_budget_splits, subject_of_case, write_budget_splits

CASES = [f"ph{i:03d}_{phase}" for i in range(1, 21) for phase in ("ED", "ES")]


def test_subject_of_case():
    assert subject_of_case("ph001_ED") == "ph001" and subject_of_case("A1D9Z7_ES") == "A1D9Z7"
    assert subject_of_case("case_07") == "case_07"


def test_budgets_are_nested_within_a_seed_and_disjoint_from_validation():
    folds, descriptions, val = make_budget_splits(CASES, [2, 5, 10, "all"], seeds=[0, 1], num_val=4)
    assert len(val) == 4 and len(folds) == 8
    for seed_block in (folds[:4], folds[4:]):
        trains = [set(f["train"]) for f in seed_block]
        assert all(a < b for a, b in zip(trains, trains[1:]))  # strictly nested
        assert len(trains[-1]) == 2 * 16
        for fold in seed_block:
            assert fold["val"] == seed_block[0]["val"] and not set(fold["train"]) & set(fold["val"])
            subjects = {subject_of_case(c) for c in fold["train"]}
            assert {c for s in subjects for c in (f"{s}_ED", f"{s}_ES")} == set(fold["train"])  # ED+ES together
    assert set(folds[0]["train"]) != set(folds[4]["train"])  # seeds differ
    assert [d["budget"] for d in descriptions] == [2, 5, 10, "all"] * 2


def test_too_large_budget_is_refused():
    with pytest.raises(SSPError, match="budget 30: only 16 training subjects"):
        make_budget_splits(CASES, [30], seeds=[0], num_val=4)


def test_written_after_existing_folds_and_rerun_is_stable(tmp_path):
    existing = [{"train": ["x"], "val": ["y"]}] * 5
    (tmp_path / "splits_final.json").write_text(json.dumps(existing))
    first = write_budget_splits(str(tmp_path), CASES, [2, "all"], [0], num_val=4)
    assert list(first) == [5, 6]
    again = write_budget_splits(str(tmp_path), CASES, [2, "all"], [0], num_val=4)
    splits = json.load(open(tmp_path / "splits_final.json"))
    assert again == first and len(splits) == 7 and splits[:5] == existing
    sidecar = json.load(open(os.path.join(tmp_path, SIDECAR)))
    assert sidecar["folds"]["5"]["budget"] == 2 and len(sidecar["val_subjects"]) == 4
