"""Slice cache at the paper's scale: build time, memory and reads, against nnU-Net's own preprocessing.

The paper pretrains on ~300 subjects x ~300 slices (frames x slices), ~90k 2D slices at 256x256. This benchmark
builds the pretraining slice cache (pretraining/data/cache.py) for a phantom cohort of that size and measures:

* build: wall time and slices/s of ``build_or_load_cache`` (source discovery included, each build from scratch),
  the cache's size on disk, the peak memory of the whole process tree (the building process AND its spawned
  workers), the CPU cores it kept busy and how many worker processes did the work (parallel over subjects);
* memory flat in the cohort size: the same build at a small cohort (default 30 subjects, the first subjects of the
  same phantom, same plans) and at the full one; the peak tree RSS must not grow with the number of subjects;
* a pretraining epoch over the cache (the real Pretrainer with its DataLoader workers, --epoch-iters iterations)
  at both sizes: peak RSS of the data path (the loader workers) and of the whole tree; on a CPU the training
  process itself holds the model's activations (batch x views x patch), which do not depend on the cohort;
* random-access reads: ``SliceCache.slice`` of --read-samples random slices, cold-ish (the cache files evicted from
  the page cache with posix_fadvise(DONTNEED) first: a host cache below the VM may still serve them) and warm (the
  same slices again), with the reader's RSS after them; --read-via-mmap also reads them through the blocks' memory
  maps, the cache's former reader, whose RSS grew with every page it touched;
* nnU-Net's own preprocessing of the same frames, for the ratio cache slices/s / nnU-Net slices/s (goal >= 1).

The comparison, made fair: nnU-Net preprocesses 3D cases, so every frame of the compared subjects (--compare-
subjects, default the small cohort) is written once, untimed, as a 3D NIfTI case (int16, same geometry and
compression level as the phantom's own files). nnU-Net's preprocessing of those cases is timed exactly as
``nnUNetv2_preprocess`` runs it (DefaultPreprocessor.run: a spawn multiprocessing Pool of the same number of
processes, one ``run_case_save`` per case, blosc2 output), with no label (the cache has none either, and nnU-Net
then skips only its foreground-location sampling), so both run the same ``run_case_npy`` on the same frames with the
same process count; both timings include their pool's start-up. The two alternate (--compare-repeats times) and
each keeps its best, so that other jobs on a shared machine slow both alike. The cache reads each subject's 4D cine
once (nibabel, which also checks it is complete and finite) where nnU-Net reads one 3D file per frame (SimpleITK):
that is how each tool is used. The information row "cache build, 3D frame files" builds the cache from the very
same 3D files nnU-Net reads (nibabel check + the plans' reader per file), a same-input ratio.

Memory: every measured step runs in a child process (``--phase``) whose process tree a thread of this process
samples from /proc every --sample-interval s: the sum over the tree of VmRSS (counts shared pages once per process,
an overestimate), of PSS (shared pages split between processes) and of RssAnon (heap, no file pages); "main" is
the measured process, "kids" its children (pool or loader workers). Memory-mapped file pages count in RSS and PSS.

    python benchmarks/cache_scale.py --subjects 8 --size 96 --sizes 4 8        # a quick look (~3 min)
    python benchmarks/cache_scale.py --subjects 375 --workdir /tmp/ssp_scale --read-via-mmap   # paper scale
    python benchmarks/cache_scale.py --subjects 375 --workdir /tmp/ssp_scale --skip-nnunet     # again, reusing it

The phantom draws 15-30 frames x 8-12 slices per subject (~240 slices): the default 300 subjects give ~72k slices,
375 subjects ~91k (the paper's ~90k). The workspace (phantom cohort and nnU-Net plans, made once by the stock CLIs;
their times are reported) is kept in --workdir and reused when the parameters match; caches are always rebuilt and
removed at the end (--keep-caches keeps them). Disk: about slices x 256 KB for the full cache (24 GB at 375
subjects) plus the raw data (8 GB), checked against the free space first.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from nnunet_ssp.workspace import workspace_env

DATASET_ID = 993
DATASET_NAME = "CacheScale"
GB = 1024 ** 3
MB = 1024 ** 2
RSS_GOAL_BYTES = 3 * 1000 ** 3  # 3 GB
FLAT_TOLERANCE = 1.15  # peak RSS at the full cohort / at the small one


# ------------------------------------------------------------------------------------------ process-tree memory
def _ppids() -> dict:
    """pid -> parent pid, for every process visible in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2:].split()  # the command name may hold spaces and parentheses
        out[int(name)] = int(rest[1])
    return out


