"""Folds: label budgets (subjects kept whole, nested per seed, fixed validation), the paper's split files and vendor
subsets, written after existing folds; all on a hand-made raw + preprocessed layout (no nnU-Net preprocessing)."""

import csv
import json
import os

import numpy as np
import pytest
from conftest import run_cli

from nnunet_ssp.errors import SSPError
from nnunet_ssp.fold_files import SIDECAR, write_folds
from nnunet_ssp.splits import (
    development_split,
    make_budget_splits,
    make_folds,
    phase_of_case,
    planned_folds,
    splits_match,
    subject_of_case,
    write_splits,
)

CASES = [f"ph{i:03d}_{phase}" for i in range(1, 21) for phase in ("ED", "ES")]
DATASET = "Dataset950_Unit"
# subject -> (split, vendor): M&Ms-like codes and M&Ms-2-like numbers
SUBJECTS = {
    **{f"A{i}B{i}C{i}": ("train", "A") for i in range(6)},
    **{f"B{i}C{i}D{i}": ("train", "B") for i in range(4)},
    **{str(101 + i): ("train", "C") for i in range(5)},
    "T1T1T1": ("test", "A"),
    "T2T2T2": ("test", "B"),
    "281": ("test", "C"),
}
TRAIN_SUBJECTS = sorted(s for s, (split, _) in SUBJECTS.items() if split == "train")


def ed_es(subjects):
    return [f"{s}_{phase}" for s in sorted(subjects) for phase in ("ED", "ES")]


