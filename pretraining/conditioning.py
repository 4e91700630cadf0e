"""Decoder conditioning: how many directions each decoder stage's output features really use.

For a stage's output on a fixed set of slices, every pixel is a sample of its C channels; λ_1 ≥ … ≥ λ_C are the
eigenvalues of the channel covariance. Three figures:

- condition number κ = λ_1 / λ_C (fresh segmentation heads trained by SGD on badly conditioned features barely
  move in a short run);
- entropy effective rank erank = exp(−Σ p_i log p_i), p_i = λ_i / Σ_j λ_j (Roy & Vetterli, "The effective rank: a
  measure of effective dimensionality", EUSIPCO 2007): C for isotropic features, 1 when one direction holds all;
- the share of the variance in the top 3 directions.

:class:`DecoderConditioningProbe` measures them after every pretraining epoch for methods that pretrain the decoder
(MIM), beside the same on the randomly initialised network the run started from; progress.png plots erank / C per
stage (``probe_decoder_rank_*``), the log holds κ (``decoder_condition_*``). Stages are numbered as nnU-Net's
decoder numbers them: 0 is the deepest.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from pretraining.data.views import augmentation, make_view

#: eigenvalues below this fraction of the largest count as this fraction (κ stays finite for rank-deficient features)
EIGENVALUE_FLOOR = 1e-12


@dataclass(frozen=True)
class Conditioning:
    channels: int
    condition_number: float
    effective_rank: float
    top3_share: float


def channel_spectrum(features: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending, float64) of the channel covariance of ``features`` (N, C, *spatial), every pixel of
    every image one sample."""
    samples = features.detach().double().movedim(1, -1).reshape(-1, features.shape[1])
    samples = samples - samples.mean(0)
    covariance = samples.T @ samples / max(1, len(samples) - 1)
    return torch.linalg.eigvalsh(covariance).flip(0).clamp_min(0)


def conditioning(eigenvalues: torch.Tensor) -> Conditioning:
    """κ, entropy effective rank and top-3 share of a covariance spectrum (descending eigenvalues)."""
    eigenvalues = eigenvalues.double()
    top = float(eigenvalues[0])
    if top <= 0:
        return Conditioning(len(eigenvalues), float("inf"), 0.0, float("nan"))
    p = eigenvalues / eigenvalues.sum()
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    smallest = max(float(eigenvalues[-1]), top * EIGENVALUE_FLOOR)
    return Conditioning(len(eigenvalues), top / smallest, float(np.exp(entropy)), float(p[:3].sum()))


