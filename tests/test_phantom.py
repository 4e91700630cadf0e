"""The cine phantom: nnU-Net raw layout, geometry, anatomy of the labels, the subjects table against the label
files, determinism, refusals, cardiac timing and phenotypes, tissue contrast."""

import csv
import hashlib
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ssp.errors import SSPError
from nnunet_ssp.phantom import (
    CSV_COLUMNS,
    DEFAULT_SIZE,
    PHANTOM_VERSION,
    PHENOTYPES,
    VENDORS,
    contraction_curve,
    simulate_subject,
    subject_rng,
    write_phantom_dataset,
)
from nnunet_ssp.phantom import dataset as dataset_module

SEED, SIZE, N_TRAIN, N_TEST = 3, 64, 3, 1
DATASET = "Dataset742_Unit"


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    path = write_phantom_dataset(str(root), 742, "Unit", N_TRAIN, N_TEST, seed=SEED, size=SIZE)
    assert path == os.path.join(str(root), DATASET)
    return path


@pytest.fixture(scope="module")
def table(raw):
    with open(os.path.join(raw, "subjects.csv"), newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        return list(reader)


def read(path):
    img = sitk.ReadImage(path)
    return img, sitk.GetArrayFromImage(img)


def mid_slices(num_slices):
    return range(int(round(0.3 * (num_slices - 1))), int(round(0.6 * (num_slices - 1))) + 1)


def case_files(raw, row):
    images, labels = ("imagesTr", "labelsTr") if row["split"] == "train" else ("imagesTs", "labelsTs")
    sid = row["subject"]
    return {
        phase: (
            os.path.join(raw, images, f"{sid}_{phase}_0000.nii.gz"),
            os.path.join(raw, labels, f"{sid}_{phase}.nii.gz"),
        )
        for phase in ("ED", "ES")
    }


def file_digests(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ---------------------------------------------------------------- layout, dataset.json, geometry


def test_layout_counts_and_dataset_json(raw, table):
    train = ["ph001", "ph002", "ph003"]
    test = ["ph004"]
    assert sorted(os.listdir(raw)) == [
        "cineTr",
        "dataset.json",
        "imagesTr",
        "imagesTs",
        "labelsTr",
        "labelsTs",
        "subjects.csv",
    ]
    assert sorted(os.listdir(os.path.dirname(raw))) == [DATASET]  # no temporary folder left behind
    cases = lambda ids: sorted(f"{s}_{p}" for s in ids for p in ("ED", "ES"))  # noqa: E731
    assert sorted(os.listdir(os.path.join(raw, "imagesTr"))) == [f"{c}_0000.nii.gz" for c in cases(train)]
    assert sorted(os.listdir(os.path.join(raw, "labelsTr"))) == [f"{c}.nii.gz" for c in cases(train)]
    assert sorted(os.listdir(os.path.join(raw, "imagesTs"))) == [f"{c}_0000.nii.gz" for c in cases(test)]
    assert sorted(os.listdir(os.path.join(raw, "labelsTs"))) == [f"{c}.nii.gz" for c in cases(test)]
    assert sorted(os.listdir(os.path.join(raw, "cineTr"))) == [f"{s}_0000.nii.gz" for s in train]  # no test cines
    assert [(r["subject"], r["split"]) for r in table] == [(s, "train") for s in train] + [(s, "test") for s in test]
    with open(os.path.join(raw, "dataset.json")) as f:
        meta = json.load(f)
    assert meta["channel_names"] == {"0": "cineMRI"}
    assert meta["labels"] == {"background": 0, "LV_bloodpool": 1, "LV_myocardium": 2, "RV_bloodpool": 3}
    assert meta["numTraining"] == 2 * N_TRAIN
    assert meta["file_ending"] == ".nii.gz"
    assert meta["cine_folder"] == "cineTr" and meta["subjects_table"] == "subjects.csv"
    assert meta["phantom"] == {
        "seed": SEED,
        "size": SIZE,
        "num_subjects": N_TRAIN,
        "num_test_subjects": N_TEST,
        "version": PHANTOM_VERSION,
    }
    for r in table:
        assert r["vendor"] in VENDORS and r["pathology"] in PHENOTYPES


def test_geometry_of_cases_and_cines(raw, table):
    for row in table:
        z, t = int(row["num_slices"]), int(row["num_frames"])
        spacing = (float(row["spacing_x_mm"]), float(row["spacing_y_mm"]), float(row["spacing_z_mm"]))
        assert 8 <= z <= 12 and 15 <= t <= 30
        assert 6.0 <= spacing[2] <= 10.0 and spacing[0] == spacing[1]
        assert 200.0 <= spacing[0] * SIZE <= 300.0  # field of view in mm
        images = {}
        for phase, (image_path, label_path) in case_files(raw, row).items():
            img, arr = read(image_path)
            lab, lab_arr = read(label_path)
            assert img.GetSize() == lab.GetSize() == (SIZE, SIZE, z)
            assert img.GetSpacing() == lab.GetSpacing() == pytest.approx(spacing)
            assert img.GetOrigin() == lab.GetOrigin() and img.GetDirection() == lab.GetDirection()
            assert arr.dtype == np.int16 and lab_arr.dtype == np.uint8
            images[phase] = arr
        if row["split"] == "train":
            cine, cine_arr = read(os.path.join(raw, "cineTr", f"{row['subject']}_0000.nii.gz"))
            assert cine.GetDimension() == 4 and cine.GetSize() == (SIZE, SIZE, z, t)  # (X, Y, Z, T) like M&Ms
            assert cine.GetSpacing()[:3] == pytest.approx(spacing) and 15.0 < cine.GetSpacing()[3] < 80.0
            assert cine_arr.shape == (t, z, SIZE, SIZE)
            assert np.array_equal(cine_arr[int(row["ed_frame"])], images["ED"])
            assert np.array_equal(cine_arr[int(row["es_frame"])], images["ES"])
        else:
            assert not os.path.exists(os.path.join(raw, "cineTr", f"{row['subject']}_0000.nii.gz"))


# ---------------------------------------------------------------- anatomy of the labels


def test_labels_are_anatomical(raw, table):
    for row in table:
        files = case_files(raw, row)
        ed, es = read(files["ED"][1])[1], read(files["ES"][1])[1]
        mids = mid_slices(ed.shape[0])
        for lab in (ed, es):
            assert set(np.unique(lab)) <= {0, 1, 2, 3}
            assert not (lab[-1] == 3).any(), "RV at the apex-most slice"
            for z in mids:
                sl = lab[z]
                assert (sl == 1).any() and (sl == 3).any(), f"LV and RV expected in mid slice {z}"
                padded = np.pad(sl, 1)
                lv = sl == 1
                for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                    neighbour = padded[1 + dy : 1 + dy + sl.shape[0], 1 + dx : 1 + dx + sl.shape[1]]
                    assert np.isin(neighbour[lv], (1, 2)).all(), f"LV blood pool not enclosed in slice {z}"
        # apex tapers: the apex-most slice holds less LV than the mid slices
        area = lambda lab, z, v: int((lab[z] == v).sum())  # noqa: E731
        assert area(ed, -1, 1) + area(ed, -1, 2) < min(area(ed, z, 1) + area(ed, z, 2) for z in mids)
        # contraction: smaller cavity at ES, thicker (not smaller) myocardium
        lv_ed = sum(area(ed, z, 1) for z in mids)
        lv_es = sum(area(es, z, 1) for z in mids)
        myo_ed = sum(area(ed, z, 2) for z in mids)
        myo_es = sum(area(es, z, 2) for z in mids)
        assert lv_es < lv_ed
        assert myo_es >= 0.9 * myo_ed


def test_subjects_table_matches_the_label_files(raw, table):
    for row in table:
        files = case_files(raw, row)
        vols = {}
        for phase in ("ED", "ES"):
            img, lab = read(files[phase][1])
            sx, sy, sz = img.GetSpacing()
            voxel_ml = sx * sy * sz / 1000.0
            vols[phase] = {v: np.count_nonzero(lab == v) * voxel_ml for v in (1, 2, 3)}
        expected = {
            "lv_edv_ml": vols["ED"][1],
            "lv_esv_ml": vols["ES"][1],
            "lv_ef_pct": 100.0 * (vols["ED"][1] - vols["ES"][1]) / vols["ED"][1],
            "rv_edv_ml": vols["ED"][3],
            "rv_esv_ml": vols["ES"][3],
            "rv_ef_pct": 100.0 * (vols["ED"][3] - vols["ES"][3]) / vols["ED"][3],
            "lv_myo_mass_g": vols["ED"][2] * 1.05,
        }
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, abs=1.5e-3), (row["subject"], key)
            assert len(row[key].split(".")[1]) == 3
        assert 0.0 < float(row["lv_ef_pct"]) < 100.0 and 0.0 < float(row["rv_ef_pct"]) < 100.0
        assert 40.0 < float(row["lv_edv_ml"]) < 350.0 and 40.0 < float(row["lv_myo_mass_g"]) < 350.0


def test_subject_depends_only_on_seed_and_index(raw, table):
    row = table[1]
    subject = simulate_subject(subject_rng(SEED, 2), "ph002", SIZE)
    assert (subject.vendor, subject.phenotype) == (row["vendor"], row["pathology"])
    assert (subject.ed_frame, subject.es_frame) == (int(row["ed_frame"]), int(row["es_frame"]))
    cine = read(os.path.join(raw, "cineTr", "ph002_0000.nii.gz"))[1]
    assert np.array_equal(subject.cine, cine.astype(np.float32))
    assert np.array_equal(subject.phase("ES")[1], read(case_files(raw, row)["ES"][1])[1])
    assert subject.cine.dtype == np.float32 and subject.labels.dtype == np.uint8
    assert subject.labels.shape == subject.cine.shape


# ---------------------------------------------------------------- determinism, re-runs, refusals


def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path, raw):
    again = write_phantom_dataset(str(tmp_path / "a"), 742, "Unit", N_TRAIN, N_TEST, seed=SEED, size=SIZE)
    assert file_digests(again) == file_digests(raw)
    other = write_phantom_dataset(str(tmp_path / "b"), 742, "Unit", N_TRAIN, N_TEST, seed=SEED + 1, size=SIZE)
    a, b = file_digests(raw), file_digests(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".nii.gz"))


