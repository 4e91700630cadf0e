"""The SSP checkpoint contract: one self-describing file per pretraining run.

A contract checkpoint is a plain dict of tensors and JSON-able metadata, so it loads with
``torch.load(..., weights_only=True)`` and can never execute code. It holds:

- ``format`` / ``format_version``;
- ``method`` and ``parts`` (``["encoder"]`` or ``["encoder", "decoder"]``);
- ``network_weights``: CPU tensors of those parts under nnU-Net's own state-dict keys;
- ``network``: architecture class, kwargs and input channels (a :class:`NetworkSpec`);
- ``plans``: dataset, plans identifier, configuration, patch size, spacing, normalization;
- ``pretraining`` (settings) and ``data`` (summary of what it was trained on);
- ``versions`` of the libraries that wrote it, and ``created`` (UTC time).

Saving first proves that the weights load into a fresh network built from the plans.
"""

import hashlib
import os
import pickle
import platform
import re
from datetime import datetime, timezone
from importlib import metadata
from typing import Sequence

import torch

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import torch_save_atomic
from nnunet_ssp.network import PARTS, NetworkSpec, PlannedConfiguration, check_fit, extract_parts

FORMAT_NAME = "nnunet_ssp.checkpoint"
FORMAT_VERSION = 1
FINAL_CHECKPOINT = "checkpoint_final.pth"
CHECKPOINT_ENV = "nnUNet_ssp_checkpoint"
#: what a fine-tuning trainer loaded, written into its fold folder (``fold_X/ssp_init.json``; ``method`` among it)
SSP_INIT_FILE = "ssp_init.json"


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("nnunet-ssp", "nnunetv2", "torch", "dynamic_network_architectures", "batchgeneratorsv2"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def default_checkpoint_folder(
    results_root: str, dataset_name: str, method: str, plans_name: str, configuration: str
) -> str:
    """``$nnUNet_results/<Dataset>/ssp/<method>__<plans>__<configuration>``: where ssp_pretrain writes and the
    trainers look."""
    return os.path.join(results_root, dataset_name, "ssp", f"{method}__{plans_name}__{configuration}")


def build_checkpoint(
    network: torch.nn.Module,
    target: PlannedConfiguration,
    method: str,
    parts: Sequence[str],
    pretraining: dict = None,
    data: dict = None,
) -> dict:
    """The contract dict for ``network`` (its ``parts`` only, those the ``method`` pretrained), verified against a
    fresh network from the plans."""
    _check_method_and_parts(method, parts, f"{method} network")
    spec = target.network_spec
    weights = extract_parts(network, parts)
    check_fit(weights, spec.build(num_output_channels=target.num_segmentation_heads), parts, source=f"{method} network")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": method,
        "parts": list(parts),
        "network_weights": weights,
        "network": spec.as_dict(),
        "plans": target.summary(),
        "pretraining": dict(pretraining or {}),
        "data": dict(data or {}),
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_checkpoint(
    path: str,
    network: torch.nn.Module,
    target: PlannedConfiguration,
    method: str,
    parts: Sequence[str],
    pretraining: dict = None,
    data: dict = None,
) -> dict:
    """Writes a contract checkpoint atomically and returns it."""
    checkpoint = build_checkpoint(network, target, method, parts, pretraining, data)
    torch_save_atomic(checkpoint, path)
    return checkpoint


def _check_method_and_parts(method, parts, source: str) -> None:
    """A method key and a non-empty list of distinct network parts (``nnunet_ssp.network.PARTS``), else SSPError."""
    if (
        not isinstance(method, str)
        or not method.isidentifier()
        or not isinstance(parts, (list, tuple))
        or not parts
        or len(set(parts)) != len(parts)
        or not set(parts) <= set(PARTS)
    ):
        raise SSPError(f"{source}: invalid method {method!r} or parts {parts!r} (parts: some of {', '.join(PARTS)})")


def load_weights_only(path: str):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain data only, so a file that would run code
    when unpickled is refused before any of it runs. Any failure is an SSPError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise SSPError(
            f"{path}: refused to load: unpickling it would call "
            f"{needs.group(1) if needs else 'code'}, which a weights-only load does not allow"
        ) from None
    except Exception as e:  # zip/pickle corruption: torch raises several unrelated types here
        raise SSPError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_sentence(e)})"
        ) from None


def _first_sentence(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else "no details"


def load_checkpoint(path: str) -> dict:
    """Loads and validates a contract checkpoint with ``weights_only=True``; SSPError for anything else."""
    if not os.path.isfile(path):
        raise SSPError(f"{path}: checkpoint not found")
    checkpoint = load_weights_only(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT_NAME:
        raise SSPError(
            f"{path}: not an nnunet_ssp checkpoint (no '{FORMAT_NAME}' format marker); "
            f"nnU-Net's own checkpoints go to nnUNetv2_train -pretrained_weights instead"
        )
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise SSPError(
            f"{path}: checkpoint format version {checkpoint.get('format_version')} is not supported "
            f"(this nnunet_ssp reads version {FORMAT_VERSION})"
        )
    missing = [k for k in ("method", "parts", "network_weights", "network", "plans") if k not in checkpoint]
    if missing:
        raise SSPError(f"{path}: checkpoint lacks {', '.join(missing)}")
    _check_method_and_parts(checkpoint["method"], checkpoint["parts"], path)
    weights = checkpoint["network_weights"]
    if not isinstance(weights, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise SSPError(f"{path}: network_weights is not a dict of named tensors")
    return checkpoint


def verify_checkpoint(checkpoint: dict, target: PlannedConfiguration, parts, source: str) -> list:
    """Raises SSPError unless ``parts`` of the checkpoint fit the network of ``target``.

    Returns warnings for differences that leave the weights loadable: another dataset or plans (a checkpoint of a
    pooled corpus, plans moved between datasets), patch size, spacing, normalization.
    """
    absent = [p for p in parts if p not in checkpoint["parts"]]
    if absent:
        raise SSPError(
            f"{source}: the checkpoint ({checkpoint['method']}) holds {'+'.join(checkpoint['parts'])} "
            f"but {'+'.join(absent)} is needed"
        )
    spec = target.network_spec
    try:
        differences = NetworkSpec.from_dict(checkpoint["network"]).differences(spec)
    except (KeyError, TypeError, ValueError) as e:
        raise SSPError(f"{source}: the checkpoint's network record is malformed ({type(e).__name__}: {e})") from None
    if differences:
        raise SSPError(
            f"{source}: checkpoint built for other plans ({checkpoint['plans'].get('plans_name')} of "
            f"{checkpoint['plans'].get('dataset_name')}, {checkpoint['plans'].get('configuration')}) "
            f"does not fit {target.plans_name} of {target.dataset_name} ({target.configuration}): "
            + "; ".join(differences)
        )
    check_fit(
        checkpoint["network_weights"], spec.build(num_output_channels=target.num_segmentation_heads), parts, source
    )
    ours, theirs = target.summary(), checkpoint["plans"]
    return [
        f"{source}: pretrained with {key} {theirs.get(key)}, fine-tuning uses {ours[key]}"
        for key in ("dataset_name", "plans_name", "spacing", "normalization_schemes", "patch_size")
        if theirs.get(key) != ours[key]
    ]


def sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