@pytest.fixture
def dataset(tmp_path):
    """(preprocessed folder, raw folder) of a dataset with SUBJECTS; gt_segmentations holds empty files."""
    raw, pre = tmp_path / "raw" / DATASET, tmp_path / "pre" / DATASET
    for folder in (raw / "imagesTs", pre / "gt_segmentations"):
        folder.mkdir(parents=True)
    (pre / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    for subject, (split, _) in SUBJECTS.items():
        for case in ed_es([subject]):
            (
                raw / "imagesTs" / f"{case}_0000.nii.gz"
                if split == "test"
                else pre / "gt_segmentations" / f"{case}.nii.gz"
            ).touch()
    with open(raw / "subjects.csv", "w", newline="") as f:
        csv.writer(f).writerows(
            [("subject", "split", "vendor", "pathology")]
            + [(s, split, vendor, "NOR") for s, (split, vendor) in SUBJECTS.items()]
        )
    return str(pre), str(raw)


def write_yaml(folder, name, test, train=None, valid=None):
    """A split file as the paper's: sections of dataset keys (mm1: codes, mm2: numbers) with quoted IDs."""

    def section(key, subjects):
        lines = [f'"{key}":']
        for dataset_key, ids in (
            ("mm1", [s for s in subjects if not s.isdigit()]),
            ("mm2", [s for s in subjects if s.isdigit()]),
        ):
            lines += [f'  "{dataset_key}":'] + [f'  - "{s}"' for s in ids] if ids else [f'  "{dataset_key}": []']
        return lines

    lines = section("test", test)
    if train is not None:
        lines += section("train", train) + section("valid", valid)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def read(pre):
    return json.load(open(os.path.join(pre, "splits_final.json"))), json.load(open(os.path.join(pre, SIDECAR)))


def test_subject_and_phase_of_case():
    assert subject_of_case("ph001_ED") == "ph001" and subject_of_case("A1D9Z7_ES") == "A1D9Z7"
    assert subject_of_case("case_07") == "case_07"
    assert (phase_of_case("ph001_ED"), phase_of_case("A1D9Z7_ES"), phase_of_case("case_07")) == ("ED", "ES", None)


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
            assert set(ed_es(subjects)) == set(fold["train"])  # ED+ES together
    assert set(folds[0]["train"]) != set(folds[4]["train"])  # seeds differ
    assert [d["budget"] for d in descriptions] == [2, 5, 10, "all"] * 2


def test_too_large_budget_is_refused():
    with pytest.raises(SSPError, match="budget 30: only 16 training subjects"):
        make_budget_splits(CASES, [30], seeds=[0], num_val=4)


def test_written_after_existing_folds_and_rerun_is_stable(tmp_path):
    existing = [{"train": ["x"], "val": ["y"]}] * 5
    (tmp_path / "splits_final.json").write_text(json.dumps(existing))
    options = {"budgets": ["2", "all"], "seeds": [0], "num_val": 4}
    first = write_folds(str(tmp_path), *make_folds(CASES, options))
    assert list(first) == [5, 6]
    again = write_folds(str(tmp_path), *make_folds(CASES, options))
    splits, sidecar = read(str(tmp_path))
    assert again == first and len(splits) == 7 and splits[:5] == existing
    assert sidecar["folds"]["5"]["budget"] == 2 and len(sidecar["groups"]["budgets"]["val_subjects"]) == 4


def test_budget_folds_of_a_preprocessed_dataset(dataset):
    pre, raw = dataset
    options = {"budgets": ["3", "all"], "seeds": [0, 1], "num_val": 3}
    assert not splits_match(pre, raw, options)
    assert planned_folds(pre, raw, options) == [
        {"fold": i, "budget": b, "seed": s} for i, (s, b) in enumerate((s, b) for s in (0, 1) for b in (3, "all"))
    ]
    written = write_splits(pre, raw, options)
    splits, sidecar = read(pre)
    assert len(splits) == 4 and set(splits[0]["train"]) < set(splits[1]["train"])
    assert set(splits[1]["train"]) | set(splits[1]["val"]) == set(ed_es(TRAIN_SUBJECTS))
    assert splits_match(pre, raw, options) and not splits_match(pre, raw, {**options, "seeds": [0]})
    assert [d["budget"] for d in written.values()] == [3, "all", 3, "all"]


def test_yaml_train_and_valid_are_used_verbatim(dataset, tmp_path):
    pre, raw = dataset
    train, valid = ["A0B0C0", "B1C1D1", "101"], ["A1B1C1", "102"]
    paths = [
        write_yaml(tmp_path, "default-cine-split-nr3-seed2.yaml", ["T1T1T1", "281"], train, valid),
        write_yaml(tmp_path, "default-cine-split.yaml", ["T1T1T1"], train + ["103"], valid),
        write_yaml(tmp_path, "default-cine-split-Vendor-A_B.yaml", [], ["A0B0C0"], ["B1C1D1"]),
        write_yaml(tmp_path, "custom.yaml", [], train, valid),
    ]
    written = write_splits(pre, raw, {"from_yaml": paths})
    splits, sidecar = read(pre)
    assert splits[0] == {"train": ed_es(train), "val": ed_es(valid)}
    assert sidecar["folds"]["0"] == {
        "budget": 3,
        "seed": 2,
        "subjects": sorted(train),
        "source": paths[0],
        "yaml_test_subjects": ["281", "T1T1T1"],
        "group": "yaml",
    }
    identities = [(d["budget"], d["seed"]) for d in written.values()]
    assert identities == [(3, 2), ("all", None), ("vendors:A+B", None), (3, None)]
    assert sidecar["folds"]["2"]["vendors"] == ["A", "B"] and sidecar["groups"] == {"yaml": {}}
    assert planned_folds(pre, raw, {"from_yaml": paths}) == [
        {"fold": i, "budget": b, "seed": s} for i, (b, s) in enumerate(identities)
    ]


def test_yaml_without_valid_splits_the_development_set_like_qcardia(dataset, tmp_path):
    pre, raw = dataset
    path = write_yaml(tmp_path, "default-cine-split.yaml", ["T1T1T1", "T2T2T2", "281"])
    write_splits(pre, raw, {"from_yaml": [path]})
    splits, sidecar = read(pre)
    reference = sorted(TRAIN_SUBJECTS)  # qcardia-data: np.random.seed(0); np.random.shuffle(sorted subjects)
    np.random.seed(0)
    np.random.shuffle(reference)
    num_val = round(0.2 * len(TRAIN_SUBJECTS))
    assert splits == [{"train": ed_es(reference[num_val:]), "val": ed_es(reference[:num_val])}]
    assert development_split(TRAIN_SUBJECTS) == (sorted(reference[num_val:]), sorted(reference[:num_val]))
    assert sidecar["folds"]["0"]["budget"] == "all" and sidecar["folds"]["0"]["seed"] is None


def test_yaml_rerun_changes_nothing(dataset, tmp_path):
    pre, raw = dataset
    existing = [{"train": ["x"], "val": ["y"]}] * 5
    with open(os.path.join(pre, "splits_final.json"), "w") as f:
        json.dump(existing, f)
    paths = [write_yaml(tmp_path, f"s-nr{n}-seed0.yaml", [], TRAIN_SUBJECTS[:n], TRAIN_SUBJECTS[-2:]) for n in (2, 4)]
    options = {"from_yaml": paths}
    assert list(write_splits(pre, raw, options)) == [5, 6]
    before = [open(os.path.join(pre, f), "rb").read() for f in ("splits_final.json", SIDECAR)]
    assert splits_match(pre, raw, options)
    write_splits(pre, raw, options)
    assert [open(os.path.join(pre, f), "rb").read() for f in ("splits_final.json", SIDECAR)] == before
    assert read(pre)[0][:5] == existing


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '"train": {"mm1": ["A0B0C0", "ZZZ999", "YYY888"]}\n"valid": {"mm1": ["A1B1C1"]}\n"test": {}\n',
            "subject(s) YYY888, ZZZ999 are not training subjects of the dataset (2 in all)",
        ),
        (
            '"train": {"mm1": ["A0B0C0"]}\n"valid": {"mm1": ["A0B0C0", "A1B1C1"]}\n',
            "A0B0C0 are in both train and valid",
        ),
        ('"test": {"mm1": ["A0B0C0", "T1T1T1"]}\n', "test subject(s) A0B0C0 are training cases of the dataset"),
        ('"test": {"mm1": ["A0B0C0"]\n', "cannot read split file"),
        ('- "A0B0C0"\n', "expected top-level keys test, train, valid (got list)"),
        ('"training": {"mm1": ["A0B0C0"]}\n', "expected top-level keys test, train, valid (got training)"),
        ('"test": {"mm2": [101]}\n', "'test' must map dataset keys (mm1, mm2, ...) to lists of quoted subject IDs"),
        ('"test": {}\n"train": {"mm1": ["A0B0C0"]}\n', "has 'train' without 'valid'"),
    ],
)
def test_bad_split_files_are_refused_and_nothing_is_written(dataset, tmp_path, content, message):
    pre, raw = dataset
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(SSPError) as error:
        write_splits(pre, raw, {"from_yaml": [str(path)]})
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    assert "\n" not in str(error.value) and not os.path.exists(os.path.join(pre, "splits_final.json"))


