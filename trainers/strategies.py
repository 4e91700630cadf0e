"""Fine-tuning strategies for the pretrained parts, as recipe mixins of the SSP trainers.

One mechanism serves them all: the optimizer holds two parameter groups, the parts this run loaded from the SSP
checkpoint (``pretrained``) and the others (``new``: the decoder and heads of an encoder method, the heads of MIM),
and an lr scheduler that is a pure function of the epoch sets the new group to the trainer's poly lr and the
pretrained group to ``pretrained_lr_scale(epoch)`` times it (so ``nnUNetv2_train --c`` resumes exactly, and the
groups round-trip through nnU-Net's optimizer checkpoint). A group at lr 0 is frozen bit for bit
(:func:`freeze_groups_at_zero_lr`).

- :class:`FreezePretrained50EpochsMixin` (``_freeze50epochs``): frozen for the first 50 epochs (5% of a shortened
  run, as :class:`trainers.base.WarmupMixin`'s warm-up), then trained at the trainer's lr;
- :class:`FrozenPretrainedMixin` (``_frozen``): frozen throughout;
- :class:`PretrainedTenthLRMixin` (``_pretrainedTenthLR``): at a tenth of the trainer's lr throughout.
"""

import functools
from typing import List, Tuple

import torch

from nnunet_ssp.network import part_of_key, unwrap
from nnunet_ssp.schedule import shortened_epochs
from trainers.schedules import WarmupPolyLRScheduler

NEW, PRETRAINED = "new", "pretrained"  # the parameter groups' names, in the optimizer's order


def split_parameters(network: torch.nn.Module, parts) -> Tuple[List[torch.nn.Parameter], List[torch.nn.Parameter]]:
    """(parameters of ``parts``, the others) of ``network``, each parameter once, in the network's order; a parameter
    belongs to the part its state-dict names give it (:func:`nnunet_ssp.network.part_of_key`; aliases name none)."""
    part_of = {}
    for name, parameter in unwrap(network).named_parameters(remove_duplicate=False):
        part_of[parameter] = part_of.get(parameter) or part_of_key(name)
    in_parts = [p for p, part in part_of.items() if part in parts]
    return in_parts, [p for p, part in part_of.items() if part not in parts]


def freeze_groups_at_zero_lr(optimizer: torch.optim.Optimizer) -> None:
    """Parameters of a group whose lr is 0 stay bit-identical: their gradients are zeroed as backward computes them
    (so gradient clipping counts only the trained parts, and DDP, which needs a gradient for every parameter it
    wraps, still gets one), and the optimizer step skips them (no weight decay, no momentum; momentum starts afresh
    when the group trains). Groups are looked up by index on every call (``load_state_dict`` replaces the dicts); the
    hooks stay on the parameters, so call it once per network, for its one optimizer (as nnU-Net's initialize)."""
    for index, group in enumerate(optimizer.param_groups):
        for parameter in group["params"]:
            parameter.register_hook(functools.partial(_zero_gradient_if_frozen, optimizer, index))
    optimizer.register_step_pre_hook(_skip_frozen_groups)


def _zero_gradient_if_frozen(optimizer, index: int, gradient: torch.Tensor):
    return torch.zeros_like(gradient) if optimizer.param_groups[index]["lr"] == 0 else None  # None: unchanged


def _skip_frozen_groups(optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        if group["lr"] == 0:
            for parameter in group["params"]:
                parameter.grad = None


class PretrainedPartsLRMixin:
    """Trains the parts loaded from the SSP checkpoint at ``pretrained_lr_factor`` times the trainer's lr after
    ``frozen_epochs`` epochs at lr 0. Put it first in the bases, as the other recipe mixins."""

    #: the pretrained parts' lr relative to the trainer's, once they train
    pretrained_lr_factor = 1.0

    @property
    def frozen_epochs(self) -> int:
        """Epochs at the start of the run in which the pretrained parts do not move."""
        return 0

    def pretrained_lr_scale(self, epoch: int) -> float:
        return 0.0 if epoch < self.frozen_epochs else self.pretrained_lr_factor

    def configure_optimizers(self):
        """nnU-Net's optimizer (its class and settings) over the ``new`` and ``pretrained`` groups, and the poly
        schedule with the pretrained group scaled."""
        optimizer, _ = super().configure_optimizers()
        parts = self.pretrained_parts()
        pretrained, new = split_parameters(self.network, parts)
        optimizer = type(optimizer)(
            [{"params": new, "name": NEW}, {"params": pretrained, "name": PRETRAINED}], **optimizer.defaults
        )
        freeze_groups_at_zero_lr(optimizer)
        scheduler = WarmupPolyLRScheduler(
            optimizer,
            self.initial_lr,
            self.num_epochs,
            group_scales=lambda epoch: (1.0, self.pretrained_lr_scale(epoch)),
        )
        self.print_to_log_file(
            f"fine-tuning recipe {self.recipe}: the pretrained {'+'.join(parts)} "
            f"({_size(pretrained)}) {self._describe_strategy()}; the other parameters "
            f"({_size(new)}) at the trainer's lr; both with nnU-Net's poly decay"
        )
        return optimizer, scheduler

    def _describe_strategy(self) -> str:
        trained = f"at {self.pretrained_lr_factor:g} x the trainer's lr"
        if self.frozen_epochs >= self.num_epochs:
            return f"frozen in every epoch (0-{self.num_epochs - 1})"
        if self.frozen_epochs:
            return f"frozen in epochs 0-{self.frozen_epochs - 1}, from epoch {self.frozen_epochs} {trained}"
        return trained

    def fine_tuning_strategy(self) -> dict:
        return {
            **super().fine_tuning_strategy(),
            "pretrained_lr_factor": self.pretrained_lr_factor,
            "frozen_epochs": self.frozen_epochs,
        }


def _size(parameters) -> str:
    return f"{len(parameters)} tensors, {sum(p.numel() for p in parameters):,} values"


class FreezePretrained50EpochsMixin(PretrainedPartsLRMixin):
    """The pretrained parts frozen for the first 50 of nnU-Net's 1000 epochs (5% of a shortened run, at least 1),
    then trained with the rest of the network (the paper code's ``nr_epochs_frozen_encoder``)."""

    @property
    def frozen_epochs(self) -> int:
        return shortened_epochs(50, self.num_epochs)


class FrozenPretrainedMixin(PretrainedPartsLRMixin):
    """The pretrained parts frozen for the whole run: only the randomly initialised parts train."""

    @property
    def frozen_epochs(self) -> int:
        return self.num_epochs


class PretrainedTenthLRMixin(PretrainedPartsLRMixin):
    """The pretrained parts at a tenth of the trainer's lr, the other parts at the trainer's lr."""

    pretrained_lr_factor = 0.1
