"""DINO self-distillation loss (its schedules, teacher update and collapse monitor: ``pretraining.methods.dino``).

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021). With the teacher's
centred, sharpened distribution P_i = softmax((t_i − c) / τ_t) of global view i and the student's
log Q_v = log_softmax(s_v / τ_s) of view v, averaged over the batch and over all pairs of different views:

    L = mean over (i, v), v ≠ i, of −Σ_k P_i,k · log Q_v,k

The centre follows the teacher outputs: c ← m·c + (1 − m)·mean(t).

Like every loss here it knows nothing of processes: it takes the rows it is given. ``batch_mean`` averages the
centre's and the statistics' per-batch means over the global batch (the method passes the distributed average).
"""

import math
from typing import Callable, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _same(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tensors


class DINOLoss(nn.Module):
    """DINO cross-entropy with the teacher centre as a buffer (saved in the state_dict, so resumes are exact).

    After each call, ``last_statistics`` holds the teacher's mean entropy ("teacher_entropy") and the KL of its
    mean distribution to uniform ("teacher_kl_to_uniform"), natural log, for collapse monitoring.
    """

    def __init__(self, output_dim: int, student_temperature: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, output_dim))
        self.last_statistics = {}

    def forward(
        self,
        student_outputs: Sequence[torch.Tensor],
        teacher_outputs: Sequence[torch.Tensor],
        teacher_temperature: float,
        batch_mean: Callable[..., Tuple[torch.Tensor, ...]] = _same,
    ) -> torch.Tensor:
        """Loss of the student views ((B, K) each, the global ones first, in the teachers' order) against the
        teacher views ((B, K) each, global views only), the mean over these rows; the teacher side gets no gradient.
        Updates the centre with the batch's teacher mean (``batch_mean`` of the rows' means)."""
        if len(student_outputs) < len(teacher_outputs) or len(student_outputs) < 2:
            raise ValueError(
                f"need at least 2 student views, the first {len(teacher_outputs)} global, got {len(student_outputs)}"
            )
        teacher = torch.cat([t.detach().float() for t in teacher_outputs])
        teacher_log_p = F.log_softmax((teacher - self.center) / teacher_temperature, dim=1)
        teacher_p = teacher_log_p.exp()
        student_log_q = [F.log_softmax(s.float() / self.student_temperature, dim=1) for s in student_outputs]
        pair_losses = [
            -(p * log_q).sum(dim=1).mean()
            for i, p in enumerate(teacher_p.chunk(len(teacher_outputs)))
            for v, log_q in enumerate(student_log_q)
            if v != i
        ]
        with torch.no_grad():
            entropy, mean_p, batch_center = batch_mean(
                -(teacher_p * teacher_log_p).sum(dim=1).mean(), teacher_p.mean(dim=0), teacher.mean(dim=0, keepdim=True)
            )
            self.last_statistics = {
                "teacher_entropy": entropy.item(),
                "teacher_kl_to_uniform": (math.log(teacher.shape[1]) + torch.xlogy(mean_p, mean_p).sum()).item(),
            }
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
        return torch.stack(pair_losses).mean()
