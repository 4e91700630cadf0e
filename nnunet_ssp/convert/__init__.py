"""Converters from public cardiac cine datasets to one nnU-Net raw dataset each, in the phantom's layout.

``nnunet_ssp convert {mnms,mnms2,acdc} SRC -d ID -n NAME [--overwrite]`` writes ``$nnUNet_raw/DatasetID_NAME``
with imagesTr/labelsTr and imagesTs/labelsTs (ED and ES of each labelled subject as cases ``{subject}_ED`` and
``{subject}_ES``), cineTr (the 4D cine of every training subject), dataset.json and subjects.csv; see
``nnunet_ssp.convert.common``. SRC and the train/test assignment of each dataset:

- ``mnms`` (M&Ms 2020, OpenDataset): SRC holds ``Training/Labeled``, ``Training/Unlabeled``, ``Validation``,
  ``Testing`` and ``211230_M&Ms_Dataset_information_diagnosis_opendataset.csv``. Training and Validation -> train,
  Testing -> test; Training/Unlabeled subjects without ground truth only give their cine (split ``unlabeled``).
- ``mnms2`` (M&Ms-2): SRC holds ``dataset/NNN/`` and ``dataset_information.csv``. Subjects with pathology NOR, HCM
  or LV are dropped (possible overlap with M&Ms); challenge training and validation (001-200) -> train, challenge
  test (201-360) -> test, which leaves the paper's 101-160 + 176-200 and 281-360.
- ``acdc`` (ACDC 2017): SRC holds ``training/patientNNN/`` and ``testing/patientNNN/``; training -> train,
  testing -> test.
"""
import importlib
import os

from nnunet_ssp.errors import SSPError

DATASETS = ("mnms", "mnms2", "acdc")


def convert_dataset(dataset: str, source: str, dataset_id: int, name: str, overwrite: bool = False,
                    raw_root: str = None) -> str:
    """Converts the ``dataset`` (one of DATASETS) distributed in folder ``source`` to
    ``{raw_root}/Dataset{dataset_id:03d}_{name}`` (raw_root: $nnUNet_raw by default) and returns its path."""
    from nnunet_ssp.convert.common import target_folder, write_dataset
    if dataset not in DATASETS:
        raise SSPError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if raw_root is None:
        raw_root = os.environ.get("nnUNet_raw")
        if not raw_root:
            raise SSPError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (see README)")
    target = target_folder(raw_root, dataset_id, name, overwrite)
    source = os.path.abspath(source)
    if not os.path.isdir(source):
        raise SSPError(f"{source}: not a folder")
    module = importlib.import_module(f"nnunet_ssp.convert.{dataset}")
    loaders = module.list_subjects(source)
    return write_dataset(target, name, module.DESCRIPTION, loaders, {"dataset": dataset, "folder": source})
