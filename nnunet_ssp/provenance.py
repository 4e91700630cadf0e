"""Provenance of results: what made them, where and how long it took.

- :func:`collect_provenance`: the project's commit (and whether its tree has uncommitted changes), the command, the
  date, the hardware, the library versions and the recorded phase times of the runs behind some results folders;
  :func:`render_provenance_markdown` shows it, :func:`load_provenance` reads back a saved one.
- The phase-time file ``ssp_phase_times.json`` in a protocol's output folder (``nnunet_ssp/protocol.py``): a list
  of phase records ``{"phase", "shard", "start", "end", "seconds"}`` (start and end: UTC ISO dates; shard: ``"i/n"``,
  null when not sharded), one appended by :func:`record_phase` after each completed phase, so a re-run adds its own
  records after the earlier ones.
"""

import os
import platform
import shlex
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from typing import List, Optional, Sequence

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import acquire_lock, load_json_file, save_json_atomic

PROVENANCE_FORMAT = "nnunet_ssp.provenance"
PHASE_TIMES_FORMAT = "nnunet_ssp.phase_times"
PHASE_TIMES_FILE = "ssp_phase_times.json"
#: the distributions whose versions a provenance records (Python's own comes first)
LIBRARIES = ("nnunetv2", "torch", "numpy", "scipy", "SimpleITK", "batchgeneratorsv2", "nnunet-ssp")
UNKNOWN = "unknown"
PHASE_RECORD_TYPES = {"phase": str, "shard": (str, type(None)), "start": str, "end": str, "seconds": (int, float)}
HARDWARE_KEYS = ("cpu", "logical_cores", "usable_cores", "memory_bytes", "gpus")
PROVENANCE_KEYS = (
    "command",
    "working_directory",
    "commit",
    "dirty",
    "repository",
    "date",
    "hardware",
    "versions",
    "phase_times",
)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------------ phase times
def read_phase_times(path: str) -> List[dict]:
    """The phase records of a phase-time file; a malformed file is one SSPError naming it."""
    content = load_json_file(path, dict)
    records = content.get("phases")
    if content.get("format") != PHASE_TIMES_FORMAT or not isinstance(records, list):
        raise SSPError(f"{path}: not a phase-time file (format {PHASE_TIMES_FORMAT} with a list of phases)")
    problem = _phase_records_problem(records)
    if problem:
        raise SSPError(f"{path}: {problem}")
    return records


def _phase_records_problem(records: list) -> Optional[str]:
    """What is wrong with a list of phase records; None when nothing is."""
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not all(
            isinstance(record.get(key), kind) for key, kind in PHASE_RECORD_TYPES.items()
        ):
            return f"phase record {index} is not {{{', '.join(PHASE_RECORD_TYPES)}}} of the right types"
    return None


def record_phase(folder: str, phase: str, start: datetime, shard: Optional[str] = None) -> str:
    """Appends the record of ``phase``, started at ``start`` (UTC) and ending now, to ``folder``'s phase-time file
    (created if absent), under a lock (shards may share the folder) and atomically; returns the file's path."""
    path = os.path.join(folder, PHASE_TIMES_FILE)
    end = utc_now()
    os.makedirs(folder, exist_ok=True)
    lock = acquire_lock(os.path.join(folder, f".{PHASE_TIMES_FILE}.lock"), wait_message=f"waiting to write {path}")
    try:
        records = read_phase_times(path) if os.path.isfile(path) else []
        records.append(
            {
                "phase": phase,
                "shard": shard,
                "start": _iso(start),
                "end": _iso(end),
                "seconds": round((end - start).total_seconds(), 3),
            }
        )
        save_json_atomic({"format": PHASE_TIMES_FORMAT, "format_version": 1, "phases": records}, path)
    finally:
        os.close(lock)
    return path


def find_phase_times(results: Sequence[str]) -> List[str]:
    """The phase-time files of the runs behind ``results``: for each folder the nearest ``ssp_phase_times.json`` in
    it or in a folder above it (the protocol's is in its output folder, above its ``predictions``), each file once,
    in the order of ``results``."""
    found = []
    for folder in results:
        here = os.path.abspath(folder)
        while not os.path.isfile(os.path.join(here, PHASE_TIMES_FILE)) and os.path.dirname(here) != here:
            here = os.path.dirname(here)
        path = os.path.join(here, PHASE_TIMES_FILE)
        if os.path.isfile(path) and path not in found:
            found.append(path)
    return found


