"""The method-agnostic pretraining loop: optimisation, logging, plots, checkpoints and resume.

Everything random in an epoch is a pure function of (seed, epoch): the loader's sampling and augmentation seeds and
the main process's torch RNG (e.g. MIM's masks) are re-seeded at every epoch start, and batch k of an epoch is a pure
function of (seed, epoch, k). ``checkpoint_latest.pth`` is written atomically after every epoch, and in the middle
of one when SIGINT or SIGTERM stops the run: model and optimizer, the next (epoch, iteration), the epoch's losses
and metrics so far, and the torch RNG states. ``--continue`` therefore resumes exactly where the run stopped (bit for
bit on CPU), and a run killed outright (SIGKILL, power loss) resumes from its last complete epoch.

A non-finite loss or gradient stops the run with one message and keeps the last good state, unless
``skip_nonfinite`` allows skipping such steps (no update; each is logged).

Distributed runs (torchrun, see :mod:`pretraining.distributed`): the model runs under DistributedDataParallel, each
rank on its block of every global batch of ``batch_size``; its BatchNorm layers (if any) normalise over the global
batch. The logged losses and metrics are the ranks' means, the decisions (skip, stop) are taken on values all ranks
agree on, a stop request is agreed at every step, and only rank 0 writes logs, plots, previews and checkpoints and
runs the probes. Every rank resumes from the same state.
"""

import itertools
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from nnunet_ssp.checkpoint import FINAL_CHECKPOINT, save_checkpoint
from nnunet_ssp.errors import Interrupted, SSPError
from nnunet_ssp.io import fault_point, torch_save_atomic, write_error
from nnunet_ssp.network import PlannedConfiguration
from pretraining import distributed
from pretraining.data.loader import make_loader
from pretraining.methods.base import SSPMethod, Step
from pretraining.probe import Probe
from pretraining.progress_log import ProgressLog
from pretraining.state import (
    LATEST_CHECKPOINT,
    RESUMABLE_CHANGES,
    STATE_FORMAT,
    EpochProgress,
    StopRequest,
    epoch_seed,
    load_state,
    rng_state,
    set_rng_state,
)


@dataclass
class PretrainSettings:
    """What a :class:`Pretrainer` runs, stored in its checkpoints: the method's recipe with the run's overrides
    (:meth:`of_method`); resuming refuses changes to any but :data:`pretraining.state.RESUMABLE_CHANGES`."""

    method: str
    epochs: int
    iters_per_epoch: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    device: str
    num_workers: int
    seed: int
    options: dict = field(default_factory=dict)  # method-specific options, e.g. MIM's mask patch size
    subjects_fraction: float = 1.0  # the fraction of the cache's subjects pretrained on (drawn by seed)
    skip_nonfinite: int = 0  # steps with a non-finite loss or gradient that may be skipped before the run stops
    precision: str = "bf16"  # autocast dtype on CUDA ("bf16") or full "fp32"; CPU always runs fp32
    channels_last: bool = False  # NHWC model and batches on CUDA (slower for nnU-Net's InstanceNorm U-Nets on H100)
    world_size: int = 1  # processes of a distributed run; batch_size is the global batch, batch_size / world_size each

    @property
    def batch_per_process(self) -> int:
        return self.batch_size // self.world_size

    @classmethod
    def of_method(
        cls,
        method: SSPMethod,
        *,
        epochs: int,
        iters_per_epoch: int,
        batch_size: int,
        lr: Optional[float] = None,
        device: str = "cpu",
        num_workers: int = 0,
        seed: int = 0,
        **runtime,
    ) -> "PretrainSettings":
        """The settings of a run of ``method``: its recipe (lr unless given, momentum, weight decay, Nesterov) and
        options, the run's length and batch, and ``runtime`` (subjects_fraction, skip_nonfinite, precision,
        channels_last, world_size)."""
        d = method.defaults
        return cls(
            method.name,
            epochs,
            iters_per_epoch,
            batch_size,
            d.lr if lr is None else lr,
            d.momentum,
            d.weight_decay,
            d.nesterov,
            device,
            num_workers,
            seed,
            options=method.option_values(),
            **runtime,
        )


class _MethodLoss(torch.nn.Module):
    """The method's loss as a module's forward: DistributedDataParallel arms its gradient hooks in forward, and the
    methods call several parts of their model (student, teacher, ...)."""

    def __init__(self, method: SSPMethod, model: torch.nn.Module):
        super().__init__()
        self.method, self.model = method, model

    def forward(self, batch: dict, step: Step) -> Tuple[torch.Tensor, Dict[str, float]]:
        return self.method.loss(self.model, batch, step)


