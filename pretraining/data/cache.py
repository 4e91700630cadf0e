"""The pretraining slice cache: every frame of every source, preprocessed exactly as nnU-Net preprocesses it.

Each source (a 4D cine, or a 3D volume taken as a 1-frame cine) is preprocessed frame by frame with nnU-Net's own
preprocessor for the target plans and configuration (``preprocessor.run_case_npy``: transpose_forward, crop to
nonzero, normalization, resampling), so a cached ED frame equals nnU-Net's own preprocessed ED case. Nothing of that
pipeline is reimplemented here.

Layout of a cache folder::

    cache.json            fingerprint + summary; written last, so its presence means "complete"
    index.npz             per-slice metadata (subject, frame, frame_from_ed, slice_index, num_slices, num_frames)
                          plus where each slice lives (block, row, z) and the subject ids
    subjects/sNNNNNN.json one marker per finished subject (written after its arrays)
    subjects/sNNNNNN_bK.npy  float32 arrays (T_k, Z, H, W) (single channel) or (T_k, C, Z, H, W); axis Z is the
                          first axis after transpose_forward, i.e. the slice axis. Usually one block per subject;
                          frames whose nonzero crop differs (shape or first slice) go to further blocks.

Next to the folder, ``<folder>.lock`` serializes builds and keeps a cache that a run reads from being rebuilt.

Slices are read with positioned reads (``os.preadv``) from block files kept open per process, not through memory maps:
a process's resident memory does not grow with the dataset nor with the slices it has read (their pages stay in the
kernel's page cache, which the kernel reclaims at will). ``memmap_for`` still gives a block's memory map. Every file is
written atomically (temporary file + ``os.replace``), so an interrupted build resumes with the subjects already done
and never reads half-written files. Before a frame is cached, its file must be complete and finite (SimpleITK would
read missing, NaN and infinite voxels as zeros) and the frame not constant.
"""
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import (acquire_lock, atomic_path, check_finite, check_intensities, fault_point,
                           remove_temporaries, save_json_atomic)
from nnunet_ssp.raw_layout import CINE_FOLDER, IMAGES_TR, SUBJECTS_TABLE, SubjectRow, read_subjects

CACHE_FORMAT_VERSION = 1
FINGERPRINT_FILE = "cache.json"
INDEX_FILE = "index.npz"
BUILDING_FILE = "building.json"
SUBJECTS_DIR = "subjects"
NIFTI = ".nii.gz"
META_KEYS = ("subject", "frame", "frame_from_ed", "slice_index", "num_slices", "num_frames")
MAX_OPEN_MEMMAPS = 256
MAX_OPEN_FILES = 128  # block files a reading process keeps open
# how cache-building processes start: spawn, as nnU-Net's own preprocessing does (forking a process whose torch/OpenMP
# threads are running can deadlock the children); each spawned process pays the torch + nnU-Net imports once.
POOL_START_METHOD = "spawn"
# a spawned process costs seconds of start-up: use at most one process per this many subjects still to build
MIN_SUBJECTS_PER_PROCESS = 4


# --------------------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class CineSource:
    """One subject's images: a cine (4D, T frames) or a 3D volume (one frame), possibly split into channel files.

    ``paths`` holds one file, or for an imagesTr case its channel files ``_0000``, ``_0001``, ... in order.
    """
    paths: Tuple[str, ...]
    subject: str
    ed_frame: int
    kind: str  # "cineTr", "imagesTr" or "extra"
    ndim: int  # 3 or 4
    num_frames: int
    size: Tuple[int, int, int]  # (x, y, z) voxels, from the header

    def as_dict(self) -> dict:
        d = asdict(self)
        d["paths"], d["size"] = list(self.paths), list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CineSource":
        return cls(tuple(d["paths"]), d["subject"], int(d["ed_frame"]), d["kind"], int(d["ndim"]),
                   int(d["num_frames"]), tuple(int(n) for n in d["size"]))


def max_slices(sources: Sequence[CineSource], transpose_forward: Sequence[int]) -> int:
    """An upper bound of the 2D slices the cache of ``sources`` holds, from the headers alone (nnU-Net's 2D
    preprocessing never adds slices along the first axis after transpose_forward; cropping may remove some)."""
    return sum(s.num_frames * s.size[::-1][transpose_forward[0]] for s in sources)