# ------------------------------------------------------------------------------------------------------- provenance
def _git(folder: str, *args: str) -> Optional[str]:
    """The output of ``git args`` in ``folder``, None where git fails or is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def project_commit() -> dict:
    """{commit, dirty, repository} of the git checkout that holds the installed nnunet_ssp package (dirty: tracked
    files differ from the commit); commit "unknown", dirty and repository None when the package is not tracked in
    one (e.g. installed into site-packages)."""
    package = os.path.dirname(os.path.abspath(__file__))
    commit = _git(package, "rev-parse", "HEAD")
    if commit is None or _git(package, "ls-files", "--error-unmatch", "__init__.py") is None:
        return {"commit": UNKNOWN, "dirty": None, "repository": None}
    changes = _git(package, "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": None if changes is None else bool(changes),
        "repository": _git(package, "rev-parse", "--show-toplevel"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> List[str]:
    """The names of the GPUs torch sees; none without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def hardware() -> dict:
    """CPU model, logical cores, the cores this process may use (None where the OS does not say), total memory in
    bytes and GPU names."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_bytes": _memory_bytes(),
        "gpus": _gpus(),
    }


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def library_versions() -> dict:
    return {"python": platform.python_version(), **{name: _version(name) for name in LIBRARIES}}


def collect_provenance(argv: Sequence[str], results: Sequence[str] = ()) -> dict:
    """The provenance of a command ``argv`` (program first) run now on ``results`` folders: commit, command
    (shell-quoted), working directory, UTC date, hardware, library versions and the phase records of the
    phase-time files of ``results`` (find_phase_times) as [{file, phases}]."""
    return {
        "format": PROVENANCE_FORMAT,
        "format_version": 1,
        "command": shlex.join(argv),
        "working_directory": os.getcwd(),
        **project_commit(),
        "date": _iso(utc_now()),
        "hardware": hardware(),
        "versions": library_versions(),
        "phase_times": [{"file": path, "phases": read_phase_times(path)} for path in find_phase_times(results)],
    }


def load_provenance(path: str) -> dict:
    """A provenance saved as JSON; one SSPError naming the file when it is not one."""
    provenance = load_json_file(path, dict)
    problem = _provenance_problem(provenance)
    if problem:
        raise SSPError(f"{path}: not a provenance record ({problem})")
    return provenance


def _provenance_problem(provenance: dict) -> Optional[str]:
    """What keeps a dict from being a provenance that render_provenance_markdown can show; None when nothing does."""
    if provenance.get("format") != PROVENANCE_FORMAT:
        return f"format is not {PROVENANCE_FORMAT}"
    missing = [key for key in PROVENANCE_KEYS if key not in provenance]
    missing += [f"hardware.{key}" for key in HARDWARE_KEYS if key not in (provenance.get("hardware") or {})]
    if missing:
        return f"no {', '.join(missing)}"
    phase_times = provenance["phase_times"]
    if not isinstance(phase_times, list) or not all(
        isinstance(e, dict) and isinstance(e.get("phases"), list) and "file" in e for e in phase_times
    ):
        return "phase_times is not a list of {file, phases}"
    return next(filter(None, (_phase_records_problem(e["phases"]) for e in phase_times)), None)


def _duration_text(seconds: float) -> str:
    """ "12.3 s" under a minute, else "3725 s (1:02:05)"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{round(seconds)} s ({minutes // 60}:{minutes % 60:02d}:{secs:02d})"


def _hardware_text(h: dict) -> str:
    usable = "" if h["usable_cores"] is None else f", {h['usable_cores']} usable by the command"
    memory = "memory unknown" if h["memory_bytes"] is None else f"{h['memory_bytes'] / 2**30:.1f} GiB memory"
    return f"{h['cpu']}; {h['logical_cores']} logical cores{usable}; {memory}; GPU: {', '.join(h['gpus']) or 'none'}"


def _commit_text(p: dict) -> str:
    if p["commit"] == UNKNOWN:
        return "unknown (nnunet_ssp is not installed from a git checkout)"
    state = {True: "with uncommitted changes", False: "clean", None: "state unknown"}[p["dirty"]]
    return f"{p['commit']} ({state}; {p['repository']})"


def _phase_lines(phase_times: Sequence[dict]) -> List[str]:
    """A list item per phase-time file, each followed by its table of phases."""
    if not phase_times:
        return [f"- Wall time per phase: not recorded (no {PHASE_TIMES_FILE} in or above the results folders)"]
    blocks = [
        "\n".join(
            [
                f"- Wall time per phase, from {entry['file']}:",
                "",
                "| phase | shard | start (UTC) | end (UTC) | wall time |",
                "|---|---|---|---|---|",
                *(
                    f"| {r['phase']} | {r['shard'] or '–'} | {r['start']} | {r['end']} | "
                    f"{_duration_text(r['seconds'])} |"
                    for r in entry["phases"]
                ),
            ]
        )
        for entry in phase_times
    ]
    return ["\n\n".join(blocks)]


def render_provenance_markdown(provenance: dict) -> str:
    """A provenance as a Markdown list (the phase times as tables), without a heading."""
    versions = ", ".join(f"{name} {version}" for name, version in provenance["versions"].items())
    return "\n".join(
        [
            f"- Command: `{provenance['command']}` (in {provenance['working_directory']})",
            f"- Commit: {_commit_text(provenance)}",
            f"- Date: {provenance['date']}",
            f"- Hardware: {_hardware_text(provenance['hardware'])}",
            f"- Libraries: {versions}",
            *_phase_lines(provenance["phase_times"]),
        ]
    )
