"""Run assembly: what a pretraining run is made of before it trains, for ``ssp_pretrain``, the benchmarks and the
tests alike: its settings (the method's recipe with the run's overrides), the global batch sized to memory, the
learning rate scaled to it, the slice cache's place, and the Pretrainer on the cache."""

import os
import sys
from typing import Optional

from nnunet_ssp.errors import SSPError
from nnunet_ssp.network import PlannedConfiguration
from pretraining import distributed
from pretraining.loop import Pretrainer, PretrainSettings
from pretraining.methods.base import Hyperparameters, SSPMethod

#: slices of the decoder-conditioning probe (of the k-NN probe's number, when that is smaller)
CONDITIONING_SLICES = 64


def scaled_lr(defaults: Hyperparameters, batch_size: int) -> float:
    """The method's learning rate scaled linearly from its batch size to ``batch_size`` (the linear scaling rule)."""
    return defaults.lr * batch_size / defaults.batch_size


def cache_folder(target: PlannedConfiguration) -> str:
    """Where the slice cache of ``target``'s plans and configuration lives: next to nnU-Net's preprocessed data."""
    return os.path.join(
        os.environ["nnUNet_preprocessed"],
        target.dataset_name,
        f"ssp_cache__{target.configuration_manager.data_identifier}",
    )


def global_batch_size(method: SSPMethod, target: PlannedConfiguration, device: str, batch_size: Optional[int]) -> int:
    """The global batch: ``batch_size`` (--batch-size), or the method's default halved until each process's share
    fits in its device's memory (on every device of a distributed run). Refused unless it splits evenly over the
    processes."""
    from pretraining.memory import affordable_batch_size

    world = distributed.world_size()
    requested = batch_size or method.defaults.batch_size
    if requested % world:
        given = "--batch-size" if batch_size is not None else f"the {method.name} default batch size"
        raise SSPError(
            f"{given} {requested} is the global batch and must split evenly over the {world} processes "
            f"(set --batch-size to a multiple of {world})"
        )
    if batch_size is not None:
        return requested
    own_device = distributed.device(device)
    sizing_model = method.build_model().to(own_device)
    fitted = affordable_batch_size(
        method, sizing_model, target.network_spec.num_input_channels, requested // world, own_device
    )
    fitted = distributed.min_int(fitted, own_device) * world
    if fitted < requested and distributed.is_main():
        print(
            f"warning: batch size {requested} would not fit in {device} memory; using {fitted} "
            f"(set --batch-size to choose)",
            file=sys.stderr,
        )
    return fitted


def too_few_slices(where: str, slices: str, batch_size: int) -> SSPError:
    return SSPError(f"{where}: {slices} slices, fewer than one batch of {batch_size}; lower --batch-size or add data")


def open_cache(target: PlannedConfiguration, sources, num_processes: int):
    """The slice cache of ``sources`` (built or reused in :func:`cache_folder`); in a distributed run rank 0 builds
    it while the others wait, then read it."""
    from pretraining.data.cache import build_or_load_cache

    folder = cache_folder(target)
    if distributed.is_main():
        cache = build_or_load_cache(target, sources, folder, num_processes=max(1, num_processes))
    distributed.barrier()
    if not distributed.is_main():
        cache = build_or_load_cache(target, sources, folder, num_processes=1, progress=False)
    return cache


def make_pretrainer(
    method: SSPMethod,
    target: PlannedConfiguration,
    cache,
    settings: PretrainSettings,
    output: str,
    probe_slices: int = 0,
    seg_probe: bool = False,
):
    """A Pretrainer of ``method`` on ``cache`` (its views, the cache's summary) writing to ``output``, with probes on
    rank 0: a k-NN probe of ``probe_slices`` slices (0: none), for a method that pretrains the decoder the decoder's
    conditioning on :data:`CONDITIONING_SLICES` of them, and, with ``seg_probe``, the segmentation probe when the
    dataset has labelled training cases (its log says which, or why not). A method that pretrains the decoder gets
    :data:`CONDITIONING_SLICES` un-augmented slices to calibrate its checkpoint's network on."""
    from pretraining.conditioning import calibration_slices, make_conditioning_probe
    from pretraining.data.loader import SliceViewDataset
    from pretraining.probe import make_probe
    from pretraining.seg_probe import make_seg_probe

    probes, note, calibration = [], None, None
    if distributed.is_main():
        if "decoder" in method.parts:
            calibration = calibration_slices(cache, method.patch_size, CONDITIONING_SLICES, settings.seed)
        probes.append(make_probe(cache, method.patch_size, probe_slices, settings.seed))
        probes.append(make_conditioning_probe(cache, method, min(probe_slices, CONDITIONING_SLICES), settings.seed))
        if seg_probe:
            probe, note = make_seg_probe(target, method, settings.seed)
            probes.append(probe)
    trainer = Pretrainer(
        method,
        SliceViewDataset(cache, method.view_transforms()),
        target,
        settings,
        output,
        data_summary=cache.summary(),
        probes=[p for p in probes if p is not None],
        calibration_images=calibration,
    )
    if note:
        trainer.log(note)
    return trainer
