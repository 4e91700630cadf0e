"""Learning-rate schedules that are pure functions of the epoch, so ``--c`` resumes them exactly."""

from typing import Callable, Optional, Sequence

from torch.optim.lr_scheduler import _LRScheduler


class WarmupPolyLRScheduler(_LRScheduler):
    """Linear warm-up to ``initial_lr`` over ``warmup_epochs`` (0: none, which is nnU-Net's PolyLRScheduler), then
    nnU-Net's poly decay (exponent 0.9); parameter group i gets that lr times ``group_scales(epoch)[i]`` (default 1).

    lr(e) = initial_lr * (e + 1) / W                           for e < W
    lr(e) = initial_lr * (1 - (e - W) / (N - W)) ** 0.9         for e >= W
    """

    def __init__(
        self,
        optimizer,
        initial_lr: float,
        num_epochs: int,
        warmup_epochs: int = 0,
        exponent: float = 0.9,
        group_scales: Optional[Callable[[int], Sequence[float]]] = None,
    ):
        self.initial_lr, self.num_epochs, self.warmup_epochs, self.exponent = (
            initial_lr,
            num_epochs,
            warmup_epochs,
            exponent,
        )
        self.group_scales = group_scales or (lambda epoch: [1.0] * len(optimizer.param_groups))
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.initial_lr * (epoch + 1) / self.warmup_epochs
        decay_epochs = max(1, self.num_epochs - self.warmup_epochs)
        return self.initial_lr * max(0.0, 1 - (epoch - self.warmup_epochs) / decay_epochs) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group, scale in zip(self.optimizer.param_groups, self.group_scales(current_step), strict=True):
            group["lr"] = self.lr_at(current_step) * scale
