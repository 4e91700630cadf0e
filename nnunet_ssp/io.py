"""Atomic file writes: a crash never leaves a half-written file where a good one was expected."""
import json
import os
import tempfile
from contextlib import contextmanager

import torch


@contextmanager
def atomic_path(path: str):
    """Yields a temporary path in the target's folder; renames it onto ``path`` only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json_atomic(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")


def torch_save_atomic(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