def test_vendor_folds(dataset):
    pre, raw = dataset
    options = {"vendors": ["A", "C"], "seeds": [0, 1], "num_val": 2}
    written = write_splits(pre, raw, options)
    splits, sidecar = read(pre)
    vendor_subjects = {s for s, (split, vendor) in SUBJECTS.items() if split == "train" and vendor in ("A", "C")}
    assert len(splits) == 2 and splits[0] == splits[1]  # the seeds repeat the training, the subjects are fixed
    fold = splits[0]
    assert {subject_of_case(c) for c in fold["train"] + fold["val"]} == vendor_subjects
    assert not set(fold["train"]) & set(fold["val"]) and len(fold["val"]) == 2 * 2
    assert sidecar["folds"]["1"] == {
        "budget": "vendors:A+C",
        "seed": 1,
        "vendors": ["A", "C"],
        "subjects": sorted({subject_of_case(c) for c in fold["train"]}),
        "group": "vendors A+C",
    }
    entries = sidecar["groups"]["vendors A+C"]
    assert entries["test_cases_by_vendor"] == {"A": ed_es(["T1T1T1"]), "B": ed_es(["T2T2T2"]), "C": ed_es(["281"])}
    assert sorted(entries["val_subjects"]) == sorted({subject_of_case(c) for c in fold["val"]})
    assert planned_folds(pre, raw, options) == [
        {"fold": i, **{k: d[k] for k in ("budget", "seed")}} for i, d in written.items()
    ]
    assert splits_match(pre, raw, options)


