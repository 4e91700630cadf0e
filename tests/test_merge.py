"""``nnunet_ssp merge``: two phantom raw datasets as one, through the CLI."""

import csv
import json
import os

import pytest
from conftest import run_cli

from nnunet_ssp.phantom import CSV_COLUMNS, VOLUME_KEYS, write_phantom_dataset
from nnunet_ssp.raw_layout import SUBFOLDERS

A, B, MERGED = "Dataset601_PhA", "Dataset602_PhB", "Dataset610_Both"


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def rename_subjects(folder):
    """ph001 -> qh001 in every file name and in subjects.csv, without the volume columns (as converters write)."""
    for sub in SUBFOLDERS:
        for name in os.listdir(os.path.join(folder, sub)):
            os.rename(os.path.join(folder, sub, name), os.path.join(folder, sub, "q" + name[1:]))
    columns, rows = read_csv(os.path.join(folder, "subjects.csv"))
    rows = [{**{k: v for k, v in r.items() if k not in VOLUME_KEYS}, "subject": "q" + r["subject"][1:]} for r in rows]
    write_csv(os.path.join(folder, "subjects.csv"), [c for c in columns if c not in VOLUME_KEYS], rows)


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "raw"
    write_phantom_dataset(str(root), 601, "PhA", 3, 1, seed=0, size=48, workers=1)
    write_phantom_dataset(str(root), 602, "PhB", 2, 1, seed=1, size=48, workers=1)
    return str(root)


def merge(raw, *extra, check=True):
    env = dict(os.environ, nnUNet_raw=raw)
    return run_cli(["nnunet_ssp", "merge", "-d", "610", "-n", "Both", "--from", "601", B, *extra], env, check=check)


def assert_refused(result, raw, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    assert sorted(os.listdir(raw)) == [A, B]  # no target, no temporary folder


def test_merge(raw):
    rename_subjects(os.path.join(raw, B))
    result = merge(raw)
    merged = os.path.join(raw, MERGED)
    assert result.stdout.strip() == merged and sorted(os.listdir(raw)) == [A, B, MERGED]
    for sub in SUBFOLDERS:
        sources = {n: os.path.join(raw, d, sub, n) for d in (A, B) for n in os.listdir(os.path.join(raw, d, sub))}
        assert sorted(os.listdir(os.path.join(merged, sub))) == sorted(sources)
        for name, source in sources.items():
            assert open(os.path.join(merged, sub, name), "rb").read() == open(source, "rb").read()
            assert os.path.samefile(os.path.join(merged, sub, name), source)  # hard link (same filesystem)
    assert len(os.listdir(os.path.join(merged, "imagesTr"))) == 2 * (3 + 2)
    assert len(os.listdir(os.path.join(merged, "cineTr"))) == 3 + 2

    columns, rows = read_csv(os.path.join(merged, "subjects.csv"))
    assert columns == list(CSV_COLUMNS) + ["source_dataset"]
    assert [r["subject"] for r in rows] == ["ph001", "ph002", "ph003", "ph004", "qh001", "qh002", "qh003"]
    assert [r["source_dataset"] for r in rows] == [A] * 4 + [B] * 3
    assert rows[0]["lv_edv_ml"] and rows[4]["lv_edv_ml"] == "" and rows[4]["pathology"]
    dataset_json = json.load(open(os.path.join(merged, "dataset.json")))
    source_json = json.load(open(os.path.join(raw, A, "dataset.json")))
    assert dataset_json["numTraining"] == 10 and list(dataset_json["sources"]) == [A, B]
    assert {k: dataset_json[k] for k in ("labels", "channel_names", "file_ending")} == {
        k: source_json[k] for k in ("labels", "channel_names", "file_ending")
    }

    again = merge(raw, check=False)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    merge(raw, "--overwrite")
    assert sorted(os.listdir(raw)) == [A, B, MERGED]


def test_subject_in_two_sources_is_refused(raw):
    assert_refused(
        merge(raw, check=False),
        raw,
        "subject ph001",
        os.path.join(raw, A, "subjects.csv"),
        os.path.join(raw, B, "subjects.csv"),
    )


def test_different_labels_are_refused(raw):
    rename_subjects(os.path.join(raw, B))
    path = os.path.join(raw, B, "dataset.json")
    dataset_json = json.load(open(path))
    dataset_json["labels"]["scar"] = 4
    json.dump(dataset_json, open(path, "w"))
    assert_refused(merge(raw, check=False), raw, f"{path}: labels", os.path.join(raw, A, "dataset.json"))