class Pretrainer:
    """Runs ``method`` on ``dataset`` and writes logs, plots and checkpoints to ``output_folder``; ``probes`` measure
    the network after every epoch (k-NN, segmentation). In a distributed run (a process group is initialised) it
    trains under DDP, and only rank 0 writes or probes."""

    def __init__(
        self,
        method: SSPMethod,
        dataset,
        target: PlannedConfiguration,
        settings: PretrainSettings,
        output_folder: str,
        data_summary: dict,
        probes: Sequence[Probe] = (),
        calibration_images: Optional[torch.Tensor] = None,
    ):
        if settings.world_size != distributed.world_size():
            raise ValueError(f"settings.world_size {settings.world_size}, but {distributed.world_size()} processes run")
        self.device = distributed.device(settings.device)
        if self.device.type != "cuda":  # the settings say what runs: bf16 autocast and channels_last are CUDA-only
            settings = replace(settings, precision="fp32", channels_last=False)
        self.method, self.dataset, self.target, self.settings = method, dataset, target, settings
        self.output_folder, self.data_summary, self.probes = output_folder, data_summary, tuple(probes)
        self.calibration_images = calibration_images  # what the method may calibrate its checkpoint's network on
        self.main = distributed.is_main()
        if self.main:
            try:
                os.makedirs(output_folder, exist_ok=True)
            except OSError as e:
                raise write_error(output_folder, e) from None
        self.progress_log = ProgressLog(
            output_folder,
            f"ssp_pretrain {settings.method}: {target.dataset_name}",
            f"{settings.method} loss",
            enabled=self.main,
        )
        self.latest = os.path.join(output_folder, LATEST_CHECKPOINT)
        self.history = {"epoch": [], "loss": [], "lr": [], "slices_per_s": [], "epoch_time_s": []}
        torch.manual_seed(settings.seed)
        self.model = method.build_model()
        if settings.world_size > 1:
            self.model = distributed.global_batch_norm(self.model)
        self.model = self.model.to(self.device)
        self.channels_last = settings.channels_last
        self.autocast = settings.precision == "bf16"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(
            method.parameter_groups(self.model, settings.weight_decay),
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=settings.nesterov,
        )
        self.ddp = distributed.data_parallel(_MethodLoss(method, self.model))  # None in one process
        self.start_epoch = 0
        self.progress = EpochProgress(0)  # of the epoch to run next
        self.skipped = 0  # non-finite steps skipped so far
        self._stream, self._stream_position = None, None  # see _batch_stream

    def log(self, message: str) -> None:
        """Prints and appends to training_log.txt (rank 0 only)."""
        self.progress_log.log(message)

    # ---------------------------------------------------------------- checkpoints
    def _save_latest(self, progress: EpochProgress) -> None:
        torch_save_atomic(
            {
                "format": STATE_FORMAT,
                "epoch": progress.epoch,
                "iteration": progress.iteration,
                "settings": asdict(self.settings),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "history": self.history,
                "progress": asdict(progress),
                "skipped": self.skipped,
            },
            self.latest,
        )

    def resume(self, state: Optional[dict] = None) -> bool:
        """Continues from ``state`` (default: :func:`load_state` of ``checkpoint_latest.pth``); False (starting at
        epoch 0) when there is none yet, e.g. after a run killed in its first epoch."""
        state = state or load_state(self.latest)
        if state is None:
            return False
        if state["settings"]["method"] != self.settings.method:
            raise SSPError(
                f"{self.latest}: written by --method {state['settings']['method']}, not {self.settings.method}"
            )
        changed = [
            f"{k} {v} -> {getattr(self.settings, k)}"
            for k, v in state["settings"].items()
            if k not in RESUMABLE_CHANGES and getattr(self.settings, k) != v
        ]
        if changed:
            raise SSPError(
                f"{self.latest}: settings differ from the interrupted run ({', '.join(changed)}); "
                f"continue with the same options"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = state["history"]
        self.skipped = state.get("skipped", 0)
        self.progress = EpochProgress.from_state(state)
        self.start_epoch = self.progress.epoch
        self.log(f"continuing from {self.latest} at epoch {self.start_epoch}, iteration {self.progress.iteration}")
        return True

    # ---------------------------------------------------------------- training
    def _step(self, epoch: int, iteration: int) -> Step:
        return Step(epoch, iteration, self.settings.iters_per_epoch, self.settings.epochs)

    def _set_lr(self, step: Step) -> float:
        lr = self.method.lr_at(self.settings.lr, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _to_device(self, batch: dict) -> dict:
        non_blocking = self.device.type == "cuda"
        moved = {k: v.to(self.device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
        moved["views"] = [v.to(self.device, non_blocking=non_blocking) for v in batch["views"]]
        if self.channels_last:
            moved["views"] = [v.contiguous(memory_format=torch.channels_last) for v in moved["views"]]
        return moved

    def _gradients_finite(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _skip_or_stop(self, problem: str, step: Step) -> None:
        """Skips the step (no update) while ``skip_nonfinite`` allows it, else stops the run."""
        self.optimizer.zero_grad(set_to_none=True)
        where = f"{problem} at epoch {step.epoch}, iteration {step.iteration}"
        if self.skipped >= self.settings.skip_nonfinite:
            raise SSPError(
                f"{where}: run stopped; the last good state is {self.latest} (resume with --continue "
                f"--skip-nonfinite N to skip up to N such steps, or start a new run with a lower --lr)"
            )
        self.skipped += 1
        self.log(
            f"warning: {where}: step skipped without an update ({self.skipped} of "
            f"{self.settings.skip_nonfinite} allowed)"
        )

    def train_step(self, batch: dict, step: Step) -> Optional[Tuple[float, Dict[str, float]]]:
        """One optimisation step on a loader batch: the loss and the method's extra metrics, or None when the step
        was skipped for a non-finite loss or gradient."""
        self._set_lr(step)
        batch = self._to_device(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.ddp is None:
                loss, extra = self.method.loss(self.model, batch, step)
            else:
                loss, extra = self.ddp(batch, step)
        value = loss.item()
        if self.ddp is not None:  # the global loss on every rank already; the mean makes the agreement explicit
            value, *metrics = distributed.mean_of_values([value, *extra.values()], self.device)
            extra = dict(zip(extra, metrics))
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(value):
            self._skip_or_stop(f"non-finite loss ({value})", step)
            return None
        loss.backward()
        self.method.before_optimizer_step(self.model, step)
        if not self._gradients_finite():
            self._skip_or_stop(f"non-finite gradient (loss {value:.4g})", step)
            return None
        self.optimizer.step()
        self.method.after_step(self.model, step)
        return value, extra

    def _interrupted(self, signum: int, where: str) -> Interrupted:
        return Interrupted(
            f"{signal.Signals(signum).name}: stopped {where}; the state is saved in {self.latest} "
            f"(resume with --continue)",
            signum,
        )

    def _iterations(self, progress: EpochProgress, stop: StopRequest) -> dict:
        """Runs the epoch's remaining steps into ``progress``; returns the last batch. On a stop request before the
        epoch's last step, saves the mid-epoch state and raises Interrupted."""
        s, epoch = self.settings, progress.epoch
        torch.manual_seed(epoch_seed(s.seed, epoch))
        if progress.rng is not None:
            set_rng_state(progress.rng, self.device)
        start, batch = time.perf_counter() - progress.seconds, None
        batches = itertools.islice(
            self._batch_stream(epoch, progress.iteration), s.iters_per_epoch - progress.iteration
        )
        self._stream_position = None  # until the epoch's batches are all taken
        bar = tqdm(
            batches,
            total=s.iters_per_epoch,
            initial=progress.iteration,
            desc=f"epoch {epoch}",
            leave=False,
            mininterval=1.0,
            disable=not self.main,
        )
        for iteration, batch in enumerate(bar, start=progress.iteration):
            result = self.train_step(batch, self._step(epoch, iteration))
            if result is not None:
                progress.losses.append(result[0])
                for key, metric in result[1].items():
                    progress.metrics.setdefault(key, []).append(metric)
                bar.set_postfix(loss=f"{result[0]:.4f}", refresh=False)
            progress.iteration, progress.seconds = iteration + 1, time.perf_counter() - start
            fault_point(f"iteration:{epoch}:{iteration}")
            signum = stop.agreed(self.device)
            if signum is not None and progress.iteration < s.iters_per_epoch:
                progress.rng = rng_state(self.device)
                if self.main:
                    self._save_latest(progress)
                distributed.barrier()  # no rank ends (and makes torchrun stop the others) before the state is saved
                raise self._interrupted(signum, f"at epoch {epoch}, iteration {progress.iteration}")
        self._stream_position = (epoch + 1, 0)
        return batch

    def _batch_stream(self, epoch: int, iteration: int):
        """The loader's batches from (``epoch``, ``iteration``) to the end of the run: one loader, whose workers
        prefetch across epoch boundaries and start once per run, not once per epoch. Made anew when training does not
        go on where the last epoch ended (a resumed run, a stopped epoch)."""
        if self._stream is None or self._stream_position != (epoch, iteration):
            s = self.settings
            self._stream = iter(
                make_loader(
                    self.dataset,
                    s.batch_size,
                    s.iters_per_epoch,
                    epoch,
                    s.seed,
                    s.num_workers,
                    pin_memory=self.device.type == "cuda",
                    first_iteration=iteration,
                    rank=distributed.rank(),
                    world_size=s.world_size,
                    num_epochs=s.epochs - epoch,
                )
            )
        return self._stream

    def _finish_epoch(self, progress: EpochProgress, batch: dict) -> None:
        """History, log line, probe, warning and preview of a finished epoch."""
        s, epoch = self.settings, progress.epoch
        if not progress.losses:
            raise SSPError(f"epoch {epoch}: every step was skipped (non-finite loss or gradient); run stopped")
        self.history["epoch"].append(epoch)
        self.history["loss"].append(sum(progress.losses) / len(progress.losses))
        self.history["lr"].append(self._set_lr(self._step(epoch, 0)))
        self.history["slices_per_s"].append(s.iters_per_epoch * s.batch_size / progress.seconds)
        self.history["epoch_time_s"].append(progress.seconds)
        metrics = {key: sum(values) / len(values) for key, values in progress.metrics.items()}
        for probe in self.probes if self.main else ():
            metrics.update(probe.evaluate(self.method.export_network(self.model)))
        for key, metric in metrics.items():
            self.history.setdefault(key, []).append(metric)
        described = "".join(f", {key} {metric:.4g}" for key, metric in metrics.items())
        self.log(
            f"epoch {epoch}: loss {self.history['loss'][-1]:.5f}, lr {self.history['lr'][-1]:.3g}, "
            f"{self.history['slices_per_s'][-1]:.1f} slices/s, {progress.seconds:.1f} s{described}"
        )
        warning = self.method.epoch_warning(metrics)
        if warning:
            self.log(f"warning: {warning}")
        self.model.eval()
        if self.main:
            preview = os.path.join(self.output_folder, "previews", f"epoch_{epoch:03d}.png")
            os.makedirs(os.path.dirname(preview), exist_ok=True)
            self.method.write_preview(self.model, batch, preview)

    def train_epoch(self, epoch: int, stop: Optional[StopRequest] = None) -> None:
        """Runs epoch ``epoch`` (its rest, when a resumed state stopped inside it) and finishes it; ``stop`` carries a
        signal's request to stop early."""
        progress = self.progress if self.progress.epoch == epoch else EpochProgress(epoch)
        self.model.train()
        batch = self._iterations(progress, stop or StopRequest())
        self._finish_epoch(progress, batch)
        self.progress = EpochProgress(epoch + 1)

    def run(self, max_epochs_this_run: Optional[int] = None) -> str:
        """Trains from ``start_epoch`` to the end (or ``max_epochs_this_run`` epochs); returns the checkpoint path.
        SIGINT or SIGTERM stops it at the next step with the state saved (Interrupted)."""
        s = self.settings
        self.log(
            f"ssp_pretrain {s.method} on {self.target.dataset_name} ({self.target.plans_name}, "
            f"{self.target.configuration}): {asdict(s)}; data {self.data_summary}"
        )
        if s.world_size > 1:
            self.log(
                f"distributed data parallel: {s.world_size} processes ({distributed.backend()}), batch "
                f"{s.batch_per_process} per process, global batch {s.batch_size}"
            )
        last = s.epochs if max_epochs_this_run is None else min(s.epochs, self.start_epoch + max_epochs_this_run)
        try:
            with StopRequest() as stop:
                for epoch in range(self.start_epoch, last):
                    self.train_epoch(epoch, stop)
                    if self.main:
                        self._save_latest(self.progress)
                    self.start_epoch = epoch + 1
                    self.progress_log.plot(self.history)
                    signum = stop.agreed(self.device)
                    if signum is not None and epoch + 1 < s.epochs:
                        distributed.barrier()
                        raise self._interrupted(signum, f"after epoch {epoch}")
        finally:
            self._stream = None  # ends the loader's worker processes
        if last < s.epochs:
            distributed.barrier()
            return self.latest
        final = os.path.join(self.output_folder, FINAL_CHECKPOINT)
        if self.main:
            network = self.method.checkpoint_network(self.model, self.calibration_images).cpu()
            save_checkpoint(
                final, network, self.target, s.method, self.method.parts, pretraining=asdict(s), data=self.data_summary
            )
            self.log(f"wrote {final}")
        distributed.barrier()
        return final