def test_vendor_errors(dataset):
    pre, raw = dataset
    with pytest.raises(SSPError, match=r"no subjects of vendor\(s\) D \(vendors: A, B, C\)"):
        write_splits(pre, raw, {"vendors": ["A", "D"]})
    os.remove(os.path.join(raw, "subjects.csv"))
    with pytest.raises(SSPError, match=f"{os.path.join(raw, 'subjects.csv')}: not found"):
        write_splits(pre, raw, {"vendors": ["A"]})


def test_cli_modes(dataset, tmp_path):
    pre, raw = dataset
    env = dict(
        os.environ,
        nnUNet_raw=os.path.dirname(raw),
        nnUNet_preprocessed=os.path.dirname(pre),
        nnUNet_results=str(tmp_path / "results"),
    )
    path = write_yaml(tmp_path, "default-cine-split-nr2-seed1.yaml", ["281"], ["A0B0C0", "101"], ["A1B1C1"])
    result = run_cli(["nnunet_ssp", "splits", "-d", "950", "--from-yaml", path], env)
    assert "fold 0: budget 2, seed 1: 2 subjects (default-cine-split-nr2-seed1.yaml)" in result.stdout
    both = run_cli(["nnunet_ssp", "splits", "-d", "950", "--budgets", "2", "--vendors", "A"], env, check=False)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    seeds = run_cli(["nnunet_ssp", "splits", "-d", "950", "--from-yaml", path, "--seeds", "1"], env, check=False)
    assert seeds.returncode == 2 and seeds.stderr.strip().startswith("error: --seeds and --val do not apply")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("splits_final.json", '[{"train": ["a"], "val": [', "not valid JSON"),
        ("splits_final.json", '{"train": []}', "expected a JSON list, found dict"),
        (SIDECAR, "not json", "not valid JSON"),
    ],
)
def test_corrupt_existing_split_files_are_named_and_left_alone(dataset, name, content, message):
    pre, raw = dataset
    path = os.path.join(pre, name)
    with open(path, "w") as f:
        f.write(content)
    with pytest.raises(SSPError) as error:
        write_splits(pre, raw, {"budgets": [2]})
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    with open(path) as f:
        assert f.read() == content


def test_folds_with_trained_runs_keep_their_cases(dataset, tmp_path):
    """nnU-Net finds a run by its fold number: new budgets may not give a trained fold other cases."""
    pre, raw = dataset
    results = tmp_path / "results"
    env = dict(
        os.environ,
        nnUNet_raw=os.path.dirname(raw),
        nnUNet_preprocessed=os.path.dirname(pre),
        nnUNet_results=str(results),
    )
    splits = ["nnunet_ssp", "splits", "-d", "950", "--seeds", "0", "--val", "2", "--budgets"]
    run_cli(splits + ["1", "2"], env)
    (results / DATASET / "nnUNetTrainerBaseline__nnUNetPlans__2d" / "fold_1").mkdir(parents=True)
    run_cli(splits + ["1", "2"], env)  # the same folds again: nothing changes
    run_cli(splits + ["1", "2", "4"], env)  # fold 2 is new, folds 0 and 1 keep their cases
    before = read(pre)
    refused = run_cli(splits + ["1", "4"], env, check=False)  # fold 1 would become budget 4
    path = os.path.join(pre, "splits_final.json")
    trained = results / DATASET / "nnUNetTrainerBaseline__nnUNetPlans__2d" / "fold_1"
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"error: {path}: fold 1 would change its cases, but {trained} was trained on the old ones; move that "
        f"dataset's results away (or use another dataset id) first"
    )
    assert read(pre) == before