@torch.no_grad()
def decoder_stage_outputs(network: torch.nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """The output of every decoder stage of nnU-Net's U-Net on ``images``, deepest first."""
    captured: List[torch.Tensor] = []
    hooks = [
        stage.register_forward_hook(lambda module, args, output: captured.append(output.float()))
        for stage in network.decoder.stages
    ]
    try:
        network(images)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def decoder_conditioning(network: torch.nn.Module, images: torch.Tensor, batch_size: int = 32) -> List[Conditioning]:
    """Per decoder stage (deepest first), the conditioning of its output on ``images`` (in eval mode; the network's
    mode is restored)."""
    was_training = network.training
    network.eval()
    device = next(network.parameters()).device
    try:
        chunks = [
            decoder_stage_outputs(network, images[i : i + batch_size].to(device))
            for i in range(0, len(images), batch_size)
        ]
    finally:
        network.train(was_training)
    return [conditioning(channel_spectrum(torch.cat([c[stage] for c in chunks]))) for stage in range(len(chunks[0]))]


def conditioning_metrics(stages: List[Conditioning], suffix: str = "") -> Dict[str, float]:
    """Log and plot keys of a list of per-stage figures: erank / C (plotted) and κ (logged)."""
    metrics = {}
    for index, stage in enumerate(stages):
        metrics[f"probe_decoder_rank_{index}{suffix}"] = stage.effective_rank / stage.channels
        if not suffix:
            metrics[f"decoder_condition_{index}"] = stage.condition_number
    return metrics


class DecoderConditioningProbe:
    """:meth:`evaluate` gives the conditioning of each decoder stage on a fixed set of slices, and the same of the
    network ``build_random_network()`` returns (``_random_init``, computed once)."""

    def __init__(self, images: torch.Tensor, build_random_network: Callable[[], torch.nn.Module]):
        self.images, self.build_random_network = images, build_random_network
        self.random_init: Optional[Dict[str, float]] = None

    def evaluate(self, network: torch.nn.Module) -> Dict[str, float]:
        if self.random_init is None:
            random_network = self.build_random_network().to(next(network.parameters()).device)
            self.random_init = conditioning_metrics(decoder_conditioning(random_network, self.images), "_random_init")
        return {**conditioning_metrics(decoder_conditioning(network, self.images)), **self.random_init}


def calibration_slices(cache, patch_size, num_slices: int, seed: int) -> torch.Tensor:
    """``num_slices`` seeded slices of the cache, image-centred crops at the patch size without augmentation."""
    indices = np.sort(np.random.default_rng(seed).choice(len(cache), size=min(num_slices, len(cache)), replace=False))
    crop = augmentation(patch_size, p_rotation=0, p_scaling=0, mirror=False, translation=0, intensity=None)
    return torch.stack([make_view(crop, cache.slice_channels(int(i))) for i in indices])


def make_conditioning_probe(cache, method, num_slices: int, seed: int) -> Optional[DecoderConditioningProbe]:
    """The probe on :func:`calibration_slices` for a method that pretrains the decoder; None for the others or when
    ``num_slices`` is 0."""
    from pretraining.seg_probe import random_network_builder

    if "decoder" not in method.parts or num_slices <= 0:
        return None
    return DecoderConditioningProbe(
        calibration_slices(cache, method.patch_size, num_slices, seed), random_network_builder(method, seed)
    )


#: non-linearities f with f(a x) = a f(x) for a > 0, through which a decoder stage's output can be rescaled exactly
POSITIVELY_HOMOGENEOUS = (torch.nn.LeakyReLU, torch.nn.ReLU)


def _ends_in_affine_norm_and_homogeneous_nonlinearity(block: torch.nn.Module) -> bool:
    modules = list(getattr(block, "all_modules", ()))
    return (
        len(modules) >= 2
        and isinstance(modules[-1], POSITIVELY_HOMOGENEOUS)
        and getattr(modules[-2], "affine", False) is True
    )


@torch.no_grad()
def rescale_decoder_outputs(network: torch.nn.Module, images: torch.Tensor, target_std: float = 1.0) -> List[float]:
    """Reparametrises nnU-Net's decoder in place so that every channel of every decoder stage's output has standard
    deviation ``target_std`` on ``images``, without changing what the decoder computes from one stage to the next.

    A stage ends in conv, affine norm (γ, β), positively homogeneous non-linearity f: dividing γ and β of channel c by
    s_c divides its output by s_c, since f(x / s) = f(x) / s; the next stage's transposed conv multiplies its weights
    on input channel c by s_c, so the next stage sees the same input. Only the segmentation heads, which fine-tuning
    replaces, see the rescaled features. Returns the median s_c per stage (deepest first)."""
    decoder = network.decoder
    medians = []
    for index, (stage, features) in enumerate(zip(decoder.stages, decoder_stage_outputs(network, images))):
        last = stage.convs[-1]
        if not _ends_in_affine_norm_and_homogeneous_nonlinearity(last):
            raise ValueError(f"decoder stage {index} does not end in an affine norm and a (leaky) ReLU")
        scale = features.movedim(1, 0).reshape(features.shape[1], -1).std(dim=1).clamp_min(1e-6) / target_std
        norm = last.all_modules[-2]
        norm.weight.div_(scale)
        norm.bias.div_(scale)
        if index + 1 < len(decoder.stages):
            weight = decoder.transpconvs[index + 1].weight  # (input channels, output channels, *kernel)
            weight.mul_(scale.view(-1, *[1] * (weight.dim() - 1)))
        medians.append(float(scale.median()))
    return medians
