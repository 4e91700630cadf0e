"""Channel decorrelation penalty: the redundancy-reduction term of Barlow Twins (Zbontar et al., ICML 2021) and the
covariance term of VICReg (Bardes et al., ICLR 2022), applied to one feature map's channels.

Every pixel of every image is a sample of the C channels; with each channel standardised over the samples
(z = (x − mean) / sd) and R = Zᵀ Z / n their correlation matrix,

    L = Σ_{i≠j} R_ij² / (C (C − 1))

the mean squared off-diagonal correlation: 0 for uncorrelated channels, 1 when all carry the same signal.
"""

import torch

EPS = 1e-5


def offdiagonal_correlation(features: torch.Tensor) -> torch.Tensor:
    """L of ``features`` (N, C, *spatial), C ≥ 2, as a float32 scalar that carries gradients."""
    samples = features.float().movedim(1, -1).reshape(-1, features.shape[1])
    standardised = (samples - samples.mean(0)) / (samples.var(0, unbiased=False) + EPS).sqrt()
    correlation = standardised.T @ standardised / len(samples)
    channels = correlation.shape[0]
    off_diagonal = correlation - torch.diag_embed(correlation.diagonal())
    return off_diagonal.pow(2).sum() / (channels * (channels - 1))