def _tree(root: int) -> list:
    children = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _memory(pid: int) -> dict:
    """VmRSS, RssAnon, RssFile and Pss of ``pid`` in bytes, CPU seconds (utime+stime); {} if it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1]) * 1024
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rfind(b")") + 2:].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return {}
    return out


class TreeSampler:
    """Samples the memory of a process and all its descendants from /proc in a background thread."""

    def __init__(self, root: int, interval: float):
        self.root, self.interval = root, interval
        self.peak = {"rss": 0, "pss": 0, "anon": 0, "file": 0, "root_rss": 0, "one_process_rss": 0, "children_rss": 0}
        self.max_processes = 0
        self.cpu = {}  # pid -> last CPU seconds seen
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self):
        totals = {"rss": 0, "pss": 0, "anon": 0, "file": 0}
        tree = _tree(self.root)
        alive, children = 0, 0
        for pid in tree:
            m = _memory(pid)
            if not m:
                continue
            alive += 1
            totals["rss"] += m.get("VmRSS", 0)
            totals["pss"] += m.get("Pss", 0)
            totals["anon"] += m.get("RssAnon", 0)
            totals["file"] += m.get("RssFile", 0) + m.get("RssShmem", 0)
            self.peak["one_process_rss"] = max(self.peak["one_process_rss"], m.get("VmRSS", 0))
            if pid == self.root:
                self.peak["root_rss"] = max(self.peak["root_rss"], m.get("VmRSS", 0))
            else:
                children += m.get("VmRSS", 0)
            self.cpu[pid] = m["cpu_s"]
        for k, v in totals.items():
            self.peak[k] = max(self.peak[k], v)
        self.peak["children_rss"] = max(self.peak["children_rss"], children)
        self.max_processes = max(self.max_processes, alive)
        self.samples += 1

    def summary(self, busy_cpu_s: float = 1.0) -> dict:
        workers = [pid for pid, s in self.cpu.items() if pid != self.root and s >= busy_cpu_s]
        return {"peak_tree_rss_bytes": self.peak["rss"], "peak_tree_pss_bytes": self.peak["pss"],
                "peak_tree_anon_bytes": self.peak["anon"], "peak_tree_file_bytes": self.peak["file"],
                "peak_main_rss_bytes": self.peak["root_rss"], "peak_children_rss_bytes": self.peak["children_rss"],
                "peak_one_process_rss_bytes": self.peak["one_process_rss"],
                "max_processes": self.max_processes, "busy_child_processes": len(workers),
                "child_cpu_s": round(sum(self.cpu[p] for p in workers), 1), "rss_samples": self.samples}


def run_phase(phase: str, params: dict, workdir: str, interval: float, log) -> dict:
    """Runs ``--phase PHASE`` of this script in a child process, sampling its process tree's memory."""
    out = os.path.join(workdir, f"phase_{phase}.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--phase-params", json.dumps(params),
           "--phase-out", out]
    start = time.perf_counter()
    with open(os.path.join(workdir, f"phase_{phase}.log"), "a") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        with TreeSampler(proc.pid, interval) as sampler:
            rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"phase {phase} failed (exit {rc}); see {logf.name}")
    with open(out) as f:
        result = json.load(f)
    result.update(sampler.summary())
    result["process_wall_s"] = round(wall, 2)
    log(f"  {phase}: {json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))})}")
    return result


