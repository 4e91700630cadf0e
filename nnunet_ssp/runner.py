"""How the protocol's plan runs: a :class:`Run` is a named list of :class:`Command` s (stock commands, each skipped
when its result exists); :func:`print_plan` shows a plan, :func:`execute` runs it stage by stage, up to ``jobs`` runs at
a time, each command's output in its own log file."""

import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, List, Sequence

from nnunet_ssp.errors import SSPError

#: Environment of runs that share the machine (--jobs > 1), unless the user's environment sets it. nnU-Net gives every
#: CPU run one torch (OpenMP) thread per core (``torch.set_num_threads(cpu_count())`` for ``-device cpu``); OpenMP
#: threads that spin while idle then take the cores the other runs need. Measured on 2 cores, two parallel
#: fine-tunes: epoch 25 s with spinning threads, 13.5 s with passive ones (one alone: 7.7 s).
PARALLEL_RUN_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class Command:
    """One stock command and how to tell that its result already exists."""

    command: List[str]
    done: Callable[[], bool]
    resume: Callable[[], List[str]] = field(default=lambda: [])  # extra arguments when partly done
    env: dict = field(default_factory=dict)  # environment overrides for this command


@dataclass
class Run:
    """A named unit of work: its steps run in order, each skipped when done."""

    phase: str
    name: str
    steps: List["Command"]

    def is_done(self) -> bool:
        return all(step.done() for step in self.steps)


def file_exists(*parts: str) -> Callable[[], bool]:
    """A ``done`` check: whether the file exists (at the time of asking)."""
    path = os.path.join(*parts)
    return lambda: os.path.isfile(path)


def _describe(command: List[str]) -> str:
    return " ".join(shlex.quote(c) for c in command)


def _numbered(stages: Sequence[Sequence[Run]]):
    """(number of the run in its phase, total, run) for the runs of each stage, stage by stage."""
    total = sum(len(stage) for stage in stages)
    numbers = iter(range(1, total + 1))
    return [[(next(numbers), total, run) for run in stage] for stage in stages]


def print_plan(stages: Sequence[Sequence[Run]]) -> None:
    """The dry run: every run with its commands, those already done marked."""
    for stage in _numbered(stages):
        for number, total, run in stage:
            print(f"[{run.phase} {number}/{total}] {run.name}{' [done]' if run.is_done() else ''}")
            for step in run.steps:
                print(f"    {'(done) ' if step.done() else ''}{_describe(step.command)}")


def _say(line: str, stream=None) -> None:
    """One whole line in one write: ``print`` writes the text and its newline separately, so the lines of runs
    executing in parallel threads could run into each other."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def _execute_run(run: Run, label: str, log_folder: str, base_env: dict) -> None:
    """Runs the steps of ``run`` that are not done, in order, with ``base_env`` under the environment; each command's
    output goes to its log file."""
    _say(f"[{label}] {run.name}{' [done]' if run.is_done() else ''}")
    for step in run.steps:
        if step.done():
            continue
        command = step.command + step.resume()
        log = os.path.join(log_folder, f"{run.phase}_{_slug(run.name)}_{os.path.basename(command[0])}.log")
        os.makedirs(log_folder, exist_ok=True)
        _say(f"[{label}] $ {_describe(command)}")
        start = time.time()
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n$ {_describe(command)}\n")
            f.flush()
            code = subprocess.call(
                command, stdout=f, stderr=subprocess.STDOUT, env={**base_env, **os.environ, **step.env}
            )
        if code != 0:
            tail = open(log, encoding="utf-8", errors="replace").read().strip().splitlines()[-15:]
            _say("\n".join(f"[{label}] | {line}" for line in tail), sys.stderr)
            raise SSPError(
                f"{command[0]} failed (exit {code}) in '{run.name}'; full output in {log}; "
                f"re-run the same command to resume"
            )
        _say(f"[{label}] {os.path.basename(command[0])} finished in {time.time() - start:.0f} s")


def execute(stages: Sequence[Sequence[Run]], log_folder: str, jobs: int = 1) -> None:
    """Runs the stages in order, the runs of each with up to ``jobs`` at a time; after the first failure no new run
    starts, and its error is raised once the runs under way have ended."""
    base_env = PARALLEL_RUN_ENV if jobs > 1 else {}
    for stage in _numbered(stages):
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [
                pool.submit(_execute_run, run, f"{run.phase} {number}/{total}", log_folder, base_env)
                for number, total, run in stage
            ]
            for future in as_completed(futures):
                if future.exception() is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise future.exception()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")[:80]
