"""Pretraining data: slice cache vs nnU-Net's own preprocessing, metadata, reuse/rebuild/resume, views, loader."""

import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_ssp.errors import SSPError
from nnunet_ssp.network import PlannedConfiguration
from pretraining.data import cache as cache_module
from pretraining.data.cache import build_or_load_cache
from pretraining.data.loader import SliceViewDataset, default_iters_per_epoch, make_loader
from pretraining.data.slice_cache import SliceCache
from pretraining.data.sources import discover_sources
from pretraining.data.views import augmentation, make_view

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_SSPData"
SPACING = (1.5, 1.5, 8.0, 30.0)
# subject: (frames, slices, ED frame, ES frame, in-plane spacing); sub001 has an empty first slice in frame 2 (its
# ES frame), so nnU-Net crops that frame along z; sub002 has another spacing, so it is resampled; sub000 has two
# empty rows in every frame, so it is cropped in-plane.
SUBJECTS = {"sub000": (4, 5, 1, 3, 1.5), "sub001": (3, 4, 0, 2, 1.5), "sub002": (3, 4, 2, 0, 1.25)}
DATASET_JSON = {
    "channel_names": {"0": "cineMRI"},
    "labels": {"background": 0, "LV_bloodpool": 1, "LV_myocardium": 2, "RV_bloodpool": 3},
    "numTraining": 2 * len(SUBJECTS),
    "file_ending": ".nii.gz",
}


def _cine(name: str, frames: int, slices: int, size=(48, 40)) -> np.ndarray:
    """(T, Z, Y, X) positive images with a bright disc that moves with the frame."""
    rng = np.random.default_rng(int(name[-3:]))
    t, z, y, x = np.meshgrid(
        np.arange(frames), np.arange(slices), np.arange(size[0]), np.arange(size[1]), indexing="ij"
    )
    r = np.sqrt((y - size[0] / 2) ** 2 + (x - size[1] / 2 - t) ** 2)
    data = 100 + 300 * (r < 8 + z) + rng.normal(0, 20, (frames, slices, *size))
    return np.clip(data, 1, None).astype(np.float32)


def _write(array: np.ndarray, path: str, spacing) -> None:
    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(image, path, True)