# ---------------------------------------------------------------------------------------------------- workspace
def prepare_workspace(workdir: str, subjects: int, size: int, num_processes: int, log) -> dict:
    """The phantom cohort and nnU-Net's plans (fingerprint + planning, no preprocessing) by the stock CLIs; reused
    when ``workspace.json`` says they were made with these parameters."""
    record_file = os.path.join(workdir, "workspace.json")
    want = {"subjects": subjects, "size": size, "dataset_id": DATASET_ID}
    if os.path.isfile(record_file):
        with open(record_file) as f:
            record = json.load(f)
        if {k: record.get(k) for k in want} == want:
            log(f"reusing the workspace in {workdir} (phantom {record['phantom_s']:.0f} s, "
                f"plans {record['plan_s']:.0f} s when made)")
            return {**record, "reused": True}
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, nnUNet_n_proc_DA=str(num_processes), nnUNet_def_n_proc=str(num_processes))
    log(f"generating the phantom cohort: {subjects} subjects at {size}x{size} ...")
    start = time.perf_counter()
    _quiet([os.path.join(bin_dir, "nnunet_ssp"), "phantom", "-d", str(DATASET_ID), "-n", DATASET_NAME,
            "--subjects", str(subjects), "--test-subjects", "0", "--size", str(size)], env)
    phantom_s = time.perf_counter() - start
    log(f"  phantom: {phantom_s:.0f} s; planning (nnUNetv2_plan_and_preprocess --no_pp) ...")
    start = time.perf_counter()
    _quiet([os.path.join(bin_dir, "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "--no_pp",
            "-npfp", str(num_processes)], env)
    plan_s = time.perf_counter() - start
    log(f"  plans: {plan_s:.0f} s")
    raw = os.path.join(os.environ["nnUNet_raw"], f"Dataset{DATASET_ID:03d}_{DATASET_NAME}")
    record = {**want, "phantom_s": round(phantom_s, 1), "plan_s": round(plan_s, 1),
              "raw_bytes": _disk_bytes(raw), "cine_bytes": _disk_bytes(os.path.join(raw, "cineTr"))}
    with open(record_file, "w") as f:
        json.dump(record, f, indent=2)
    return {**record, "reused": False}


def _quiet(cmd: list, env: dict) -> None:
    """Runs a stock CLI; its output is shown only if it fails."""
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], file=sys.stderr)
        raise SystemExit(f"{os.path.basename(cmd[0])} failed (exit {done.returncode})")


def _disk_bytes(folder: str) -> int:
    """Bytes allocated on disk for the files under ``folder``."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _raw_folder() -> str:
    return os.path.join(os.environ["nnUNet_raw"], f"Dataset{DATASET_ID:03d}_{DATASET_NAME}")


def _target():
    from nnunet_ssp.network import PlannedConfiguration
    return PlannedConfiguration.from_preprocessed(str(DATASET_ID))


def _full_cache_dir(target) -> str:
    """Where ssp_pretrain looks for this dataset's cache."""
    return os.path.join(os.environ["nnUNet_preprocessed"], target.dataset_name,
                        f"ssp_cache__{target.configuration_manager.data_identifier}")


# ------------------------------------------------------------------------------------------------- child phases
def phase_build(p: dict) -> dict:
    """A cache build from scratch: the first ``subjects`` cines, or every 3D file of ``extra``."""
    from pretraining.data.cache import build_or_load_cache
    from pretraining.data.sources import discover_sources
    target = _target()
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
        sources = discover_sources(_raw_folder())[:p["subjects"]]
    cache = build_or_load_cache(target, sources, p["cache_dir"], num_processes=p["num_processes"], progress=False)
    seconds = time.perf_counter() - start
    frames = sum(s.num_frames for s in sources)
    return {"subjects": len(sources), "frames": frames, "slices": len(cache), "seconds": round(seconds, 2),
            "slices_per_s": len(cache) / seconds, "frames_per_s": frames / seconds,
            "disk_bytes": _disk_bytes(p["cache_dir"]), "num_processes": p["num_processes"],
            "slice_shape": list(cache.slice(0).shape)}


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
    for source in discover_sources(_raw_folder())[:p["subjects"]]:
        image = sitk.ReadImage(source.paths[0])
        array = sitk.GetArrayFromImage(image)  # (T, Z, Y, X) int16
        spacing = image.GetSpacing()[:3]
        for t in range(array.shape[0]):
            frame = sitk.GetImageFromArray(np.ascontiguousarray(array[t]))
            frame.SetSpacing(spacing)
            frame.SetOrigin([0.0] * 3)  # the phantom's geometry: origin 0, identity direction
            sitk.WriteImage(frame, os.path.join(folder, f"{source.subject}_f{t:02d}_0000.nii.gz"),
                            useCompression=True, compressionLevel=phantom_dataset._COMPRESSION_LEVEL)
            cases += 1
    return {"cases": cases, "disk_bytes": _disk_bytes(folder)}


