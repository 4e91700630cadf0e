"""``nnunet_ssp convert {mnms,mnms2,acdc}``: synthetic phantom subjects written in each public dataset's layout go
through the real CLI; the output must be the phantom's nnU-Net raw layout with the right cases, ED/ES frames,
labels, geometry, exclusions and tables, with slice 0 at the base also for subjects stored apex first, and bad input
must fail with one line, exit code 2 and no output."""

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ssp.convert.common import Volume, orthonormal_affine, read_labels, reverse_slices
from nnunet_ssp.convert.mnms import labelled_frames
from nnunet_ssp.convert.mnms2 import vendor_code
from nnunet_ssp.convert.orientation import APEX_FIRST, BASE_FIRST, header_vote, label_position, label_vote, stored_order
from nnunet_ssp.errors import SSPError
from nnunet_ssp.phantom import simulate_subject, subject_rng
from nnunet_ssp.raw_layout import LABELS, target_folder

SIZE, SEED = 48, 5
# SimpleITK direction (LPS): orthonormal, right-handed, oblique; the slice direction (third column) points towards the
# apex (cosine 0.81 with (+1, -1, -1)/sqrt(3)), as it does for the phantom's base-first stacks
ROTATION = np.array([[0.36, -0.48, 0.8], [-0.8, -0.6, 0.0], [0.48, -0.64, -0.6]])
ORIGIN = (-120.5, 80.25, 33.0)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
ACDC_LABELS = np.array([0, 3, 2, 1], dtype=np.uint8)  # project -> ACDC (1 RV, 2 MYO, 3 LV), its own inverse
MNMS_TABLE = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"


@dataclass
class Source:
    """A synthetic subject as written in a dataset's layout: cine and labels (T, Z, Y, X) base first, 0-based ED/ES;
    ``apex_first``: stored with the slices reversed and the geometry adjusted (same world geometry), ``stale_header``
    too but with the geometry left as for base first (header and labels disagree)."""

    subject: str
    split: str
    vendor: str
    pathology: str
    cine: np.ndarray
    labels: np.ndarray
    ed: int
    es: int
    spacing: tuple
    frame_interval: float
    apex_first: bool = False
    stale_header: bool = False


def make_source(
    index, subject, split, vendor, pathology, ed_after_es=False, apex_first=False, stale_header=False
) -> Source:
    s = simulate_subject(subject_rng(SEED, index), subject, SIZE)
    cine, labels, ed, es = s.cine.astype(np.int16), s.labels, s.ed_frame, s.es_frame
    if ed_after_es:  # rotate the cycle so that ES is frame 1 and ED comes later
        shift = s.num_frames - es + 1
        cine, labels = np.roll(cine, shift, axis=0), np.roll(labels, shift, axis=0)
        ed, es = (ed + shift) % s.num_frames, 1
        assert ed > es
    return Source(
        subject,
        split,
        vendor,
        pathology,
        cine,
        labels,
        ed,
        es,
        s.spacing,
        s.frame_interval_ms,
        apex_first or stale_header,
        stale_header,
    )


def geometry(source: Source, reversed_: bool):
    """Direction (LPS) and origin of the source's stack base first, or ``reversed_``: apex first with the same world
    geometry (slice direction negated, origin at the apex-most slice)."""
    if not reversed_:
        return ROTATION, np.array(ORIGIN)
    num_slices = source.cine.shape[1]
    return ROTATION * [1, 1, -1], np.array(ORIGIN) + (num_slices - 1) * source.spacing[2] * ROTATION[:, 2]