def _image_header(path: str) -> Tuple[int, Tuple[int, ...]]:
    """(dimension, size) from the image header, or SSPError naming the file."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise SSPError(f"{path}: not a readable image ({_first_line(e)})") from None
    return reader.GetDimension(), tuple(reader.GetSize())


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # SimpleITK puts the useful part last ("... ImageIO failed to read ...")
    return lines[-1] if lines else type(e).__name__


def _nifti_files(folder: str, ending: str = NIFTI) -> List[str]:
    return sorted(f for f in glob.glob(os.path.join(glob.escape(folder), "*" + ending)) if os.path.isfile(f))


def _strip(name: str, ending: str) -> str:
    return name[:-len(ending)] if name.endswith(ending) else name


def _check_frames(subjects_csv: str, path: str, num_frames: int, row: SubjectRow) -> None:
    """The table's frame count and ED/ES frame indices must fit the cine's frames."""
    if row.num_frames is not None and row.num_frames != num_frames:
        raise SSPError(f"{subjects_csv}: subject {row.subject} has num_frames {row.num_frames}, but {path} has "
                       f"{num_frames} frames")
    for column in ("ed_frame", "es_frame"):
        frame = getattr(row, column)
        if frame is not None and not 0 <= frame < num_frames:
            raise SSPError(f"{subjects_csv}: {column} {frame} of subject {row.subject} is outside "
                           f"0..{num_frames - 1} ({path} has {num_frames} frames)")


def _cine_sources(cine_dir: str, subjects_csv: str) -> List[CineSource]:
    files = _nifti_files(cine_dir)
    if not files:
        raise SSPError(f"{cine_dir}: no *{NIFTI} cine files")
    table = {row.subject: row for row in read_subjects(subjects_csv)} if os.path.isfile(subjects_csv) else {}
    sources = []
    for path in files:
        dim, size = _image_header(path)
        if dim not in (3, 4):
            raise SSPError(f"{path}: a cine must be 4D (X, Y, Z, T) or 3D, not {dim}D")
        num_frames = size[3] if dim == 4 else 1
        subject = _strip(_strip(os.path.basename(path), NIFTI), "_0000")
        row = table.get(subject, SubjectRow(subject))
        _check_frames(subjects_csv, path, num_frames, row)
        sources.append(CineSource((os.path.abspath(path),), subject, row.ed_frame or 0, CINE_FOLDER, dim, num_frames,
                                  size[:3]))
    return sources


def _imagestr_sources(images_dir: str, dataset_json: dict) -> List[CineSource]:
    ending = dataset_json.get("file_ending", NIFTI)
    files = _nifti_files(images_dir, ending)
    if not files:
        raise SSPError(f"{images_dir}: no *{ending} images")
    cases: Dict[str, Dict[int, str]] = OrderedDict()
    for path in files:
        match = re.fullmatch(r"(.+)_(\d{4})", _strip(os.path.basename(path), ending))
        if match is None:
            raise SSPError(f"{path}: not named CASE_XXXX{ending} (nnU-Net's channel suffix is missing)")
        cases.setdefault(match.group(1), {})[int(match.group(2))] = path
    expected = len(dataset_json["channel_names"]) if "channel_names" in dataset_json else None
    sources = []
    for case, channels in cases.items():
        n = expected if expected is not None else max(channels) + 1
        if sorted(channels) != list(range(n)):
            raise SSPError(f"{images_dir}: case {case} has channel files {sorted(channels)}, expected 0..{n - 1}")
        paths = tuple(os.path.abspath(channels[c]) for c in range(n))
        headers = [_image_header(p) for p in paths]
        for p, (dim, _) in zip(paths, headers):
            if dim != 3:
                raise SSPError(f"{p}: imagesTr volumes must be 3D, not {dim}D")
        sources.append(CineSource(paths, case, 0, IMAGES_TR, 3, 1, headers[0][1]))
    return sources


def _extra_sources(folder: str) -> List[CineSource]:
    if not os.path.isdir(folder):
        raise SSPError(f"{folder}: extra data folder not found")
    files = _nifti_files(folder)
    if not files:
        raise SSPError(f"{folder}: no *{NIFTI} images")
    prefix = os.path.basename(os.path.normpath(folder))
    sources = []
    for path in files:
        dim, size = _image_header(path)
        if dim not in (3, 4):
            raise SSPError(f"{path}: expected a 3D volume or a 4D cine, not a {dim}D image")
        sources.append(CineSource((os.path.abspath(path),), f"{prefix}/{_strip(os.path.basename(path), NIFTI)}", 0,
                                  "extra", dim, size[3] if dim == 4 else 1, size[:3]))
    return sources


def discover_sources(raw_dataset_folder: Optional[str], extra_folders: Sequence[str] = ()) -> List[CineSource]:
    """The images to pretrain on: the dataset's ``cineTr/*.nii.gz`` (every frame of every slice) when that folder
    exists, else its ``imagesTr`` volumes (each a 1-frame cine, channel files grouped per case); plus every
    ``*.nii.gz`` (3D or 4D) in ``extra_folders``. ED frames come from the dataset's ``subjects.csv`` (``ed_frame``)
    when present, else frame 0. ``raw_dataset_folder`` may be None to use only extra folders."""
    sources: List[CineSource] = []
    if raw_dataset_folder is not None:
        if not os.path.isdir(raw_dataset_folder):
            raise SSPError(f"{raw_dataset_folder}: raw dataset folder not found")
        cine_dir = os.path.join(raw_dataset_folder, CINE_FOLDER)
        images_dir = os.path.join(raw_dataset_folder, IMAGES_TR)
        if os.path.isdir(cine_dir):
            sources += _cine_sources(cine_dir, os.path.join(raw_dataset_folder, SUBJECTS_TABLE))
        elif os.path.isdir(images_dir):
            dataset_json_file = os.path.join(raw_dataset_folder, "dataset.json")
            dataset_json = {}
            if os.path.isfile(dataset_json_file):
                try:
                    with open(dataset_json_file, encoding="utf-8") as f:
                        dataset_json = json.load(f)
                except (OSError, ValueError) as e:
                    raise SSPError(f"{dataset_json_file}: cannot read ({e})") from None
            sources += _imagestr_sources(images_dir, dataset_json)
        else:
            raise SSPError(f"{raw_dataset_folder}: neither cineTr/ nor imagesTr/ found")
    for folder in extra_folders:
        sources += _extra_sources(folder)
    if not sources:
        raise SSPError("no pretraining images: give a raw dataset folder or extra data folders")
    return sources


# ------------------------------------------------------------------------------------------------ fingerprint
def _nnunet_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("nnunetv2")
    except PackageNotFoundError:
        return "unknown"


def _preprocessing_digest(target) -> str:
    """Everything in the plans (beyond target.summary()) that can change nnU-Net's preprocessing output."""
    plans = target.plans_manager.plans
    config = {k: v for k, v in target.configuration_manager.configuration.items()
              if k not in ("architecture", "batch_size")}
    relevant = {"configuration": config, "transpose_forward": plans.get("transpose_forward"),
                "image_reader_writer": plans.get("image_reader_writer"),
                "foreground_intensity_properties_per_channel": plans.get("foreground_intensity_properties_per_channel"),
                "channel_names": target.dataset_json.get("channel_names"),
                "labels": target.dataset_json.get("labels")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(target, sources: Sequence[CineSource]) -> dict:
    """What a cache was built from: source files (path, size, mtime), ED frames, plans and software versions."""
    files = []
    for s in sources:
        entries = []
        for p in s.paths:
            try:
                st = os.stat(p)
            except OSError as e:
                raise SSPError(f"{p}: {e.strerror}") from None
            entries.append([p, st.st_size, st.st_mtime_ns])
        files.append({"subject": s.subject, "kind": s.kind, "ed_frame": s.ed_frame, "files": entries})
    return {"format_version": CACHE_FORMAT_VERSION, "nnunetv2_version": _nnunet_version(),
            "preprocessor": target.configuration_manager.preprocessor_name, "target": target.summary(),
            "preprocessing_digest": _preprocessing_digest(target), "sources": files}


def _fingerprint_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:20]


