"""DINO (Caron et al. 2021) as the paper pretrains the nnU-Net encoder (de Mooij et al., arXiv 2409.18100, §3.3).

Views: 2 global views at the patch size (view 1 always blurred, view 2 solarized with p 0.2) and 6 local views at
half the patch size showing a smaller field of view. The student (encoder -> pooled deepest features, a 2x2 grid
as in ``pretraining.heads`` -> DINO head with 8192 weight-normalised prototypes) sees all views, the teacher (its
EMA, momentum 0.996 -> 1 on a cosine) only the global ones.
Loss: cross-entropy between the centred, sharpened teacher distribution (τ_t warmed from 0.02 to 0.04) and the
student's (τ_s 0.1) over all pairs of different views; centre momentum 0.9. SGD momentum 0.9, weight decay 1e-4
except on biases and norms, lr 0.0075 (= 0.03 × 64 / 256) after a 10-epoch linear warm-up, cosine to 1e-6; the
last layer is frozen during epoch 0. The student's encoder is exported.

Distributed runs: each rank's loss over its own rows is averaged over the ranks, the centre and the collapse
statistics use the global batch's means, and the loop makes the heads' BatchNorm layers
normalise over the global batch (``pretraining.distributed.GlobalBatchNorm``).

Deviation: the teacher starts as a copy of the student (canonical DINO); the paper initialises it separately at
random, which stops mattering within an epoch (0.996^1415 ≈ 0.004).
"""

import copy
import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from pretraining import distributed
from pretraining.data.views import augmentation
from pretraining.heads import DINOHead, EncoderWithHead, encoder_width
from pretraining.losses.dino import DINOLoss
from pretraining.methods.base import POOL_GRID_OPTION, Hyperparameters, Option, SSPMethod, Step

GLOBAL_SCALE = (0.524, 1.4)  # 1.4·sqrt(area) for DINO's global crop areas (0.14, 1)
LOCAL_SCALE = (0.313, 0.524)  # ... and local crop areas (0.05, 0.14), at half the patch size
LOCAL_TRANSLATION = 0.5  # the paper's ±160 output px at scale ~0.42, as a fraction of the local patch
MIN_LR = 1e-6


def teacher_temperature(epoch: int, warmup_epochs: int, start: float = 0.02, end: float = 0.04) -> float:
    """Teacher temperature of an epoch: np.linspace(start, end, warmup_epochs), then ``end``.

    That is start + (end − start)·epoch / (warmup_epochs − 1) for epoch < warmup_epochs (so ``end`` from epoch
    warmup_epochs − 1 on), and ``end`` for every epoch when warmup_epochs <= 1.
    """
    if warmup_epochs <= 1 or epoch >= warmup_epochs:
        return end
    return start + (end - start) * epoch / (warmup_epochs - 1)


def teacher_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """EMA momentum on a cosine: final − (final − base)·(cos(π·step/total_steps) + 1)/2, ``final`` if no steps."""
    progress = step / total_steps if total_steps > 0 else 1.0
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← momentum·teacher + (1 − momentum)·student for the matching parameters; buffers stay as they are
    (as in DINO, the teacher's normalisation statistics come from its own forward passes)."""
    for teacher_parameter, student_parameter in zip(teacher.parameters(), student.parameters()):
        teacher_parameter.mul_(momentum).add_(student_parameter.detach(), alpha=1 - momentum)


def collapse_warning(entropy: float, kl_to_uniform: float, output_dim: int) -> Optional[str]:
    """A one-line warning when the teacher outputs have collapsed, else None.

    Uniform collapse: mean entropy > 0.95·log K (every output almost uniform). One-dimension collapse: mean
    entropy < 0.05·log K and KL(mean distribution ‖ uniform) > 0.5·log K (every output peaks on the same prototype).
    """
    log_k = math.log(output_dim)
    advice = "try a lower teacher temperature, a larger batch or a lower learning rate (DINO issue #43)"
    if entropy > 0.95 * log_k:
        return f"DINO teacher outputs collapsed to uniform (entropy {entropy:.3f} of max {log_k:.3f}); {advice}"
    if entropy < 0.05 * log_k and kl_to_uniform > 0.5 * log_k:
        return (
            f"DINO teacher outputs collapsed to one dimension (entropy {entropy:.3f}, KL to uniform "
            f"{kl_to_uniform:.3f} of max {log_k:.3f}); {advice}"
        )
    return None


class StudentTeacher(nn.Module):
    """Student, its EMA teacher (no gradients) and the loss with its centre (a buffer, so resumes are exact)."""

    def __init__(self, student: EncoderWithHead, criterion: DINOLoss):
        super().__init__()
        self.student, self.criterion = student, criterion
        self.teacher = copy.deepcopy(student)
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)


