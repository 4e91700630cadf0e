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
import time

from cache_scale_phases import DATASET_ID, DATASET_NAME, disk_bytes, planned_configuration  # benchmarks/
from process_memory import TreeSampler

from nnunet_ssp.workspace import workspace_env
from pretraining.run import cache_folder

GB = 1024**3
MB = 1024**2
RSS_GOAL_BYTES = 3 * 1000**3  # 3 GB
FLAT_TOLERANCE = 1.15  # peak RSS at the full cohort / at the small one


def run_phase(phase: str, params: dict, workdir: str, interval: float, log) -> dict:
    """Runs ``phase`` (cache_scale_phases.py) in a child process, sampling its process tree's memory."""
    out = os.path.join(workdir, f"phase_{phase}.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [
        sys.executable,
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache_scale_phases.py"),
        phase,
        json.dumps(params),
        out,
    ]
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
            log(
                f"reusing the workspace in {workdir} (phantom {record['phantom_s']:.0f} s, "
                f"plans {record['plan_s']:.0f} s when made)"
            )
            return {**record, "reused": True}
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, nnUNet_n_proc_DA=str(num_processes), nnUNet_def_n_proc=str(num_processes))
    log(f"generating the phantom cohort: {subjects} subjects at {size}x{size} ...")
    start = time.perf_counter()
    _quiet(
        [
            os.path.join(bin_dir, "nnunet_ssp"),
            "phantom",
            "-d",
            str(DATASET_ID),
            "-n",
            DATASET_NAME,
            "--subjects",
            str(subjects),
            "--test-subjects",
            "0",
            "--size",
            str(size),
        ],
        env,
    )
    phantom_s = time.perf_counter() - start
    log(f"  phantom: {phantom_s:.0f} s; planning (nnUNetv2_plan_and_preprocess --no_pp) ...")
    start = time.perf_counter()
    _quiet(
        [
            os.path.join(bin_dir, "nnUNetv2_plan_and_preprocess"),
            "-d",
            str(DATASET_ID),
            "-c",
            "2d",
            "--no_pp",
            "-npfp",
            str(num_processes),
        ],
        env,
    )
    plan_s = time.perf_counter() - start
    log(f"  plans: {plan_s:.0f} s")
    raw = os.path.join(os.environ["nnUNet_raw"], f"Dataset{DATASET_ID:03d}_{DATASET_NAME}")
    record = {
        **want,
        "phantom_s": round(phantom_s, 1),
        "plan_s": round(plan_s, 1),
        "raw_bytes": disk_bytes(raw),
        "cine_bytes": disk_bytes(os.path.join(raw, "cineTr")),
    }
    with open(record_file, "w") as f:
        json.dump(record, f, indent=2)
    return {**record, "reused": False}


def _quiet(cmd: list, env: dict) -> None:
    """Runs a stock CLI; its output is shown only if it fails."""
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], file=sys.stderr)
        raise SystemExit(f"{os.path.basename(cmd[0])} failed (exit {done.returncode})")


# ---------------------------------------------------------------------------------------------------- reporting
def _gb(n: float) -> str:
    return f"{n / 1000**3:.2f}"


