"""Pure metric functions: 95th-percentile Hausdorff distance, volumes, cardiac function measures and agreement.

Labels follow the raw layout (``nnunet_ssp.raw_layout``): 1 LV blood pool, 2 LV myocardium, 3 RV blood pool. The
MEASURES are also the phantom's ground-truth columns of subjects.csv; myocardial mass = myocardial volume x 1.05 g/ml.
"""

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from nnunet_ssp.raw_layout import LV_BLOODPOOL, LV_MYOCARDIUM, RV_BLOODPOOL

MYOCARDIUM_DENSITY_G_PER_ML = 1.05
MEASURES = ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "rv_edv_ml", "rv_esv_ml", "rv_ef_pct", "lv_myo_mass_g")
CLINICAL_LABELS = (LV_BLOODPOOL, LV_MYOCARDIUM, RV_BLOODPOOL)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside it (voxels on the image border count)."""
    mask = mask.astype(bool, copy=False)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _directed_surface_distances(from_surface: np.ndarray, to_surface: np.ndarray, spacing) -> np.ndarray:
    """Distance in mm from every voxel of ``from_surface`` to the nearest voxel of ``to_surface``."""
    return ndimage.distance_transform_edt(~to_surface, sampling=spacing)[from_surface]


def hd95(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) between the surfaces of two binary masks.

    Defined as the larger of the two directed 95th percentiles (reference surface to prediction surface and back;
    numpy's linear percentile), with exact Euclidean distances between voxel centres at ``spacing`` (mm per axis,
    in array order). NaN when either mask is empty.
    """
    if not (reference.any() and prediction.any()):
        return float("nan")
    ref_surface, pred_surface = surface_voxels(reference), surface_voxels(prediction)
    spacing = [float(s) for s in spacing]
    return float(
        max(
            np.percentile(_directed_surface_distances(ref_surface, pred_surface, spacing), 95),
            np.percentile(_directed_surface_distances(pred_surface, ref_surface, spacing), 95),
        )
    )


def label_volumes_ml(
    segmentation: np.ndarray, spacing: Sequence[float], labels: Sequence[int] = CLINICAL_LABELS
) -> Dict[int, float]:
    """Volume in ml of each label: voxel count x voxel volume (mm^3) / 1000."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    return {label: float(np.count_nonzero(segmentation == label)) * voxel_ml for label in labels}


def ejection_fraction_pct(edv: float, esv: float) -> float:
    """100 (EDV - ESV) / EDV; NaN when EDV is not positive."""
    return 100.0 * (edv - esv) / edv if edv > 0 else float("nan")


def clinical_measures(
    ed_volumes: Optional[Mapping[int, float]], es_volumes: Optional[Mapping[int, float]]
) -> Dict[str, float]:
    """LV/RV EDV, ESV (ml), EF (%) and LV myocardial mass at ED (g) from the label volumes of one subject.

    Either phase may be None (the subject has no such case): measures that need it are NaN.
    """
    nan = float("nan")
    ed = ed_volumes or {}
    es = es_volumes or {}
    out = {
        "lv_edv_ml": ed.get(LV_BLOODPOOL, nan),
        "lv_esv_ml": es.get(LV_BLOODPOOL, nan),
        "rv_edv_ml": ed.get(RV_BLOODPOOL, nan),
        "rv_esv_ml": es.get(RV_BLOODPOOL, nan),
        "lv_myo_mass_g": ed.get(LV_MYOCARDIUM, nan) * MYOCARDIUM_DENSITY_G_PER_ML,
    }
    out["lv_ef_pct"] = ejection_fraction_pct(out["lv_edv_ml"], out["lv_esv_ml"])
    out["rv_ef_pct"] = ejection_fraction_pct(out["rv_edv_ml"], out["rv_esv_ml"])
    return {k: out[k] for k in MEASURES}


def agreement(reference: Sequence[float], prediction: Sequence[float]) -> Dict[str, float]:
    """Bland-Altman agreement over the pairs where both values are finite.

    n, mean absolute error, bias = mean(prediction - reference), sd of the differences (ddof=1; NaN for n < 2)
    and the limits of agreement bias -/+ 1.96 sd.
    """
    reference, prediction = np.asarray(reference, dtype=float), np.asarray(prediction, dtype=float)
    valid = np.isfinite(reference) & np.isfinite(prediction)
    diff = prediction[valid] - reference[valid]
    n = int(diff.size)
    bias = float(diff.mean()) if n else float("nan")
    sd = float(diff.std(ddof=1)) if n > 1 else float("nan")
    return {
        "n": n,
        "mae": float(np.abs(diff).mean()) if n else float("nan"),
        "bias": bias,
        "sd": sd,
        "loa_low": bias - 1.96 * sd,
        "loa_high": bias + 1.96 * sd,
    }