def write_image(array: np.ndarray, source: Source, path: str) -> None:
    """(T, Z, Y, X) or (Z, Y, X), given base first, with the source's spacing, oblique geometry and slice order,
    written by SimpleITK."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if source.apex_first:
        array = np.ascontiguousarray(array[..., ::-1, :, :])
    rotation, origin = geometry(source, source.apex_first and not source.stale_header)
    image = sitk.GetImageFromArray(array, isVector=False)
    direction = np.eye(image.GetDimension())
    direction[:3, :3] = rotation
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing(list(source.spacing) + [source.frame_interval] * (image.GetDimension() - 3))
    image.SetOrigin(list(origin) + [0.0] * (image.GetDimension() - 3))
    sitk.WriteImage(image, path, useCompression=True, compressionLevel=1)


def write_csv(path: str, header, rows) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


# ------------------------------------------------------------------------------------------- the three layouts
def write_mnms(root: str, placed) -> None:
    """M&Ms OpenDataset from (folder, Source) pairs; the table's ED/ES are swapped for labelled subjects, since the
    converter must take them from the ground truth."""
    rows = []
    for i, (folder, s) in enumerate(placed):
        subject_dir = os.path.join(root, folder, s.subject)
        write_image(s.cine, s, os.path.join(subject_dir, f"{s.subject}_sa.nii.gz"))
        if s.split != "unlabeled":
            gt = np.zeros_like(s.labels)
            gt[[s.ed, s.es]] = s.labels[[s.ed, s.es]]
            write_image(gt, s, os.path.join(subject_dir, f"{s.subject}_sa_gt.nii.gz"))
        ed, es = (s.ed, s.es) if s.split == "unlabeled" else (s.es, s.ed)
        rows.append([i, s.subject, "Siemens", s.vendor, 1, ed, es, 50, s.pathology, "M", 170, 70])
    for folder in ("Training/Labeled", "Training/Unlabeled", "Validation", "Testing"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    write_csv(
        os.path.join(root, MNMS_TABLE),
        [
            "",
            "External code",
            "VendorName",
            "Vendor",
            "Centre",
            "ED",
            "ES",
            "Age",
            "Pathology",
            "Sex",
            "Height",
            "Weight",
        ],
        rows,
    )


MNMS2_VENDORS = {"A": "SIEMENS", "B": "Philips Medical Systems", "C": "GE MEDICAL SYSTEMS"}


def write_mnms2(root: str, sources, excluded=()) -> None:
    """M&Ms-2: dataset/NNN/ files (plus a long-axis file), the table with unpadded codes and padding rows;
    ``excluded``: (code, pathology) of subjects that get an empty folder only."""
    rows = []
    for s in sources:
        folder = os.path.join(root, "dataset", s.subject)
        write_image(s.cine, s, os.path.join(folder, f"{s.subject}_SA_CINE.nii.gz"))
        for phase, frame in (("ED", s.ed), ("ES", s.es)):
            write_image(s.cine[frame], s, os.path.join(folder, f"{s.subject}_SA_{phase}.nii.gz"))
            write_image(s.labels[frame], s, os.path.join(folder, f"{s.subject}_SA_{phase}_gt.nii.gz"))
        write_image(s.cine[:, :1], s, os.path.join(folder, f"{s.subject}_LA_CINE.nii.gz"))
        rows.append([int(s.subject), s.pathology, MNMS2_VENDORS[s.vendor], "Scanner", 1.5])
    for code, pathology in excluded:
        os.makedirs(os.path.join(root, "dataset", code))
        rows.append([int(code), pathology, "SIEMENS", "Scanner", 1.5])
    write_csv(
        os.path.join(root, "dataset_information.csv"),
        ["SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD"],
        rows + [[""] * 5] * 2,
    )


def write_acdc(root: str, sources) -> None:
    """ACDC: {training,testing}/patientNNN/ with the 4D cine, 1-based frame files, ACDC labels and Info.cfg."""
    for s in sources:
        folder = os.path.join(root, "training" if s.split == "train" else "testing", s.subject)
        write_image(s.cine, s, os.path.join(folder, f"{s.subject}_4d.nii.gz"))
        for frame in (s.ed, s.es):
            write_image(s.cine[frame], s, os.path.join(folder, f"{s.subject}_frame{frame + 1:02d}.nii.gz"))
            write_image(
                ACDC_LABELS[s.labels[frame]], s, os.path.join(folder, f"{s.subject}_frame{frame + 1:02d}_gt.nii.gz")
            )
        with open(os.path.join(folder, "Info.cfg"), "w") as f:
            f.write(
                f"ED: {s.ed + 1}\nES: {s.es + 1}\nGroup: {s.pathology}\nHeight: 170.0\n"
                f"NbFrame: {len(s.cine)}\nWeight: 70.0\n"
            )
    for folder in ("training", "testing"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)


# -------------------------------------------------------------------------------------------------- helpers
def convert(tmp, dataset, source_root, dataset_id, *extra):
    env = dict(os.environ, nnUNet_raw=os.path.join(tmp, "raw"))
    command = [
        os.path.join(os.path.dirname(sys.executable), "nnunet_ssp"),
        "convert",
        dataset,
        source_root,
        "-d",
        str(dataset_id),
        "-n",
        "Test",
        *extra,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True)


def converted(tmp, dataset, source_root, dataset_id, warned=()) -> str:
    """The converted dataset's path; stderr must hold exactly one warning for each cine in ``warned`` (stored apex
    first with a header as for base first)."""
    result = convert(tmp, dataset, source_root, dataset_id)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stderr.strip().splitlines()) == sorted(
        f"warning: {cine}: the labels put the apex at slice 0 but the header's slice direction points from base to "
        f"apex; following the labels"
        for cine in warned
    ), result.stderr
    path = result.stdout.strip().splitlines()[-1]
    assert path == os.path.join(tmp, "raw", f"Dataset{dataset_id:03d}_Test")
    return path


def assert_failed(result, tmp, *fragments) -> None:
    """Exit code 2, one stderr line naming the problem, nothing left in nnUNet_raw."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    raw = os.path.join(tmp, "raw")
    assert not os.path.isdir(raw) or os.listdir(raw) == []


