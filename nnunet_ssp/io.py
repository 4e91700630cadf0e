"""File input and output shared by the commands.

- Atomic writes: a crash never leaves a half-written file where a good one was expected, and a failed write (no
  permission, disk full) is one SSPError naming the file.
- Process locks that the kernel releases however the process ends (SIGKILL included).
- Checks that an image's voxels are usable (finite, not constant).
- :func:`fault_point`, the test hook that places kills and write failures at named points.
"""

import errno
import fcntl
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, Optional

import numpy as np

from nnunet_ssp.errors import SSPError

FAULT_ENV = "NNUNET_SSP_FAULT"
_fault_counts: Dict[str, int] = {}


def fault_point(point: str) -> None:
    """Test hook, inert unless ``$NNUNET_SSP_FAULT`` is set to ``POINT=ACTION`` (``POINT#n=ACTION``: the n-th time
    this process reaches POINT; the first time otherwise). ACTION is

    - ``pause:DIR``: write ``DIR/reached`` (holding POINT), then wait until ``DIR/go`` exists. A test that waits for
      ``reached`` and then sends a signal hits exactly this point, with no timing luck;
    - an errno name such as ``ENOSPC`` or ``EACCES``: raise that OSError, as a full disk or a read-only folder would.

    Points: ``write:NAME`` (atomic write of a file named NAME: temporary file complete, not yet renamed),
    ``iteration:E:I`` (ssp_pretrain: optimizer step I of epoch E done), ``cache:subject:N`` (slice cache: subject N
    written), ``epoch_end:E`` (a plugin trainer: epoch E and its checkpoints done).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, action = spec.partition("=")
    name, _, nth = target.partition("#")
    if name != point:
        return
    _fault_counts[point] = _fault_counts.get(point, 0) + 1
    if _fault_counts[point] != int(nth or 1):
        return
    if action.startswith("pause:"):
        folder = action[len("pause:") :]
        with open(os.path.join(folder, "reached.tmp"), "w") as f:
            f.write(target)
        os.replace(os.path.join(folder, "reached.tmp"), os.path.join(folder, "reached"))
        while not os.path.exists(os.path.join(folder, "go")):
            time.sleep(0.01)
    else:
        code = getattr(errno, action)
        raise OSError(code, os.strerror(code))


def write_error(path: str, error: OSError) -> SSPError:
    return SSPError(f"{path}: cannot write ({error.strerror or error})")


@contextmanager
def atomic_path(path: str):
    """Yields a temporary path in the target's folder (same extension); renames it onto ``path`` only if the block
    succeeds. The temporary is removed either way; an OSError (no permission, disk full) becomes an SSPError."""
    folder = os.path.dirname(os.path.abspath(path))
    base, extension = os.path.basename(path), os.path.splitext(path)[1]
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{extension}", dir=folder)
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        fault_point(f"write:{base}")
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_temporaries(folder: str) -> None:
    """Removes what interrupted atomic writes left in ``folder`` (call it only while no one else writes there)."""
    for leftover in glob.glob(os.path.join(glob.escape(folder), ".*.tmp*")):
        os.remove(leftover)


def build_files_into(out: str, build):
    """Runs ``build(folder)`` on a new temporary folder beside ``out``; it returns (result, paths of the files it
    wrote there). Only when it succeeds are the files moved into ``out`` (created if needed; other files in it are
    kept). Returns (result, the paths in ``out``). On any error ``out`` is left as it was."""
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    except OSError as e:
        raise write_error(out, e) from None
    try:
        result, written = build(tmp)
        os.makedirs(out, exist_ok=True)
        moved = []
        for path in written:
            final = os.path.join(out, os.path.relpath(path, tmp))
            os.replace(path, final)
            moved.append(final)
        return result, moved
    except OSError as e:
        raise write_error(out, e) from None
    except SSPError as e:  # name the file the user asked for, not its temporary twin
        raise SSPError(str(e).replace(tmp, out)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_json_file(path: str, expected_type: type = object):
    """The JSON in ``path``; a file that is unreadable, not JSON or not of ``expected_type`` is one SSPError."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except ValueError as e:
        raise SSPError(f"{path}: not valid JSON ({e}); remove or restore it") from None
    if not isinstance(value, expected_type):
        raise SSPError(
            f"{path}: expected a JSON {expected_type.__name__}, found {type(value).__name__}; remove or restore it"
        )
    return value


def save_json_atomic(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")


def torch_save_atomic(obj, path: str) -> None:
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # through a file object a full disk raises OSError, not RuntimeError
            torch.save(obj, f)


# ---------------------------------------------------------------------------------------------------------- locks
def _lockf(fd: int, shared: bool, wait_message: Optional[str]) -> bool:
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fcntl.lockf(fd, mode | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
    if wait_message is None:
        return False
    print(wait_message, file=sys.stderr, flush=True)
    fcntl.lockf(fd, mode)
    return True


def acquire_lock(path: str, shared: bool = False, wait_message: Optional[str] = None) -> Optional[int]:
    """Takes a POSIX lock (``fcntl.lockf``) on the file ``path``, created if absent, and returns its descriptor.

    The lock is this process's until the descriptor is closed or the process ends; the kernel releases it however
    the process ends (SIGKILL included), and a process never conflicts with its own locks. ``shared``: a read lock,
    which many processes may hold. If another process holds a conflicting lock: None at once, or with
    ``wait_message`` that message on stderr and a wait.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(path, e) from None
        if not _lockf(fd, shared, wait_message):
            os.close(fd)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file while we waited: lock the one that is there now


# --------------------------------------------------------------------------------------------------------- images
def check_finite(array: np.ndarray, where: str) -> None:
    """SSPError unless every voxel of the image is finite."""
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            nan = int(np.isnan(array).sum())
            counts = [
                f"{n} {kind}" for n, kind in ((nan, "NaN"), (array.size - int(finite.sum()) - nan, "infinite")) if n
            ]
            raise SSPError(f"{where}: {' and '.join(counts)} voxel(s)")


def check_intensities(array: np.ndarray, where: str) -> None:
    """SSPError unless every voxel of the image is finite and they are not all equal (zero standard deviation)."""
    check_finite(array, where)
    if array.size and array.min() == array.max():
        raise SSPError(f"{where}: constant image (every voxel is {array.flat[0]:g}, zero standard deviation)")
