"""Slices with their augmented views, and a DataLoader whose epoch is a pure function of (seed, epoch).

Reproducibility: the sampler draws, from (seed, epoch) only, a random permutation of all slices (repeated with new
permutations when an epoch needs more samples) and one 32-bit seed per sample. ``__getitem__`` seeds numpy, python
``random`` and torch's CPU generator with that sample seed while it builds the views, and restores the previous RNG
states afterwards. A batch therefore does not depend on the number of workers, on which worker made it, or on what
ran before (with ``num_workers=0`` the caller's global RNG streams are left untouched). Workers are also seeded from
(seed, epoch, worker_id) for any randomness outside ``__getitem__``.

Distributed runs: ``batch_size`` is the global batch. Rank r of W takes the r-th contiguous block of
``batch_size / W`` samples of every global batch (same slices, same sample seeds), so the ranks' batches concatenated
in rank order are exactly the one-process batch.
"""

import itertools
import math
import random
import signal
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pretraining.data.views import make_view

_U64 = (1 << 64) - 1


def default_iters_per_epoch(num_slices: int, batch_size: int) -> int:
    """The paper's epoch: one pass over all slices, ceil(num_slices / batch_size) iterations."""
    if num_slices < 1 or batch_size < 1:
        raise ValueError(f"need num_slices >= 1 and batch_size >= 1 (got {num_slices}, {batch_size})")
    return math.ceil(num_slices / batch_size)


def _seed_sequence(*values: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(v) & _U64 for v in values])


@contextmanager
def seeded_rngs(seed: int):
    """Seeds numpy's global RNG, python ``random`` and torch's CPU generator with ``seed`` inside the block and
    restores their previous states after it (CUDA generators are never touched)."""
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.random.get_rng_state()
    seed = int(seed) & 0xFFFFFFFF
    np.random.seed(seed)
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.random.set_rng_state(torch_state)


class SliceViewDataset(Dataset):
    """Item ``i`` (or ``(i, sample_seed)``, as ``make_loader``'s sampler yields): ``{"views": [tensor (C, *patch)
    per view transform], "index": i, "slice_position": float32 slice_index / num_slices}``. Picklable and cheap to
    send to workers: the cache pickles as its folder and opens its files lazily in each process."""

    def __init__(self, cache, view_transforms: Sequence[Callable]):
        self.cache = cache
        self.view_transforms = list(view_transforms)
        if not self.view_transforms:
            raise ValueError("SliceViewDataset needs at least one view transform")

    def __len__(self) -> int:
        return len(self.cache)

    def views(self, index: int) -> list:
        image = self.cache.slice_channels(index)
        threads = torch.get_num_threads()
        if threads > 1:  # num_workers=0: small per-sample ops are far slower multi-threaded (as in workers: 1)
            torch.set_num_threads(1)
        try:
            return [make_view(t, image) for t in self.view_transforms]
        finally:
            if threads > 1:
                torch.set_num_threads(threads)

    def __getitem__(self, item) -> dict:
        if isinstance(item, (tuple, list)):
            index, sample_seed = int(item[0]), int(item[1])
            with seeded_rngs(sample_seed):
                views = self.views(index)
        else:
            index = int(item)
            views = self.views(index)
        return {"views": views, "index": index, "slice_position": np.float32(self.cache.slice_position(index))}


