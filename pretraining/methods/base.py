"""The interface every SSP method implements; the training loop knows nothing beyond it.

A method declares which nnU-Net network parts it trains (:data:`nnunet_ssp.methods.METHOD_PARTS`), builds its
model (the plans' network plus its head), its views (one augmentation per view) and its loss, and hands back the
nnU-Net network whose parts go into the checkpoint.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from nnunet_ssp.methods import parts_of_method
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


class SSPMethod:
    name: str = ""
    defaults: Hyperparameters

    def __init__(self, spec: NetworkSpec, patch_size: Sequence[int]):
        self.spec = spec
        self.patch_size = tuple(int(p) for p in patch_size)

    @property
    def parts(self) -> Tuple[str, ...]:
        return parts_of_method(self.name)

    def build_model(self) -> torch.nn.Module:
        """The module that is optimised; it holds the plans' network as ``model.network``."""
        raise NotImplementedError

    def view_transforms(self) -> List:
        """One batchgeneratorsv2 transform per view of a slice."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The scalar loss of one batch and extra figures to log."""
        raise NotImplementedError

    def lr_at(self, base_lr: float, epoch: int, iteration: int, iters_per_epoch: int, epochs: int) -> float:
        """Cosine decay per epoch from ``base_lr`` to 0 over ``epochs`` (the paper's default schedule)."""
        return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))

    def after_step(self, model: torch.nn.Module, epoch: int, iteration: int, iters_per_epoch: int,
                   epochs: int) -> None:
        """Called after each optimizer step (e.g. teacher updates)."""

    def export_network(self, model: torch.nn.Module) -> torch.nn.Module:
        """The nnU-Net network whose declared parts go into the checkpoint."""
        return model.network

    def write_preview(self, model: torch.nn.Module, batch: dict, path: str) -> bool:
        """Optionally writes a PNG that shows what the method does; returns whether it wrote one."""
        return False
