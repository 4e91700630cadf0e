"""Positional contrastive loss: supervised contrastive learning with slice positions as labels.

Zeng et al., "Positional Contrastive Learning for Volumetric Medical Image Segmentation" (MICCAI 2021), as used by
de Mooij et al. (arXiv 2409.18100). Views whose slice positions (slice index / number of slices) differ by less than
a threshold are positives of each other. The loss is the "L_out" supervised contrastive loss of Khosla et al.
(NeurIPS 2020) over the L2-normalised views z_1..z_M with cosine similarities s_ij and positives P(i):

    L = mean over {i : P(i) ≠ ∅} of −(1/|P(i)|) Σ_{p∈P(i)} log( exp(s_ip / τ) / Σ_{a≠i} exp(s_ia / τ) )
"""

import torch

from pretraining.losses.ntxent import cosine_log_softmax


def positive_mask(positions: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool (M, M): [i, j] is True iff i != j and |positions[i] − positions[j]| < threshold (strictly)."""
    close = (positions[:, None] - positions[None, :]).abs() < threshold
    return close & ~torch.eye(len(positions), dtype=torch.bool, device=positions.device)


def supervised_contrastive(z: torch.Tensor, positives: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """L_out of the projections z (M, D) given the bool (M, M) mask of positives (its diagonal is ignored).

    Anchors without positives are left out of the mean; raises ValueError when no anchor has one.
    """
    if z.ndim != 2 or positives.shape != (len(z), len(z)):
        raise ValueError(f"need z (M, D) and positives (M, M), got {tuple(z.shape)} and {tuple(positives.shape)}")
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positives = positives.to(device=z.device, dtype=torch.bool) & ~eye
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not has_positive.any():
        raise ValueError("supervised_contrastive: no anchor has a positive")
    log_probabilities = cosine_log_softmax(z, temperature).masked_fill(~positives, 0.0)
    return -(log_probabilities.sum(dim=1)[has_positive] / counts[has_positive]).mean()


def positional_contrastive(
    z_a: torch.Tensor, z_b: torch.Tensor, positions: torch.Tensor, threshold: float = 0.1, temperature: float = 0.1
) -> torch.Tensor:
    """PCL loss of two views z_a, z_b (N, D) of N slices at positions (N,) (slice index / number of slices).

    The 2N views [z_a; z_b] carry the positions [positions; positions], so each view's partner (Δ = 0) is always a
    positive, as is every other view within ``threshold``, whatever its subject or frame.
    """
    if z_a.shape != z_b.shape or positions.shape != z_a.shape[:1]:
        raise ValueError(
            f"need z_a, z_b (N, D) and positions (N,), got {tuple(z_a.shape)}, {tuple(z_b.shape)} "
            f"and {tuple(positions.shape)}"
        )
    if threshold <= 0:
        raise ValueError(f"threshold must be positive so partners are positives, got {threshold}")
    positives = positive_mask(torch.cat([positions, positions]), threshold)
    return supervised_contrastive(torch.cat([z_a, z_b]), positives, temperature)