def _load_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------- building
_WORKER_TARGETS: Dict[str, object] = {}


def _worker_target(key: str, plans: dict, configuration: str, dataset_json: dict):
    from nnunet_ssp.network import PlansTarget
    if key not in _WORKER_TARGETS:
        _WORKER_TARGETS.clear()
        _WORKER_TARGETS[key] = PlansTarget(plans, configuration, dataset_json)
    return _WORKER_TARGETS[key]


def _read_frames(source: CineSource, plans_manager):
    """Yields (data (C, Z, Y, X) float32, properties) per frame, as nnU-Net's reader would return them.

    3D files go through the plans' own reader. A 4D cine is split into frames whose properties are those SimpleITKIO
    produces for a 3D image of the same geometry (spacing reversed to (z, y, x)), and whose voxels are SimpleITK's.
    The file is decompressed once: when SimpleITK would return the stored values unchanged (a 4D scalar NIfTI without
    intensity scaling, the usual cine), the voxels nibabel read for the integrity check are used and SimpleITK reads
    the header only; otherwise SimpleITK reads the image."""
    import SimpleITK as sitk
    voxels = None
    for path in source.paths:
        voxels = _check_file(path, keep=source.ndim == 4)
    reader_class = plans_manager.image_reader_writer_class
    if source.ndim == 4 and reader_class.__name__ != "SimpleITKIO":
        import warnings
        warnings.warn(f"{source.paths[0]}: 4D cines are read with SimpleITK (as SimpleITKIO reads 3D images), but "
                      f"the plans use {reader_class.__name__}; check that cine frames and imagesTr volumes match")
    if source.ndim == 3:
        try:
            data, props = reader_class().read_images(list(source.paths))
        except Exception as e:  # the readers raise RuntimeError, OSError, nibabel errors ...
            raise SSPError(f"{source.paths[0]}: cannot read image ({_first_line(e)})") from None
        yield data, props
        return
    path = source.paths[0]
    try:
        if voxels is not None:
            image = sitk.ImageFileReader()
            image.SetFileName(path)
            image.ReadImageInformation()
            if image.GetDimension() != 4:
                raise SSPError(f"{path}: expected a 4D cine, SimpleITK reads a {image.GetDimension()}D image")
            array = voxels.transpose(3, 2, 1, 0)  # nibabel's (X, Y, Z, T) -> SimpleITK's (T, Z, Y, X)
        else:
            image = sitk.ReadImage(path)
            array = sitk.GetArrayFromImage(image)  # (T, Z, Y, X)
    except RuntimeError as e:
        raise SSPError(f"{path}: cannot read image ({_first_line(e)})") from None
    del voxels
    if array.ndim != 4:
        raise SSPError(f"{path}: expected a 4D cine, read an array of shape {array.shape}")
    spacing, origin, d = image.GetSpacing()[:3], image.GetOrigin()[:3], image.GetDirection()
    direction = (d[0], d[1], d[2], d[4], d[5], d[6], d[8], d[9], d[10])
    for t in range(array.shape[0]):
        props = {"sitk_stuff": {"spacing": tuple(spacing), "origin": tuple(origin), "direction": direction},
                 "spacing": list(np.abs(list(spacing)[::-1]))}
        # C order whatever the source's layout: nnU-Net's normalization sums in memory order
        yield np.ascontiguousarray(array[t][None], dtype=np.float32), props


