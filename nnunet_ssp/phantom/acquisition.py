"""Scanner side of the cine phantom: vendor contrast, coil bias field, Rician noise and intensity scaling.

Four vendors A-D differ in tissue contrast (bSSFP intensity ratios relative to blood, and a gamma), noise level,
bias-field strength and the integer range of the stored images, as scanners from different manufacturers do.
"""

from dataclasses import dataclass
from typing import Dict

import numpy as np
from scipy import ndimage

VENDORS = ("A", "B", "C", "D")
PSF_SIGMA_PX = 0.5

# tissue intensities relative to blood (bSSFP: blood and fat bright, myocardium and muscle dark, lung black)
_VENDOR_TABLE = {
    "A": dict(
        gamma=1.0,
        myocardium=0.30,
        fat=0.85,
        liver=0.40,
        muscle=0.27,
        lung=0.035,
        mediastinum=0.45,
        noise=0.035,
        bias=0.25,
        scale=900.0,
    ),
    "B": dict(
        gamma=0.8,
        myocardium=0.25,
        fat=0.95,
        liver=0.45,
        muscle=0.23,
        lung=0.05,
        mediastinum=0.50,
        noise=0.05,
        bias=0.40,
        scale=300.0,
    ),
    "C": dict(
        gamma=1.25,
        myocardium=0.34,
        fat=0.75,
        liver=0.36,
        muscle=0.31,
        lung=0.03,
        mediastinum=0.40,
        noise=0.03,
        bias=0.18,
        scale=2400.0,
    ),
    "D": dict(
        gamma=0.95,
        myocardium=0.28,
        fat=0.90,
        liver=0.42,
        muscle=0.26,
        lung=0.045,
        mediastinum=0.48,
        noise=0.06,
        bias=0.33,
        scale=600.0,
    ),
}


@dataclass
class Acquisition:
    vendor: str
    tissue: Dict[str, float]
    gamma: float
    noise: float  # Rician noise sigma relative to the blood signal
    bias: float  # strength of the multiplicative bias field (log scale)
    scale: float  # stored value of unit (blood) signal


def sample_acquisition(rng: np.random.Generator, vendor: str) -> Acquisition:
    v = _VENDOR_TABLE[vendor]
    u = rng.uniform
    j = lambda value, spread=0.1: value * u(1.0 - spread, 1.0 + spread)  # noqa: E731
    myo = j(v["myocardium"])
    tissue = dict(
        blood=1.0,
        rv_blood=u(0.92, 1.0),
        myocardium=myo,
        fat=j(v["fat"]),
        liver=j(v["liver"]),
        muscle=j(v["muscle"]),
        lung=j(v["lung"], 0.3),
        lung_vessel=j(0.22, 0.2),
        mediastinum=j(v["mediastinum"]),
        bone=j(0.08, 0.3),
        marrow=j(0.5, 0.15),
        csf=j(0.9, 0.1),
        stomach=j(0.55, 0.3),
    )
    return Acquisition(
        vendor=vendor,
        tissue=tissue,
        gamma=j(v["gamma"], 0.05),
        noise=j(v["noise"], 0.2),
        bias=j(v["bias"], 0.2),
        scale=j(v["scale"], 0.2),
    )


def bias_field(rng: np.random.Generator, shape_zyx, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(strength * F), F a random quadratic in normalized (x, y) plus a gentle
    through-plane trend, scaled to max |F| = 1 (surface-coil shading)."""
    nz, ny, nx = shape_zyx
    y = np.linspace(-1.0, 1.0, ny)[None, :, None]
    x = np.linspace(-1.0, 1.0, nx)[None, None, :]
    z = np.linspace(-1.0, 1.0, nz)[:, None, None]
    c = rng.uniform(-1.0, 1.0, size=7)
    f = c[0] * x + c[1] * y + 0.7 * (c[2] * x * x + c[3] * y * y + c[4] * x * y) + 0.3 * c[5] * z + 0.2 * c[6] * z * y
    f = f / max(float(np.abs(f).max()), 1e-6)
    return np.exp(strength * f).astype(np.float32)


def acquire(rng: np.random.Generator, clean: np.ndarray, acq: Acquisition) -> np.ndarray:
    """Noiseless tissue image (T, Z, Y, X) -> stored scanner values: in-plane point-spread blur, vendor gamma,
    bias field, Rician noise (magnitude of complex Gaussian, independent per frame), scaling and rounding to
    integers (float32 array holding int16-range integers)."""
    img = ndimage.gaussian_filter(
        np.asarray(clean, dtype=np.float32), (0.0, 0.0, PSF_SIGMA_PX, PSF_SIGMA_PX), truncate=3.0
    )
    np.maximum(img, 0.0, out=img)
    if acq.gamma != 1.0:
        np.power(img, np.float32(acq.gamma), out=img)
    img *= bias_field(rng, img.shape[1:], acq.bias)[None]
    sigma = np.float32(acq.noise)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= sigma
    img += noise
    np.square(img, out=img)
    rng.standard_normal(img.shape, dtype=np.float32, out=noise)
    noise *= sigma
    np.square(noise, out=noise)
    img += noise
    del noise
    np.sqrt(img, out=img)
    img *= np.float32(acq.scale)
    np.rint(img, out=img)
    np.clip(img, 0.0, 32767.0, out=img)
    return img
