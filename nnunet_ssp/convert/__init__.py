"""Converters from public cardiac cine datasets to one raw dataset each, in the layout of ``nnunet_ssp.raw_layout``.

``nnunet_ssp convert {mnms,mnms2,acdc} SRC -d ID -n NAME [--overwrite]`` writes ``$nnUNet_raw/DatasetID_NAME``
with imagesTr/labelsTr and imagesTs/labelsTs (ED and ES of each labelled subject as cases ``{subject}_ED`` and
``{subject}_ES``), cineTr (the 4D cine of every training subject), dataset.json and subjects.csv, every stack with
the base at slice 0 (``nnunet_ssp.convert.orientation``). SRC and the train/test assignment of each dataset:

- ``mnms`` (M&Ms 2020, OpenDataset): SRC holds ``Training/Labeled``, ``Training/Unlabeled``, ``Validation``,
  ``Testing`` and ``211230_M&Ms_Dataset_information_diagnosis_opendataset.csv`` (all but Training/Labeled and the
  table optional). Training and Validation -> train, Testing -> test; Training/Unlabeled subjects without ground
  truth only give their cine (split ``unlabeled``).
- ``mnms2`` (M&Ms-2): SRC holds ``dataset/NNN/`` and ``dataset_information.csv``. Subjects with pathology NOR, HCM
  or LV are dropped (possible overlap with M&Ms); challenge training and validation (001-200) -> train, challenge
  test (201-360) -> test, which leaves the paper's 101-160 + 176-200 and 281-360.
- ``acdc`` (ACDC 2017): SRC holds ``training/patientNNN/`` and ``testing/patientNNN/``; training -> train,
  testing -> test.
"""

import importlib
import os
from functools import partial
from typing import Callable, List, Sequence

from nnunet_ssp.errors import SSPError

DATASETS = ("mnms", "mnms2", "acdc")


def split_file_test_set(loaders: Sequence[Callable], split_file: str) -> List[Callable]:
    """The loaders with the train/test assignment of a split YAML (the paper's files): its ``test`` subjects are
    test cases, every other labelled subject a training case. The paper draws its M&Ms test subjects from the whole
    release, Training included. A test subject the source lacks, or one without ground truth, is an error (raised
    when the last subject has loaded, before anything is moved into place)."""
    from dataclasses import replace

    from nnunet_ssp.raw_layout import TEST, TRAIN, UNLABELED
    from nnunet_ssp.splits import read_split_file

    wanted, seen = set(read_split_file(split_file).get("test", [])), set()

    def assign(load: Callable, last: bool):
        subject = load()
        if subject.subject in wanted:
            if subject.split == UNLABELED:
                raise SSPError(f"{split_file}: test subject {subject.subject} has no ground truth in the source")
            seen.add(subject.subject)
            subject = replace(subject, split=TEST)
        elif subject.split == TEST:
            subject = replace(subject, split=TRAIN)
        missing = sorted(wanted - seen) if last else []
        if missing:
            raise SSPError(
                f"{split_file}: test subject(s) {', '.join(missing[:3])} not in the source ({len(missing)} in all)"
            )
        return subject

    return [partial(assign, load, i == len(loaders) - 1) for i, load in enumerate(loaders)]


def convert_dataset(
    dataset: str,
    source: str,
    dataset_id: int,
    name: str,
    overwrite: bool = False,
    raw_root: str = None,
    test_split_file: str = None,
) -> str:
    """Converts the ``dataset`` (one of DATASETS) distributed in folder ``source`` to
    ``{raw_root}/Dataset{dataset_id:03d}_{name}`` (raw_root: $nnUNet_raw by default) and returns its path;
    ``test_split_file``: take the test subjects from a split YAML (see :func:`split_file_test_set`)."""
    from nnunet_ssp.convert.common import write_dataset
    from nnunet_ssp.env import nnunet_path
    from nnunet_ssp.raw_layout import target_folder

    if dataset not in DATASETS:
        raise SSPError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if raw_root is None:
        raw_root = nnunet_path("nnUNet_raw")
    target = target_folder(raw_root, dataset_id, name, overwrite)
    source = os.path.abspath(source)
    if not os.path.isdir(source):
        raise SSPError(f"{source}: not a folder")
    module = importlib.import_module(f"nnunet_ssp.convert.{dataset}")
    loaders = module.list_subjects(source)
    if not loaders:
        raise SSPError(f"{source}: no {dataset} subjects found (layout: see nnunet_ssp convert --help)")
    if test_split_file:
        loaders = split_file_test_set(loaders, test_split_file)
    return write_dataset(target, name, module.DESCRIPTION, loaders, {"dataset": dataset, "folder": source})
