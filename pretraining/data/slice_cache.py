"""The slice cache format and its reader (``SliceCache``); ``pretraining.data.cache`` builds it.

Layout of a cache folder::

    cache.json            fingerprint + summary; written last, so its presence means "complete"
    index.npz             per-slice metadata (subject, frame, frame_from_ed, slice_index, num_slices, num_frames)
                          plus where each slice lives (block, row, z) and the subject ids
    subjects/sNNNNNN.json one marker per finished subject (written after its arrays)
    subjects/sNNNNNN_bK.npy  float32 arrays (T_k, Z, H, W) (single channel) or (T_k, C, Z, H, W); axis Z is the
                          first axis after transpose_forward, i.e. the slice axis. Usually one block per subject;
                          frames whose nonzero crop differs (shape or first slice) go to further blocks.

Slices are read with positioned reads (``os.preadv``) from block files kept open per process, not through memory maps:
a process's resident memory does not grow with the dataset nor with the slices it has read (their pages stay in the
kernel's page cache, which the kernel reclaims at will).
"""

import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ssp.errors import SSPError, first_line

CACHE_FORMAT_VERSION = 1
FINGERPRINT_FILE = "cache.json"
INDEX_FILE = "index.npz"
BUILDING_FILE = "building.json"
SUBJECTS_DIR = "subjects"
META_KEYS = ("subject", "frame", "frame_from_ed", "slice_index", "num_slices", "num_frames")
MAX_OPEN_FILES = 128  # block files a reading process keeps open


def load_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class SliceCache:
    """Read access to a finished cache, or to the slices of some of its subjects (``subjects``: their ids; see
    :meth:`with_subjects_fraction`). Block files are opened on first use, per process; pickling sends only the folder
    and the subject selection (DataLoader workers reopen it lazily)."""

    def __init__(self, folder: str, subjects: Optional[Sequence[str]] = None):
        self.folder = os.path.abspath(folder)
        info = load_json(os.path.join(self.folder, FINGERPRINT_FILE))
        if info is None:
            raise SSPError(f"{os.path.join(self.folder, FINGERPRINT_FILE)}: no finished slice cache here")
        if info.get("format_version") != CACHE_FORMAT_VERSION:
            raise SSPError(
                f"{os.path.join(self.folder, FINGERPRINT_FILE)}: cache format "
                f"{info.get('format_version')}, expected {CACHE_FORMAT_VERSION}; delete the folder"
            )
        self._info = info
        self.key = info["key"]
        self._index: Optional[dict] = None
        self._files: "OrderedDict[int, Tuple[int, int, Tuple[int, ...]]]" = OrderedDict()  # block -> fd, offset, shape
        self._pid = os.getpid()
        self.lock_fd: Optional[int] = None  # the shared lock that build_or_load_cache took for this process
        self.selected_subjects = None if subjects is None else sorted(subjects)
        self._rows: Optional[np.ndarray] = None  # the selected subjects' rows of the index, when there is a selection
        if subjects is not None:
            ids = self.subjects
            unknown = sorted(set(subjects) - set(ids))
            if unknown or not subjects:
                raise SSPError(
                    f"{self.folder}: no subject(s) {', '.join(unknown[:3]) or '(none given)'} in this slice cache"
                )
            chosen = [ids.index(s) for s in self.selected_subjects]
            self._rows = np.flatnonzero(np.isin(self._idx()["subject"], chosen))

    def close(self) -> None:
        """Closes the files this process opened (they reopen on the next read)."""
        files, self._files = getattr(self, "_files", {}), OrderedDict()
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

    # pickling: only the folder and key; block files are reopened lazily in the receiving process
    def __getstate__(self):
        return {"folder": self.folder, "key": self.key, "subjects": self.selected_subjects}

    def __setstate__(self, state):
        self.__init__(state["folder"], state.get("subjects"))
        if self.key != state["key"]:
            raise SSPError(f"{self.folder}: the slice cache changed while in use (rebuilt by another run?)")

    def _idx(self) -> dict:
        if self._index is None:
            with np.load(os.path.join(self.folder, INDEX_FILE)) as z:
                self._index = {k: z[k] for k in z.files}
        return self._index

    def __len__(self) -> int:
        return int(self._info["summary"]["num_slices"]) if self._rows is None else len(self._rows)

    @property
    def meta(self) -> Dict[str, np.ndarray]:
        """Per-slice int32 arrays: subject (index into ``subjects``), frame, frame_from_ed ((t - ED) mod T),
        slice_index (0 = first slice of the stack, e.g. base), num_slices, num_frames."""
        idx = self._idx()
        return {k: idx[k] if self._rows is None else idx[k][self._rows] for k in META_KEYS}

    @property
    def subjects(self) -> List[str]:
        return [str(s) for s in self._idx()["subject_ids"]]

    @property
    def num_channels(self) -> int:
        return int(self._info["summary"]["num_channels"])

    def summary(self) -> dict:
        """Facts for a checkpoint: num_subjects, num_slices, num_frames_total, source_kind, num_channels, key; of a
        selection also the cache's num_subjects_available and the selected subjects."""
        summary = {**self._info["summary"], "cache_key": self.key}
        if self._rows is not None:
            meta = self.meta
            summary.update(
                num_subjects_available=summary["num_subjects"],
                num_subjects=len(self.selected_subjects),
                num_slices=len(self),
                subjects=self.selected_subjects,
                num_frames_total=len({(s, f) for s, f in zip(meta["subject"], meta["frame"])}),
            )
        return summary

    def with_subjects_fraction(self, fraction: float, seed: int) -> "SliceCache":
        """The slices of round(fraction x subjects) of this cache's subjects (at least 1), drawn by ``seed``: the
        subjects in a seeded random order, the first ones taken, so the selections of one seed are nested
        (0.25 within 0.5 within 1)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction {fraction:g}: must be in (0, 1]")
        ids = sorted(self.subjects)
        order = np.random.default_rng(seed).permutation(len(ids))
        view = SliceCache(self.folder, [ids[i] for i in order[: max(1, round(fraction * len(ids)))]])
        view.lock_fd = self.lock_fd  # the selection reads under the lock its cache holds
        return view

    def missing_files(self) -> List[str]:
        """Array files (or the index) that are absent or have the wrong size."""
        try:
            idx = self._idx()
        except (OSError, ValueError, KeyError, EOFError):
            return [INDEX_FILE]
        return [
            f
            for f, n in zip(idx["block_files"], idx["block_bytes"])
            if not os.path.isfile(os.path.join(self.folder, f)) or os.path.getsize(os.path.join(self.folder, f)) != n
        ]

    def _check(self, i) -> int:
        """The index row of slice ``i`` (of the selection, when there is one)."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"slice {i} out of range (cache has {len(self)})")
        return i if self._rows is None else int(self._rows[i])

    def _forked(self) -> None:
        """Drops the file descriptors the parent process opened: a child opens its own."""
        if self._pid != os.getpid():
            self._files, self._pid = OrderedDict(), os.getpid()

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
            raise SSPError(f"{path}: cannot read ({first_line(e)}); delete the slice cache {self.folder}") from None
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
                raise SSPError(
                    f"{os.path.join(self.folder, str(self._idx()['block_files'][block]))}: shorter than "
                    f"its header says; delete the slice cache {self.folder}"
                )
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
        return (
            f"SliceCache({self.folder!r}: {s['num_slices']} slices of {s['num_subjects']} subjects, {s['source_kind']})"
        )
