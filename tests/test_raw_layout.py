"""The raw-layout contract: subjects.csv written and read back (old phantom tables included), its refusals, and
dataset.json through nnU-Net's helper."""

import json
import os

import pytest

from nnunet_ssp.errors import SSPError
from nnunet_ssp.raw_layout import (
    LABELS,
    SUBJECT_COLUMNS,
    SubjectRow,
    build_into_place,
    read_subjects,
    read_vendor_table,
    write_dataset_json,
    write_subjects,
)


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_subjects_table_round_trip(tmp_path):
    rows = [
        SubjectRow(
            "a01", "train", "A", "NOR", 25, 0, 9, 11, (1.25, 1.25, 10.0), "base_first", {"lv_edv_ml": "140.125"}
        ),
        SubjectRow("b02", "unlabeled", "B", extra={"source_dataset": "Dataset1_X"}),
    ]
    path = write_subjects(str(tmp_path), rows)
    with open(path, encoding="utf-8") as f:
        header, first, second = f.read().splitlines()
    assert header.split(",") == list(SUBJECT_COLUMNS) + ["lv_edv_ml", "source_dataset"]
    assert first == "a01,train,A,NOR,25,0,9,11,1.25,1.25,10,base_first,140.125,"
    assert second == "b02,unlabeled,B,,,,,,,,,,,Dataset1_X"
    back = read_subjects(path)
    assert back[0] == SubjectRow(**{**rows[0].__dict__, "extra": {"lv_edv_ml": "140.125", "source_dataset": ""}})
    assert back[1] == SubjectRow(**{**rows[1].__dict__, "extra": {"lv_edv_ml": "", "source_dataset": "Dataset1_X"}})


def test_old_phantom_tables_read_phenotype_as_pathology(tmp_path):
    path = write_text(tmp_path / "subjects.csv", "subject,split,vendor,phenotype,ed_frame\nph001,train,A,dilated,3\n")
    (row,) = read_subjects(path)
    assert (row.pathology, row.ed_frame, row.es_frame, row.spacing_mm) == ("dilated", 3, None, None)


@pytest.mark.parametrize(
    "text, message",
    [
        ("split,vendor\ntrain,A\n", "no column 'subject'"),
        ("subject,split\nx,train\n", "no column 'vendor'"),
        ("subject,split,vendor\nx,train,A\nx,test,A\n", "subject x appears twice"),
        ("subject,split,vendor,ed_frame\nx,train,A,first\n", "ed_frame of subject x is not a number: 'first'"),
    ],
)
def test_bad_subjects_tables_name_the_file_and_the_problem(tmp_path, text, message):
    path = write_text(tmp_path / "subjects.csv", text)
    with pytest.raises(SSPError) as err:
        read_subjects(path, required=("split", "vendor"))
    assert str(err.value).startswith(path + ": ") and message in str(err.value) and "\n" not in str(err.value)


def test_vendor_table_refuses_an_unknown_vendor(tmp_path):
    path = write_text(tmp_path / "subjects.csv", "subject,split,vendor\nx,train,A\ny,test,B\n")
    assert sorted(read_vendor_table(path, ["B"])) == ["x", "y"]
    with pytest.raises(SSPError, match="no subjects of vendor\\(s\\) C \\(vendors: A, B\\)"):
        read_vendor_table(path, ["B", "C"])


def test_dataset_json_is_nnunets_with_the_layout_keys(tmp_path):
    write_dataset_json(str(tmp_path), "Demo", "a test", 6, phantom={"seed": 1})
    with open(tmp_path / "dataset.json", encoding="utf-8") as f:
        dataset_json = json.load(f)
    assert dataset_json["labels"] == LABELS and dataset_json["channel_names"] == {"0": "cineMRI"}
    assert (dataset_json["numTraining"], dataset_json["file_ending"]) == (6, ".nii.gz")
    assert (dataset_json["cine_folder"], dataset_json["subjects_table"]) == ("cineTr", "subjects.csv")
    assert (dataset_json["name"], dataset_json["phantom"]) == ("Demo", {"seed": 1})


def test_build_into_place_leaves_nothing_on_error_and_replaces_on_success(tmp_path):
    target = str(tmp_path / "Dataset001_X")
    os.mkdir(target)
    write_text(os.path.join(target, "old"), "old")

    def failing(folder):
        write_text(os.path.join(folder, "half"), "half")
        raise SSPError("stop")

    with pytest.raises(SSPError, match="stop"):
        build_into_place(target, failing)
    assert os.listdir(tmp_path) == ["Dataset001_X"] and os.listdir(target) == ["old"]
    build_into_place(target, lambda folder: write_text(os.path.join(folder, "new"), "new"))
    assert os.listdir(tmp_path) == ["Dataset001_X"] and os.listdir(target) == ["new"]
