"""The nnU-Net network as the plans define it, and its parts (encoder, decoder, heads).

Networks are always built by nnU-Net's own ``get_network_from_plans``; nothing here hand-builds an architecture.
State-dict keys are nnU-Net's own: ``encoder.*`` (the encoder), ``decoder.*`` minus the ``decoder.encoder.*``
aliases and the ``decoder.seg_layers.*`` heads (the decoder).
"""

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_ssp.errors import SSPError

PARTS = ("encoder", "decoder")


def part_of_key(key: str) -> Optional[str]:
    """Which transferable part a state-dict key belongs to; None for aliases and segmentation heads."""
    if key.startswith("encoder."):
        return "encoder"
    if key.startswith("decoder.") and not key.startswith(("decoder.encoder.", "decoder.seg_layers.")):
        return "decoder"
    return None


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare module behind DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(network, "module") and isinstance(network.module, torch.nn.Module):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def extract_parts(network: torch.nn.Module, parts: Iterable[str]) -> Dict[str, torch.Tensor]:
    """CPU copies of the tensors (parameters and buffers) of ``parts``, keyed by nnU-Net's state-dict names."""
    parts = set(parts)
    return {k: v.detach().cpu().clone() for k, v in unwrap(network).state_dict().items() if part_of_key(k) in parts}


@dataclass
class LoadReport:
    parts: Tuple[str, ...]
    tensors_per_part: Dict[str, int]
    parameters_per_part: Dict[str, int]

    def as_dict(self) -> dict:
        return {"parts": list(self.parts), "tensors": self.tensors_per_part, "parameters": self.parameters_per_part}

    def __str__(self) -> str:
        return ", ".join(
            f"{p}: {self.tensors_per_part[p]} tensors, {self.parameters_per_part[p]:,} values" for p in self.parts
        )


def check_fit(weights: Dict[str, torch.Tensor], network: torch.nn.Module, parts: Iterable[str], source: str) -> None:
    """Raises SSPError unless ``weights`` holds exactly the keys and shapes of ``parts`` of ``network``."""
    parts = tuple(parts)
    expected = {k: tuple(v.shape) for k, v in unwrap(network).state_dict().items() if part_of_key(k) in parts}
    given = {k: tuple(v.shape) for k, v in weights.items() if part_of_key(k) in parts}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    if not (missing or unexpected or wrong_shape):
        return
    details = []
    if missing:
        details.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        details.append(
            f"{len(wrong_shape)} with other shapes (e.g. "
            + ", ".join(f"{k}: checkpoint {list(given[k])} vs network {list(expected[k])}" for k in wrong_shape[:3])
            + ")"
        )
    raise SSPError(f"{source}: weights do not fit the target network's {'+'.join(parts)}: " + "; ".join(details))


def load_parts(
    network: torch.nn.Module, weights: Dict[str, torch.Tensor], parts: Iterable[str], source: str
) -> LoadReport:
    """Copies ``parts`` of ``weights`` into ``network`` in place (optimizer and compiled graphs stay valid)."""
    parts = tuple(parts)
    check_fit(weights, network, parts, source)
    bare = unwrap(network)
    selected = {k: v for k, v in weights.items() if part_of_key(k) in parts}
    result = bare.load_state_dict(selected, strict=False)
    not_loaded = [k for k in result.missing_keys if part_of_key(k) in parts]
    assert not not_loaded and not result.unexpected_keys, (not_loaded, result.unexpected_keys)
    return LoadReport(
        parts,
        {p: sum(part_of_key(k) == p for k in selected) for p in parts},
        {p: sum(v.numel() for k, v in selected.items() if part_of_key(k) == p) for p in parts},
    )


def tensor_digests(network: torch.nn.Module, parts: Iterable[str]) -> Dict[str, str]:
    """Short sha256 of every tensor of ``parts``, read from the network itself: a record of what it holds."""
    parts = set(parts)
    return {
        k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        for k, v in unwrap(network).state_dict().items()
        if part_of_key(k) in parts
    }


def _json_normalized(obj):
    return json.loads(json.dumps(obj))


