"""Seeded, bitwise-reproducible fine-tuning: the mixin of the ``<trainer>_seed<K>`` trainers
(:func:`trainers.ssp_trainers.seeded_trainer` makes them on demand).

:data:`SCHEME`: batch k of the training (validation) stream is drawn under numpy's and torch's global RNGs seeded
from ``SeedSequence([seed, stream, rank, k])`` inside the data loader, whichever process makes it; the augmenter reads
its N workers round-robin (``MultiThreadedAugmenter``; worker i makes k = start + i, start + i + N, ...), so batches
arrive in the order of k and the worker count changes nothing. A stream starts at k = current_epoch x its iterations
per epoch: nnU-Net's warm-up ``next()`` takes that batch, and epoch e trains on batches e*I + 1 ... (e + 1)*I whether
the run started at epoch 0 or resumed (``--c``) at epoch e. The network is built under torch's RNG seeded from (seed,
init), alike for every trainer, so the parts an SSP trainer does not load start as the baseline's of that seed; the
main process's RNGs are re-seeded at every epoch start (dropout, if a plan has it). On CUDA: cuDNN deterministic
without benchmarking, deterministic algorithms (warn only: nnU-Net's cross-entropy has no deterministic CUDA
kernel), ``CUBLAS_WORKSPACE_CONFIG=:4096:8``. CPU runs repeat bit for bit; CUDA runs are meant to agree closely.

``fold_X/training_seed.json`` records the seed, the scheme and, per start of the run, the data-loading workers, the
DDP world size, the device and the library versions; ``nnUNetv2_train --c`` of a fold trained under another seed or
scheme, or unseeded, is refused.
"""

import os
from contextlib import contextmanager
from importlib.metadata import version
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import load_json_file, save_json_atomic
from nnunet_ssp.schedule import split_training_seed

SCHEME = "per-batch SeedSequence([seed, stream, rank, k]) v1"
RECORD_FILE = "training_seed.json"
TRAIN, VALIDATION, INIT, EPOCH = range(4)  # the streams of random numbers a seed splits into
_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
_LIBRARIES = ("torch", "numpy", "nnunetv2", "batchgenerators", "batchgeneratorsv2")


def _seeds(*entropy: int):
    """(numpy's seed, torch's seed) from ``SeedSequence(entropy)``."""
    words = np.random.SeedSequence(entropy).generate_state(6)
    return words[:4], int(words[4]) << 32 | int(words[5])


def seed_global_rngs(*entropy: int) -> None:
    """Seeds numpy's global RNG and torch's (every device) from ``entropy``."""
    numpy_seed, torch_seed = _seeds(*entropy)
    np.random.seed(numpy_seed)
    torch.manual_seed(torch_seed)