def read(path: str):
    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(image), image


def assert_geometry(image, source: Source) -> None:
    """The source's base-first geometry; with a stale header, the stored one reversed (the labels win)."""
    dim = image.GetDimension()
    rotation, origin = geometry(source, source.stale_header)
    np.testing.assert_allclose(
        image.GetSpacing(), list(source.spacing) + [source.frame_interval] * (dim - 3), rtol=1e-6
    )
    np.testing.assert_allclose(image.GetOrigin()[:3], origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (dim, dim))[:3, :3], rotation, atol=1e-6)


def check_dataset(path: str, sources, unlabeled=()) -> None:
    """Cases, cines, labels, geometry, dataset.json and subjects.csv of a converted dataset; slice 0 is the base."""
    train = [s for s in sources if s.split == "train"]
    test = [s for s in sources if s.split == "test"]
    with open(os.path.join(path, "dataset.json")) as f:
        meta = json.load(f)
    assert meta["numTraining"] == 2 * len(train) and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == LABELS and meta["channel_names"] == {"0": "cineMRI"}

    def names(folder):
        return sorted(os.listdir(os.path.join(path, folder)))

    def cases(group, suffix):
        return sorted(f"{s.subject}_{phase}{suffix}.nii.gz" for s in group for phase in ("ED", "ES"))

    assert names("imagesTr") == cases(train, "_0000") and names("labelsTr") == cases(train, "")
    assert names("imagesTs") == cases(test, "_0000") and names("labelsTs") == cases(test, "")
    assert names("cineTr") == sorted(f"{s.subject}_0000.nii.gz" for s in train + list(unlabeled))

    with open(os.path.join(path, "subjects.csv"), newline="") as f:
        rows = {r["subject"]: r for r in csv.DictReader(f)}
    assert set(rows) == {s.subject for s in sources + list(unlabeled)}
    for s in sources + list(unlabeled):
        row = rows[s.subject]
        assert (row["split"], row["vendor"], row["pathology"]) == (s.split, s.vendor, s.pathology)
        assert (int(row["ed_frame"]), int(row["es_frame"])) == (s.ed, s.es)
        assert (int(row["num_frames"]), int(row["num_slices"])) == s.cine.shape[:2]
        assert float(row["spacing_z_mm"]) == pytest.approx(s.spacing[2], rel=1e-5)
        assert row["slice_order"] == ("reversed" if s.apex_first else "base_first")

    for s in train + test:
        images, labels = ("imagesTr", "labelsTr") if s.split == "train" else ("imagesTs", "labelsTs")
        for phase, frame in (("ED", s.ed), ("ES", s.es)):
            image_array, image = read(os.path.join(path, images, f"{s.subject}_{phase}_0000.nii.gz"))
            label_array, label = read(os.path.join(path, labels, f"{s.subject}_{phase}.nii.gz"))
            np.testing.assert_array_equal(image_array, s.cine[frame])
            np.testing.assert_array_equal(label_array, s.labels[frame])
            assert_geometry(image, s)
            assert_geometry(label, s)
    for s in train + list(unlabeled):
        cine_array, cine = read(os.path.join(path, "cineTr", f"{s.subject}_0000.nii.gz"))
        np.testing.assert_array_equal(cine_array, s.cine)
        assert_geometry(cine, s)