def _check_file(path: str, keep: bool = False) -> Optional[np.ndarray]:
    """SimpleITK (in nnU-Net's reader too) reads a truncated NIfTI without complaint, the missing voxels as zeros, and
    NaN or infinite voxels as zeros: the file is read with nibabel first, which does neither. With ``keep``, returns
    nibabel's voxels (X, Y, Z, T) when they are what SimpleITK would read (see ``_same_as_simpleitk``), else None."""
    if not path.endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib
    try:
        image = nib.load(path)
        voxels = np.asanyarray(image.dataobj)
    except Exception as e:  # nibabel, gzip and zlib raise many types for short or corrupt files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SSPError(f"{path}: truncated or corrupt image file ({reason})") from None
    check_finite(voxels, path)
    return voxels if keep and _same_as_simpleitk(image, voxels) else None


def _same_as_simpleitk(image, voxels: np.ndarray) -> bool:
    """Whether SimpleITK reads the same voxel values as nibabel did: a 4D scalar NIfTI of a plain integer or float
    type stored without intensity scaling (scl_slope 0, 1 or NaN and scl_inter 0 or NaN, which both libraries take
    as no scaling), so both return the stored values, in the file's order."""
    try:
        header = image.header
        slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
        dims = [int(n) for n in header["dim"]]
        stored = header.get_data_dtype()
    except (AttributeError, KeyError, TypeError, ValueError):
        return False
    return (voxels.ndim == 4 and dims[0] == 4 and voxels.dtype.kind in "iuf" and voxels.dtype == stored
            and (slope in (0.0, 1.0) or np.isnan(slope)) and (inter == 0.0 or np.isnan(inter)))


def _check_frame(source: CineSource, t: int, data: np.ndarray) -> None:
    """Every channel of frame ``t`` must have finite voxels that are not all equal."""
    for c in range(data.shape[0]):
        path = source.paths[min(c, len(source.paths) - 1)]  # one file per channel, or one file
        check_intensities(data[c], f"{path} frame {t}" if source.ndim == 4 else path)


def _subject_marker(folder: str, index: int) -> str:
    return os.path.join(folder, SUBJECTS_DIR, f"s{index:06d}.json")