def phase_nnunet(p: dict) -> dict:
    """nnU-Net's own preprocessing of the 3D frame cases, as DefaultPreprocessor.run does it (spawn Pool,
    starmap_async(run_case_save) per case), without labels."""
    import glob
    import multiprocessing
    target = _target()
    pm, cm = target.plans_manager, target.configuration_manager
    out_dir = p["out_dir"]
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    files = sorted(glob.glob(os.path.join(p["frames_dir"], "*_0000.nii.gz")))
    preprocessor = cm.preprocessor_class(verbose=False)
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(p["num_processes"]) as pool:
        results = [pool.starmap_async(preprocessor.run_case_save,
                                      ((os.path.join(out_dir, os.path.basename(f)[:-len("_0000.nii.gz")]), [f], None,
                                        pm, cm, target.dataset_json),)) for f in files]
        for r in results:
            r.get()
    seconds = time.perf_counter() - start
    slices = 0
    import blosc2
    for f in glob.glob(os.path.join(out_dir, "*.b2nd")):
        if not f.endswith("_seg.b2nd"):
            slices += blosc2.open(f, mode="r").shape[1]  # (C, Z, Y, X): Z slices per case
    return {"cases": len(files), "slices": slices, "seconds": round(seconds, 2), "slices_per_s": slices / seconds,
            "frames_per_s": len(files) / seconds, "disk_bytes": _disk_bytes(out_dir),
            "num_processes": p["num_processes"], "preprocessor": type(preprocessor).__name__}


def phase_epoch(p: dict) -> dict:
    """One pretraining epoch of ``iters`` iterations over a finished cache (the real Pretrainer and loader)."""
    import torch
    from pretraining.data.slice_cache import SliceCache
    from pretraining.run import PretrainSettings, make_pretrainer
    from pretraining.methods import METHODS
    torch.set_num_threads(max(1, p["num_processes"]))
    target = _target()
    cache = SliceCache(p["cache_dir"])
    method = METHODS[p["method"]](target.network_spec, target.configuration_manager.patch_size)
    settings = PretrainSettings.of_method(method, epochs=1, iters_per_epoch=p["iters"], batch_size=p["batch_size"],
                                          num_workers=p["num_processes"])
    output = p["output"]
    shutil.rmtree(output, ignore_errors=True)
    trainer = make_pretrainer(method, target, cache, settings, output)
    start = time.perf_counter()
    trainer.train_epoch(0)
    seconds = time.perf_counter() - start
    return {"slices_in_cache": len(cache), "iters": p["iters"], "batch_size": p["batch_size"],
            "method": p["method"], "seconds": round(seconds, 2),
            "slices_per_s": trainer.history["slices_per_s"][-1], "num_workers": p["num_processes"]}


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

            def read(i):
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
        own = _memory(os.getpid())  # before the next pass drops this one's files or maps
        rates[f"{name}_rss"], rates[f"{name}_file"] = own.get("VmRSS", 0), own.get("RssFile", 0)
    return {"via": p["via"], "rss_after_reads_bytes": max(rates["cold_rss"], rates["warm_rss"]),
            "file_pages_after_reads_bytes": max(rates["cold_file"], rates["warm_file"]),
            "samples": int(len(indices)), "cold_slices_per_s": rates["cold"],
            "warm_slices_per_s": rates["warm"], "slice_bytes": int(cache.slice(0).nbytes),
            "slices_in_cache": len(cache)}


PHASES = {"build": phase_build, "frames": phase_frames, "nnunet": phase_nnunet, "epoch": phase_epoch,
          "read": phase_read}


# ---------------------------------------------------------------------------------------------------- reporting
def _gb(n: float) -> str:
    return f"{n / 1000 ** 3:.2f}"