# ---------------------------------------------------------------------------------------------------- M&Ms
@pytest.fixture(scope="module")
def mnms(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("mnms"))
    placed = [
        ("Training/Labeled", make_source(1, "A1B2C3", "train", "A", "HCM")),
        ("Training/Labeled", make_source(2, "B2C3D4", "train", "B", "NOR", ed_after_es=True)),
        ("Validation", make_source(3, "D4E5F6", "train", "D", "DCM", apex_first=True)),
        ("Testing", make_source(4, "A7B8C9", "test", "A", "NOR")),
        ("Training/Unlabeled", make_source(5, "C1D2E3", "unlabeled", "C", "HHD", apex_first=True)),
    ]
    write_mnms(os.path.join(tmp, "OpenDataset"), placed)
    sources, unlabeled = [s for _, s in placed[:-1]], [placed[-1][1]]
    return tmp, converted(tmp, "mnms", os.path.join(tmp, "OpenDataset"), 601), sources, unlabeled


def test_mnms(mnms):
    """Training + Validation -> Tr, Testing -> Ts, Unlabeled -> cine only; ED = the fuller labelled frame (also when
    it comes after ES), not the table's (swapped) ED/ES; subjects stored apex first are reversed, the unlabeled one
    by its header alone."""
    tmp, path, sources, unlabeled = mnms
    check_dataset(path, sources, unlabeled)


def test_mnms_test_set_from_the_papers_split_file(mnms):
    """--test-split: the YAML's test subjects (here one from Training/Labeled) become test cases and the release's
    own Testing subject a training case; a test subject the source lacks fails with nothing written."""
    from dataclasses import replace

    tmp, _, sources, unlabeled = mnms
    split = os.path.join(tmp, "default-cine-split.yaml")
    with open(split, "w") as f:
        f.write('test:\n  mm1: ["B2C3D4"]\n  mm2: ["281"]\n')
    result = convert(tmp, "mnms", os.path.join(tmp, "OpenDataset"), 602, "--test-split", split)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {split}: test subject(s) 281 not in the source (1 in all)"
    )
    assert os.listdir(os.path.join(tmp, "raw")) == ["Dataset601_Test"]  # no partial output
    with open(split, "w") as f:
        f.write('test:\n  mm1: ["B2C3D4"]\n')
    result = convert(tmp, "mnms", os.path.join(tmp, "OpenDataset"), 602, "--test-split", split)
    assert result.returncode == 0, result.stderr
    reassigned = [replace(s, split="test" if s.subject == "B2C3D4" else "train") for s in sources]
    check_dataset(result.stdout.strip(), reassigned, unlabeled)


def test_existing_dataset_is_refused_without_overwrite(mnms):
    tmp, path, _, _ = mnms
    before = sorted(os.listdir(os.path.join(path, "imagesTr")))
    result = convert(tmp, "mnms", os.path.join(tmp, "OpenDataset"), 601)
    assert result.returncode == 2 and "--overwrite" in result.stderr and path in result.stderr
    assert sorted(os.listdir(os.path.join(path, "imagesTr"))) == before


def test_mnms_missing_table(tmp_path):
    tmp = str(tmp_path)
    write_mnms(os.path.join(tmp, "src"), [("Training/Labeled", make_source(1, "A1B2C3", "train", "A", "HCM"))])
    os.remove(os.path.join(tmp, "src", MNMS_TABLE))
    assert_failed(
        convert(tmp, "mnms", os.path.join(tmp, "src"), 602), tmp, os.path.join(tmp, "src", MNMS_TABLE), "not found"
    )