def print_report(result: dict) -> None:
    print()
    print(f"{'goal':50s} {'value':>24s}  ok")
    for g in result["goals"]:
        print(f"{g['goal']:50s} {g['value']:>24s}  {'' if g['ok'] is None else 'yes' if g['ok'] else 'NO'}")
    compare = result.get("compare")
    if compare:
        runs = lambda v: ", ".join(f"{x:.0f}" for x in v)  # noqa: E731
        print(
            f"comparison on {compare['frames']} frames of {compare['subjects']} subjects, slices/s per run: cache "
            f"{runs(compare['cache_slices_per_s'])}; nnU-Net {runs(compare['nnunet_slices_per_s'])} (best kept)"
        )
    print()
    print(
        f"{'step':34s} {'subj':>5s} {'slices':>7s} {'time s':>7s} {'slices/s':>8s} {'disk GB':>7s} "
        f"{'RSS GB':>6s} {'PSS GB':>6s} {'anon GB':>7s} {'main GB':>7s} {'kids GB':>7s} {'procs':>5s} "
        f"{'busy':>4s} {'cores':>5s}"
    )
    for r in result["rows"]:
        cores = r["child_cpu_s"] / r["seconds"] if r.get("seconds") else 0.0
        disk = _gb(r["disk_bytes"]) if "disk_bytes" in r else ""
        print(
            f"{r['step']:34s} {r.get('subjects', ''):>5} {r.get('slices', ''):>7} {r.get('seconds', 0):7.1f} "
            f"{r.get('slices_per_s', 0):8.1f} {disk:>7s} {_gb(r['peak_tree_rss_bytes']):>6s} "
            f"{_gb(r['peak_tree_pss_bytes']):>6s} {_gb(r['peak_tree_anon_bytes']):>7s} "
            f"{_gb(r['peak_main_rss_bytes']):>7s} {_gb(r['peak_children_rss_bytes']):>7s} "
            f"{r['max_processes']:5d} {r['busy_child_processes']:4d} {cores:5.2f}"
        )
    for r in result["reads"]:
        print(
            f"random reads ({r['via']:5s}), {r['subjects']:>4} subjects: cold-ish {r['cold_slices_per_s']:6.0f} "
            f"slices/s, warm {r['warm_slices_per_s']:6.0f} slices/s ({r['samples']} slices of "
            f"{r['slice_bytes'] // 1024} KB); reader RSS {_gb(r['rss_after_reads_bytes'])} GB (file pages "
            f"{_gb(r['file_pages_after_reads_bytes'])} GB)"
        )
    w = result["workspace"]
    print(
        f"workspace: phantom {w['phantom_s']:.0f} s, plans {w['plan_s']:.0f} s"
        f"{' (when made, reused)' if w.get('reused') else ''}; raw data {_gb(w['raw_bytes'])} GB; "
        f"{result['num_processes']} processes. RSS/PSS/anon: peak sums over the process tree; main: the measured "
        f"process; kids: its child processes (workers); busy: children with >= 1 s CPU; cores: their CPU s / wall s. "
        f"GB = 10^9 bytes."
    )


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
            goals.append(
                {
                    "goal": f"{name} flat: {rows[-1]['subjects']} vs {rows[0]['subjects']} subjects",
                    "value": f"{growth:.2f}x",
                    "ok": growth <= FLAT_TOLERANCE,
                }
            )

    def under_goal(name, rows, key):
        if rows:
            values = [r[key] for r in rows]
            goals.append(
                {
                    "goal": f"{name} (< 3 GB)",
                    "value": " / ".join(_gb(v) for v in values) + " GB",
                    "ok": max(values) < RSS_GOAL_BYTES,
                }
            )

    compare = result.get("compare")
    if compare:
        goals.append(
            {
                "goal": "cache / nnU-Net preprocessing, slices/s",
                "value": f"{compare['ratio']:.2f}",
                "ok": compare["ratio"] >= 1.0,
            }
        )
        goals.append(
            {
                "goal": "  (info) cache from nnU-Net's 3D frame files",
                "value": f"{compare['ratio_same_files']:.2f}",
                "ok": None,
            }
        )
    for name, rows, key in (
        ("build peak RSS, process tree", builds, "peak_tree_rss_bytes"),
        ("epoch data path RSS (loader workers)", epochs, "peak_children_rss_bytes"),
        ("reader RSS after random reads", preads, "rss_after_reads_bytes"),
    ):
        under_goal(name, rows, key)
        flat(name, rows, key)
    if epochs:
        goals.append(
            {
                "goal": "  (info) epoch main process (model step on CPU)",
                "value": " / ".join(_gb(r["peak_main_rss_bytes"]) for r in epochs) + " GB",
                "ok": None,
            }
        )
        flat("epoch tree RSS", epochs, "peak_tree_rss_bytes")
    if mmaps:
        goals.append(
            {
                "goal": "  (info) former mmap reader, same reads",
                "value": " / ".join(_gb(r["rss_after_reads_bytes"]) for r in mmaps) + " GB",
                "ok": None,
            }
        )
    if builds:
        big, n = builds[-1], result["num_processes"]
        cores = big["child_cpu_s"] / big["seconds"]
        goals.append(
            {
                "goal": f"build parallel over subjects ({n} processes)",
                "value": f"{big['busy_child_processes']} workers, {cores:.2f} cores",
                "ok": big["busy_child_processes"] >= n or n == 1,
            }
        )
    return goals


