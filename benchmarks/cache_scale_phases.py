"""The measured steps of benchmarks/cache_scale.py, each run in a child process of its own so that its process tree's
memory is its alone: ``python cache_scale_phases.py PHASE PARAMS_JSON OUT_JSON`` (cache_scale.py starts them)."""

import json
import os
import shutil
import sys
import time

from process_memory import memory_of  # benchmarks/, next door

DATASET_ID = 993
DATASET_NAME = "CacheScale"


def disk_bytes(folder: str) -> int:
    """Bytes allocated on disk for the files under ``folder``."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def raw_folder() -> str:
    return os.path.join(os.environ["nnUNet_raw"], f"Dataset{DATASET_ID:03d}_{DATASET_NAME}")


def planned_configuration():
    from nnunet_ssp.network import PlannedConfiguration

    return PlannedConfiguration.from_preprocessed(str(DATASET_ID))


# ------------------------------------------------------------------------------------------------- child phases
def phase_build(p: dict) -> dict:
    """A cache build from scratch: the first ``subjects`` cines, or every 3D file of ``extra``."""
    from pretraining.data.cache import build_or_load_cache
    from pretraining.data.sources import discover_sources

    target = planned_configuration()
    for path in (p["cache_dir"], p["cache_dir"] + ".lock"):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    os.makedirs(os.path.dirname(p["cache_dir"]), exist_ok=True)
    start = time.perf_counter()
    if p.get("extra"):
        sources = discover_sources(None, [p["extra"]])
    else:
        sources = discover_sources(raw_folder())[: p["subjects"]]
    cache = build_or_load_cache(target, sources, p["cache_dir"], num_processes=p["num_processes"], progress=False)
    seconds = time.perf_counter() - start
    frames = sum(s.num_frames for s in sources)
    return {
        "subjects": len(sources),
        "frames": frames,
        "slices": len(cache),
        "seconds": round(seconds, 2),
        "slices_per_s": len(cache) / seconds,
        "frames_per_s": frames / seconds,
        "disk_bytes": disk_bytes(p["cache_dir"]),
        "num_processes": p["num_processes"],
        "slice_shape": list(cache.slice(0).shape),
    }


def phase_frames(p: dict) -> dict:
    """Untimed setup of the comparison: every frame of the first ``subjects`` cines as a 3D NIfTI case."""
    import numpy as np
    import SimpleITK as sitk

    from nnunet_ssp.phantom import dataset as phantom_dataset
    from pretraining.data.sources import discover_sources

    folder = p["frames_dir"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    cases = 0
    for source in discover_sources(raw_folder())[: p["subjects"]]:
        image = sitk.ReadImage(source.paths[0])
        array = sitk.GetArrayFromImage(image)  # (T, Z, Y, X) int16
        spacing = image.GetSpacing()[:3]
        for t in range(array.shape[0]):
            frame = sitk.GetImageFromArray(np.ascontiguousarray(array[t]))
            frame.SetSpacing(spacing)
            frame.SetOrigin([0.0] * 3)  # the phantom's geometry: origin 0, identity direction
            sitk.WriteImage(
                frame,
                os.path.join(folder, f"{source.subject}_f{t:02d}_0000.nii.gz"),
                useCompression=True,
                compressionLevel=phantom_dataset._COMPRESSION_LEVEL,
            )
            cases += 1
    return {"cases": cases, "disk_bytes": disk_bytes(folder)}


def phase_nnunet(p: dict) -> dict:
    """nnU-Net's own preprocessing of the 3D frame cases, as DefaultPreprocessor.run does it (spawn Pool,
    starmap_async(run_case_save) per case), without labels."""
    import glob
    import multiprocessing

    target = planned_configuration()
    pm, cm = target.plans_manager, target.configuration_manager
    out_dir = p["out_dir"]
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    files = sorted(glob.glob(os.path.join(p["frames_dir"], "*_0000.nii.gz")))
    preprocessor = cm.preprocessor_class(verbose=False)
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(p["num_processes"]) as pool:
        results = [
            pool.starmap_async(
                preprocessor.run_case_save,
                (
                    (
                        os.path.join(out_dir, os.path.basename(f)[: -len("_0000.nii.gz")]),
                        [f],
                        None,
                        pm,
                        cm,
                        target.dataset_json,
                    ),
                ),
            )
            for f in files
        ]
        for r in results:
            r.get()
    seconds = time.perf_counter() - start
    slices = 0
    import blosc2

    for f in glob.glob(os.path.join(out_dir, "*.b2nd")):
        if not f.endswith("_seg.b2nd"):
            slices += blosc2.open(f, mode="r").shape[1]  # (C, Z, Y, X): Z slices per case
    return {
        "cases": len(files),
        "slices": slices,
        "seconds": round(seconds, 2),
        "slices_per_s": slices / seconds,
        "frames_per_s": len(files) / seconds,
        "disk_bytes": disk_bytes(out_dir),
        "num_processes": p["num_processes"],
        "preprocessor": type(preprocessor).__name__,
    }


def phase_epoch(p: dict) -> dict:
    """One pretraining epoch of ``iters`` iterations over a finished cache (the real Pretrainer and loader)."""
    import torch

    from pretraining.data.slice_cache import SliceCache
    from pretraining.methods import METHODS
    from pretraining.run import PretrainSettings, make_pretrainer

    torch.set_num_threads(max(1, p["num_processes"]))
    target = planned_configuration()
    cache = SliceCache(p["cache_dir"])
    method = METHODS[p["method"]](target.network_spec, target.configuration_manager.patch_size)
    settings = PretrainSettings.of_method(
        method, epochs=1, iters_per_epoch=p["iters"], batch_size=p["batch_size"], num_workers=p["num_processes"]
    )
    output = p["output"]
    shutil.rmtree(output, ignore_errors=True)
    trainer = make_pretrainer(method, target, cache, settings, output)
    start = time.perf_counter()
    trainer.train_epoch(0)
    seconds = time.perf_counter() - start
    return {
        "slices_in_cache": len(cache),
        "iters": p["iters"],
        "batch_size": p["batch_size"],
        "method": p["method"],
        "seconds": round(seconds, 2),
        "slices_per_s": trainer.history["slices_per_s"][-1],
        "num_workers": p["num_processes"],
    }


def phase_read(p: dict) -> dict:
    """Random slices through SliceCache.slice: cold-ish (files evicted from the page cache), then warm (same)."""
    import numpy as np

    from pretraining.data.slice_cache import SliceCache

    cache = SliceCache(p["cache_dir"])
    files = [os.path.join(cache.folder, str(f)) for f in cache._idx()["block_files"]]
    indices = np.random.default_rng(0).choice(len(cache), size=min(p["samples"], len(cache)), replace=False)
    for path in files:  # cold-ish: drop this cache's pages from the page cache (needs no privileges)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    rates = {}
    for name in ("cold", "warm"):
        cache = SliceCache(p["cache_dir"])  # files opened afresh
        if p["via"] == "mmap":  # the reader before positioned reads: a copy out of the block's memory map
            idx, maps = cache._idx(), {}

            def read(i, cache=cache, idx=idx, maps=maps):
                block = os.path.join(cache.folder, str(idx["block_files"][idx["block"][i]]))
                array = maps.get(block)
                if array is None:
                    array = maps[block] = np.load(block, mmap_mode="r")
                return np.array(array[int(idx["row"][i]), int(idx["z"][i])], dtype=np.float32)
        else:
            read = cache.slice
        start = time.perf_counter()
        checksum = 0.0
        for i in indices:
            checksum += float(read(i)[0, 0])
        rates[name] = len(indices) / (time.perf_counter() - start)
        own = memory_of(os.getpid())  # before the next pass drops this one's files or maps
        rates[f"{name}_rss"], rates[f"{name}_file"] = own.get("VmRSS", 0), own.get("RssFile", 0)
    return {
        "via": p["via"],
        "rss_after_reads_bytes": max(rates["cold_rss"], rates["warm_rss"]),
        "file_pages_after_reads_bytes": max(rates["cold_file"], rates["warm_file"]),
        "samples": int(len(indices)),
        "cold_slices_per_s": rates["cold"],
        "warm_slices_per_s": rates["warm"],
        "slice_bytes": int(cache.slice(0).nbytes),
        "slices_in_cache": len(cache),
    }


PHASES = {
    "build": phase_build,
    "frames": phase_frames,
    "nnunet": phase_nnunet,
    "epoch": phase_epoch,
    "read": phase_read,
}


if __name__ == "__main__":
    phase, params, out = sys.argv[1:]
    result = PHASES[phase](json.loads(params))
    with open(out, "w") as f:
        json.dump(result, f)