def test_mnms_labelled_part_only(tmp_path):
    """Training/Unlabeled, Validation and Testing may be missing (a partial download); Training/Labeled may not."""
    tmp, source = str(tmp_path), make_source(1, "A1B2C3", "train", "A", "HCM")
    src, labelled = os.path.join(str(tmp_path), "src"), os.path.join(str(tmp_path), "src", "Training", "Labeled")
    write_mnms(src, [("Training/Labeled", source)])
    for folder in ("Training/Unlabeled", "Validation", "Testing"):
        os.rmdir(os.path.join(src, folder))
    os.rename(labelled, os.path.join(tmp, "Labeled"))
    assert_failed(convert(tmp, "mnms", src, 604), tmp, labelled, "not found")
    os.rename(os.path.join(tmp, "Labeled"), labelled)
    check_dataset(converted(tmp, "mnms", src, 604), [source])


def test_mnms_ground_truth_with_other_frames_than_the_cine(tmp_path):
    """The second subject fails after the first was written: nothing may be left behind."""
    tmp = str(tmp_path)
    second = make_source(2, "D4E5F6", "train", "D", "NOR")
    write_mnms(
        os.path.join(tmp, "src"),
        [("Training/Labeled", make_source(1, "A1B2C3", "train", "A", "HCM")), ("Validation", second)],
    )
    gt = os.path.join(tmp, "src", "Validation", "D4E5F6", "D4E5F6_sa_gt.nii.gz")
    labels = np.zeros_like(second.labels[:-1])
    labels[[second.ed, second.es]] = second.labels[[second.ed, second.es]]
    write_image(labels, second, gt)
    assert_failed(convert(tmp, "mnms", os.path.join(tmp, "src"), 603), tmp, gt, "differs from the cine")


# -------------------------------------------------------------------------------------------------- M&Ms-2
def test_mnms2(tmp_path):
    """Pathologies NOR/HCM/LV dropped; codes up to 200 -> Tr, above -> Ts; ED/ES = indices of the matching cine
    frames; vendors coded A/B/C; long-axis files ignored; 176 stored apex first is reversed; 101, stored apex first
    with a header as for base first, warns and follows its labels."""
    tmp = str(tmp_path)
    sources = [
        make_source(1, "101", "train", "A", "ARR", stale_header=True),
        make_source(2, "176", "train", "B", "CIA", apex_first=True),
        make_source(3, "290", "test", "C", "FALL", ed_after_es=True),
    ]
    write_mnms2(os.path.join(tmp, "MnM2"), sources, excluded=[("005", "NOR"), ("170", "HCM"), ("250", "LV")])
    path = converted(
        tmp,
        "mnms2",
        os.path.join(tmp, "MnM2"),
        611,
        warned=[os.path.join(tmp, "MnM2", "dataset", "101", "101_SA_CINE.nii.gz")],
    )
    check_dataset(path, sources)


def test_mnms2_missing_ground_truth(tmp_path):
    tmp = str(tmp_path)
    write_mnms2(os.path.join(tmp, "src"), [make_source(1, "101", "train", "A", "ARR")])
    gt = os.path.join(tmp, "src", "dataset", "101", "101_SA_ES_gt.nii.gz")
    os.remove(gt)
    assert_failed(convert(tmp, "mnms2", os.path.join(tmp, "src"), 612), tmp, gt, "not found")


# ---------------------------------------------------------------------------------------------------- ACDC
def test_acdc(tmp_path):
    """training -> Tr, testing -> Ts; Info.cfg's 1-based ED/ES -> 0-based; labels remapped to 1 LV, 2 MYO, 3 RV;
    a test subject stored apex first is reversed; --overwrite replaces an existing dataset."""
    tmp = str(tmp_path)
    sources = [
        make_source(1, "patient001", "train", "A", "DCM"),
        make_source(2, "patient002", "train", "A", "NOR", ed_after_es=True),
        make_source(3, "patient101", "test", "A", "MINF", apex_first=True),
    ]
    write_acdc(os.path.join(tmp, "database"), sources[:1])
    converted(tmp, "acdc", os.path.join(tmp, "database"), 621)
    write_acdc(os.path.join(tmp, "database"), sources[1:])
    result = convert(tmp, "acdc", os.path.join(tmp, "database"), 621, "--overwrite")
    assert result.returncode == 0, result.stderr
    check_dataset(result.stdout.strip(), sources)
    assert sorted(os.listdir(os.path.join(tmp, "raw"))) == ["Dataset621_Test"]


