"""Width-scaled nnU-Net plans: the planned network with its features per stage scaled, for CPU miniatures.

``<base>_w<W>.json`` (e.g. ``nnUNetPlans_w025.json``) sits beside nnU-Net's ``<base>.json`` and differs from it only in
``plans_name``, every configuration's ``features_per_stage`` (times W, rounded, at least 1) and the record
``nnunet_ssp_width``. Its ``data_identifier`` is the base plans', so ``nnUNetv2_train -p <base>_w<W>`` and
``ssp_pretrain -p <base>_w<W>`` train on the data nnUNetv2_plan_and_preprocess wrote for the base plans. Real-data
reproduction keeps nnU-Net's plans as planned.
"""

import math
import os
from typing import Dict, List, Optional

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import load_json_file, save_json_atomic
from nnunet_ssp.network import preprocessed_dataset_folder

#: top-level key of a width-scaled plans file: {"base": base plans identifier, "width": factor}
WIDTH_KEY = "nnunet_ssp_width"


def width_plans_identifier(base: str, width: float) -> str:
    """The identifier of ``base`` scaled by ``width``: "w" and the width's digits (0.25 -> ``<base>_w025``)."""
    if not (math.isfinite(width) and width > 0):
        raise SSPError(f"--width {width:g}: must be a positive number (the factor on the planned features per stage)")
    return f"{base}_w{format(width, 'g').replace('.', '')}"


def plans_width(plans: dict) -> Optional[float]:
    """The width a plans dict was scaled by (:func:`write_width_plans`); None for plans as nnU-Net planned them."""
    record = plans.get(WIDTH_KEY)
    return float(record["width"]) if record else None


def features_per_stage(plans: dict) -> Dict[str, List[int]]:
    """``features_per_stage`` of each configuration that defines its architecture (others inherit one)."""
    return {
        name: configuration["architecture"]["arch_kwargs"]["features_per_stage"]
        for name, configuration in plans["configurations"].items()
        if "architecture" in configuration
    }


def write_width_plans(dataset: str, width: float, base: str = "nnUNetPlans") -> str:
    """Writes ``<base>_w<W>.json`` (see the module) beside the dataset's ``<base>.json`` and returns its path.

    Rewriting the same width writes the same file; an existing file of that name that is not these plans is refused,
    as are base plans that are themselves width-scaled."""
    identifier = width_plans_identifier(base, width)
    folder = preprocessed_dataset_folder(dataset)
    base_file, path = os.path.join(folder, f"{base}.json"), os.path.join(folder, f"{identifier}.json")
    if not os.path.isfile(base_file):
        raise SSPError(f"{base_file}: plans not found; run nnUNetv2_plan_and_preprocess -d {dataset} first")
    plans = load_json_file(base_file, dict)
    if plans_width(plans) is not None:
        raise SSPError(
            f"{base_file}: already width-scaled ({plans[WIDTH_KEY]}); scale {plans[WIDTH_KEY]['base']} instead"
        )
    record = {"base": base, "width": width}
    if os.path.isfile(path) and load_json_file(path, dict).get(WIDTH_KEY) != record:
        raise SSPError(f"{path}: exists and is not width {width:g} plans of {base}; remove it to write them")
    try:
        for name in features_per_stage(plans):
            arch_kwargs = plans["configurations"][name]["architecture"]["arch_kwargs"]
            arch_kwargs["features_per_stage"] = [max(1, round(f * width)) for f in arch_kwargs["features_per_stage"]]
    except (KeyError, TypeError) as e:
        raise SSPError(
            f"{base_file}: not nnU-Net v2 plans with an architecture per configuration ({type(e).__name__}: {e})"
        ) from None
    save_json_atomic({**plans, "plans_name": identifier, WIDTH_KEY: record}, path)
    return path