@contextmanager
def seeded_cpu_rngs(*entropy: int):
    """numpy's and torch's CPU global RNGs seeded from ``entropy`` inside the block, as they were after it."""
    numpy_seed, torch_seed = _seeds(*entropy)
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(numpy_seed)
        torch.default_generator.manual_seed(torch_seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


class SeededDataLoader(nnUNetDataLoader):
    """nnU-Net's loader whose batch k is drawn under the RNGs of (``entropy``, k); as worker ``thread_id`` of
    ``num_workers`` it makes k = start + thread_id, start + thread_id + num_workers, ..."""

    def __init__(self, *args, entropy: tuple, start: int, num_workers: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.entropy, self.start, self.num_workers = entropy, start, num_workers
        self.batches_made = 0

    def set_thread_id(self, thread_id: int):
        """The augmenter's worker process starts: one torch thread in it, as in nnU-Net's own augmenter (a forked
        child that inherits the parent's OpenMP pool would hang in its first parallel region)."""
        torch.set_num_threads(1)
        super().set_thread_id(thread_id)

    def generate_train_batch(self):
        k = self.start + self.thread_id + self.batches_made * self.num_workers
        self.batches_made += 1
        with seeded_cpu_rngs(*self.entropy, k):
            return super().generate_train_batch()


def check_resumable(folder: str, trainer: str, seed: Optional[int]) -> None:
    """SSPError unless ``trainer`` (seed None: unseeded) may continue (``--c``) the fold in ``folder``: a fold trained
    under another seed or scheme, or seeded and unseeded, would mix two streams of random numbers."""
    record_path = os.path.join(folder, RECORD_FILE)
    ours = f"{trainer} trains with seed {seed} ({SCHEME})" if seed is not None else f"{trainer} trains unseeded"
    if os.path.isfile(record_path):
        record = load_json_file(record_path, dict)
        recorded = (record.get("seed"), record.get("scheme"))
        if recorded != ((seed, SCHEME) if seed is not None else (None, None)):
            raise SSPError(
                f"{record_path}: this fold was trained with seed {recorded[0]} ({recorded[1]}), but "
                f"{ours}; continue it with {record.get('trainer')} or train afresh without --c"
            )
    elif seed is not None and any(os.path.isfile(os.path.join(folder, c)) for c in _CHECKPOINTS):
        raise SSPError(
            f"{folder}: this fold was trained unseeded (no {RECORD_FILE}), but {ours}; continue it with "
            f"{split_training_seed(trainer)[0]} or train afresh without --c"
        )


class SeededTrainingMixin:
    """Trains under training seed ``training_seed``, reproducibly: every batch, the network's initialisation and the
    RNGs of every epoch are drawn from it (:data:`SCHEME`), whatever the worker count; a ``--c`` of a fold trained
    under another seed is refused.

    Seeded training (module docstring) for any of the plugin's trainers; first in the bases, with ``training_seed``
    set."""

    training_seed: int

    def initialize(self):
        if self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first use
        with seeded_cpu_rngs(self.training_seed, INIT):
            super().initialize()

    def on_train_start(self):
        if self.device.type == "cuda":  # after nnUNetv2_train's own cuDNN settings
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            torch.use_deterministic_algorithms(True, warn_only=True)
        super().on_train_start()
        if self.local_rank == 0:
            self._write_record()

    def on_train_epoch_start(self):
        seed_global_rngs(self.training_seed, EPOCH, self.local_rank, self.current_epoch)
        super().on_train_epoch_start()

    def get_dataloaders(self):
        """nnU-Net's pipelines (transforms, datasets, loaders, augmenters, one warm-up batch each) with seeded loaders
        and augmenters that keep the order of the batches."""
        patch_size = self.configuration_manager.patch_size
        scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = (
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        labels = self.label_manager
        label_kwargs = dict(
            is_cascaded=self.is_cascaded,
            foreground_labels=labels.foreground_labels,
            regions=labels.foreground_regions if labels.has_regions else None,
            ignore_label=labels.ignore_label,
        )
        train_transforms = self.get_training_transforms(
            patch_size,
            rotation,
            scales,
            mirror_axes,
            dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            **label_kwargs,
        )
        validation_transforms = self.get_validation_transforms(scales, **label_kwargs)
        dataset_train, dataset_validation = self.get_tr_and_val_datasets()
        workers = get_allowed_n_proc_DA()
        augmenters = []
        for stream, dataset, patch, transforms, iterations, processes in (
            (TRAIN, dataset_train, initial_patch_size, train_transforms, self.num_iterations_per_epoch, workers),
            (
                VALIDATION,
                dataset_validation,
                patch_size,
                validation_transforms,
                self.num_val_iterations_per_epoch,
                max(1, workers // 2),
            ),
        ):
            loader = SeededDataLoader(
                dataset,
                self.batch_size,
                patch,
                patch_size,
                labels,
                oversample_foreground_percent=self.oversample_foreground_percent,
                transforms=transforms,
                probabilistic_oversampling=self.probabilistic_oversampling,
                entropy=(self.training_seed, stream, self.local_rank),
                start=self.current_epoch * iterations,
                num_workers=processes if workers else 1,
            )
            augmenters.append(
                SingleThreadedAugmenter(loader, None)
                if workers == 0
                else MultiThreadedAugmenter(
                    loader, None, processes, pin_memory=self.device.type == "cuda", wait_time=0.002
                )
            )
        for augmenter in augmenters:
            next(augmenter)  # nnU-Net's warm-up batch: batch `start` of the stream
        return tuple(augmenters)

    def _write_record(self):
        path = os.path.join(self.output_folder, RECORD_FILE)
        starts = load_json_file(path, dict).get("starts", []) if self.current_epoch and os.path.isfile(path) else []
        starts.append(
            {
                "epoch": self.current_epoch,
                "nnUNet_n_proc_DA": get_allowed_n_proc_DA(),
                "world_size": dist.get_world_size() if self.is_ddp else 1,
                "device": self.device.type,
                "versions": {name: version(name) for name in _LIBRARIES},
            }
        )
        save_json_atomic(
            {"trainer": type(self).__name__, "seed": self.training_seed, "scheme": SCHEME, "starts": starts}, path
        )