def test_acdc_cine_that_is_not_4d(tmp_path):
    tmp = str(tmp_path)
    sources = [make_source(1, "patient001", "train", "A", "DCM"), make_source(2, "patient101", "test", "A", "NOR")]
    write_acdc(os.path.join(tmp, "src"), sources)
    cine = os.path.join(tmp, "src", "testing", "patient101", "patient101_4d.nii.gz")
    write_image(sources[1].cine[0], sources[1], cine)
    assert_failed(convert(tmp, "acdc", os.path.join(tmp, "src"), 622), tmp, cine, "expected a 4D image")


# ----------------------------------------------------------------------------------------------- in-process
def test_labelled_frames():
    gt = np.zeros((2, 2, 1, 5), np.uint8)
    gt[..., 3] = 1
    gt[0, 0, 0, 1] = 2
    assert labelled_frames(gt, "gt.nii.gz") == (3, 1)
    gt[0, 0, 0, 4] = 1
    with pytest.raises(SSPError, match=r"gt.nii.gz: expected exactly 2 labelled frames .* found 3"):
        labelled_frames(gt, "gt.nii.gz")


def test_label_values_outside_the_convention(tmp_path):
    path = str(tmp_path / "gt.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.array([[[0, 1, 4]]], np.uint8)), path)
    with pytest.raises(SSPError, match=r"gt.nii.gz: label values 4 are not in 0..3"):
        read_labels(path, 3)


def affine_with_cosine(cosine: float) -> np.ndarray:
    """A voxel-to-RAS affine whose slice direction has ``cosine`` with the long axis from base to apex."""
    apex, across = np.array([-1.0, 1.0, -1.0]) / np.sqrt(3.0), np.array([1.0, 1.0, 0.0]) / np.sqrt(2.0)
    affine = np.eye(4)
    affine[:3, 2] = 8.0 * (cosine * apex + np.sqrt(1.0 - cosine**2) * across)
    return affine


def stack_with_areas(*areas) -> np.ndarray:
    """ED labels (X, Y, Z) with ``areas[z]`` foreground voxels on slice z."""
    labels = np.zeros((1, max(areas), len(areas)), np.uint8)
    for z, area in enumerate(areas):
        labels[0, :area, z] = 2
    return labels


def test_header_vote():
    """The tests' ROTATION is base first; cosine with the long axis >= 0.3 base first, <= -0.3 apex first."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ ROTATION
    assert header_vote(affine) == BASE_FIRST
    affine[:3, 2] *= -1
    assert header_vote(affine) == APEX_FIRST
    for cosine, vote in ((0.35, BASE_FIRST), (0.25, None), (0.0, None), (-0.25, None), (-0.35, APEX_FIRST)):
        assert header_vote(affine_with_cosine(cosine)) == vote, cosine


def test_label_vote():
    """Phantom ED frames (base first) lie well below 0.5 - margin, reversed well above; undecided near 0.5 and with
    fewer than 3 labelled slices."""
    for index in range(1, 6):
        s = make_source(index, "s", "train", "A", "NOR")
        labels = s.labels[s.ed].transpose(2, 1, 0)  # file order X, Y, Z
        assert 0.3 < label_position(labels) < 0.4
        assert label_vote(labels) == BASE_FIRST and label_vote(labels[:, :, ::-1]) == APEX_FIRST
    assert label_position(stack_with_areas(0, 6, 3, 1, 0)) == pytest.approx(0.25)
    assert label_vote(stack_with_areas(0, 6, 3, 1, 0)) == BASE_FIRST
    assert label_vote(stack_with_areas(1, 3, 6)) == APEX_FIRST
    assert label_position(stack_with_areas(5, 4, 4)) == pytest.approx(6 / 13)
    assert label_vote(stack_with_areas(5, 4, 4)) is None
    symmetric = stack_with_areas(4, 4, 0, 4, 4)
    assert label_position(symmetric) == 0.5 and label_vote(symmetric) is None
    assert label_position(stack_with_areas(0, 6, 3, 0)) is None and label_vote(stack_with_areas(0, 6, 3, 0)) is None
    assert label_vote(np.zeros((2, 2, 5), np.uint8)) is None


def test_stored_order(capsys):
    """Labels win when they decide, the header otherwise, neither: None; one warning when both decide and differ."""
    base, apex, undecided = stack_with_areas(6, 3, 1), stack_with_areas(1, 3, 6), stack_with_areas(4, 4, 4)
    towards_apex, towards_base, across = affine_with_cosine(0.8), affine_with_cosine(-0.8), affine_with_cosine(0.0)
    cases = [
        (base, towards_apex, BASE_FIRST),
        (apex, across, APEX_FIRST),
        (undecided, towards_base, APEX_FIRST),
        (None, towards_base, APEX_FIRST),
        (None, towards_apex, BASE_FIRST),
        (undecided, across, None),
    ]
    for labels, affine, order in cases:
        assert stored_order(labels, affine, "cine.nii.gz") == order
    assert capsys.readouterr().err == ""
    assert stored_order(base, towards_base, "cine.nii.gz") == BASE_FIRST
    assert stored_order(apex, towards_apex, "cine.nii.gz") == APEX_FIRST
    assert capsys.readouterr().err.splitlines() == [
        "warning: cine.nii.gz: the labels put the base at slice 0 but the header's slice direction points from apex "
        "to base; following the labels",
        "warning: cine.nii.gz: the labels put the apex at slice 0 but the header's slice direction points from base "
        "to apex; following the labels",
    ]


def test_reverse_slices_keeps_world_geometry():
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ ROTATION * [1.25, 1.25, 8.0]
    affine[:3, 3] = ORIGIN
    volume = Volume(np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5), affine, "cine.nii.gz")  # X, Y, Z, T
    reversed_ = reverse_slices(volume)
    for i, j, k in np.ndindex(2, 3, 4):
        np.testing.assert_array_equal(reversed_.array[i, j, 3 - k], volume.array[i, j, k])
        np.testing.assert_allclose(reversed_.affine @ [i, j, 3 - k, 1], affine @ [i, j, k, 1])
    twice = reverse_slices(reversed_)
    np.testing.assert_array_equal(twice.array, volume.array)
    np.testing.assert_allclose(twice.affine, affine)


def test_vendor_codes():
    assert [vendor_code(v, "t") for v in MNMS2_VENDORS.values()] == ["A", "B", "C"]
    with pytest.raises(SSPError, match="t: unknown vendor 'Canon'"):
        vendor_code("Canon", "t")


def test_orthonormal_affine():
    """Orthonormal direction cosines stay as they are; others (which ITK refuses) become the nearest rotation."""
    affine = np.eye(4)
    affine[:3, :3] = ROTATION * [1.25, 1.25, 8.0]
    assert orthonormal_affine(affine) is affine
    sheared = affine.copy()
    sheared[0, 1] += 0.05
    fixed = orthonormal_affine(sheared)
    spacing = np.linalg.norm(fixed[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, np.linalg.norm(sheared[:3, :3], axis=0))
    np.testing.assert_allclose((fixed[:3, :3] / spacing).T @ (fixed[:3, :3] / spacing), np.eye(3), atol=1e-12)
    np.testing.assert_array_equal(fixed[:, 3], sheared[:, 3])


def test_target_folder_checks(tmp_path):
    os.makedirs(tmp_path / "Dataset631_Other")
    with pytest.raises(SSPError, match="Dataset631_Other: dataset id 631 is already used"):
        target_folder(str(tmp_path), 631, "Test", overwrite=False)
    with pytest.raises(SSPError, match="dataset name must be"):
        target_folder(str(tmp_path), 632, "bad name", overwrite=False)
    assert target_folder(str(tmp_path), 632, "Test", overwrite=False) == str(tmp_path / "Dataset632_Test")
