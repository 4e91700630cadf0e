"""Masked reconstruction loss of masked image modeling.

SimMIM (Xie et al., CVPR 2022) and MAE (He et al., CVPR 2022) reconstruct only what was hidden; de Mooij et al.
(arXiv 2409.18100, §MIM) use the mean squared error over the masked pixels of the whole batch:

    L = sum_i m_i (x̂_i - x_i)^2 / sum_i m_i

with m the binary mask (1 = masked), x the unmasked target and x̂ the reconstruction. Visible pixels do not
contribute.
"""

from typing import Tuple

import torch


def masked_squared_error(
    reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The numerator and denominator of :func:`masked_mse`: sum of m (x̂ − x)^2 and the number of masked pixels
    (a distributed run sums both over the ranks before dividing, for the global batch's loss)."""
    mask = mask.to(reconstruction.dtype)
    squared_error = (reconstruction - target) ** 2 * mask
    return squared_error.sum(), mask.expand_as(squared_error).sum()


def masked_mse(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels where ``mask`` is 1 (all tensors broadcast to (B, C, H, W))."""
    squared_error, count = masked_squared_error(reconstruction, target, mask)
    return squared_error / count.clamp_min(1)
