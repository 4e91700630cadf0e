"""Fault injection through the real command line: every bad input of tests/fault_matrix.py (and docs/faults.md, its
table), 20 SIGKILLs at random points of a run with a bitwise-equal result after --continue, SIGTERM/SIGINT mid-epoch
saves, two runs on one output folder or one slice cache, and the NNUNET_SSP_FAULT hook itself.

Kills are placed by the hook, never by timing: the process writes a marker file at a named point and waits there;
the test waits for the marker, then signals.
"""

import os
import random
import shutil
import signal
import subprocess
import time

import fault_matrix
import numpy as np
import pytest
import torch
from fault_matrix import BIN, CASES, DATASET, Scratch, Workspace, format_markdown, pretrain_command, run_case

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import FAULT_ENV, fault_point, torch_save_atomic
from pretraining.data.slice_cache import SliceCache
from pretraining.state import LATEST_CHECKPOINT, load_state

EPOCHS, ITERS, SUBJECTS = 4, 3, 4
RUN = pretrain_command("--iters-per-epoch", str(ITERS), "--seed", "7", epochs=EPOCHS)
SHORT_RUN = pretrain_command("--seed", "7")  # one epoch of one step
CACHE = ("nnUNet_preprocessed", DATASET, "ssp_cache__nnUNetPlans_2d")
MARKER_TIMEOUT_S = 300
FAULTS_PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "faults.md")
ROWS = {}  # case name -> its row, as the matrix's cases run: docs/faults.md is compared once all have


@pytest.fixture(scope="module")
def workspace(phantom_workspace, tmp_path_factory) -> Workspace:
    """A private copy of the phantom workspace (nnUNetv2_train writes splits_final.json into it)."""
    root, env = phantom_workspace
    mine = tmp_path_factory.mktemp("fault_workspace")
    env = fault_matrix.base_env(str(mine))
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(os.path.join(root, name), env[name], dirs_exist_ok=True)
    return Workspace(str(mine), env)


# ------------------------------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault_matrix_case(workspace, case, tmp_path):
    row = ROWS[case.name] = run_case(workspace, case, str(tmp_path / "case"))
    assert row.passed, row
    assert not os.path.exists(tmp_path / "case" / "payload_ran")  # a pickle's payload never ran


def test_faults_page_is_the_matrix_table():
    """docs/faults.md is the table of the rows the cases above printed (they run first, in file order)."""
    if len(ROWS) < len(CASES):
        pytest.skip("needs every case of the matrix run before it (not with -k)")
    with open(FAULTS_PAGE, encoding="utf-8", newline="") as f:
        page = f.read()
    stale = "docs/faults.md is stale: python tests/fault_matrix.py --markdown docs/faults.md"
    assert format_markdown([ROWS[case.name] for case in CASES]) == page, stale


# ---------------------------------------------------------------------------------------------------- helpers
def _command(output: str, run=RUN) -> list:
    return [os.path.join(BIN, run[0]), *run[1:], "-o", output, "--continue"]


def _start(scratch: Scratch, output: str, point: str = None, hook: str = None, run=RUN, **popen) -> subprocess.Popen:
    """ssp_pretrain --continue in its own process group; with ``point``, it pauses there (marker in ``hook``)."""
    env = dict(scratch.env)
    if point:
        os.makedirs(hook, exist_ok=True)
        env[FAULT_ENV] = f"{point}=pause:{hook}"
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(_command(output, run), env=env, start_new_session=True, text=True, **popen)


def _wait_for_marker(process: subprocess.Popen, hook: str) -> None:
    """Waits until the process reports that it reached its point (it then waits there for the go file)."""
    deadline = time.monotonic() + MARKER_TIMEOUT_S
    while not os.path.exists(os.path.join(hook, "reached")):
        assert process.poll() is None, f"exited ({process.returncode}) before reaching its point"
        assert time.monotonic() < deadline, "point never reached"
        time.sleep(0.05)


