"""One simulated subject: a short-axis cine stack with labels at every frame, its acquisition parameters and
the ventricular volumes measured from its ED and ES label maps."""

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_ssp.evaluation.clinical import clinical_measures, label_volumes_ml
from nnunet_ssp.phantom.acquisition import VENDORS, acquire, sample_acquisition
from nnunet_ssp.phantom.anatomy import (
    MAX_SIZE,
    MIN_SIZE,
    PHENOTYPE_PROBABILITIES,
    PHENOTYPES,
    render_background,
    render_heart,
    sample_anatomy,
    tissue_texture,
)

DEFAULT_SIZE = 160


@dataclass
class Subject:
    """A simulated cine CMR short-axis stack.

    ``cine``: float32 (T, Z, Y, X) scanner values (integers in the int16 range, as stored); ``labels``: uint8
    (T, Z, Y, X), 0 background, 1 LV blood pool, 2 LV myocardium, 3 RV blood pool, at every frame; slice 0 is
    the base. ``spacing`` is (sx, sy, sz) in mm; ``volumes`` holds the clinical MEASURES taken from the ED and ES
    label maps."""

    subject_id: str
    cine: np.ndarray
    labels: np.ndarray
    spacing: Tuple[float, float, float]
    frame_interval_ms: float
    ed_frame: int
    es_frame: int
    vendor: str
    phenotype: str
    volumes: Dict[str, float]
    parameters: Dict[str, float] = field(default_factory=dict)  # drawn targets (EF etc.), for inspection

    @property
    def num_frames(self) -> int:
        return int(self.cine.shape[0])

    @property
    def num_slices(self) -> int:
        return int(self.cine.shape[1])

    def phase(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        """(image, labels) (Z, Y, X) of phase ``name``, "ED" or "ES"."""
        frame = {"ED": self.ed_frame, "ES": self.es_frame}[name]
        return self.cine[frame], self.labels[frame]


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of subject number ``index`` (1-based) of a cohort: independent of the cohort's size."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def measure_volumes(ed_labels: np.ndarray, es_labels: np.ndarray, spacing: Sequence[float]) -> Dict[str, float]:
    """Volumes (ml), EFs (%) and LV myocardial mass (g) from ED and ES label volumes, unrounded: the clinical
    measures of the evaluation, so the ground truth and the predictions are measured alike."""
    return clinical_measures(label_volumes_ml(ed_labels, spacing), label_volumes_ml(es_labels, spacing))


def simulate_subject(
    rng: Union[np.random.Generator, int, Sequence[int]],
    subject_id: str = "ph001",
    size: int = DEFAULT_SIZE,
    vendor: Optional[str] = None,
    phenotype: Optional[str] = None,
) -> Subject:
    """Simulates one subject in memory. ``rng``: a numpy Generator, or a seed (int or sequence of ints) for
    ``numpy.random.default_rng``. ``vendor`` (A-D) and ``phenotype`` (normal, dilated, hypertrophic) are drawn
    when not given. Same generator state and arguments -> identical arrays."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    size = int(size)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    drawn_vendor = VENDORS[int(rng.integers(len(VENDORS)))]
    drawn_phenotype = PHENOTYPES[int(rng.choice(len(PHENOTYPES), p=PHENOTYPE_PROBABILITIES))]
    vendor = drawn_vendor if vendor is None else vendor
    phenotype = drawn_phenotype if phenotype is None else phenotype
    if vendor not in VENDORS:
        raise ValueError(f"unknown vendor {vendor!r}; expected one of {', '.join(VENDORS)}")
    if phenotype not in PHENOTYPES:
        raise ValueError(f"unknown phenotype {phenotype!r}; expected one of {', '.join(PHENOTYPES)}")
    # independent streams for anatomy, acquisition and rendering, so that one part's draws never shift another's
    anat_rng, acq_rng, render_rng, noise_rng = (
        np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=4)
    )
    anat = sample_anatomy(anat_rng, size, phenotype)
    acq = sample_acquisition(acq_rng, vendor)
    background = render_background(anat, render_rng, acq.tissue)
    clean, labels = render_heart(anat, background, acq.tissue)
    clean *= tissue_texture(anat, render_rng)[None]
    cine = acquire(noise_rng, clean, acq)
    spacing = (anat.spacing_xy, anat.spacing_xy, anat.thickness)
    parameters = dict(
        target_lv_ef_pct=100.0 * anat.target_ef,
        target_rv_ef_pct=100.0 * anat.rv_target_ef,
        fov_mm=anat.spacing_xy * size,
        noise_sigma=acq.noise,
        bias_strength=acq.bias,
        gamma=acq.gamma,
        intensity_scale=acq.scale,
        has_lvot=float(anat.has_lvot),
    )
    return Subject(
        subject_id=subject_id,
        cine=cine,
        labels=labels,
        spacing=spacing,
        frame_interval_ms=anat.frame_interval_ms,
        ed_frame=anat.ed_frame,
        es_frame=anat.es_frame,
        vendor=vendor,
        phenotype=phenotype,
        volumes=measure_volumes(labels[anat.ed_frame], labels[anat.es_frame], spacing),
        parameters=parameters,
    )
