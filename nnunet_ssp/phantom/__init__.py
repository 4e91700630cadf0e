"""Synthetic short-axis cine CMR phantom, written as a raw dataset in the layout of ``nnunet_ssp.raw_layout``.

``write_phantom_dataset`` writes a cohort (ED/ES cases with labels, 4D training cines, dataset.json,
subjects.csv); ``simulate_subject`` simulates one subject in memory.
"""

from nnunet_ssp.phantom.acquisition import VENDORS
from nnunet_ssp.phantom.anatomy import MAX_SIZE, MIN_SIZE, PHENOTYPES, contraction_curve
from nnunet_ssp.phantom.dataset import CSV_COLUMNS, PHANTOM_VERSION, VOLUME_KEYS, subject_ids, write_phantom_dataset
from nnunet_ssp.phantom.subject import DEFAULT_SIZE, Subject, measure_volumes, simulate_subject, subject_rng

__all__ = [
    "write_phantom_dataset",
    "simulate_subject",
    "Subject",
    "measure_volumes",
    "subject_rng",
    "subject_ids",
    "contraction_curve",
    "DEFAULT_SIZE",
    "MIN_SIZE",
    "MAX_SIZE",
    "PHANTOM_VERSION",
    "VENDORS",
    "PHENOTYPES",
    "CSV_COLUMNS",
    "VOLUME_KEYS",
]