class DINO(SSPMethod):
    name = "dino"
    defaults = Hyperparameters(batch_size=64, lr=0.0075, momentum=0.9, weight_decay=1e-4)
    options = {
        "dino_out_dim": Option(8192, "DINO: number of prototypes of the head (default 8192)"),
        "dino_local_views": Option(6, "DINO: local views per slice, at half the patch size (default 6)"),
        "dino_teacher_temperature": Option(
            0.04, "DINO: final teacher temperature (default 0.04; lower it if the outputs collapse)"
        ),
        "dino_teacher_temperature_start": Option(0.02, "DINO: teacher temperature at epoch 0 (default 0.02)"),
        "dino_teacher_warmup_epochs": Option(
            30, "DINO: epochs of teacher-temperature warm-up (default 30, at most 30%% of the run)"
        ),
        "dino_warmup_epochs": Option(10, "DINO: epochs of linear lr warm-up (default 10, at most 10%% of the run)"),
        "dino_teacher_momentum": Option(0.996, "DINO: initial teacher EMA momentum, raised to 1 (default 0.996)"),
        "dino_freeze_last_layer_epochs": Option(1, "DINO: epochs the head's last layer stays frozen (default 1)"),
        "pool_grid": POOL_GRID_OPTION,
    }

    def __init__(self, spec, patch_size, **options):
        super().__init__(spec, patch_size, **options)
        if self.dino_local_views < 0 or self.dino_out_dim < 2 or self.pool_grid < 1:
            raise ValueError("dino_local_views must be >= 0, dino_out_dim >= 2 and pool_grid >= 1")
        self.local_patch_size = tuple(max(1, p // 2) for p in self.patch_size)

    def build_model(self) -> nn.Module:
        network = self.spec.build(num_output_channels=1)
        head = DINOHead(encoder_width(network) * self.pool_grid**2, out_features=self.dino_out_dim)
        student = EncoderWithHead(network, head, self.pool_grid)
        return StudentTeacher(student, DINOLoss(self.dino_out_dim))

    def view_transforms(self):
        blurred = augmentation(self.patch_size, scale=GLOBAL_SCALE, intensity="dino", p_blur=1.0, blur_sigma=(0.1, 2.0))
        solarized = augmentation(self.patch_size, scale=GLOBAL_SCALE, intensity="dino", p_solarize=0.2)
        local = [
            augmentation(self.local_patch_size, scale=LOCAL_SCALE, translation=LOCAL_TRANSLATION, intensity="dino")
            for _ in range(self.dino_local_views)
        ]
        return [blurred, solarized, *local]

    def view_patch_sizes(self):
        return [self.patch_size] * 2 + [self.local_patch_size] * self.dino_local_views

    def export_network(self, model: StudentTeacher) -> nn.Module:
        return model.student.network

    def parameter_groups(self, model: StudentTeacher, weight_decay: float):
        """Weight decay on the student's weight matrices and kernels only, none on biases and norms."""
        params = [p for p in model.student.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]

    @staticmethod
    def _warmup_epochs(requested: int, fraction: float, epochs: int) -> int:
        return min(requested, math.ceil(fraction * epochs))

    def lr_at(self, base_lr: float, step: Step) -> float:
        """Per iteration: linear warm-up from 0, then cosine from ``base_lr`` to 1e-6."""
        warmup = self._warmup_epochs(self.dino_warmup_epochs, 0.1, step.epochs) * step.iters_per_epoch
        if step.global_step < warmup:
            return base_lr * step.global_step / warmup
        progress = (step.global_step - warmup) / max(1, step.total_steps - warmup)
        return MIN_LR + 0.5 * (base_lr - MIN_LR) * (1 + math.cos(math.pi * progress))

    def teacher_temperature_at(self, step: Step) -> float:
        warmup = self._warmup_epochs(self.dino_teacher_warmup_epochs, 0.3, step.epochs)
        return teacher_temperature(
            step.epoch, warmup, self.dino_teacher_temperature_start, self.dino_teacher_temperature
        )

    def loss(self, model: StudentTeacher, batch, step: Step) -> Tuple[torch.Tensor, Dict[str, float]]:
        views = batch["views"]
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher_out = model.teacher(global_views).float().chunk(2)
        student_out = list(model.student(global_views).float().chunk(2))
        if len(views) > 2:
            student_out += model.student(torch.cat(views[2:])).float().chunk(len(views) - 2)
        # the global batch's loss: the mean of the ranks' means (equal rows per rank); the centre and the statistics
        # from the global batch's means
        loss = distributed.all_reduce_mean(
            model.criterion(
                student_out, teacher_out, self.teacher_temperature_at(step), distributed.all_reduce_mean_many
            )
        )
        metrics = dict(model.criterion.last_statistics)
        # the loss is H(teacher) + KL(teacher || student); early on the centring raises H(teacher), so the loss can
        # rise while the student learns: the KL is the part the student controls
        metrics["student_teacher_kl"] = loss.item() - metrics["teacher_entropy"]
        return loss, metrics

    def before_optimizer_step(self, model: StudentTeacher, step: Step) -> None:
        if step.epoch < self.dino_freeze_last_layer_epochs:
            model.student.head.last_layer.weight.grad = None

    def after_step(self, model: StudentTeacher, step: Step) -> None:
        momentum = teacher_momentum(step.global_step, step.total_steps, self.dino_teacher_momentum)
        ema_update(model.teacher, model.student, momentum)

    def epoch_warning(self, metrics: Dict[str, float]) -> Optional[str]:
        if "teacher_entropy" not in metrics:
            return None
        return collapse_warning(metrics["teacher_entropy"], metrics["teacher_kl_to_uniform"], self.dino_out_dim)