# ------------------------------------------------------------------------------------------------ phases and groups
def test_phase_folds_hold_one_phase_of_the_unfiltered_folds_subjects(dataset):
    pre, raw = dataset
    options = {"budgets": ["2", "4", "all"], "seeds": [0, 1], "num_val": 2}
    unfiltered = write_splits(pre, raw, options)
    ed = write_splits(pre, raw, {**options, "phases": ["ED"]})
    splits, sidecar = read(pre)
    assert list(unfiltered) == [0, 1, 2, 3, 4, 5] and list(ed) == [6, 7, 8, 9, 10, 11]
    for i, j in zip(unfiltered, ed):
        for part in ("train", "val"):
            assert splits[j][part] == [c for c in splits[i][part] if c.endswith("_ED")] and splits[j][part]
        assert sidecar["folds"][str(j)] == {**sidecar["folds"][str(i)], "phases": ["ED"], "group": "budgets phases=ED"}
    for seed_block in (splits[6:9], splits[9:12]):
        trains = [set(f["train"]) for f in seed_block]
        assert all(a < b for a, b in zip(trains, trains[1:]))  # still nested
    assert sidecar["groups"]["budgets phases=ED"] == sidecar["groups"]["budgets"]
    es_only = make_folds(CASES, {"budgets": [3], "seeds": [0], "num_val": 4, "phases": ["ES", "ES"]})
    assert all(c.endswith("_ES") for c in es_only[0][0]["train"] + es_only[0][0]["val"])
    assert es_only[1][0]["phases"] == ["ES"] and es_only[1][0]["group"] == "budgets phases=ES"


def test_a_subject_without_a_case_of_the_phase_is_named(dataset):
    pre, raw = dataset
    os.remove(os.path.join(pre, "gt_segmentations", "101_ES.nii.gz"))
    with pytest.raises(SSPError) as error:
        write_splits(pre, raw, {"budgets": ["all"], "num_val": 2, "phases": ["ES"]})
    assert str(error.value) == "--phases ES: subject(s) 101 have no training case 101_ES (1 missing)"
    with pytest.raises(SSPError, match=r"^--phases EDV: not a cardiac phase \(expected ED or ES\)$"):
        make_folds(CASES, {"budgets": [2], "phases": ["EDV"]})
    assert not os.path.exists(os.path.join(pre, "splits_final.json"))


def _cli(argv, capsys):
    """``nnunet_ssp ARGV`` through the console script's entry point, in this process: (exit code, stdout, stderr)."""
    from nnunet_ssp.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_budget_phase_and_vendor_groups_coexist_with_stable_indices(dataset, tmp_path, monkeypatch, capsys):
    pre, raw = dataset
    for name, folder in (
        ("nnUNet_raw", os.path.dirname(raw)),
        ("nnUNet_preprocessed", os.path.dirname(pre)),
        ("nnUNet_results", str(tmp_path / "results")),
    ):
        monkeypatch.setenv(name, folder)
    nnunet_folds = [{"train": ["x"], "val": ["y"]}] * 2  # nnU-Net's own folds stay first
    with open(os.path.join(pre, "splits_final.json"), "w") as f:
        json.dump(nnunet_folds, f)
    splits = ["splits", "-d", "950", "--val", "2"]
    budget_folds = [(1, 0), (2, 0), (1, 1), (2, 1)]  # (budget, seed)
    commands = {  # command -> (its options as nnunet_ssp.splits takes them, its folds: index, budget, seed)
        "--budgets 1 2 --seeds 0 1": (
            {"budgets": ["1", "2"], "seeds": [0, 1]},
            [(i, *f) for i, f in zip((2, 3, 4, 5), budget_folds)],
        ),
        "--budgets 1 2 --seeds 0 1 --phases ED": (
            {"budgets": ["1", "2"], "seeds": [0, 1], "phases": ["ED"]},
            [(i, *f) for i, f in zip((6, 7, 8, 9), budget_folds)],
        ),
        "--vendors A B --seeds 0": ({"vendors": ["A", "B"], "seeds": [0]}, [(10, "vendors:A+B", 0)]),
        "--vendors A B --seeds 0 --phases ED": (
            {"vendors": ["A", "B"], "seeds": [0], "phases": ["ED"]},
            [(11, "vendors:A+B", 0)],
        ),
    }
    for command, (options, folds) in commands.items():
        planned = [{"fold": i, "budget": b, "seed": s} for i, b, s in folds]
        assert planned_folds(pre, raw, {**options, "num_val": 2}) == planned  # before writing
        code, out, _ = _cli(splits + command.split(), capsys)
        assert code == 0 and [line.split(":")[0] for line in out.splitlines()[:-1]] == [f"fold {f[0]}" for f in folds]
    assert (
        "fold 6: budget 1, seed 0: 1 subjects, ED only"
        in _cli(splits + "--budgets 1 2 --seeds 0 1 --phases ED".split(), capsys)[1]
    )
    written = [open(os.path.join(pre, f), "rb").read() for f in ("splits_final.json", SIDECAR)]
    final, sidecar = read(pre)
    assert final[:2] == nnunet_folds and len(final) == 12
    assert list(sidecar["groups"]) == ["budgets", "budgets phases=ED", "vendors A+B", "vendors A+B phases=ED"]
    for command, (options, folds) in commands.items():  # re-running changes nothing
        assert splits_match(pre, raw, {**options, "num_val": 2})
        assert [d["fold"] for d in planned_folds(pre, raw, {**options, "num_val": 2})] == [f[0] for f in folds]
        assert _cli(splits + command.split(), capsys)[0] == 0
    assert [open(os.path.join(pre, f), "rb").read() for f in ("splits_final.json", SIDECAR)] == written

    code, _, err = _cli(splits + "--budgets 1 2 4 --seeds 0 1".split(), capsys)  # 6 folds where 4 are, not last
    assert code == 2 and err == (
        f"error: {os.path.join(pre, 'splits_final.json')}: the 4 folds of 'budgets' (folds "
        f"2-5) are followed by other folds, so 6 cannot replace them; remove the file and "
        f"{SIDECAR} to start over\n"
    )
    assert _cli(splits + "--vendors A B --seeds 0 1 --phases ED".split(), capsys)[0] == 0  # the last group grows
    final, sidecar = read(pre)
    assert len(final) == 13 and final[11] == final[12]
    assert [sidecar["folds"][str(i)]["seed"] for i in (11, 12)] == [0, 1]
    assert _cli(splits + "--budgets 1 3 --seeds 0 1 --phases ED".split(), capsys)[0] == 0  # in place, as many
    changed = read(pre)[0]
    assert [i for i in range(13) if changed[i] != final[i]] == [7, 9]  # budget 2 -> 3 of seeds 0 and 1

    trained = tmp_path / "results" / DATASET / "nnUNetTrainerBaseline__nnUNetPlans__2d" / "fold_7"
    trained.mkdir(parents=True)
    before = read(pre)
    code, _, err = _cli(splits + "--budgets 1 2 --seeds 0 1 --phases ED".split(), capsys)
    assert code == 2 and err.count("\n") == 1 and f"fold 7 would change its cases, but {trained} was trained" in err
    assert read(pre) == before