def print_report(result: dict) -> None:
    print()
    print(f"{'goal':50s} {'value':>24s}  ok")
    for g in result["goals"]:
        print(f"{g['goal']:50s} {g['value']:>24s}  {'' if g['ok'] is None else 'yes' if g['ok'] else 'NO'}")
    compare = result.get("compare")
    if compare:
        runs = lambda v: ", ".join(f"{x:.0f}" for x in v)  # noqa: E731
        print(f"comparison on {compare['frames']} frames of {compare['subjects']} subjects, slices/s per run: cache "
              f"{runs(compare['cache_slices_per_s'])}; nnU-Net {runs(compare['nnunet_slices_per_s'])} (best kept)")
    print()
    print(f"{'step':34s} {'subj':>5s} {'slices':>7s} {'time s':>7s} {'slices/s':>8s} {'disk GB':>7s} "
          f"{'RSS GB':>6s} {'PSS GB':>6s} {'anon GB':>7s} {'main GB':>7s} {'kids GB':>7s} {'procs':>5s} "
          f"{'busy':>4s} {'cores':>5s}")
    for r in result["rows"]:
        cores = r["child_cpu_s"] / r["seconds"] if r.get("seconds") else 0.0
        disk = _gb(r["disk_bytes"]) if "disk_bytes" in r else ""
        print(f"{r['step']:34s} {r.get('subjects', ''):>5} {r.get('slices', ''):>7} {r.get('seconds', 0):7.1f} "
              f"{r.get('slices_per_s', 0):8.1f} {disk:>7s} {_gb(r['peak_tree_rss_bytes']):>6s} "
              f"{_gb(r['peak_tree_pss_bytes']):>6s} {_gb(r['peak_tree_anon_bytes']):>7s} "
              f"{_gb(r['peak_main_rss_bytes']):>7s} {_gb(r['peak_children_rss_bytes']):>7s} "
              f"{r['max_processes']:5d} {r['busy_child_processes']:4d} {cores:5.2f}")
    for r in result["reads"]:
        print(f"random reads ({r['via']:5s}), {r['subjects']:>4} subjects: cold-ish {r['cold_slices_per_s']:6.0f} "
              f"slices/s, warm {r['warm_slices_per_s']:6.0f} slices/s ({r['samples']} slices of "
              f"{r['slice_bytes'] // 1024} KB); reader RSS {_gb(r['rss_after_reads_bytes'])} GB (file pages "
              f"{_gb(r['file_pages_after_reads_bytes'])} GB)")
    w = result["workspace"]
    print(f"workspace: phantom {w['phantom_s']:.0f} s, plans {w['plan_s']:.0f} s"
          f"{' (when made, reused)' if w.get('reused') else ''}; raw data {_gb(w['raw_bytes'])} GB; "
          f"{result['num_processes']} processes. RSS/PSS/anon: peak sums over the process tree; main: the measured "
          f"process; kids: its child processes (workers); busy: children with >= 1 s CPU; cores: their CPU s / wall s. "
          f"GB = 10^9 bytes.")