def test_parallel_writing_equals_serial(tmp_path):
    serial = write_phantom_dataset(str(tmp_path / "s"), 5, "P", 2, 1, seed=11, size=48, workers=1)
    parallel = write_phantom_dataset(str(tmp_path / "p"), 5, "P", 2, 1, seed=11, size=48, workers=2)
    assert file_digests(serial) == file_digests(parallel)


def test_simulation_is_deterministic_and_subjects_differ():
    a = simulate_subject(subject_rng(0, 1), "ph001", 48)
    b = simulate_subject(subject_rng(0, 1), "ph001", 48)
    c = simulate_subject(subject_rng(0, 2), "ph002", 48)
    assert np.array_equal(a.cine, b.cine) and np.array_equal(a.labels, b.labels) and a.volumes == b.volumes
    assert a.cine.shape != c.cine.shape or not np.array_equal(a.cine, c.cine)
    assert a.volumes != c.volumes


def test_rerun_reuses_and_refusals_name_the_path(tmp_path, capsys):
    root = str(tmp_path)
    path = write_phantom_dataset(root, 9, "Same", 1, 0, seed=1, size=48)
    stamp = os.stat(os.path.join(path, "dataset.json")).st_mtime_ns
    assert write_phantom_dataset(root, 9, "Same", 1, 0, seed=1, size=48) == path
    assert "reusing" in capsys.readouterr().err
    assert os.stat(os.path.join(path, "dataset.json")).st_mtime_ns == stamp
    with pytest.raises(SSPError, match="different phantom parameters") as err:
        write_phantom_dataset(root, 9, "Same", 1, 0, seed=2, size=48)
    assert path in str(err.value) and "\n" not in str(err.value)
    # overwrite replaces it, atomically (no temporary or old folder left)
    assert write_phantom_dataset(root, 9, "Same", 2, 0, seed=2, size=48, overwrite=True) == path
    with open(os.path.join(path, "dataset.json")) as f:
        assert json.load(f)["phantom"]["seed"] == 2
    assert len(os.listdir(os.path.join(path, "cineTr"))) == 2
    assert os.listdir(root) == ["Dataset009_Same"]
    # nnU-Net needs unique dataset ids
    with pytest.raises(SSPError, match="unique") as err:
        write_phantom_dataset(root, 9, "Other", 1, 0, size=48)
    assert path in str(err.value)
    with pytest.raises(SSPError, match="unique"):
        write_phantom_dataset(root, 9, "Other", 1, 0, size=48, overwrite=True)
    # a folder that is not a phantom dataset is not replaced without overwrite
    os.makedirs(os.path.join(root, "Dataset010_Mine"))
    with pytest.raises(SSPError, match="not this phantom"):
        write_phantom_dataset(root, 10, "Mine", 1, 0, size=48)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_subjects=0), "num_subjects"),
        (dict(num_test_subjects=-1), "num_test_subjects"),
        (dict(size=32), "too small"),
        (dict(name="a/b"), "dataset name"),
        (dict(dataset_id=0), "dataset id"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    args = dict(raw_root=str(tmp_path / "raw"), dataset_id=3, name="Bad", num_subjects=1, num_test_subjects=0, size=48)
    args.update(kwargs)
    with pytest.raises(SSPError, match=message) as err:
        write_phantom_dataset(**args)
    assert str(tmp_path / "raw") in str(err.value)
    assert not os.path.exists(tmp_path / "raw")


def test_raw_root_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(SSPError, match="not a folder") as err:
        write_phantom_dataset(str(path), 3, "Bad", 1, 0, size=48)
    assert str(path) in str(err.value)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    original = dataset_module._write_subject
    calls = []

    def failing(folder, index, *args):
        calls.append(index)
        if index == 2:
            raise KeyboardInterrupt
        return original(folder, index, *args)

    monkeypatch.setattr(dataset_module, "_write_subject", failing)
    with pytest.raises(KeyboardInterrupt):
        write_phantom_dataset(str(tmp_path), 4, "Broken", 2, 0, size=48, workers=1)
    assert calls == [1, 2]
    assert os.listdir(tmp_path) == []


def test_default_size_gives_realistic_spacing():
    assert 128 <= DEFAULT_SIZE <= 192
    subject = simulate_subject(subject_rng(0, 1), "ph001")
    assert subject.cine.shape[2:] == (DEFAULT_SIZE, DEFAULT_SIZE)
    assert 1.2 <= subject.spacing[0] <= 1.8


# ---------------------------------------------------------------- cardiac timing, phenotypes, contrast


def test_contraction_curve_is_smooth_periodic_and_peaks_at_es():
    phase = np.linspace(0.0, 1.0, 2001)
    c = contraction_curve(phase, 0.35, 0.2, 0.1, 0.85)
    assert c[0] == 0.0 and c[-1] == pytest.approx(0.0, abs=1e-12)
    assert c.max() == pytest.approx(1.0) and phase[np.argmax(c)] == pytest.approx(0.35, abs=1e-3)
    assert (c >= 0).all() and (c <= 1).all()
    assert np.abs(np.diff(c)).max() < 0.01  # no jumps
    assert np.abs(np.diff(c, 2)).max() < 1e-4  # no kinks


def test_es_at_about_35_percent_and_ed_near_frame_0(table):
    subjects = [simulate_subject(subject_rng(5, i), f"ph{i:03d}", 48) for i in range(1, 7)]
    timing = [(s.ed_frame, s.es_frame, s.num_frames) for s in subjects]
    timing += [(int(r["ed_frame"]), int(r["es_frame"]), int(r["num_frames"])) for r in table]
    for ed, es, t in timing:
        assert ed in (0, 1)
        assert 0.28 <= (es - ed) / t <= 0.42
    for s in subjects:  # ES is the frame with the smallest LV cavity, ED among the largest
        lv = (s.labels == 1).sum(axis=(1, 2, 3))
        assert lv[s.es_frame] == lv.min()
        assert lv[s.ed_frame] >= 0.97 * lv.max()


def test_phenotypes_order_the_ejection_fraction():
    ef = {}
    for phenotype in PHENOTYPES:
        subjects = [simulate_subject(subject_rng(21, i), "x", 48, phenotype=phenotype) for i in range(1, 4)]
        assert all(s.phenotype == phenotype for s in subjects)
        ef[phenotype] = np.mean([s.volumes["lv_ef_pct"] for s in subjects])
        if phenotype == "hypertrophic":
            wall = np.mean([s.volumes["lv_myo_mass_g"] for s in subjects])
        if phenotype == "dilated":
            edv = np.mean([s.volumes["lv_edv_ml"] for s in subjects])
        if phenotype == "normal":
            normal_wall = np.mean([s.volumes["lv_myo_mass_g"] for s in subjects])
            normal_edv = np.mean([s.volumes["lv_edv_ml"] for s in subjects])
    assert ef["dilated"] < ef["normal"] < ef["hypertrophic"]
    assert ef["dilated"] < 45.0 and 50.0 < ef["normal"] < 75.0 and ef["hypertrophic"] > 62.0
    assert edv > normal_edv and wall > normal_wall


def test_vendor_is_honoured_and_changes_the_images():
    a = simulate_subject(subject_rng(2, 1), "x", 48, vendor="A", phenotype="normal")
    c = simulate_subject(subject_rng(2, 1), "x", 48, vendor="C", phenotype="normal")
    assert (a.vendor, c.vendor) == ("A", "C")
    assert np.array_equal(a.labels, c.labels)  # same anatomy
    assert not np.array_equal(a.cine, c.cine)
    with pytest.raises(ValueError, match="vendor"):
        simulate_subject(0, "x", 48, vendor="Z")


def test_tissue_contrast_is_ssfp_like(raw, table):
    """Blood pools brighter than myocardium, myocardium brighter than the lungs' air-like dark background."""
    for row in table:
        files = case_files(raw, row)
        for phase in ("ED", "ES"):
            image = read(files[phase][0])[1].astype(np.float64)
            lab = read(files[phase][1])[1]
            lv, myo, rv = (image[lab == v].mean() for v in (1, 2, 3))
            assert lv > 1.5 * myo and rv > 1.5 * myo
            # the darkest tenth of the image (lungs, air) is darker than the myocardium
            assert np.percentile(image, 10) < myo
    subject = simulate_subject(subject_rng(SEED, 1), "ph001", SIZE)
    # the image is more than the heart: much of the field of view outside the heart carries tissue signal
    image, labels = subject.phase("ED")
    outside = image[labels == 0]
    assert (outside > 0.2 * image[labels == 1].mean()).mean() > 0.3