def test_a_sidecar_written_before_groups_is_read_as_one_group(dataset):
    """An older sidecar (no group, its entries at the top level) keeps its folds' indices when another group is
    written; its descriptions and entries move into the group named from them."""
    pre, raw = dataset
    options = {"budgets": ["2", "all"], "seeds": [0], "num_val": 2}
    write_splits(pre, raw, options)
    splits, sidecar = read(pre)
    old = {
        "folds": {i: {k: v for k, v in d.items() if k != "group"} for i, d in sidecar["folds"].items()},
        **sidecar["groups"]["budgets"],
    }
    with open(os.path.join(pre, SIDECAR), "w") as f:
        json.dump(old, f)
    assert not splits_match(pre, raw, options)  # the command is run again, to write the new format
    assert list(write_splits(pre, raw, {"vendors": ["C"], "num_val": 1})) == [2]
    new_splits, new_sidecar = read(pre)
    assert new_splits[:2] == splits and new_sidecar["groups"]["budgets"] == sidecar["groups"]["budgets"]
    assert {i: new_sidecar["folds"][i] for i in ("0", "1")} == sidecar["folds"]
    assert splits_match(pre, raw, options)


def test_cli_refuses_bad_phases_in_one_line(dataset, tmp_path, capsys):
    pre, raw = dataset
    from nnunet_ssp.cli import main

    for argv in (
        ["splits", "-d", "950", "--budgets", "2", "--phases", "ED", "mid"],
        ["evaluate", str(tmp_path), "-d", "950", "--phases", "es"],
    ):
        with pytest.raises(SystemExit) as exit_code:
            main(argv)
        err = capsys.readouterr().err
        assert exit_code.value.code == 2 and err.count("\n") == 1, err
        assert "argument --phases: invalid choice: " in err and "(choose from ED, ES)" in err.replace("'", "")