@dataclass(frozen=True)
class NetworkSpec:
    """Everything that fixes the network's weights: the plans' architecture and the number of input channels."""

    network_class_name: str
    arch_kwargs: dict
    arch_kwargs_requiring_import: tuple
    num_input_channels: int

    def build(self, num_output_channels: int, deep_supervision: bool = False) -> torch.nn.Module:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        return get_network_from_plans(
            self.network_class_name,
            self.arch_kwargs,
            self.arch_kwargs_requiring_import,
            self.num_input_channels,
            num_output_channels,
            allow_init=True,
            deep_supervision=deep_supervision,
        )

    def as_dict(self) -> dict:
        return {
            "network_class_name": self.network_class_name,
            "arch_kwargs": _json_normalized(self.arch_kwargs),
            "arch_kwargs_requiring_import": list(self.arch_kwargs_requiring_import),
            "num_input_channels": self.num_input_channels,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkSpec":
        return cls(
            d["network_class_name"],
            d["arch_kwargs"],
            tuple(d["arch_kwargs_requiring_import"]),
            int(d["num_input_channels"]),
        )

    def differences(self, other: "NetworkSpec") -> list:
        """Human-readable differences that would make weights of one unusable in the other."""
        a, b = self.as_dict(), other.as_dict()
        out = []
        for key in ("network_class_name", "num_input_channels"):
            if a[key] != b[key]:
                out.append(f"{key} {a[key]} vs {b[key]}")
        for key in sorted(set(a["arch_kwargs"]) | set(b["arch_kwargs"])):
            if a["arch_kwargs"].get(key) != b["arch_kwargs"].get(key):
                out.append(f"{key} {a['arch_kwargs'].get(key)} vs {b['arch_kwargs'].get(key)}")
        return out


def preprocessed_dataset_folder(dataset: str) -> str:
    """``$nnUNet_preprocessed/<DatasetXXX_Name>`` for a dataset name or id, with clear errors."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_ssp.env import nnunet_path

    preprocessed = nnunet_path("nnUNet_preprocessed")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise SSPError(f"dataset '{dataset}': {str(e).splitlines()[0]}") from None
    return os.path.join(preprocessed, dataset_name)


class PlannedConfiguration:
    """One nnU-Net plans + configuration + dataset.json: the network SSP pretrains and fine-tuning uses."""

    def __init__(self, plans, configuration: str, dataset_json: dict):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.plans_manager = plans if isinstance(plans, PlansManager) else PlansManager(plans)
        if configuration not in self.plans_manager.available_configurations:
            raise SSPError(
                f"plans {self.plans_manager.plans_name}: no configuration '{configuration}' "
                f"(available: {', '.join(self.plans_manager.available_configurations)})"
            )
        self.configuration = configuration
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.dataset_json = dataset_json

    @classmethod
    def from_preprocessed(
        cls, dataset: str, plans_identifier: str = "nnUNetPlans", configuration: str = "2d"
    ) -> "PlannedConfiguration":
        """Reads ``$nnUNet_preprocessed/<Dataset>/<plans>.json`` and its dataset.json."""
        folder = preprocessed_dataset_folder(dataset)
        plans_file = os.path.join(folder, f"{plans_identifier}.json")
        if not os.path.isfile(plans_file):
            raise SSPError(
                f"{plans_file}: plans not found; run nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration} first"
            )
        return cls(plans_file, configuration, load_json(os.path.join(folder, "dataset.json")))

    @property
    def dataset_name(self) -> str:
        return self.plans_manager.dataset_name

    @property
    def plans_name(self) -> str:
        return self.plans_manager.plans_name

    @property
    def network_spec(self) -> NetworkSpec:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        cm = self.configuration_manager
        return NetworkSpec(
            cm.network_arch_class_name,
            cm.network_arch_init_kwargs,
            tuple(cm.network_arch_init_kwargs_req_import),
            determine_num_input_channels(self.plans_manager, cm, self.dataset_json),
        )

    @property
    def num_segmentation_heads(self) -> int:
        return self.plans_manager.get_label_manager(self.dataset_json).num_segmentation_heads

    def summary(self) -> dict:
        """The plans facts recorded in a checkpoint: identity, patch size, spacing and normalization."""
        cm = self.configuration_manager
        return _json_normalized(
            {
                "dataset_name": self.dataset_name,
                "plans_name": self.plans_name,
                "configuration": self.configuration,
                "data_identifier": cm.data_identifier,
                "patch_size": list(cm.patch_size),
                "spacing": list(cm.spacing),
                "normalization_schemes": list(cm.normalization_schemes),
                "use_mask_for_norm": list(cm.use_mask_for_norm),
                "transpose_forward": list(self.plans_manager.transpose_forward),
            }
        )
