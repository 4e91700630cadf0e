"""Building the pretraining slice cache: every frame of every source, preprocessed exactly as nnU-Net preprocesses it
(the format and its reader: ``pretraining.data.slice_cache``).

Each source (a 4D cine, or a 3D volume taken as a 1-frame cine) is preprocessed frame by frame with nnU-Net's own
preprocessor for the target plans and configuration (``preprocessor.run_case_npy``: transpose_forward, crop to
nonzero, normalization, resampling), so a cached ED frame equals nnU-Net's own preprocessed ED case. Nothing of that
pipeline is reimplemented here.

Next to the folder, ``<folder>.lock`` serializes builds and keeps a cache that a run reads from being rebuilt. Every
file is written atomically (temporary file + ``os.replace``), so an interrupted build resumes with the subjects
already done and never reads half-written files. Before a frame is cached, its file must be complete and finite
(SimpleITK would read missing, NaN and infinite voxels as zeros) and the frame not constant.
"""

import fcntl
import hashlib
import json
import os
import shutil
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import acquire_lock, atomic_path, fault_point, remove_temporaries, save_json_atomic
from pretraining.data.frames import check_frame, read_frames
from pretraining.data.slice_cache import (
    BUILDING_FILE,
    CACHE_FORMAT_VERSION,
    FINGERPRINT_FILE,
    INDEX_FILE,
    META_KEYS,
    SUBJECTS_DIR,
    SliceCache,
    load_json,
)
from pretraining.data.sources import CineSource

# how cache-building processes start: spawn, as nnU-Net's own preprocessing does (forking a process whose torch/OpenMP
# threads are running can deadlock the children); each spawned process pays the torch + nnU-Net imports once.
POOL_START_METHOD = "spawn"
# a spawned process costs seconds of start-up: use at most one process per this many subjects still to build
MIN_SUBJECTS_PER_PROCESS = 4


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
    config = {
        k: v for k, v in target.configuration_manager.configuration.items() if k not in ("architecture", "batch_size")
    }
    relevant = {
        "configuration": config,
        "transpose_forward": plans.get("transpose_forward"),
        "image_reader_writer": plans.get("image_reader_writer"),
        "foreground_intensity_properties_per_channel": plans.get("foreground_intensity_properties_per_channel"),
        "channel_names": target.dataset_json.get("channel_names"),
        "labels": target.dataset_json.get("labels"),
    }
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
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "nnunetv2_version": _nnunet_version(),
        "preprocessor": target.configuration_manager.preprocessor_name,
        "target": target.summary(),
        "preprocessing_digest": _preprocessing_digest(target),
        "sources": files,
    }


def _fingerprint_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------------- building
_WORKER_TARGETS: Dict[str, object] = {}


def _worker_target(key: str, plans: dict, configuration: str, dataset_json: dict):
    from nnunet_ssp.network import PlannedConfiguration

    if key not in _WORKER_TARGETS:
        _WORKER_TARGETS.clear()
        _WORKER_TARGETS[key] = PlannedConfiguration(plans, configuration, dataset_json)
    return _WORKER_TARGETS[key]


def _subject_marker(folder: str, index: int) -> str:
    return os.path.join(folder, SUBJECTS_DIR, f"s{index:06d}.json")


def _marker_valid(folder: str, index: int, source: CineSource) -> Optional[dict]:
    marker = load_json(_subject_marker(folder, index))
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
    for t, (data, props) in enumerate(read_frames(source, pm)):
        if data.shape[0] != num_channels:
            raise SSPError(
                f"{source.paths[0]}: {data.shape[0]} channel(s), but the plans normalize "
                f"{num_channels} (dataset.json channel_names)"
            )
        check_frame(source, t, data)
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
        blocks.append(
            {
                "file": f"{SUBJECTS_DIR}/{name}",
                "frames": ts,
                "shape": list(block_shape),
                "z_offset": z0,
                "num_slices": n,
                "bytes": os.path.getsize(path),
            }
        )
    marker = {
        "index": index,
        "subject": source.subject,
        "paths": list(source.paths),
        "kind": source.kind,
        "num_frames": source.num_frames,
        "ed_frame": source.ed_frame,
        "num_channels": num_channels,
        "blocks": blocks,
    }
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
    summary = {
        "num_subjects": len(markers),
        "num_slices": int(len(order)),
        "num_frames_total": int(sum(m["num_frames"] for m in markers)),
        "source_kind": "+".join(kinds),
        "num_channels": int(markers[0]["num_channels"]),
    }
    return arrays, summary


class _WorkerDied(SSPError):
    """A cache-building process died (e.g. killed for memory); the subjects finished so far stay for the next run."""


def _run_jobs(jobs: List[tuple], num_processes: int, progress: bool) -> List[dict]:
    from tqdm import tqdm

    results = []
    with tqdm(
        total=len(jobs), desc="SSP slice cache", unit="subject", disable=not progress or not jobs, mininterval=1.0
    ) as bar:
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
                raise _WorkerDied(
                    f"a cache-building process died (out of memory?); rerun, e.g. with fewer "
                    f"processes: the {len(results)} subjects finished in this run are kept"
                ) from None
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    return results


def _build(
    folder: str, key: str, fp: dict, target, sources: Sequence[CineSource], num_processes: int, progress: bool
) -> None:
    os.makedirs(os.path.join(folder, SUBJECTS_DIR), exist_ok=True)
    building = load_json(os.path.join(folder, BUILDING_FILE))
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
    save_json_atomic(
        {"format_version": CACHE_FORMAT_VERSION, "key": key, "summary": summary, "fingerprint": fp},
        os.path.join(folder, FINGERPRINT_FILE),
    )
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
    existing = load_json(os.path.join(cache_dir, FINGERPRINT_FILE))
    if existing is None or existing.get("key") != key:
        return None
    cache = SliceCache(cache_dir)
    return None if cache.missing_files() else cache


def _build_locked(
    cache_dir: str, key: str, fp: dict, target, sources: Sequence[CineSource], num_processes: int, progress: bool
) -> "SliceCache":
    """Builds, completes or rebuilds the cache (under the exclusive lock)."""
    build_args = (key, fp, target, sources, num_processes, progress)
    _finish_swap(cache_dir)
    existing = load_json(os.path.join(cache_dir, FINGERPRINT_FILE))
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


def build_or_load_cache(
    target, sources: Sequence[CineSource], cache_dir: str, num_processes: int = 2, progress: bool = True
) -> "SliceCache":
    """The slice cache of ``sources`` for ``target`` (a PlannedConfiguration) in ``cache_dir``: reused when its
    fingerprint (inputs, plans, versions) matches, completed when files are missing or a build was interrupted,
    rebuilt into ``<cache_dir>.rebuild`` and swapped in when inputs or plans changed. Subjects are preprocessed by up to
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
            cache = _finished(cache_dir, key) or _build_locked(
                cache_dir, key, fp, target, sources, num_processes, progress
            )
            fcntl.lockf(fd, fcntl.LOCK_SH)
    except BaseException as e:
        if isinstance(e, SSPError) and not lock_existed and not os.path.exists(cache_dir) and fd is not None:
            os.remove(lock_path)  # while still holding it: a process that waits for it sees it gone and retries
        if fd is not None:
            os.close(fd)
        raise
    cache.lock_fd = fd
    return cache
