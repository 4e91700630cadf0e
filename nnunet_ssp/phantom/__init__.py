"""Synthetic short-axis cine CMR phantom, written as an nnU-Net v2 raw dataset.

``write_phantom_dataset`` writes a cohort (ED/ES cases with labels, 4D training cines, dataset.json,
subjects.csv); ``simulate_subject`` simulates one subject in memory.
"""
from nnunet_ssp.phantom.acquisition import VENDORS
from nnunet_ssp.phantom.anatomy import (BACKGROUND, LV_BLOODPOOL, LV_MYOCARDIUM, MAX_SIZE, MIN_SIZE, PHENOTYPES,
                                        RV_BLOODPOOL, contraction_curve)
from nnunet_ssp.phantom.dataset import (CINE_FOLDER, CSV_COLUMNS, LABELS, PHANTOM_VERSION, SUBJECTS_TABLE,
                                        subject_ids, write_phantom_dataset)
from nnunet_ssp.phantom.subject import (DEFAULT_SIZE, MYOCARDIUM_DENSITY_G_PER_ML, VOLUME_KEYS, Subject,
                                        measure_volumes, simulate_subject, subject_rng)

__all__ = [
    "write_phantom_dataset", "simulate_subject", "Subject", "measure_volumes", "subject_rng", "subject_ids",
    "contraction_curve", "DEFAULT_SIZE", "MIN_SIZE", "MAX_SIZE", "PHANTOM_VERSION", "LABELS", "VENDORS",
    "PHENOTYPES", "CSV_COLUMNS", "VOLUME_KEYS", "CINE_FOLDER", "SUBJECTS_TABLE", "MYOCARDIUM_DENSITY_G_PER_ML",
    "BACKGROUND", "LV_BLOODPOOL", "LV_MYOCARDIUM", "RV_BLOODPOOL",
]
