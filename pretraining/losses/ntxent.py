"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (ICML 2020). The 2N views
z_1..z_2N of a batch of N pairs are L2-normalised, s_ij = z_i·z_j is their cosine similarity and p(i) the partner
view of anchor i:

    L = (1 / 2N) Σ_i −log( exp(s_i,p(i) / τ) / Σ_{a≠i} exp(s_ia / τ) )
"""

import torch
import torch.nn.functional as F


def cosine_log_softmax(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """(M, M) float32 log( exp(s_ij/τ) / Σ_{a≠i} exp(s_ia/τ) ) of the rows of z (M, D); −inf on the diagonal."""
    z = F.normalize(z.float(), dim=1)
    self_similarity = torch.eye(len(z), dtype=torch.bool, device=z.device)
    return F.log_softmax((z @ z.T / temperature).masked_fill(self_similarity, float("-inf")), dim=1)


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent of the projections z_a, z_b (N, D) of two views of each of N samples (z_a[i] pairs with z_b[i])."""
    if z_a.ndim != 2 or z_a.shape != z_b.shape or len(z_a) < 1:
        raise ValueError(
            f"nt_xent needs two (N, D) tensors of equal shape with N >= 1, got "
            f"{tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    log_probabilities = cosine_log_softmax(torch.cat([z_a, z_b]), temperature)
    anchors = torch.arange(2 * len(z_a), device=log_probabilities.device)
    return -log_probabilities[anchors, anchors.roll(len(z_a))].mean()