class EpochSampler(Sampler):
    """``num_samples`` (slice index, sample seed) pairs: random permutations of ``range(num_slices)`` (as many as
    needed, the last one cut) and per-sample seeds, all drawn from (seed, epoch) only. Iteration starts at sample
    ``start`` (the rest of an interrupted epoch). With ``world_size`` > 1 only rank ``rank``'s share is yielded: of
    every global batch of ``batch_size`` samples its contiguous block of ``batch_size / world_size``."""

    def __init__(
        self,
        num_slices: int,
        num_samples: int,
        seed: int,
        epoch: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 0,
    ):
        if num_slices < 1:
            raise ValueError("no slices to sample from")
        if world_size > 1 and (batch_size < world_size or batch_size % world_size or not 0 <= rank < world_size):
            raise ValueError(f"a global batch of {batch_size} does not split evenly over {world_size} processes")
        self.num_slices, self.num_samples, self.seed, self.epoch = num_slices, num_samples, seed, epoch
        self.start = start
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def plan(self) -> Tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(_seed_sequence(self.seed, self.epoch, 0x55505353))
        repeats = math.ceil(self.num_samples / self.num_slices)
        order = np.concatenate([rng.permutation(self.num_slices) for _ in range(repeats)])[: self.num_samples]
        seeds = rng.integers(0, 1 << 32, size=self.num_samples, dtype=np.uint64)
        return order, seeds

    def positions(self) -> np.ndarray:
        """The sample positions this rank yields, in order."""
        positions = np.arange(self.start, self.num_samples)
        if self.world_size > 1:
            share = self.batch_size // self.world_size
            positions = positions[(positions % self.batch_size) // share == self.rank]
        return positions

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order, seeds = self.plan()
        if self.world_size == 1:
            return iter([(int(i), int(s)) for i, s in zip(order[self.start :], seeds[self.start :])])
        positions = self.positions()
        return iter([(int(i), int(s)) for i, s in zip(order[positions], seeds[positions])])

    def __len__(self) -> int:
        return len(self.positions()) if self.world_size > 1 else self.num_samples - self.start


class RunSampler(Sampler):
    """The samples of several consecutive epochs, one :class:`EpochSampler` after the other: one loader, and one set
    of worker processes that prefetch across epoch boundaries, for the rest of a run."""

    def __init__(self, samplers: Sequence[EpochSampler]):
        self.samplers = list(samplers)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return itertools.chain.from_iterable(self.samplers)

    def __len__(self) -> int:
        return sum(len(s) for s in self.samplers)


def _init_worker(worker_id: int, seed: int, epoch: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the main process handles it
    s = int(_seed_sequence(seed, epoch, worker_id, 0x574F524B).generate_state(1)[0])
    np.random.seed(s)
    random.seed(s)
    torch.manual_seed(s)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    iters_per_epoch: int,
    epoch: int,
    seed: int,
    num_workers: int,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    first_iteration: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_epochs: int = 1,
) -> DataLoader:
    """Batches ``first_iteration`` .. ``iters_per_epoch - 1`` of ``batch_size`` samples of ``epoch``, then all
    batches of the next ``num_epochs - 1`` epochs; batch ``k`` of an epoch is a pure function of (seed, epoch, k)
    whatever ``num_workers`` is. Views collate to (B, C, *patch) per view index. With ``world_size`` > 1,
    ``batch_size`` is the global batch and this rank's loader yields its contiguous block of
    ``batch_size / world_size`` samples of each (see :class:`EpochSampler`)."""
    if batch_size < 1 or not 0 <= first_iteration < iters_per_epoch:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= first_iteration < iters_per_epoch (got {batch_size}, "
            f"{first_iteration}, {iters_per_epoch})"
        )
    if batch_size % world_size:
        raise ValueError(f"a global batch of {batch_size} does not split evenly over {world_size} processes")
    sampler = RunSampler(
        [
            EpochSampler(
                len(dataset),
                batch_size * iters_per_epoch,
                seed,
                e,
                start=first_iteration * batch_size if e == epoch else 0,
                rank=rank,
                world_size=world_size,
                batch_size=batch_size,
            )
            for e in range(epoch, epoch + num_epochs)
        ]
    )
    # a private generator: the DataLoader's base seed must not consume the caller's global torch RNG
    generator = torch.Generator()
    generator.manual_seed(int(_seed_sequence(seed, epoch, 0x47454E).generate_state(1)[0]))
    kwargs = {}
    if num_workers > 0:
        kwargs = {
            "worker_init_fn": partial(_init_worker, seed=seed, epoch=epoch),
            "persistent_workers": False,
            "prefetch_factor": prefetch_factor,
        }
    return DataLoader(
        dataset,
        batch_size=batch_size // world_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        generator=generator,
        **kwargs,
    )
