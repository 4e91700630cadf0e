"""The interface every SSP method implements; the training loop knows nothing beyond it.

A method declares which nnU-Net network parts it trains (``parts``, of :data:`nnunet_ssp.network.PARTS`), its
options, builds its model (the plans' network plus its head), its views (one augmentation per view) and its loss,
and hands back the nnU-Net network whose parts go into the checkpoint.

Distributed runs, one policy: a loss function (``pretraining.losses``) takes the rows it is given and knows nothing
of processes; a method's ``loss`` returns the global batch's loss, the same value on every rank, through the
collectives of ``pretraining.distributed`` that carry gradients. What pairs samples is gathered first (SimCLR, PCL:
every rank's projections); a summed loss is divided by the global count (MIM: masked pixels); a mean over samples is
the mean of the ranks' means (DINO: equal rows per rank).
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from nnunet_ssp.network import NetworkSpec


@dataclass(frozen=True)
class Hyperparameters:
    """The paper's optimisation recipe of a method (all overridable from the CLI)."""

    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool = False
    epochs: int = 100


@dataclass(frozen=True)
class Step:
    """Where an optimisation step is: epoch and iteration within it, and the run's length."""

    epoch: int
    iteration: int
    iters_per_epoch: int
    epochs: int

    @property
    def global_step(self) -> int:
        return self.epoch * self.iters_per_epoch + self.iteration

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iters_per_epoch


@dataclass(frozen=True)
class Option:
    """A method-specific setting; ``ssp_pretrain`` offers it as ``--<name-with-dashes>``."""

    default: Any
    help: str


#: the embedding methods' option for the grid of :func:`pretraining.heads.encoder_embedding`
POOL_GRID_OPTION = Option(
    2,
    "SimCLR/PCL/DINO: average-pool the deepest encoder features to a GxG grid before the "
    "head (default 2; 1 = the paper's global average pooling, which barely trains with "
    "nnU-Net's InstanceNorm)",
)


class SSPMethod:
    name: str = ""
    defaults: Hyperparameters
    #: the network parts it pretrains, which go into its checkpoint (its trainer in trainers/ssp_trainers.py loads them)
    parts: Tuple[str, ...] = ("encoder",)
    #: option name -> Option; values become attributes of the method instance
    options: Dict[str, Option] = {}

    def __init__(self, spec: NetworkSpec, patch_size: Sequence[int], **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no options {sorted(unknown)}")
        self.spec = spec
        self.patch_size = tuple(int(p) for p in patch_size)
        for key, option in self.options.items():
            value = options.get(key)
            setattr(self, key, option.default if value is None else type(option.default)(value))

    def option_values(self) -> Dict[str, Any]:
        return {key: getattr(self, key) for key in self.options}

    def build_model(self) -> torch.nn.Module:
        """The module that is optimised; it holds the plans' network as ``model.network``."""
        raise NotImplementedError

    def view_transforms(self) -> List:
        """One batchgeneratorsv2 transform per view of a slice."""
        raise NotImplementedError

    def view_patch_sizes(self) -> List[Tuple[int, ...]]:
        """The spatial size of each view, in the order of :meth:`view_transforms` (default: all at the patch size)."""
        return [self.patch_size] * len(self.view_transforms())

    def example_batch(self, batch_size: int, num_channels: int, device) -> dict:
        """A batch with the loader's keys and shapes (random views, every slice at position 0), for measuring
        what a step costs without data."""
        generator = torch.Generator().manual_seed(0)
        views = [
            torch.randn(batch_size, num_channels, *size, generator=generator).to(device)
            for size in self.view_patch_sizes()
        ]
        return {"views": views, "index": torch.arange(batch_size), "slice_position": torch.zeros(batch_size)}

    def loss(self, model: torch.nn.Module, batch: dict, step: Step) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The scalar loss of one batch and extra metrics to log (averaged per epoch)."""
        raise NotImplementedError

    def parameter_groups(self, model: torch.nn.Module, weight_decay: float) -> List[dict]:
        """The optimizer's parameter groups (default: every trainable parameter, one weight decay)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def lr_at(self, base_lr: float, step: Step) -> float:
        """Cosine decay per epoch from ``base_lr`` to 0 over the run (the paper's default schedule)."""
        return 0.5 * base_lr * (1 + math.cos(math.pi * step.epoch / step.epochs))

    def before_optimizer_step(self, model: torch.nn.Module, step: Step) -> None:
        """Called between backward and the optimizer step (e.g. to drop gradients of frozen layers)."""

    def after_step(self, model: torch.nn.Module, step: Step) -> None:
        """Called after each optimizer step (e.g. teacher updates)."""

    def epoch_warning(self, metrics: Dict[str, float]) -> Optional[str]:
        """A warning about the epoch's averaged extra metrics (e.g. a collapse), or None."""
        return None

    def export_network(self, model: torch.nn.Module) -> torch.nn.Module:
        """The nnU-Net network whose declared parts go into the checkpoint."""
        return model.network

    def checkpoint_network(self, model: torch.nn.Module, calibration_images: Optional[torch.Tensor]) -> torch.nn.Module:
        """The network whose declared parts the final checkpoint holds (default: :meth:`export_network`);
        ``calibration_images`` are un-augmented slices of the data (None when the run has none)."""
        return self.export_network(model)

    def write_preview(self, model: torch.nn.Module, batch: dict, path: str) -> bool:
        """Optionally writes a PNG that shows what the method does; returns whether it wrote one."""
        return False
