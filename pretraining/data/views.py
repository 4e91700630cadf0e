"""Augmented views of one slice, built from batchgeneratorsv2 transforms.

``augmentation(patch_size, ...)`` returns one ``BasicTransform``: call it as ``t(image=x)["image"]`` with ``x`` a
float32 torch tensor (C, H, W) of any size; the result is (C, *patch_size). Each call draws new random parameters
from numpy's and torch's global RNGs (the loader seeds both per sample). Some bgv2 transforms modify their input in
place, so pass a clone (``make_view`` does).

How this approximates the paper (de Mooij et al., qcardia MONAI pipeline; paper_protocol.md §1.4-1.5):

- Geometry: one ``SpatialTransform`` (bilinear grid_sample, zero padding, no elastic deformation) with rotation
  U(-pi, pi) p 1, isotropic scale U(0.7, 1.4) p 1 (bgv2 convention as in the paper: larger = anatomy smaller), and a
  random crop whose centre lies within +-``translation`` x patch size (default 40/256, the paper's +-40 px at 256 px)
  of the image centre, then a flip of each axis with p 0.5. Deviations: the paper centres on the label-derived
  heart centre (here: the image centre of nnU-Net's nonzero-cropped slice), resamples bicubically, and its slices are
  z-scored per subject over the whole cine (here: nnU-Net's per-volume normalization of each frame).
- Intensity ("paper", applied after the spatial part, in the paper's order):
  Gaussian noise p 0.2, sigma ~ U(0, 0.2) (bgv2's ``noise_variance`` is in fact the standard deviation);
  Gaussian blur p 0.2, sigma ~ U(0.5, 1.5) per axis (bgv2 truncates the kernel at 6 sigma, MONAI at 4);
  intensity scale p 1, x U(1.6, 2.5): the paper's MONAI ``RandScaleIntensity(factors=[0.6, 1.5])`` multiplies by
  (1 + f), reproduced on purpose (paper_protocol.md §6.1) -- pass ``scale_factor=(0.6, 1.5)`` for the intended range;
  intensity shift p 1, + U(-0.4, 0.4) (own ``UniformShiftTransform``: bgv2's additive brightness is Gaussian);
  "contrast" p 1 = MONAI ``RandAdjustContrast``: min-max normalise, power gamma ~ U(0.7, 1.5), restore the range
  (bgv2 ``GammaTransform`` without inversion and without retaining statistics).
  nnU-Net's own ContrastTransform and SimulateLowResolutionTransform are not in the paper: off by default
  (``p_contrast``, ``p_lowres``).
- ``intensity="dino"``: the DINO base column (noise p 0.15, blur p 0.1, scale p 0.2, shift p 0.15, gamma p 0.15);
  ``p_solarize`` adds DINO's solarization last (see ``SolarizeTransform``).
- ``intensity="nnunet"``: the tested recipe of cpu_environment.md §4 (nnU-Net's own transforms at raised
  probabilities: noise, blur, multiplicative brightness, contrast, low resolution, gamma).
- ``intensity=None``: spatial only.
Every probability and range can be overridden by keyword (e.g. DINO's global view 1: ``p_blur=1.0,
blur_sigma=(0.1, 2.0)``; local views: ``scale=(...)`` and a smaller ``patch_size``).
"""

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar, sample_scalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

PAPER_TRANSLATION = 40 / 256