# ---------------------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=300, help="phantom cohort (default 300, ~72k slices)")
    parser.add_argument("--size", type=int, default=256, help="in-plane size in pixels (default 256)")
    parser.add_argument(
        "--num-processes",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes of the cache build and of nnU-Net's preprocessing; DataLoader workers",
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="cohort sizes to build the cache for (default: 30 and --subjects)"
    )
    parser.add_argument(
        "--compare-subjects",
        type=int,
        help="subjects whose frames nnU-Net preprocesses for the ratio (default: the smallest size)",
    )
    parser.add_argument("--skip-nnunet", action="store_true", help="no comparison with nnU-Net's preprocessing")
    parser.add_argument("--method", default="simclr", help="SSP method of the epoch (default simclr)")
    parser.add_argument(
        "--compare-repeats",
        type=int,
        default=2,
        help="alternating runs of the cache build and of nnU-Net's preprocessing, the best of each kept (default 2)",
    )
    parser.add_argument("--epoch-iters", type=int, default=5, help="iterations of the measured epoch (default 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the measured epoch (default 8)")
    parser.add_argument("--read-samples", type=int, default=3000, help="random slices read (default 3000)")
    parser.add_argument(
        "--read-via-mmap",
        action="store_true",
        help="also read the same slices through the blocks' memory maps (the former reader)",
    )
    parser.add_argument("--sample-interval", type=float, default=0.2, help="seconds between RSS samples")
    parser.add_argument("--workdir", help="workspace to create or reuse (default: a new folder in /tmp)")
    parser.add_argument("--keep-caches", action="store_true", help="keep the built caches (default: removed)")
    parser.add_argument("--json", default="cache_scale.json")
    return parser


def _cohort_sizes(args, parser, workdir: str, log):
    """(cohort sizes to build, subjects of the nnU-Net comparison), after checking the disk space they need."""
    sizes = sorted(set(args.sizes or [min(30, args.subjects), args.subjects]))
    if sizes[-1] > args.subjects:
        parser.error(f"--sizes {sizes[-1]} is more than --subjects {args.subjects}")
    compare_n = min(args.compare_subjects or sizes[0], args.subjects)
    from pretraining.data.cache import MIN_SUBJECTS_PER_PROCESS

    for n in sorted(set(sizes) | ({compare_n} if not args.skip_nnunet else set())):
        if n < MIN_SUBJECTS_PER_PROCESS * args.num_processes:
            log(
                f"note: the cache build of {n} subjects uses {max(1, n // MIN_SUBJECTS_PER_PROCESS)} process(es), not "
                f"{args.num_processes} (one per {MIN_SUBJECTS_PER_PROCESS} subjects)"
            )
    est = 240 * sizes[-1] * args.size**2 * 4
    free = shutil.disk_usage(workdir).free
    log(f"workdir {workdir}: {free / GB:.0f} GiB free; the largest cache needs about {est / GB:.0f} GiB")
    if est > 0.9 * free:
        raise SystemExit(f"not enough disk space in {workdir}")
    return sizes, compare_n


def _compare_with_nnunet(args, workdir: str, compare_n: int, phase, log, result: dict) -> None:
    """The cache build against nnU-Net's preprocessing of the same frames (as 3D cases), alternating, best of each."""
    frames_dir = os.path.join(workdir, "frames3d", f"subjects_{compare_n}")
    log(f"writing the frames of {compare_n} subjects as 3D cases (untimed) ...")
    frames = phase("frames", {"subjects": compare_n, "frames_dir": frames_dir})
    # the two timings alternate, and each keeps its best: a machine shared with other jobs slows both alike
    cache_runs, nnunet_runs = [], []
    for rep in range(args.compare_repeats):
        log(f"comparison {rep + 1}/{args.compare_repeats}: cache build of {compare_n} cines ...")
        cache_runs.append(
            phase(
                "build",
                {
                    "subjects": compare_n,
                    "num_processes": args.num_processes,
                    "cache_dir": os.path.join(workdir, "caches", "compare"),
                },
            )
        )
        log(f"comparison {rep + 1}/{args.compare_repeats}: nnU-Net preprocessing of their frames ...")
        nnunet_runs.append(
            phase(
                "nnunet",
                {
                    "frames_dir": frames_dir,
                    "num_processes": args.num_processes,
                    "out_dir": os.path.join(workdir, "nnunet_preprocessed_frames"),
                },
            )
        )
    best = lambda runs: max(runs, key=lambda r: r["slices_per_s"])  # noqa: E731
    cache_row, nn = best(cache_runs), best(nnunet_runs)
    result["rows"].append({"step": f"cache build, {compare_n} cines, best", **cache_row})
    result["rows"].append({"step": "nnU-Net preprocess, 3D frames, best", "subjects": compare_n, **nn})
    log("cache build from the same 3D frame files (information) ...")
    same = phase(
        "build",
        {
            "extra": frames_dir,
            "cache_dir": os.path.join(workdir, "caches", "frames3d"),
            "num_processes": args.num_processes,
        },
    )
    result["rows"].append({"step": "cache build, 3D frame files", **same, "subjects": compare_n})
    if nn["slices"] != cache_row["slices"] or nn["cases"] != frames["cases"]:
        log(
            f"warning: nnU-Net made {nn['slices']} slices of {nn['cases']} cases, the cache "
            f"{cache_row['slices']} of {frames['cases']} frames"
        )
    result["compare"] = {
        "subjects": compare_n,
        "frames": frames["cases"],
        "repeats": args.compare_repeats,
        "cache_slices_per_s": [r["slices_per_s"] for r in cache_runs],
        "nnunet_slices_per_s": [r["slices_per_s"] for r in nnunet_runs],
        "ratio": cache_row["slices_per_s"] / nn["slices_per_s"],
        "ratio_same_files": same["slices_per_s"] / nn["slices_per_s"],
    }
    for folder in ("nnunet_preprocessed_frames", os.path.join("caches", "frames3d"), os.path.join("caches", "compare")):
        shutil.rmtree(os.path.join(workdir, folder), ignore_errors=True)
        if os.path.exists(os.path.join(workdir, folder + ".lock")):
            os.remove(os.path.join(workdir, folder + ".lock"))