def _marker_valid(folder: str, index: int, source: CineSource) -> Optional[dict]:
    marker = _load_json(_subject_marker(folder, index))
    if marker is None or marker.get("subject") != source.subject or marker.get("paths") != list(source.paths):
        return None
    for block in marker["blocks"]:
        path = os.path.join(folder, block["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != block["bytes"]:
            return None
    return marker


def _build_subject(job: tuple) -> dict:
    """Preprocesses every frame of one source with nnU-Net's preprocessor and writes its arrays and marker."""
    folder, index, source_dict, target_args = job
    target = _worker_target(*target_args)
    source = CineSource.from_dict(source_dict)
    pm, cm = target.plans_manager, target.configuration_manager
    preprocessor = cm.preprocessor_class(verbose=False)
    num_channels = len(cm.normalization_schemes)
    frames = []
    for t, (data, props) in enumerate(_read_frames(source, pm)):
        if data.shape[0] != num_channels:
            raise SSPError(f"{source.paths[0]}: {data.shape[0]} channel(s), but the plans normalize "
                           f"{num_channels} (dataset.json channel_names)")
        _check_frame(source, t, data)
        out, _, props = preprocessor.run_case_npy(data, None, props, pm, cm, target.dataset_json)
        out = np.asarray(out, dtype=np.float32)
        frames.append((out, int(props["bbox_used_for_cropping"][0][0]), int(props["shape_before_cropping"][0])))
    if len(frames) != source.num_frames:
        raise SSPError(f"{source.paths[0]}: read {len(frames)} frames, the header says {source.num_frames}")

    groups: Dict[tuple, List[int]] = OrderedDict()
    for t, (out, z0, n) in enumerate(frames):
        groups.setdefault((out.shape, z0, n), []).append(t)
    blocks = []
    for k, ((shape, z0, n), ts) in enumerate(groups.items()):
        name = f"s{index:06d}_b{k}.npy"
        path = os.path.join(folder, SUBJECTS_DIR, name)
        block_shape = (len(ts), *shape[1:]) if num_channels == 1 else (len(ts), *shape)
        with atomic_path(path) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=block_shape)
            for r, t in enumerate(ts):
                array[r] = frames[t][0][0] if num_channels == 1 else frames[t][0]
            array.flush()
            del array
        blocks.append({"file": f"{SUBJECTS_DIR}/{name}", "frames": ts, "shape": list(block_shape),
                       "z_offset": z0, "num_slices": n, "bytes": os.path.getsize(path)})
    marker = {"index": index, "subject": source.subject, "paths": list(source.paths), "kind": source.kind,
              "num_frames": source.num_frames, "ed_frame": source.ed_frame, "num_channels": num_channels,
              "blocks": blocks}
    save_json_atomic(marker, _subject_marker(folder, index))
    fault_point(f"cache:subject:{index}")
    return marker


def _clear(folder: str) -> None:
    """Removes what a cache build writes (and nothing else) from ``folder``."""
    shutil.rmtree(os.path.join(folder, SUBJECTS_DIR), ignore_errors=True)
    for name in (FINGERPRINT_FILE, INDEX_FILE, BUILDING_FILE):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def _assemble_index(folder: str, markers: List[dict]) -> Tuple[dict, dict]:
    """Per-slice index arrays (sorted by subject, frame, slice) and the cache summary."""
    cols = {k: [] for k in (*META_KEYS, "block", "row", "z")}
    block_files, block_bytes = [], []
    for marker in markers:
        s, n_frames, ed = marker["index"], marker["num_frames"], marker["ed_frame"]
        for block in marker["blocks"]:
            b = len(block_files)
            block_files.append(block["file"])
            block_bytes.append(block["bytes"])
            n_z = block["shape"][1] if marker["num_channels"] == 1 else block["shape"][2]
            for r, t in enumerate(block["frames"]):
                z = np.arange(n_z)
                cols["subject"].append(np.full(n_z, s))
                cols["frame"].append(np.full(n_z, t))
                cols["frame_from_ed"].append(np.full(n_z, (t - ed) % n_frames))
                cols["slice_index"].append(z + block["z_offset"])
                cols["num_slices"].append(np.full(n_z, block["num_slices"]))
                cols["num_frames"].append(np.full(n_z, n_frames))
                cols["block"].append(np.full(n_z, b))
                cols["row"].append(np.full(n_z, r))
                cols["z"].append(z)
    arrays = {k: np.concatenate(v).astype(np.int32) for k, v in cols.items()}
    order = np.lexsort((arrays["slice_index"], arrays["frame"], arrays["subject"]))
    arrays = {k: v[order] for k, v in arrays.items()}
    arrays["block_files"] = np.array(block_files)
    arrays["block_bytes"] = np.array(block_bytes, dtype=np.int64)
    arrays["subject_ids"] = np.array([m["subject"] for m in markers])
    kinds = []
    for m in markers:
        if m["kind"] not in kinds:
            kinds.append(m["kind"])
    summary = {"num_subjects": len(markers), "num_slices": int(len(order)),
               "num_frames_total": int(sum(m["num_frames"] for m in markers)), "source_kind": "+".join(kinds),
               "num_channels": int(markers[0]["num_channels"])}
    return arrays, summary


class _WorkerDied(SSPError):
    """A cache-building process died (e.g. killed for memory); the subjects finished so far stay for the next run."""


def _run_jobs(jobs: List[tuple], num_processes: int, progress: bool) -> List[dict]:
    from tqdm import tqdm
    results = []
    with tqdm(total=len(jobs), desc="SSP slice cache", unit="subject", disable=not progress or not jobs,
              mininterval=1.0) as bar:
        num_processes = max(1, min(int(num_processes), len(jobs) // MIN_SUBJECTS_PER_PROCESS))
        if num_processes == 1:
            for job in jobs:
                results.append(_build_subject(job))
                bar.update()
            return results
        import multiprocessing
        context = multiprocessing.get_context(POOL_START_METHOD)
        with ProcessPoolExecutor(num_processes, mp_context=context) as pool:
            futures = [pool.submit(_build_subject, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    results.append(future.result())
                    bar.update()
            except BrokenProcessPool:
                raise _WorkerDied(f"a cache-building process died (out of memory?); rerun, e.g. with fewer "
                                  f"processes: the {len(results)} subjects finished in this run are kept") from None
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    return results


def _build(folder: str, key: str, fp: dict, target, sources: Sequence[CineSource], num_processes: int,
           progress: bool) -> None:
    os.makedirs(os.path.join(folder, SUBJECTS_DIR), exist_ok=True)
    building = _load_json(os.path.join(folder, BUILDING_FILE))
    if building is None or building.get("key") != key:
        _clear(folder)  # leftovers of another build (other inputs or plans) are not reusable
        os.makedirs(os.path.join(folder, SUBJECTS_DIR), exist_ok=True)
        save_json_atomic({"key": key}, os.path.join(folder, BUILDING_FILE))
    for sub in (folder, os.path.join(folder, SUBJECTS_DIR)):
        remove_temporaries(sub)  # of an interrupted build
    markers: List[Optional[dict]] = [_marker_valid(folder, i, s) for i, s in enumerate(sources)]
    target_args = (key, target.plans_manager.plans, target.configuration, target.dataset_json)
    jobs = [(folder, i, s.as_dict(), target_args) for i, s in enumerate(sources) if markers[i] is None]
    for marker in _run_jobs(jobs, num_processes, progress):
        markers[marker["index"]] = marker
    arrays, summary = _assemble_index(folder, markers)
    with atomic_path(os.path.join(folder, INDEX_FILE)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    save_json_atomic({"format_version": CACHE_FORMAT_VERSION, "key": key, "summary": summary, "fingerprint": fp},
                     os.path.join(folder, FINGERPRINT_FILE))
    os.remove(os.path.join(folder, BUILDING_FILE))


def _build_or_discard(folder: str, *build_args) -> None:
    """``_build`` into a folder that holds no finished cache; a failed build (bad input, write error) is removed,
    since its inputs must change before it can finish. A dead worker process is no such failure: kept."""
    try:
        _build(folder, *build_args)
    except SSPError as e:
        if not isinstance(e, _WorkerDied):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _finish_swap(cache_dir: str) -> None:
    """Completes a swap of a rebuilt cache that was interrupted between its renames."""
    rebuilt = cache_dir + ".rebuild"
    if not os.path.exists(cache_dir) and os.path.isfile(os.path.join(rebuilt, FINGERPRINT_FILE)):
        os.replace(rebuilt, cache_dir)
    shutil.rmtree(cache_dir + ".old", ignore_errors=True)


def _finished(cache_dir: str, key: str) -> Optional["SliceCache"]:
    """The finished cache of ``key`` in ``cache_dir``, if it is there with all its files."""
    existing = _load_json(os.path.join(cache_dir, FINGERPRINT_FILE))
    if existing is None or existing.get("key") != key:
        return None
    cache = SliceCache(cache_dir)
    return None if cache.missing_files() else cache


def _build_locked(cache_dir: str, key: str, fp: dict, target, sources: Sequence[CineSource], num_processes: int,
                  progress: bool) -> "SliceCache":
    """Builds, completes or rebuilds the cache (under the exclusive lock)."""
    build_args = (key, fp, target, sources, num_processes, progress)
    _finish_swap(cache_dir)
    existing = _load_json(os.path.join(cache_dir, FINGERPRINT_FILE))
    if existing is not None and existing.get("key") == key:
        # some arrays vanished: mark the folder as an unfinished build of this key and complete it in place
        save_json_atomic({"key": key}, os.path.join(cache_dir, BUILDING_FILE))
        os.remove(os.path.join(cache_dir, FINGERPRINT_FILE))
        _build(cache_dir, *build_args)
    elif existing is not None:  # built from other inputs or plans: kept until the new one is finished
        fresh = cache_dir + ".rebuild"
        _build_or_discard(fresh, *build_args)
        os.replace(cache_dir, cache_dir + ".old")
        os.replace(fresh, cache_dir)
        shutil.rmtree(cache_dir + ".old", ignore_errors=True)
    else:
        _build_or_discard(cache_dir, *build_args)
    return SliceCache(cache_dir)


def build_or_load_cache(target, sources: Sequence[CineSource], cache_dir: str, num_processes: int = 2,
                        progress: bool = True) -> "SliceCache":
    """The slice cache of ``sources`` for ``target`` (a PlansTarget) in ``cache_dir``: reused when its fingerprint
    (inputs, plans, versions) matches, completed when files are missing or a build was interrupted, rebuilt into
    ``<cache_dir>.rebuild`` and swapped in when inputs or plans changed. Subjects are preprocessed by up to
    ``num_processes`` spawned processes (at most one per MIN_SUBJECTS_PER_PROCESS subjects left to build), with a
    tqdm bar over subjects when ``progress``.

    Concurrent runs: a build holds an exclusive lock on ``<cache_dir>.lock``, and the returned cache a shared one
    for the rest of the process (``lock_fd``), so readers only ever see finished caches and no run rebuilds a cache
    that another one reads (it waits, with a message). A failed build leaves nothing behind (a lock file it created
    included); a killed one is resumed by the next call."""
    if not sources:
        raise SSPError(f"{cache_dir}: no sources to cache")
    cache_dir = os.path.abspath(cache_dir)
    fp = fingerprint(target, sources)
    key = _fingerprint_key(fp)
    lock_path = cache_dir + ".lock"
    lock_existed = os.path.exists(lock_path)
    waiting = f"{cache_dir}: waiting for another ssp_pretrain run that builds or reads this slice cache"
    fd = acquire_lock(lock_path, shared=True, wait_message=waiting)
    try:
        cache = _finished(cache_dir, key)
        if cache is None:
            os.close(fd)  # drops the shared lock (one POSIX lock per file and process) before waiting for the other
            fd = None
            fd = acquire_lock(lock_path, wait_message=waiting)
            cache = _finished(cache_dir, key) or _build_locked(cache_dir, key, fp, target, sources, num_processes,
                                                               progress)
            fcntl.lockf(fd, fcntl.LOCK_SH)
    except BaseException as e:
        if isinstance(e, SSPError) and not lock_existed and not os.path.exists(cache_dir) and fd is not None:
            os.remove(lock_path)  # while still holding it: a process that waits for it sees it gone and retries
        if fd is not None:
            os.close(fd)
        raise
    cache.lock_fd = fd
    return cache


# ---------------------------------------------------------------------------------------------------- reading
class SliceCache:
    """Read access to a finished cache. Block files are opened on first use, per process; pickling sends only the
    folder (DataLoader workers reopen it lazily)."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        info = _load_json(os.path.join(self.folder, FINGERPRINT_FILE))
        if info is None:
            raise SSPError(f"{os.path.join(self.folder, FINGERPRINT_FILE)}: no finished slice cache here")
        if info.get("format_version") != CACHE_FORMAT_VERSION:
            raise SSPError(f"{os.path.join(self.folder, FINGERPRINT_FILE)}: cache format "
                           f"{info.get('format_version')}, expected {CACHE_FORMAT_VERSION}; delete the folder")
        self._info = info
        self.key = info["key"]
        self._index: Optional[dict] = None
        self._maps: "OrderedDict[int, np.memmap]" = OrderedDict()
        self._files: "OrderedDict[int, Tuple[int, int, Tuple[int, ...]]]" = OrderedDict()  # block -> fd, offset, shape
        self._pid = os.getpid()
        self.lock_fd: Optional[int] = None  # the shared lock that build_or_load_cache took for this process

    def close(self) -> None:
        """Closes the files and memory maps this process opened (they reopen on the next read)."""
        files, self._files, self._maps = getattr(self, "_files", {}), OrderedDict(), OrderedDict()
        if getattr(self, "_pid", None) == os.getpid():  # a forked child's copies are the parent's business too
            for fd, _, _ in files.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # pickling: only the folder and key; arrays and memmaps are reopened lazily in the receiving process
    def __getstate__(self):
        return {"folder": self.folder, "key": self.key}

    def __setstate__(self, state):
        self.__init__(state["folder"])
        if self.key != state["key"]:
            raise SSPError(f"{self.folder}: the slice cache changed while in use (rebuilt by another run?)")

    def _idx(self) -> dict:
        if self._index is None:
            with np.load(os.path.join(self.folder, INDEX_FILE)) as z:
                self._index = {k: z[k] for k in z.files}
        return self._index

    def __len__(self) -> int:
        return int(self._info["summary"]["num_slices"])

    @property
    def meta(self) -> Dict[str, np.ndarray]:
        """Per-slice int32 arrays: subject (index into ``subjects``), frame, frame_from_ed ((t - ED) mod T),
        slice_index (0 = first slice of the stack, e.g. base), num_slices, num_frames."""
        idx = self._idx()
        return {k: idx[k] for k in META_KEYS}

    @property
    def subjects(self) -> List[str]:
        return [str(s) for s in self._idx()["subject_ids"]]

    @property
    def num_channels(self) -> int:
        return int(self._info["summary"]["num_channels"])

    def summary(self) -> dict:
        """Facts for a checkpoint: num_subjects, num_slices, num_frames_total, source_kind, num_channels, key."""
        return {**self._info["summary"], "cache_key": self.key}

    def missing_files(self) -> List[str]:
        """Array files (or the index) that are absent or have the wrong size."""
        try:
            idx = self._idx()
        except (OSError, ValueError, KeyError, EOFError):
            return [INDEX_FILE]
        return [f for f, n in zip(idx["block_files"], idx["block_bytes"])
                if not os.path.isfile(os.path.join(self.folder, f))
                or os.path.getsize(os.path.join(self.folder, f)) != n]

    def _check(self, i) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"slice {i} out of range (cache has {len(self)})")
        return i

    def _forked(self) -> None:
        """Drops what the parent process opened (maps, file descriptors): a child opens its own."""
        if self._pid != os.getpid():
            self._maps, self._files, self._pid = OrderedDict(), OrderedDict(), os.getpid()

    def _memmap(self, block: int) -> np.memmap:
        self._forked()
        array = self._maps.get(block)
        if array is None:
            path = os.path.join(self.folder, str(self._idx()["block_files"][block]))
            array = np.load(path, mmap_mode="r")
            self._maps[block] = array
            if len(self._maps) > MAX_OPEN_MEMMAPS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(block)
        return array

    def memmap_for(self, i) -> np.memmap:
        """The memory-mapped array that holds slice ``i``."""
        return self._memmap(int(self._idx()["block"][self._check(i)]))

    def _file(self, block: int) -> Tuple[int, int, Tuple[int, ...]]:
        """(file descriptor, byte offset of the data, shape) of a block file, kept open per process (at most
        MAX_OPEN_FILES, least recently used closed first)."""
        self._forked()
        entry = self._files.get(block)
        if entry is not None:
            self._files.move_to_end(block)
            return entry
        path = os.path.join(self.folder, str(self._idx()["block_files"][block]))
        try:
            header = np.load(path, mmap_mode="r")  # numpy parses and checks the .npy header; no page is read
            if header.dtype != np.dtype(np.float32) or not header.flags.c_contiguous:
                raise SSPError(f"{path}: not a float32 C-order array; delete the slice cache {self.folder}")
            offset, shape = int(header.offset), tuple(header.shape)
            del header
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except (OSError, ValueError) as e:  # missing, or shorter than its header says
            raise SSPError(f"{path}: cannot read ({_first_line(e)}); delete the slice cache {self.folder}") from None
        self._files[block] = entry = (fd, offset, shape)
        if len(self._files) > MAX_OPEN_FILES:
            os.close(self._files.popitem(last=False)[1][0])
        return entry

    def _read_plane(self, fd: int, position: int, out: np.ndarray, block: int) -> None:
        """Fills ``out`` (C-contiguous) with the bytes at ``position`` of the file (one read, except near a short
        read)."""
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], position + done)
            if n <= 0:
                raise SSPError(f"{os.path.join(self.folder, str(self._idx()['block_files'][block]))}: shorter than "
                               f"its header says; delete the slice cache {self.folder}")
            done += n

    def slice(self, i) -> np.ndarray:
        """Slice ``i`` as an (H, W) float32 array ((C, H, W) for multi-channel caches), read from its block file
        with one positioned read per channel: the pages stay in the page cache but are not mapped into this
        process, so its resident memory does not grow with the slices it has read."""
        i = self._check(i)
        idx = self._idx()
        block = int(idx["block"][i])
        fd, offset, shape = self._file(block)
        r, z = int(idx["row"][i]), int(idx["z"][i])
        h, w = shape[-2:]
        plane = h * w * 4
        if self.num_channels == 1:  # (T, Z, H, W)
            out = np.empty((h, w), dtype=np.float32)
            self._read_plane(fd, offset + (r * shape[1] + z) * plane, out, block)
            return out
        channels, depth = shape[1], shape[2]  # (T, C, Z, H, W)
        out = np.empty((channels, h, w), dtype=np.float32)
        for c in range(channels):
            self._read_plane(fd, offset + ((r * channels + c) * depth + z) * plane, out[c], block)
        return out

    def slice_channels(self, i) -> np.ndarray:
        """Slice ``i`` as a (C, H, W) float32 array (a copy)."""
        s = self.slice(i)
        return s[None] if self.num_channels == 1 else s

    def slice_position(self, i) -> float:
        """slice_index / num_slices: 0 at the first slice (base), towards 1 at the last (apex)."""
        i = self._check(i)
        idx = self._idx()
        return float(idx["slice_index"][i]) / float(idx["num_slices"][i])

    def __repr__(self) -> str:
        s = self._info["summary"]
        return (f"SliceCache({self.folder!r}: {s['num_slices']} slices of {s['num_subjects']} subjects, "
                f"{s['source_kind']})")