# probabilities and ranges per preset; the keys are augmentation()'s keyword arguments
INTENSITY_PRESETS = {
    "paper": dict(
        p_noise=0.2,
        noise_std=(0.0, 0.2),
        p_blur=0.2,
        blur_sigma=(0.5, 1.5),
        p_scale=1.0,
        scale_factor=(1.6, 2.5),
        p_shift=1.0,
        shift=(-0.4, 0.4),
        p_gamma=1.0,
        gamma=(0.7, 1.5),
        p_contrast=0.0,
        contrast=(0.75, 1.25),
        p_lowres=0.0,
        lowres_scale=(0.5, 1.0),
        p_solarize=0.0,
    ),
    "dino": dict(
        p_noise=0.15,
        noise_std=(0.0, 0.2),
        p_blur=0.1,
        blur_sigma=(0.5, 1.5),
        p_scale=0.2,
        scale_factor=(1.6, 2.5),
        p_shift=0.15,
        shift=(-0.4, 0.4),
        p_gamma=0.15,
        gamma=(0.7, 1.5),
        p_contrast=0.0,
        contrast=(0.75, 1.25),
        p_lowres=0.0,
        lowres_scale=(0.5, 1.0),
        p_solarize=0.0,
    ),
    "nnunet": dict(
        p_noise=0.5,
        noise_std=(0.0, 0.1),
        p_blur=0.2,
        blur_sigma=(0.5, 1.0),
        p_scale=0.5,
        scale_factor=BGContrast((0.75, 1.25)),
        p_shift=0.0,
        shift=(-0.4, 0.4),
        p_gamma=0.3,
        gamma=BGContrast((0.7, 1.5)),
        p_contrast=0.5,
        contrast=BGContrast((0.75, 1.25)),
        p_lowres=0.25,
        lowres_scale=(0.5, 1.0),
        p_solarize=0.0,
    ),
}


class UniformShiftTransform(ImageOnlyTransform):
    """Adds one offset ~ U(shift) to the whole image (MONAI ``RandShiftIntensity``); in place."""

    def __init__(self, shift: RandomScalar = (-0.4, 0.4)):
        super().__init__()
        self.shift = shift

    def get_parameters(self, **data_dict) -> dict:
        return {"offset": float(sample_scalar(self.shift))}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        return img.add_(params["offset"])


class SolarizeTransform(ImageOnlyTransform):
    """Pixels above 0 (z-scored units) become ``max - x``, with ``max`` the image's maximum (DINO's solarization as
    the paper adapts it; the paper takes the maximum of the subject's whole standardized cine); in place."""

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        return torch.where(img > 0, img.max() - img, img, out=img)


class CenteredSpatialTransform(SpatialTransform):
    """``SpatialTransform`` with ``random_crop=True`` whose crop centre is drawn within +-``max_shift`` pixels of the
    image centre per axis (or anywhere in the image where the image is smaller than that); ``max_shift=None``
    draws it anywhere in the image (nnU-Net-style random crop)."""

    def __init__(self, patch_size, max_shift: Optional[Sequence[float]], **kwargs):
        super().__init__(patch_size, 0, True, **kwargs)
        self.max_shift = None if max_shift is None else [float(s) for s in max_shift]

    def get_parameters(self, **data_dict) -> dict:
        shape = data_dict["image"].shape[1:]
        if self.max_shift is None:
            self.patch_center_dist_from_border = [0] * len(shape)
        else:
            self.patch_center_dist_from_border = [max(0.0, s / 2 - m) for s, m in zip(shape, self.max_shift)]
        return super().get_parameters(**data_dict)