def evaluate_goals(result: dict) -> list:
    """The goals, each {goal, value, ok}; ok None: information."""
    builds = [r for r in result["rows"] if r["step"] in {f"cache build, {n} subjects" for n in result["sizes"]}]
    epochs = [r for r in result["rows"] if r["step"].startswith("epoch")]
    preads = [r for r in result["reads"] if r["via"] == "pread"]
    mmaps = [r for r in result["reads"] if r["via"] == "mmap"]
    goals = []

    def flat(name, rows, key):
        if len(rows) >= 2:
            growth = rows[-1][key] / rows[0][key]
            goals.append({"goal": f"{name} flat: {rows[-1]['subjects']} vs {rows[0]['subjects']} subjects",
                          "value": f"{growth:.2f}x", "ok": growth <= FLAT_TOLERANCE})

    def under_goal(name, rows, key):
        if rows:
            values = [r[key] for r in rows]
            goals.append({"goal": f"{name} (< 3 GB)", "value": " / ".join(_gb(v) for v in values) + " GB",
                          "ok": max(values) < RSS_GOAL_BYTES})

    compare = result.get("compare")
    if compare:
        goals.append({"goal": "cache / nnU-Net preprocessing, slices/s", "value": f"{compare['ratio']:.2f}",
                      "ok": compare["ratio"] >= 1.0})
        goals.append({"goal": "  (info) cache from nnU-Net's 3D frame files",
                      "value": f"{compare['ratio_same_files']:.2f}", "ok": None})
    for name, rows, key in (("build peak RSS, process tree", builds, "peak_tree_rss_bytes"),
                            ("epoch data path RSS (loader workers)", epochs, "peak_children_rss_bytes"),
                            ("reader RSS after random reads", preads, "rss_after_reads_bytes")):
        under_goal(name, rows, key)
        flat(name, rows, key)
    if epochs:
        goals.append({"goal": "  (info) epoch main process (model step on CPU)",
                      "value": " / ".join(_gb(r["peak_main_rss_bytes"]) for r in epochs) + " GB", "ok": None})
        flat("epoch tree RSS", epochs, "peak_tree_rss_bytes")
    if mmaps:
        goals.append({"goal": "  (info) former mmap reader, same reads",
                      "value": " / ".join(_gb(r["rss_after_reads_bytes"]) for r in mmaps) + " GB", "ok": None})
    if builds:
        big, n = builds[-1], result["num_processes"]
        cores = big["child_cpu_s"] / big["seconds"]
        goals.append({"goal": f"build parallel over subjects ({n} processes)",
                      "value": f"{big['busy_child_processes']} workers, {cores:.2f} cores",
                      "ok": big["busy_child_processes"] >= n or n == 1})
    return goals


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=300, help="phantom cohort (default 300, ~72k slices)")
    parser.add_argument("--size", type=int, default=256, help="in-plane size in pixels (default 256)")
    parser.add_argument("--num-processes", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes of the cache build and of nnU-Net's preprocessing; DataLoader workers")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="cohort sizes to build the cache for (default: 30 and --subjects)")
    parser.add_argument("--compare-subjects", type=int,
                        help="subjects whose frames nnU-Net preprocesses for the ratio (default: the smallest size)")
    parser.add_argument("--skip-nnunet", action="store_true", help="no comparison with nnU-Net's preprocessing")
    parser.add_argument("--method", default="simclr", help="SSP method of the epoch (default simclr)")
    parser.add_argument("--compare-repeats", type=int, default=2,
                        help="alternating runs of the cache build and of nnU-Net's preprocessing, the best of each "
                             "kept (default 2)")
    parser.add_argument("--epoch-iters", type=int, default=5, help="iterations of the measured epoch (default 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the measured epoch (default 8)")
    parser.add_argument("--read-samples", type=int, default=3000, help="random slices read (default 3000)")
    parser.add_argument("--read-via-mmap", action="store_true",
                        help="also read the same slices through the blocks' memory maps (the former reader)")
    parser.add_argument("--sample-interval", type=float, default=0.2, help="seconds between RSS samples")
    parser.add_argument("--workdir", help="workspace to create or reuse (default: a new folder in /tmp)")
    parser.add_argument("--keep-caches", action="store_true", help="keep the built caches (default: removed)")
    parser.add_argument("--json", default="cache_scale.json")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--phase-params", help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:  # a child: one measured step
        result = PHASES[args.phase](json.loads(args.phase_params))
        with open(args.phase_out, "w") as f:
            json.dump(result, f)
        return result

    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="ssp_cache_scale_"))
    os.makedirs(workdir, exist_ok=True)
    os.environ.update(workspace_env(workdir))

    def log(message):
        print(message, flush=True)

    sizes = sorted(set(args.sizes or [min(30, args.subjects), args.subjects]))
    if sizes[-1] > args.subjects:
        parser.error(f"--sizes {sizes[-1]} is more than --subjects {args.subjects}")
    compare_n = min(args.compare_subjects or sizes[0], args.subjects)
    from pretraining.data.cache import MIN_SUBJECTS_PER_PROCESS
    for n in sorted(set(sizes) | ({compare_n} if not args.skip_nnunet else set())):
        if n < MIN_SUBJECTS_PER_PROCESS * args.num_processes:
            log(f"note: the cache build of {n} subjects uses {max(1, n // MIN_SUBJECTS_PER_PROCESS)} process(es), not "
                f"{args.num_processes} (one per {MIN_SUBJECTS_PER_PROCESS} subjects)")
    est = 240 * sizes[-1] * args.size ** 2 * 4
    free = shutil.disk_usage(workdir).free
    log(f"workdir {workdir}: {free / GB:.0f} GiB free; the largest cache needs about {est / GB:.0f} GiB")
    if est > 0.9 * free:
        raise SystemExit(f"not enough disk space in {workdir}")

    workspace = prepare_workspace(workdir, args.subjects, args.size, args.num_processes, log)
    full_cache = _full_cache_dir(_target())
    result = {"subjects": args.subjects, "size": args.size, "num_processes": args.num_processes, "sizes": sizes,
              "workspace": workspace, "workdir": workdir, "rows": [], "reads": [], "cpu_count": os.cpu_count()}
    phase = lambda name, params: run_phase(name, params, workdir, args.sample_interval, log)  # noqa: E731
    cache_dirs = {}
    for n in sizes:
        cache_dirs[n] = full_cache if n == args.subjects else os.path.join(workdir, "caches", f"subjects_{n}")
        log(f"cache build, {n} subjects ...")
        row = phase("build", {"subjects": n, "cache_dir": cache_dirs[n], "num_processes": args.num_processes})
        result["rows"].append({"step": f"cache build, {n} subjects", **row})

    if not args.skip_nnunet:
        frames_dir = os.path.join(workdir, "frames3d", f"subjects_{compare_n}")
        log(f"writing the frames of {compare_n} subjects as 3D cases (untimed) ...")
        frames = phase("frames", {"subjects": compare_n, "frames_dir": frames_dir})
        # the two timings alternate, and each keeps its best: a machine shared with other jobs slows both alike
        cache_runs, nnunet_runs = [], []
        for rep in range(args.compare_repeats):
            log(f"comparison {rep + 1}/{args.compare_repeats}: cache build of {compare_n} cines ...")
            cache_runs.append(phase("build", {"subjects": compare_n, "num_processes": args.num_processes,
                                              "cache_dir": os.path.join(workdir, "caches", "compare")}))
            log(f"comparison {rep + 1}/{args.compare_repeats}: nnU-Net preprocessing of their frames ...")
            nnunet_runs.append(phase("nnunet", {"frames_dir": frames_dir, "num_processes": args.num_processes,
                                                "out_dir": os.path.join(workdir, "nnunet_preprocessed_frames")}))
        best = lambda runs: max(runs, key=lambda r: r["slices_per_s"])  # noqa: E731
        cache_row, nn = best(cache_runs), best(nnunet_runs)
        result["rows"].append({"step": f"cache build, {compare_n} cines, best", **cache_row})
        result["rows"].append({"step": "nnU-Net preprocess, 3D frames, best", "subjects": compare_n, **nn})
        log("cache build from the same 3D frame files (information) ...")
        same = phase("build", {"extra": frames_dir, "cache_dir": os.path.join(workdir, "caches", "frames3d"),
                               "num_processes": args.num_processes})
        result["rows"].append({"step": "cache build, 3D frame files", **same, "subjects": compare_n})
        if nn["slices"] != cache_row["slices"] or nn["cases"] != frames["cases"]:
            log(f"warning: nnU-Net made {nn['slices']} slices of {nn['cases']} cases, the cache "
                f"{cache_row['slices']} of {frames['cases']} frames")
        result["compare"] = {"subjects": compare_n, "frames": frames["cases"], "repeats": args.compare_repeats,
                             "cache_slices_per_s": [r["slices_per_s"] for r in cache_runs],
                             "nnunet_slices_per_s": [r["slices_per_s"] for r in nnunet_runs],
                             "ratio": cache_row["slices_per_s"] / nn["slices_per_s"],
                             "ratio_same_files": same["slices_per_s"] / nn["slices_per_s"]}
        for folder in ("nnunet_preprocessed_frames", os.path.join("caches", "frames3d"),
                       os.path.join("caches", "compare")):
            shutil.rmtree(os.path.join(workdir, folder), ignore_errors=True)
            if os.path.exists(os.path.join(workdir, folder + ".lock")):
                os.remove(os.path.join(workdir, folder + ".lock"))

    for n in (sizes[0], sizes[-1]) if len(sizes) > 1 else sizes:
        log(f"pretraining epoch ({args.epoch_iters} iterations), {n} subjects ...")
        row = phase("epoch", {"cache_dir": cache_dirs[n], "method": args.method, "iters": args.epoch_iters,
                              "batch_size": args.batch_size, "num_processes": args.num_processes,
                              "output": os.path.join(workdir, "pretrain", f"subjects_{n}")})
        result["rows"].append({"step": f"epoch {args.method}, {n} subjects", "subjects": n, **row})
        for via in ("pread", "mmap") if args.read_via_mmap else ("pread",):
            log(f"random reads ({via}), {n} subjects ...")
            reads = phase("read", {"cache_dir": cache_dirs[n], "samples": args.read_samples, "via": via})
            result["reads"].append({"subjects": n, **reads})

    result["goals"] = evaluate_goals(result)
    print_report(result)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    if not args.keep_caches:
        shutil.rmtree(os.path.join(workdir, "frames3d"), ignore_errors=True)
        for n, d in cache_dirs.items():
            shutil.rmtree(d, ignore_errors=True)
            if os.path.exists(d + ".lock"):
                os.remove(d + ".lock")
    return result


if __name__ == "__main__":
    main()
