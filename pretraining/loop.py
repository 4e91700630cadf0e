"""The method-agnostic pretraining loop: optimisation, logging, plots, checkpoints and resume.

Everything random in an epoch is a pure function of (seed, epoch): the loader's sampling and augmentation seeds and
the main process's RNG (e.g. MIM's masks) are re-seeded at every epoch start. With the model and optimizer state of
``checkpoint_latest.pth`` this makes ``--continue`` resume exactly where a run stopped.
"""
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Dict, Optional, Tuple

import torch
from tqdm import tqdm

from nnunet_ssp.checkpoint import FINAL_CHECKPOINT, save_checkpoint
from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import torch_save_atomic
from nnunet_ssp.network import PlansTarget
from pretraining.data.loader import make_loader
from pretraining.methods.base import SSPMethod, Step
from pretraining.probe import PositionPhaseProbe

LATEST_CHECKPOINT = "checkpoint_latest.pth"
STATE_FORMAT = "nnunet_ssp.pretrain_state"


@dataclass
class PretrainSettings:
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


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2 ** 31)


class Pretrainer:
    """Runs ``method`` on ``dataset`` and writes logs, plots and checkpoints to ``output_folder``; ``probe`` (optional)
    measures the encoder's embeddings after every epoch."""

    def __init__(self, method: SSPMethod, dataset, target: PlansTarget, settings: PretrainSettings,
                 output_folder: str, data_summary: dict, probe: Optional[PositionPhaseProbe] = None):
        self.method, self.dataset, self.target, self.settings = method, dataset, target, settings
        self.output_folder, self.data_summary, self.probe = output_folder, data_summary, probe
        self.device = torch.device(settings.device)
        os.makedirs(output_folder, exist_ok=True)
        self.log_file = os.path.join(output_folder, "training_log.txt")
        self.history = {"epoch": [], "loss": [], "lr": [], "slices_per_s": [], "epoch_time_s": []}
        torch.manual_seed(settings.seed)
        self.model = method.build_model().to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(method.parameter_groups(self.model, settings.weight_decay), lr=settings.lr,
                                         momentum=settings.momentum, nesterov=settings.nesterov)
        self.start_epoch = 0

    # ---------------------------------------------------------------- logging
    def log(self, message: str) -> None:
        line = f"{datetime.now():%Y-%m-%d %H:%M:%S}: {message}"
        tqdm.write(line)
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def plot_progress(self) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        probe_keys = [k for k in self.history if k.startswith("probe_")]
        fig, axes = plt.subplots(2 if probe_keys else 1, 1, figsize=(8, 8 if probe_keys else 4.5), squeeze=False)
        loss_axis = axes[0, 0]
        loss_axis.plot(self.history["epoch"], self.history["loss"], "b-o", markersize=3, label="loss")
        loss_axis.set_xlabel("epoch")
        loss_axis.set_ylabel(f"{self.settings.method} loss")
        lr_axis = loss_axis.twinx()
        lr_axis.plot(self.history["epoch"], self.history["lr"], "g--", label="learning rate")
        lr_axis.set_ylabel("learning rate")
        loss_axis.legend(loc="upper right")
        if probe_keys:
            probe_axis = axes[1, 0]
            for key in probe_keys:
                probe_axis.plot(self.history["epoch"], self.history[key], "--" if key.endswith("chance") else "-o",
                                markersize=3, label=key[len("probe_"):])
            probe_axis.set_xlabel("epoch")
            probe_axis.set_ylabel("k-NN probe error (held-out subjects)")
            probe_axis.legend(loc="upper right")
        fig.suptitle(f"ssp_pretrain {self.settings.method}: {self.target.dataset_name}")
        fig.tight_layout()
        path = os.path.join(self.output_folder, "progress.png")
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, path)

    # ---------------------------------------------------------------- checkpoints
    def _state(self, next_epoch: int) -> dict:
        return {"format": STATE_FORMAT, "epoch": next_epoch, "settings": asdict(self.settings),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "history": self.history}

    def resume(self) -> None:
        path = os.path.join(self.output_folder, LATEST_CHECKPOINT)
        if not os.path.isfile(path):
            raise SSPError(f"{path}: nothing to continue from")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise SSPError(f"{path}: unreadable ({type(e).__name__}); remove it to start over") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise SSPError(f"{path}: not an ssp_pretrain state file")
        if state["settings"]["method"] != self.settings.method:
            raise SSPError(f"{path}: written by --method {state['settings']['method']}, "
                           f"not {self.settings.method}")
        changed = [f"{k} {v} -> {getattr(self.settings, k)}" for k, v in state["settings"].items()
                   if k not in ("device", "num_workers") and getattr(self.settings, k) != v]
        if changed:
            raise SSPError(f"{path}: settings differ from the interrupted run ({', '.join(changed)}); "
                           f"continue with the same options")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = state["history"]
        self.start_epoch = state["epoch"]
        self.log(f"continuing from {path} at epoch {self.start_epoch}")

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
        if self.device.type == "cuda":
            moved["views"] = [v.contiguous(memory_format=torch.channels_last) for v in moved["views"]]
        return moved

    def train_step(self, batch: dict, step: Step) -> Tuple[float, Dict[str, float]]:
        """One optimisation step on a loader batch; returns the loss and the method's extra figures."""
        self._set_lr(step)
        batch = self._to_device(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss, extra = self.method.loss(self.model, batch, step)
        value = loss.item()
        if not math.isfinite(value):
            raise SSPError(f"non-finite loss ({value}) at epoch {step.epoch}, iteration {step.iteration}: run "
                           f"stopped; the last good state is {os.path.join(self.output_folder, LATEST_CHECKPOINT)} "
                           f"(resume with --continue, e.g. with a lower --lr)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.method.before_optimizer_step(self.model, step)
        self.optimizer.step()
        self.method.after_step(self.model, step)
        return value, extra

    def train_epoch(self, epoch: int) -> None:
        s = self.settings
        torch.manual_seed(epoch_seed(s.seed, epoch))
        loader = make_loader(self.dataset, s.batch_size, s.iters_per_epoch, epoch, s.seed, s.num_workers,
                             pin_memory=self.device.type == "cuda")
        self.model.train()
        losses, figures, start, batch = [], {}, time.perf_counter(), None
        progress = tqdm(loader, total=s.iters_per_epoch, desc=f"epoch {epoch}", leave=False, mininterval=1.0)
        for iteration, batch in enumerate(progress):
            value, extra = self.train_step(batch, self._step(epoch, iteration))
            losses.append(value)
            for key, figure in extra.items():
                figures.setdefault(key, []).append(figure)
            rate = (iteration + 1) * s.batch_size / (time.perf_counter() - start)
            progress.set_postfix(loss=f"{value:.4f}", slices_per_s=f"{rate:.1f}", refresh=False)
        elapsed = time.perf_counter() - start
        self.history["epoch"].append(epoch)
        self.history["loss"].append(sum(losses) / len(losses))
        self.history["lr"].append(self._set_lr(self._step(epoch, 0)))
        self.history["slices_per_s"].append(s.iters_per_epoch * s.batch_size / elapsed)
        self.history["epoch_time_s"].append(elapsed)
        figures = {key: sum(values) / len(values) for key, values in figures.items()}
        if self.probe is not None:
            figures.update(self.probe.evaluate(self.method.export_network(self.model)))
        for key, figure in figures.items():
            self.history.setdefault(key, []).append(figure)
        described = "".join(f", {key} {figure:.4g}" for key, figure in figures.items())
        self.log(f"epoch {epoch}: loss {self.history['loss'][-1]:.5f}, lr {self.history['lr'][-1]:.3g}, "
                 f"{self.history['slices_per_s'][-1]:.1f} slices/s, {elapsed:.1f} s{described}")
        warning = self.method.epoch_warning(figures)
        if warning:
            self.log(f"warning: {warning}")
        preview = os.path.join(self.output_folder, "previews", f"epoch_{epoch:03d}.png")
        os.makedirs(os.path.dirname(preview), exist_ok=True)
        self.model.eval()
        self.method.write_preview(self.model, batch, preview)

    def run(self, max_epochs_this_run: Optional[int] = None) -> str:
        """Trains from ``start_epoch`` to the end (or ``max_epochs_this_run`` epochs); returns the checkpoint path."""
        s = self.settings
        self.log(f"ssp_pretrain {s.method} on {self.target.dataset_name} ({self.target.plans_name}, "
                 f"{self.target.configuration}): {asdict(s)}; data {self.data_summary}")
        last = s.epochs if max_epochs_this_run is None else min(s.epochs, self.start_epoch + max_epochs_this_run)
        for epoch in range(self.start_epoch, last):
            self.train_epoch(epoch)
            torch_save_atomic(self._state(epoch + 1), os.path.join(self.output_folder, LATEST_CHECKPOINT))
            self.start_epoch = epoch + 1
            self.plot_progress()
        if last < s.epochs:
            return os.path.join(self.output_folder, LATEST_CHECKPOINT)
        final = os.path.join(self.output_folder, FINAL_CHECKPOINT)
        save_checkpoint(final, self.method.export_network(self.model).cpu(), self.target, s.method,
                        pretraining=asdict(s), data=self.data_summary)
        self.log(f"wrote {final}")
        return final