def augmentation(
    patch_size: Sequence[int],
    *,
    rotation: Tuple[float, float] = (-np.pi, np.pi),
    scale: Tuple[float, float] = (0.7, 1.4),
    p_rotation: float = 1.0,
    p_scaling: float = 1.0,
    mirror: bool = True,
    translation: Optional[float] = PAPER_TRANSLATION,
    intensity: Optional[str] = "paper",
    **overrides,
) -> BasicTransform:
    """One view: spatial augmentation + crop to ``patch_size`` (2D), then the ``intensity`` preset ("paper", "dino",
    "nnunet" or None), with any preset value overridden by keyword (p_noise, noise_std, p_blur, blur_sigma, p_scale,
    scale_factor, p_shift, shift, p_gamma, gamma, p_contrast, contrast, p_lowres, lowres_scale, p_solarize).
    ``translation``: maximum crop-centre offset from the image centre as a fraction of the patch size per axis
    (None: anywhere in the image). See the module docstring for how this approximates the paper."""
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 2:
        raise ValueError(f"augmentation is 2D: patch_size {patch_size} must have 2 entries")
    if intensity is not None and intensity not in INTENSITY_PRESETS:
        raise ValueError(f"intensity must be one of {sorted(INTENSITY_PRESETS)} or None, not {intensity!r}")
    params = dict(INTENSITY_PRESETS["paper" if intensity is None else intensity])
    unknown = set(overrides) - set(params)
    if unknown:
        raise TypeError(f"augmentation() got unexpected keyword arguments {sorted(unknown)}")
    params.update(overrides)

    max_shift = None if translation is None else [translation * p for p in patch_size]
    transforms = [
        CenteredSpatialTransform(
            patch_size,
            max_shift,
            p_elastic_deform=0,
            p_rotation=p_rotation,
            rotation=tuple(rotation),
            p_scaling=p_scaling,
            scaling=tuple(scale),
            p_synchronize_scaling_across_axes=1,
            mode_image="bilinear",
            padding_mode_image="zeros",
        )
    ]
    if mirror:
        transforms.append(MirrorTransform(allowed_axes=(0, 1)))
    if intensity is not None:

        def maybe(p, transform):
            if p > 0:
                transforms.append(transform if p >= 1 else RandomTransform(transform, p))

        maybe(
            params["p_noise"],
            GaussianNoiseTransform(noise_variance=params["noise_std"], p_per_channel=1, synchronize_channels=True),
        )
        # benchmark=False: the FFT-or-not benchmark depends on timing, which would break reproducibility
        nnunet = intensity == "nnunet"  # nnU-Net blurs and lowers the resolution of half the channels only
        maybe(
            params["p_blur"],
            GaussianBlurTransform(
                blur_sigma=params["blur_sigma"],
                synchronize_channels=False,
                synchronize_axes=False,
                p_per_channel=0.5 if nnunet else 1,
                benchmark=False,
            ),
        )
        maybe(
            params["p_scale"],
            MultiplicativeBrightnessTransform(
                multiplier_range=params["scale_factor"], synchronize_channels=True, p_per_channel=1
            ),
        )
        maybe(params["p_shift"], UniformShiftTransform(params["shift"]))
        maybe(
            params["p_contrast"],
            ContrastTransform(
                contrast_range=params["contrast"], preserve_range=True, synchronize_channels=False, p_per_channel=1
            ),
        )
        maybe(
            params["p_lowres"],
            SimulateLowResolutionTransform(
                scale=params["lowres_scale"],
                synchronize_channels=False,
                synchronize_axes=True,
                ignore_axes=None,
                allowed_channels=None,
                p_per_channel=0.5 if nnunet else 1,
            ),
        )
        maybe(
            params["p_gamma"],
            GammaTransform(
                gamma=params["gamma"],
                p_invert_image=0,
                synchronize_channels=False,
                p_per_channel=1,
                p_retain_stats=1 if nnunet else 0,
            ),
        )
        maybe(params["p_solarize"], SolarizeTransform())
    return ComposeTransforms(transforms)


def make_view(transform, image) -> torch.Tensor:
    """Applies one view transform to a (C, H, W) image (numpy or torch; never modified) and returns a contiguous
    float32 tensor (C, *patch). ``transform`` is a bgv2 transform (called as ``transform(image=x)["image"]``) or
    any callable taking ``image=`` and returning a dict with "image" or a tensor."""
    x = (
        torch.from_numpy(np.array(image, dtype=np.float32, copy=True))
        if isinstance(image, np.ndarray)
        else image.detach().to(torch.float32).clone()
    )
    out = transform(image=x)
    if isinstance(out, dict):
        out = out["image"]
    return out.to(torch.float32).contiguous()
