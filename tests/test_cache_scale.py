"""Slice cache reads at scale: slices come from positioned reads, so a reading process maps no cache file and its
resident memory does not grow with the slices it reads; values equal the block files as numpy loads them. Fast: the
cache folders are written here with the build's own index assembly, no nnU-Net preprocessing."""

import json
import multiprocessing
import os
import pickle
import sys

import numpy as np
import pytest

from nnunet_ssp.errors import SSPError
from pretraining.data import cache as cache_module
from pretraining.data import frames as frames_module
from pretraining.data import slice_cache as format_module
from pretraining.data.slice_cache import SliceCache


def _write_cache(folder: str, blocks_per_subject: list, channels: int = 1, hw=(6, 5)) -> SliceCache:
    """A finished cache: subject s has the blocks ``blocks_per_subject[s]``, each ``(frames, z)`` with distinct
    random values."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, format_module.SUBJECTS_DIR))
    markers = []
    for s, blocks in enumerate(blocks_per_subject):
        entries, t0 = [], 0
        for k, (frames, z) in enumerate(blocks):
            shape = (frames, z, *hw) if channels == 1 else (frames, channels, z, *hw)
            name = f"{format_module.SUBJECTS_DIR}/s{s:06d}_b{k}.npy"
            np.save(os.path.join(folder, name), rng.standard_normal(shape).astype(np.float32))
            entries.append(
                {
                    "file": name,
                    "frames": list(range(t0, t0 + frames)),
                    "shape": list(shape),
                    "z_offset": 0,
                    "num_slices": z,
                    "bytes": os.path.getsize(os.path.join(folder, name)),
                }
            )
            t0 += frames
        markers.append(
            {
                "index": s,
                "subject": f"sub{s}",
                "kind": "cineTr",
                "num_frames": t0,
                "ed_frame": 0,
                "num_channels": channels,
                "blocks": entries,
            }
        )
    arrays, summary = cache_module._assemble_index(folder, markers)
    with open(os.path.join(folder, format_module.INDEX_FILE), "wb") as f:
        np.savez(f, **arrays)
    with open(os.path.join(folder, format_module.FINGERPRINT_FILE), "w") as f:
        json.dump(
            {"format_version": format_module.CACHE_FORMAT_VERSION, "key": "k", "summary": summary, "fingerprint": {}}, f
        )
    return SliceCache(folder)


def _expected(cache: SliceCache, i: int) -> np.ndarray:
    idx = cache._idx()
    array = np.load(os.path.join(cache.folder, str(idx["block_files"][idx["block"][i]])), mmap_mode="r")
    r, z = int(idx["row"][i]), int(idx["z"][i])
    return np.array(array[r, z] if cache.num_channels == 1 else array[r, :, z])


def _mapped_cache_files(folder: str) -> list:
    with open("/proc/self/maps") as f:
        return [line for line in f if folder in line]


@pytest.mark.parametrize("channels", [1, 2])
def test_slices_equal_the_block_files(tmp_path, channels):
    cache = _write_cache(str(tmp_path / "c"), [[(3, 4)], [(2, 3), (1, 2)]], channels=channels)
    assert len(cache) == 3 * 4 + 2 * 3 + 1 * 2
    for i in range(len(cache)):
        s = cache.slice(i)
        assert s.dtype == np.float32 and s.flags.owndata and s.flags.c_contiguous
        assert s.shape == ((6, 5) if channels == 1 else (channels, 6, 5))
        np.testing.assert_array_equal(s, _expected(cache, i))
        assert cache.slice_channels(i).shape == (channels, 6, 5)
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.slice(len(cache) - 1), cache.slice(len(cache) - 1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_reading_every_slice_maps_no_cache_file(tmp_path):
    folder = str(tmp_path / "c")
    cache = _write_cache(folder, [[(4, 3)]] * 5)
    for i in range(len(cache)):
        cache.slice(i)
    assert _mapped_cache_files(folder) == []  # nothing of the cache counts in this process's RSS
    mapped = np.load(os.path.join(folder, str(cache._idx()["block_files"][0])), mmap_mode="r")  # the control
    assert _mapped_cache_files(folder)
    del mapped


def test_open_files_are_bounded_and_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(format_module, "MAX_OPEN_FILES", 2)
    cache = _write_cache(str(tmp_path / "c"), [[(2, 2)]] * 5)
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for i in range(len(cache)):
        cache.slice(i)
    assert len(cache._files) == 2
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before + 2
        cache.close()
        assert len(os.listdir("/proc/self/fd")) == before
    np.testing.assert_array_equal(cache.slice(0), _expected(cache, 0))  # reopens after close


def _read_in_child(cache, i, queue):
    queue.put(cache.slice(i).tolist())


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_reads_with_its_own_files(tmp_path):
    cache = _write_cache(str(tmp_path / "c"), [[(2, 3)], [(2, 3)]])
    cache.slice(0)  # the parent has a block file open
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(cache, len(cache) - 1, queue))
    child.start()
    got = np.array(queue.get(timeout=30), dtype=np.float32)
    child.join(30)
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, cache.slice(len(cache) - 1))
    np.testing.assert_array_equal(cache.slice(0), _expected(cache, 0))  # the parent's file still works


def test_a_truncated_block_file_is_an_error_naming_it(tmp_path):
    folder = str(tmp_path / "c")
    cache = _write_cache(folder, [[(2, 3)]])
    path = os.path.join(folder, format_module.SUBJECTS_DIR, "s000000_b0.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 8)
    assert cache.missing_files() == [f"{format_module.SUBJECTS_DIR}/s000000_b0.npy"]
    with pytest.raises(SSPError, match="s000000_b0.npy"):
        cache.slice(len(cache) - 1)


# ------------------------------------------------------------------------------ one decompression per 4D cine
def _frames(path: str, monkeypatch, one_read: bool) -> list:
    """read_frames of a 4D cine, by the one-read path (nibabel's voxels) or forced through SimpleITK's read."""
    import types

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from pretraining.data.frames import read_frames
    from pretraining.data.sources import CineSource

    if not one_read:
        monkeypatch.setattr(frames_module, "_same_as_simpleitk", lambda image, voxels: False)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    size = reader.GetSize()
    source = CineSource((path,), "s", 0, "cineTr", 4, size[3], size[:3])
    frames = list(read_frames(source, types.SimpleNamespace(image_reader_writer_class=SimpleITKIO)))
    monkeypatch.undo()
    return frames


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32", "int32"])
def test_a_cine_read_once_equals_simpleitks_read(tmp_path, monkeypatch, dtype):
    import SimpleITK as sitk

    rng = np.random.default_rng(1)
    array = (rng.standard_normal((3, 4, 7, 5)) * 50 + 100).astype(dtype)  # (T, Z, Y, X)
    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetSpacing((1.3, 1.1, 8.0, 30.0))
    image.SetOrigin((5.0, -3.0, 2.0, 0.0))
    d = np.eye(4)
    d[:3, :3] = [[0, 1, 0], [1, 0, 0], [0, 0, -1]]
    image.SetDirection(d.ravel().tolist())
    path = str(tmp_path / "cine.nii.gz")
    sitk.WriteImage(image, path, True)
    calls = []
    original = frames_module._same_as_simpleitk
    monkeypatch.setattr(frames_module, "_same_as_simpleitk", lambda *a: calls.append(original(*a)) or calls[-1])
    once = _frames(path, monkeypatch, one_read=True)
    assert calls == [True]  # the one-read path was taken
    full = _frames(path, monkeypatch, one_read=False)
    assert len(once) == len(full) == 3
    for (a, pa), (b, pb) in zip(once, full):
        assert a.dtype == b.dtype == np.float32 and a.flags.c_contiguous and b.flags.c_contiguous
        np.testing.assert_array_equal(a, b)
        assert pa == pb
    np.testing.assert_array_equal(once[1][0][0], array[1].astype(np.float32))


def test_a_scaled_cine_is_read_by_simpleitk(tmp_path, monkeypatch):
    import nibabel as nib

    array = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(5, 4, 3, 2) + 1  # (X, Y, Z, T)
    image = nib.Nifti1Image(array, np.diag([1.5, 1.5, 8.0, 1.0]))
    image.header.set_slope_inter(2.0, 10.0)
    path = str(tmp_path / "scaled.nii.gz")
    nib.save(image, path)
    assert not frames_module._same_as_simpleitk(nib.load(path), np.asanyarray(nib.load(path).dataobj))
    frames = _frames(path, monkeypatch, one_read=True)
    np.testing.assert_array_equal(frames[1][0][0], (array[..., 1].T * 2.0 + 10.0).astype(np.float32))