def _epochs_and_reads(args, workdir: str, sizes, cache_dirs, phase, log, result: dict) -> None:
    """A pretraining epoch and random slice reads on the smallest and the largest cache."""
    for n in (sizes[0], sizes[-1]) if len(sizes) > 1 else sizes:
        log(f"pretraining epoch ({args.epoch_iters} iterations), {n} subjects ...")
        row = phase(
            "epoch",
            {
                "cache_dir": cache_dirs[n],
                "method": args.method,
                "iters": args.epoch_iters,
                "batch_size": args.batch_size,
                "num_processes": args.num_processes,
                "output": os.path.join(workdir, "pretrain", f"subjects_{n}"),
            },
        )
        result["rows"].append({"step": f"epoch {args.method}, {n} subjects", "subjects": n, **row})
        for via in ("pread", "mmap") if args.read_via_mmap else ("pread",):
            log(f"random reads ({via}), {n} subjects ...")
            reads = phase("read", {"cache_dir": cache_dirs[n], "samples": args.read_samples, "via": via})
            result["reads"].append({"subjects": n, **reads})


def _remove_caches(workdir: str, cache_dirs: dict) -> None:
    shutil.rmtree(os.path.join(workdir, "frames3d"), ignore_errors=True)
    for d in cache_dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        if os.path.exists(d + ".lock"):
            os.remove(d + ".lock")


def main(argv=None) -> dict:
    parser = _parser()
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="ssp_cache_scale_"))
    os.makedirs(workdir, exist_ok=True)
    os.environ.update(workspace_env(workdir))

    def log(message):
        print(message, flush=True)

    sizes, compare_n = _cohort_sizes(args, parser, workdir, log)
    workspace = prepare_workspace(workdir, args.subjects, args.size, args.num_processes, log)
    full_cache = cache_folder(planned_configuration())
    result = {
        "subjects": args.subjects,
        "size": args.size,
        "num_processes": args.num_processes,
        "sizes": sizes,
        "workspace": workspace,
        "workdir": workdir,
        "rows": [],
        "reads": [],
        "cpu_count": os.cpu_count(),
    }
    phase = lambda name, params: run_phase(name, params, workdir, args.sample_interval, log)  # noqa: E731
    cache_dirs = {}
    for n in sizes:
        cache_dirs[n] = full_cache if n == args.subjects else os.path.join(workdir, "caches", f"subjects_{n}")
        log(f"cache build, {n} subjects ...")
        row = phase("build", {"subjects": n, "cache_dir": cache_dirs[n], "num_processes": args.num_processes})
        result["rows"].append({"step": f"cache build, {n} subjects", **row})
    if not args.skip_nnunet:
        _compare_with_nnunet(args, workdir, compare_n, phase, log, result)
    _epochs_and_reads(args, workdir, sizes, cache_dirs, phase, log, result)
    result["goals"] = evaluate_goals(result)
    print_report(result)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    if not args.keep_caches:
        _remove_caches(workdir, cache_dirs)
    return result


if __name__ == "__main__":
    main()