def write_raw_dataset(folder: str) -> None:
    """cineTr/ (4D), imagesTr/labelsTr/ (ED/ES equal to cine frames), dataset.json and subjects.csv."""
    for sub in ("cineTr", "imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rows = []
    for name, (frames, slices, ed, es, s) in SUBJECTS.items():
        cine = _cine(name, frames, slices)
        if name == "sub000":
            cine[:, :, :2] = 0
        if name == "sub001":
            cine[2, 0] = 0
        spacing = (s, s, SPACING[2], SPACING[3])
        _write(cine, os.path.join(folder, "cineTr", f"{name}_0000.nii.gz"), spacing)
        for phase, t in (("ED", ed), ("ES", es)):
            _write(cine[t], os.path.join(folder, "imagesTr", f"{name}_{phase}_0000.nii.gz"), spacing[:3])
            label = (cine[t] > 250).astype(np.uint8)
            label[:, :, :10] *= 3
            _write(label, os.path.join(folder, "labelsTr", f"{name}_{phase}.nii.gz"), spacing[:3])
        rows.append({"subject": name, "ed_frame": ed, "es_frame": es, "num_frames": frames})
    with open(os.path.join(folder, "subjects.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(DATASET_JSON, f)


@pytest.fixture(scope="session")
def planned(tmp_path_factory):
    """A tiny raw dataset, planned and preprocessed (2d) by the real nnUNetv2_plan_and_preprocess."""
    root = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(root / name)
        os.makedirs(env[name])
    raw = os.path.join(env["nnUNet_raw"], DATASET_NAME)
    write_raw_dataset(raw)
    command = [
        os.path.join(os.path.dirname(sys.executable), "nnUNetv2_plan_and_preprocess"),
        "-d",
        str(DATASET_ID),
        "-c",
        "2d",
        "-np",
        "1",
        "-npfp",
        "1",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    preprocessed = os.path.join(env["nnUNet_preprocessed"], DATASET_NAME)
    with open(os.path.join(preprocessed, "dataset.json")) as f:
        dataset_json = json.load(f)
    return {
        "raw": raw,
        "preprocessed": preprocessed,
        "plans_file": os.path.join(preprocessed, "nnUNetPlans.json"),
        "dataset_json": dataset_json,
        "root": str(root),
    }


@pytest.fixture(scope="session")
def real_target(planned) -> PlannedConfiguration:
    return PlannedConfiguration(planned["plans_file"], "2d", planned["dataset_json"])


@pytest.fixture(scope="session")
def built(planned, real_target, tmp_path_factory):
    """The cine cache of the tiny dataset, built by a pool of 2 processes (built once; tests that modify caches
    make their own, serially). The pool forks here: spawned processes would each spend seconds importing torch
    and nnU-Net, too slow for 2 cores; the jobs are pickled either way."""
    folder = str(tmp_path_factory.mktemp("cache") / "ssp_cache")
    saved = cache_module.POOL_START_METHOD, cache_module.MIN_SUBJECTS_PER_PROCESS
    cache_module.POOL_START_METHOD, cache_module.MIN_SUBJECTS_PER_PROCESS = "fork", 1
    try:
        return build_or_load_cache(
            real_target, discover_sources(planned["raw"]), folder, num_processes=2, progress=False
        )
    finally:
        cache_module.POOL_START_METHOD, cache_module.MIN_SUBJECTS_PER_PROCESS = saved


def frame_volume(cache: SliceCache, subject: int, frame: int) -> np.ndarray:
    meta = cache.meta
    rows = np.flatnonzero((meta["subject"] == subject) & (meta["frame"] == frame))
    rows = rows[np.argsort(meta["slice_index"][rows])]
    return np.stack([cache.slice(i) for i in rows])


def nnunet_case(planned, case: str) -> np.ndarray:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = nnUNetDatasetBlosc2(os.path.join(planned["preprocessed"], "nnUNetPlans_2d"))
    data, _, _, _ = dataset.load_case(case)
    return np.asarray(data[:])


# ------------------------------------------------------------------------------------------------------ cache
def test_cache_equals_nnunet_preprocessing(planned, built):
    assert built.subjects == list(SUBJECTS)
    for s, (name, (_, _, ed, es, _)) in enumerate(SUBJECTS.items()):
        for phase, t in (("ED", ed), ("ES", es)):
            expected = nnunet_case(planned, f"{name}_{phase}")
            assert expected.shape[0] == 1
            np.testing.assert_array_equal(frame_volume(built, s, t), expected[0], err_msg=f"{name} {phase}")


def test_metadata(built):
    meta = built.meta
    assert set(meta) == {"subject", "frame", "frame_from_ed", "slice_index", "num_slices", "num_frames"}
    expected_len = sum(f * z for f, z, *_ in SUBJECTS.values()) - 1  # sub001 frame 2 lost its empty slice
    assert len(built) == expected_len == len(meta["subject"])
    for s, (frames, slices, ed, _, _) in enumerate(SUBJECTS.values()):
        rows = meta["subject"] == s
        assert set(meta["num_frames"][rows]) == {frames} and set(meta["num_slices"][rows]) == {slices}
        assert sorted(set(meta["frame"][rows])) == list(range(frames))
        np.testing.assert_array_equal(meta["frame_from_ed"][rows], (meta["frame"][rows] - ed) % frames)
        assert set(meta["slice_index"][rows & (meta["frame"] == 0)]) == set(range(slices))
    cropped = (meta["subject"] == 1) & (meta["frame"] == 2)
    assert sorted(meta["slice_index"][cropped]) == [1, 2, 3]
    i = int(np.flatnonzero(cropped & (meta["slice_index"] == 3))[0])
    assert built.slice_position(i) == pytest.approx(3 / 4)
    summary = built.summary()
    assert summary["num_subjects"] == 3 and summary["num_slices"] == expected_len
    assert summary["num_frames_total"] == 10 and summary["source_kind"] == "cineTr"
    json.dumps(summary)
    # the in-plane crop of sub000 (two empty rows) and the resampling of sub002 show up in the slice shapes
    h0, w0 = built.slice(0).shape
    h2, w2 = built.slice(int(np.flatnonzero(meta["subject"] == 2)[0])).shape
    assert (h0, w0) == (46, 40) and (h2, w2) == (40, 33)


def test_cache_is_cheap_to_pickle(built):
    s = built.slice(0)
    assert type(s) is np.ndarray and s.dtype == np.float32 and s.flags.owndata
    blob = pickle.dumps(built)
    assert len(blob) < 1000
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.slice(5), built.slice(5))


def test_subjects_fraction_selects_seeded_nested_subjects_and_their_slices(built):
    meta = built.meta
    half = built.with_subjects_fraction(0.5, seed=3)  # round(1.5) = 2 of the 3 subjects
    third = built.with_subjects_fraction(0.2, seed=3)  # at least one subject
    chosen = [built.subjects.index(s) for s in half.selected_subjects]
    rows = np.flatnonzero(np.isin(meta["subject"], chosen))
    assert len(half.selected_subjects) == 2 and len(third.selected_subjects) == 1
    assert set(third.selected_subjects) < set(half.selected_subjects)  # nested within a seed
    assert half.with_subjects_fraction(1, seed=3).selected_subjects == sorted(built.subjects)
    assert len(half) == len(rows) and sorted(set(half.meta["subject"])) == sorted(chosen)
    for local in (0, len(half) - 1):
        np.testing.assert_array_equal(half.slice(local), built.slice(rows[local]))
        assert half.slice_position(local) == built.slice_position(rows[local])
    with pytest.raises(IndexError):
        half.slice(len(half))
    summary = half.summary()
    frames = sum(SUBJECTS[built.subjects[s]][0] for s in chosen)
    assert (summary["num_subjects"], summary["num_slices"], summary["num_frames_total"]) == (2, len(rows), frames)
    assert summary["num_subjects_available"] == 3 and summary["subjects"] == half.selected_subjects
    clone = pickle.loads(pickle.dumps(half))  # DataLoader workers get the selection, not the whole cache
    assert len(clone) == len(half)
    np.testing.assert_array_equal(clone.slice(1), half.slice(1))


def test_imagestr_fallback(planned, real_target, tmp_path):
    raw = tmp_path / DATASET_NAME
    shutil.copytree(os.path.join(planned["raw"], "imagesTr"), raw / "imagesTr")
    shutil.copy(os.path.join(planned["raw"], "dataset.json"), raw / "dataset.json")
    sources = discover_sources(str(raw))
    assert [s.subject for s in sources] == [f"{n}_{p}" for n in SUBJECTS for p in ("ED", "ES")]
    assert all(s.kind == "imagesTr" and s.num_frames == 1 and len(s.paths) == 1 for s in sources)
    cache = build_or_load_cache(real_target, sources, str(tmp_path / "c"), num_processes=1, progress=False)
    assert cache.summary()["source_kind"] == "imagesTr" and cache.summary()["num_frames_total"] == 6
    assert set(cache.meta["frame_from_ed"]) == {0}
    for s, case in enumerate(cache.subjects):
        np.testing.assert_array_equal(frame_volume(cache, s, 0), nnunet_case(planned, case)[0])


def test_multichannel_imagestr(planned, real_target, tmp_path):
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    for case in ("sub000_ED", "sub002_ES"):
        source = os.path.join(planned["raw"], "imagesTr", f"{case}_0000.nii.gz")
        shutil.copy(source, raw / "imagesTr" / f"{case}_0000.nii.gz")
        image = sitk.ReadImage(source)
        sitk.WriteImage(sitk.Sqrt(sitk.Cast(image, sitk.sitkFloat32)), str(raw / "imagesTr" / f"{case}_0001.nii.gz"))
    dataset_json = {**DATASET_JSON, "channel_names": {"0": "cineMRI", "1": "sqrt"}}
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    plans = json.loads(json.dumps(real_target.plans_manager.plans))
    config = plans["configurations"]["2d"]
    config["normalization_schemes"], config["use_mask_for_norm"] = ["ZScoreNormalization"] * 2, [False] * 2
    intensities = plans["foreground_intensity_properties_per_channel"]
    intensities["1"] = intensities["0"]
    target = PlannedConfiguration(plans, "2d", dataset_json)
    sources = discover_sources(str(raw))
    assert [len(s.paths) for s in sources] == [2, 2]
    cache = build_or_load_cache(target, sources, str(tmp_path / "c"), num_processes=1, progress=False)
    assert cache.num_channels == 2 and cache.slice_channels(0).shape[0] == 2 and cache.slice(0).ndim == 3
    preprocessor = target.configuration_manager.preprocessor_class(verbose=False)
    for s, source in enumerate(sources):
        expected, _, _ = preprocessor.run_case(
            list(source.paths), None, target.plans_manager, target.configuration_manager, dataset_json
        )
        got = np.stack([cache.slice_channels(i) for i in np.flatnonzero(cache.meta["subject"] == s)], axis=1)
        np.testing.assert_array_equal(got, expected)
    item = SliceViewDataset(cache, [augmentation((32, 32))])[0]
    assert item["views"][0].shape == (2, 32, 32)
    (raw / "dataset.json").write_text(json.dumps(DATASET_JSON))
    with pytest.raises(SSPError, match="sub000_ED.*channel files"):
        discover_sources(str(raw))


def _mtimes(folder):
    return {
        f: os.stat(os.path.join(folder, f)).st_mtime_ns
        for f in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, f))
    }


def test_reuse_rebuild_and_resume(planned, real_target, built, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    shutil.copytree(planned["raw"], raw)
    folder = str(tmp_path / "cache")
    built_subjects = []
    original = cache_module._build_subject

    def counting(job):
        built_subjects.append(job[1])
        return original(job)

    monkeypatch.setattr(cache_module, "_build_subject", counting)
    first = build_or_load_cache(real_target, discover_sources(str(raw)), folder, num_processes=1, progress=False)
    assert built_subjects == [0, 1, 2]
    assert len(first) == len(built) and first.subjects == built.subjects  # serial build == parallel build
    for i in range(len(first)):
        np.testing.assert_array_equal(first.slice(i), built.slice(i))
    before = {**_mtimes(folder), **_mtimes(os.path.join(folder, "subjects"))}

    # unchanged inputs and plans: reused, nothing rewritten
    built_subjects.clear()
    again = build_or_load_cache(real_target, discover_sources(str(raw)), folder, num_processes=1, progress=False)
    assert built_subjects == [] and again.key == first.key
    assert {**_mtimes(folder), **_mtimes(os.path.join(folder, "subjects"))} == before

    # a lost index is reassembled without rebuilding any subject
    os.remove(os.path.join(folder, "index.npz"))
    assert (
        build_or_load_cache(real_target, discover_sources(str(raw)), folder, num_processes=1, progress=False)
        .meta["frame"]
        .tolist()
        == first.meta["frame"].tolist()
    )
    assert built_subjects == []

    # a vanished array is rebuilt alone; a leftover temporary file is removed
    os.remove(os.path.join(folder, "subjects", "s000001_b0.npy"))
    open(os.path.join(folder, "subjects", ".s000002_b0.npy.abc.tmp"), "w").close()
    repaired = build_or_load_cache(real_target, discover_sources(str(raw)), folder, num_processes=1, progress=False)
    assert built_subjects == [1] and repaired.key == first.key
    assert not [f for f in os.listdir(os.path.join(folder, "subjects")) if ".tmp" in f]
    np.testing.assert_array_equal(repaired.slice(len(repaired) - 1), first.slice(len(first) - 1))

    # an interrupted build resumes with the subjects already done
    shutil.rmtree(folder)
    built_subjects.clear()

    def interrupted(job):
        if job[1] == 1:
            raise KeyboardInterrupt
        return counting(job)

    monkeypatch.setattr(cache_module, "_build_subject", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_or_load_cache(real_target, discover_sources(str(raw)), folder, num_processes=1, progress=False)
    assert not os.path.exists(os.path.join(folder, "cache.json")) and built_subjects == [0]
    with pytest.raises(SSPError):
        SliceCache(folder)
    monkeypatch.setattr(cache_module, "_build_subject", counting)
    built_subjects.clear()
    resumed = build_or_load_cache(real_target, discover_sources(str(raw)), folder, num_processes=1, progress=False)
    assert built_subjects == [1, 2] and resumed.key == first.key and len(resumed) == len(first)

    # changed input (mtime) -> rebuilt into a fresh folder and swapped in
    built_subjects.clear()
    cine = os.path.join(raw, "cineTr", "sub002_0000.nii.gz")
    os.utime(cine, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = build_or_load_cache(real_target, discover_sources(str(raw)), folder, num_processes=1, progress=False)
    assert built_subjects == [0, 1, 2] and changed.key != first.key
    assert sorted(os.listdir(tmp_path)) == ["cache", "cache.lock", "raw"]

    # changed plans (another target spacing) -> rebuilt, with other shapes
    built_subjects.clear()
    plans = json.loads(json.dumps(real_target.plans_manager.plans))
    plans["configurations"]["2d"]["spacing"] = [3.0, 3.0]
    coarse = build_or_load_cache(
        PlannedConfiguration(plans, "2d", real_target.dataset_json),
        discover_sources(str(raw)),
        folder,
        num_processes=1,
        progress=False,
    )
    assert built_subjects == [0, 1, 2] and coarse.key != changed.key
    assert coarse.slice(0).shape == (23, 20)


# ----------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SSPError, match=str(empty)):
        discover_sources(None, [str(empty)])
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "fake.nii.gz").write_text("this is not an image")
    with pytest.raises(SSPError, match="fake.nii.gz"):
        discover_sources(None, [str(bogus)])
    flat = tmp_path / "flat"
    flat.mkdir()
    _write(np.ones((20, 30), dtype=np.float32), str(flat / "slice2d.nii.gz"), (1.0, 1.0))
    with pytest.raises(SSPError, match="slice2d.nii.gz.*2D"):
        discover_sources(None, [str(flat)])
    with pytest.raises(SSPError, match="nowhere"):
        discover_sources(str(tmp_path / "nowhere"))
    for err in (SSPError,):
        try:
            discover_sources(None, [str(bogus)])
        except err as e:
            assert "\n" not in str(e)


def test_extra_folders_and_ed_frame_checks(tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    _write(np.ones((3, 4, 10, 12), dtype=np.float32), str(extra / "cine.nii.gz"), SPACING)
    _write(np.ones((4, 10, 12), dtype=np.float32), str(extra / "vol.nii.gz"), SPACING[:3])
    sources = discover_sources(None, [str(extra)])
    assert [(s.subject, s.ndim, s.num_frames, s.kind) for s in sources] == [
        ("extra/cine", 4, 3, "extra"),
        ("extra/vol", 3, 1, "extra"),
    ]
    raw = tmp_path / "raw"
    (raw / "cineTr").mkdir(parents=True)
    shutil.copy(extra / "cine.nii.gz", raw / "cineTr" / "a_0000.nii.gz")
    (raw / "subjects.csv").write_text("subject,ed_frame,num_frames\na,5,3\n")
    with pytest.raises(SSPError, match="subjects.csv.*ed_frame 5"):
        discover_sources(str(raw))
    (raw / "subjects.csv").write_text("subject,ed_frame,num_frames\na,2,3\n")
    assert discover_sources(str(raw))[0].ed_frame == 2


# ------------------------------------------------------------------------------------------------------ views
@pytest.mark.parametrize("intensity", ["paper", "dino", "nnunet", None])
@pytest.mark.parametrize("image_size", [(20, 24), (200, 180)])
def test_view_shapes(intensity, image_size):
    torch.manual_seed(0)
    np.random.seed(0)
    image = np.random.rand(1, *image_size).astype(np.float32)
    keep = image.copy()
    transform = augmentation((64, 48), intensity=intensity)
    first, second = make_view(transform, image), make_view(transform, image)
    assert first.shape == second.shape == (1, 64, 48) and first.dtype == torch.float32
    assert not torch.equal(first, second)
    np.testing.assert_array_equal(image, keep)


def test_view_options():
    with pytest.raises(ValueError):
        augmentation((64, 64), intensity="strong")
    with pytest.raises(TypeError):
        augmentation((64, 64), p_nois=0.3)
    with pytest.raises(ValueError):
        augmentation((8, 64, 64))
    spatial = augmentation((32, 32), intensity=None, p_rotation=0, p_scaling=0, mirror=False, translation=0)
    image = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 64, 64)
    np.testing.assert_array_equal(make_view(spatial, image), image[:, 16:48, 16:48])


# ----------------------------------------------------------------------------------------------------- loader
def _batches(loader):
    return [(b["index"].clone(), [v.clone() for v in b["views"]]) for b in loader]


def test_loader_is_a_function_of_seed_and_epoch(built):
    views = [augmentation((32, 32)), augmentation((16, 16), intensity="dino", scale=(0.3, 0.5))]
    dataset = SliceViewDataset(built, views)
    item = dataset[3]
    assert [v.shape for v in item["views"]] == [(1, 32, 32), (1, 16, 16)]
    assert set(item) == {"views", "index", "slice_position"}
    assert item["index"] == 3 and item["slice_position"] == np.float32(built.slice_position(3))
    iters = default_iters_per_epoch(len(built), 8) + 2  # more than one pass: the permutation repeats
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    serial = _batches(make_loader(dataset, 8, iters, epoch=3, seed=7, num_workers=0))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is left alone
    assert len(serial) == iters
    for index, batch_views in serial:
        assert index.shape == (8,)
        assert batch_views[0].shape == (8, 1, 32, 32) and batch_views[1].shape == (8, 1, 16, 16)
    drawn = torch.cat([i for i, _ in serial]).numpy()
    assert sorted(drawn[: len(built)]) == list(range(len(built)))  # first pass: a permutation of all slices
    for other in (
        _batches(make_loader(dataset, 8, iters, epoch=3, seed=7, num_workers=0)),
        _batches(make_loader(dataset, 8, iters, epoch=3, seed=7, num_workers=2)),
    ):
        for (i1, v1), (i2, v2) in zip(serial, other):
            assert torch.equal(i1, i2) and all(torch.equal(a, b) for a, b in zip(v1, v2))
    next_epoch = _batches(make_loader(dataset, 8, iters, epoch=4, seed=7, num_workers=0))
    assert not torch.equal(serial[0][0], next_epoch[0][0])
    other_seed = _batches(make_loader(dataset, 8, iters, epoch=3, seed=8, num_workers=0))
    assert not torch.equal(serial[0][0], other_seed[0][0])


def test_loader_resumes_inside_an_epoch_with_the_same_batches(built):
    dataset = SliceViewDataset(built, [augmentation((16, 16))])
    full = _batches(make_loader(dataset, 4, 5, epoch=2, seed=3, num_workers=0))
    rest = _batches(make_loader(dataset, 4, 5, epoch=2, seed=3, num_workers=0, first_iteration=3))
    assert len(rest) == 2
    for (i1, v1), (i2, v2) in zip(full[3:], rest):
        assert torch.equal(i1, i2) and torch.equal(v1[0], v2[0])
    with pytest.raises(ValueError, match="first_iteration"):
        make_loader(dataset, 4, 5, epoch=2, seed=3, num_workers=0, first_iteration=5)


def test_one_loader_for_several_epochs_yields_each_epochs_batches_in_turn(built):
    """The run-long loader (workers started once, prefetching across epoch boundaries) gives exactly the batches of
    the per-epoch loaders, from a resumed iteration on."""
    dataset = SliceViewDataset(built, [augmentation((16, 16))])
    run = _batches(make_loader(dataset, 4, 5, epoch=2, seed=3, num_workers=2, first_iteration=3, num_epochs=3))
    per_epoch = (
        _batches(make_loader(dataset, 4, 5, epoch=2, seed=3, num_workers=0, first_iteration=3))
        + _batches(make_loader(dataset, 4, 5, epoch=3, seed=3, num_workers=0))
        + _batches(make_loader(dataset, 4, 5, epoch=4, seed=3, num_workers=0))
    )
    assert len(run) == len(per_epoch) == 2 + 5 + 5
    for (i1, v1), (i2, v2) in zip(run, per_epoch):
        assert torch.equal(i1, i2) and torch.equal(v1[0], v2[0])


def test_default_iters_per_epoch():
    assert default_iters_per_epoch(100, 32) == 4
    assert default_iters_per_epoch(96, 32) == 3
    assert default_iters_per_epoch(5, 32) == 1