def _finish(scratch: Scratch, output: str, run=RUN) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(output, run), env=scratch.env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _assert_same_training(output: str, reference: str) -> None:
    """Final weights, and model, optimizer and losses of the last state, equal bit for bit."""
    final, expected = (
        torch.load(os.path.join(f, "checkpoint_final.pth"), weights_only=True) for f in (output, reference)
    )
    assert final["network_weights"].keys() == expected["network_weights"].keys()
    for key, tensor in expected["network_weights"].items():
        assert torch.equal(final["network_weights"][key], tensor), key
    state, expected_state = (load_state(os.path.join(f, LATEST_CHECKPOINT)) for f in (output, reference))
    for key, tensor in expected_state["model"].items():
        assert torch.equal(state["model"][key], tensor), key
    for (i, a), (_, b) in zip(
        sorted(state["optimizer"]["state"].items()), sorted(expected_state["optimizer"]["state"].items())
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"]), i
    assert state["history"]["loss"] == expected_state["history"]["loss"]
    assert not [f for f in os.listdir(output) if ".tmp" in f]


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    """An uninterrupted run (its own slice cache) and its scratch."""
    scratch = Scratch(workspace, str(tmp_path_factory.mktemp("reference") / "scratch"))
    output = os.path.join(scratch.root, "out")
    _finish(scratch, output)
    return scratch, output


def _kill_points():
    """Every point a run passes, in order: the cache build (arrays, markers, subjects, index, fingerprint), each
    iteration, the atomic write of each epoch's state (between temporary file and rename), the final checkpoint.
    A state write is ("latest", epoch): its occurrence in a process depends on where that process resumed."""
    points = []
    for n in range(SUBJECTS):
        points += [f"write:s{n:06d}_b0.npy", f"write:s{n:06d}.json", f"cache:subject:{n}"]
    points += ["write:index.npz", "write:cache.json"]
    for epoch in range(EPOCHS):
        points += [f"iteration:{epoch}:{i}" for i in range(ITERS)] + [("latest", epoch)]
    return points + ["write:checkpoint_final.pth"]


def _check_after_kill(scratch: Scratch, output: str) -> None:
    """Whatever survives a SIGKILL is complete: the last state loads, a cache marked finished has all its files."""
    state = load_state(os.path.join(output, LATEST_CHECKPOINT))
    assert state is None or 0 < state["epoch"] <= EPOCHS and state["iteration"] == 0
    cache = os.path.join(scratch.root, *CACHE)
    if os.path.isfile(os.path.join(cache, "cache.json")):
        assert SliceCache(cache).missing_files() == []


# ------------------------------------------------------------------------------------------------ interruptions
def test_20_random_kills_then_continue_equals_an_uninterrupted_run(workspace, reference, tmp_path):
    scratch = Scratch(workspace, str(tmp_path / "scratch"))
    output = os.path.join(scratch.root, "out")
    points = _kill_points()
    chosen = sorted(random.Random(2024).sample(range(len(points)), 20))
    for number, index in enumerate(chosen):
        point = points[index]
        if isinstance(point, tuple):  # the n-th state write of a process that resumes at epoch r is epoch r + n - 1
            state = load_state(os.path.join(output, LATEST_CHECKPOINT))
            point = f"write:{LATEST_CHECKPOINT}#{point[1] - (state['epoch'] if state else 0) + 1}"
        hook = str(tmp_path / f"hook{number}")
        process = _start(scratch, output, point, hook)
        _wait_for_marker(process, hook)
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        _check_after_kill(scratch, output)
    _finish(scratch, output)
    reference_scratch, reference_output = reference
    _assert_same_training(output, reference_output)
    mine, theirs = (
        SliceCache(os.path.join(scratch.root, *CACHE)),
        SliceCache(os.path.join(reference_scratch.root, *CACHE)),
    )
    assert len(mine) == len(theirs) and all(np.array_equal(mine.slice(i), theirs.slice(i)) for i in range(len(mine)))
    for folder in (os.path.join(scratch.root, *CACHE), os.path.join(scratch.root, *CACHE, "subjects")):
        assert not [f for f in os.listdir(folder) if ".tmp" in f]


def _interrupt(scratch: Scratch, output: str, point: str, signum: int, hook: str) -> str:
    """Pauses the run at ``point``, sends ``signum``, lets it go on; returns its one-line message."""
    process = _start(scratch, output, point, hook, stderr=subprocess.PIPE)
    _wait_for_marker(process, hook)
    os.kill(process.pid, signum)
    open(os.path.join(hook, "go"), "w").close()
    _, stderr = process.communicate()
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    return stderr.strip().splitlines()[-1]


def test_sigterm_and_sigint_save_the_state_and_continue_resumes_exactly(workspace, reference, tmp_path):
    scratch = Scratch(workspace, str(tmp_path / "scratch"))
    output = os.path.join(scratch.root, "out")
    latest = os.path.join(output, LATEST_CHECKPOINT)
    message = _interrupt(scratch, output, f"iteration:0:{ITERS - 1}", signal.SIGTERM, str(tmp_path / "h0"))
    assert message == f"error: SIGTERM: stopped after epoch 0; the state is saved in {latest} (resume with --continue)"
    assert (load_state(latest)["epoch"], load_state(latest)["iteration"]) == (1, 0)
    message = _interrupt(scratch, output, "iteration:1:0", signal.SIGINT, str(tmp_path / "h1"))
    assert message.startswith("error: SIGINT: stopped at epoch 1, iteration 1; the state is saved in")
    state = load_state(latest)
    assert (state["epoch"], state["iteration"], len(state["progress"]["losses"])) == (1, 1, 1)
    message = _interrupt(scratch, output, "iteration:2:1", signal.SIGTERM, str(tmp_path / "h2"))
    assert message.startswith("error: SIGTERM: stopped at epoch 2, iteration 2;")
    _finish(scratch, output)
    _assert_same_training(output, reference[1])


# -------------------------------------------------------------------------------------------------- concurrency
def test_a_second_run_on_the_same_output_refuses_and_a_crash_frees_the_folder(workspace, tmp_path):
    scratch = Scratch(workspace, str(tmp_path / "scratch"))
    output, hook = os.path.join(scratch.root, "out"), str(tmp_path / "hook")
    first = _start(scratch, output, "iteration:0:0", hook, run=SHORT_RUN)
    _wait_for_marker(first, hook)
    second = subprocess.run(_command(output, SHORT_RUN), env=scratch.env, capture_output=True, text=True)
    assert second.returncode == 2 and second.stderr.strip().splitlines()[-1] == (
        f"error: {output}: another ssp_pretrain run (pid {first.pid}) is writing here; wait for it to end or choose "
        f"another -o"
    )
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    _finish(scratch, output, SHORT_RUN)  # the kernel released the dead run's lock


def test_two_runs_share_one_slice_cache(workspace, tmp_path):
    """The second run waits while the first builds the cache, then reads the finished cache: same weights."""
    scratch = Scratch(workspace, str(tmp_path / "scratch"))
    hook = str(tmp_path / "hook")
    builder = _start(scratch, os.path.join(scratch.root, "a"), "cache:subject:1", hook, run=SHORT_RUN)
    _wait_for_marker(builder, hook)
    reader = _start(scratch, os.path.join(scratch.root, "b"), run=SHORT_RUN, stderr=subprocess.PIPE)
    for line in reader.stderr:
        if "waiting for another ssp_pretrain run that builds or reads this slice cache" in line:
            break
    else:
        pytest.fail(f"the second run did not wait for the cache build (exit {reader.wait()})")
    open(os.path.join(hook, "go"), "w").close()
    reader.stderr.read()
    assert builder.wait() == 0 and reader.wait() == 0
    _assert_same_training(os.path.join(scratch.root, "a"), os.path.join(scratch.root, "b"))
    assert SliceCache(os.path.join(scratch.root, *CACHE)).missing_files() == []


# --------------------------------------------------------------------------------------------------- the hook
def test_fault_point_is_inert_unless_set_and_counts_occurrences(monkeypatch, tmp_path):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    fault_point("write:x.pth")
    monkeypatch.setenv(FAULT_ENV, "write:x.pth#2=ENOSPC")
    fault_point("write:x.pth")  # the first time passes
    fault_point("write:other.pth")
    with pytest.raises(OSError, match="No space left on device"):
        fault_point("write:x.pth")
    fault_point("write:x.pth")  # only the second time
    (tmp_path / "go").touch()
    monkeypatch.setenv(FAULT_ENV, f"iteration:3:1=pause:{tmp_path}")
    fault_point("iteration:3:1")
    assert (tmp_path / "reached").read_text() == "iteration:3:1"


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(monkeypatch, tmp_path):
    path = str(tmp_path / "state.pth")
    torch_save_atomic({"good": torch.ones(3)}, path)
    good = open(path, "rb").read()
    monkeypatch.setenv(FAULT_ENV, "write:state.pth=ENOSPC")
    with pytest.raises(SSPError, match=r"state.pth: cannot write \(No space left on device\)"):
        torch_save_atomic({"new": torch.zeros(3)}, path)
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["state.pth"]
