"""Pretraining throughput: the real ssp_pretrain data path + step against bare forward+backward on tensors in memory.

Prints, per method: (a) end-to-end slices/s of the pretraining loop (cache -> workers -> views -> step),
(b) slices/s of the bare forward+backward+optimizer step on random tensors of the same batch and patch size,
the ratio a/b (goal >= 0.9), the data pipeline's own slices/s with no model, and peak RSS. Writes JSON too.

    python benchmarks/pretrain_throughput.py                       # builds a small phantom workspace in /tmp
    python benchmarks/pretrain_throughput.py --plan-like cardiac   # the paper-like plan: 256x256, 7 stages 32-512
    python benchmarks/pretrain_throughput.py --dataset 501 --batch-size 16 --iters 20
(with --dataset, nnUNet_raw/nnUNet_preprocessed must point at a preprocessed dataset). On CUDA every method is also
measured in fp32 and with channels_last (``--variants``).
"""

import argparse
import json
import os
import resource
import tempfile
import time

import torch

from nnunet_ssp.network import PlannedConfiguration
from nnunet_ssp.workspace import phantom_workspace, workspace_env
from pretraining.data.cache import build_or_load_cache
from pretraining.data.loader import SliceViewDataset, make_loader
from pretraining.data.sources import discover_sources
from pretraining.loop import Pretrainer
from pretraining.methods import METHODS
from pretraining.methods.base import Step
from pretraining.run import PretrainSettings, make_pretrainer

#: precision / memory-format variants of the step (CUDA only; CPU always runs fp32, contiguous)
VARIANTS = {
    "bf16+cl": {"precision": "bf16", "channels_last": True},
    "fp32+cl": {"precision": "fp32", "channels_last": True},
    "bf16": {"precision": "bf16", "channels_last": False},
    "fp32": {"precision": "fp32", "channels_last": False},
}


CARDIAC_PLANS = "nnUNetPlansCardiacLike"


def write_cardiac_like_plans(dataset: str) -> str:
    """Copies the dataset's nnUNetPlans into ``nnUNetPlansCardiacLike`` whose 2d configuration is the paper-like
    network: patch 256x256, 7 stages with 32-512 features, 3x3 convolutions; same preprocessing (data identifier).
    Returns the plans identifier."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    from nnunet_ssp.network import preprocessed_dataset_folder

    folder = preprocessed_dataset_folder(dataset)
    plans = load_json(os.path.join(folder, "nnUNetPlans.json"))
    plans["plans_name"] = CARDIAC_PLANS
    config = plans["configurations"]["2d"]
    stages = 7
    config["patch_size"] = [256, 256]
    config["architecture"]["arch_kwargs"].update(
        n_stages=stages,
        features_per_stage=[min(32 * 2**i, 512) for i in range(stages)],
        kernel_sizes=[[3, 3]] * stages,
        strides=[[1, 1]] + [[2, 2]] * (stages - 1),
        n_conv_per_stage=[2] * stages,
        n_conv_per_stage_decoder=[2] * (stages - 1),
    )
    save_json(plans, os.path.join(folder, CARDIAC_PLANS + ".json"), sort_keys=False)
    return CARDIAC_PLANS


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def bare_step_rate(trainer: Pretrainer, sample: dict, iters: int) -> float:
    """The trainer's own optimisation step on one batch of random tensors already in memory (views of the shapes a
    real sample has), so only the data path differs from the end-to-end figure."""
    s = trainer.settings
    batch = {
        "views": [torch.randn(s.batch_size, *v.shape) for v in sample["views"]],
        "slice_position": torch.rand(s.batch_size),
        "subject": torch.zeros(s.batch_size, dtype=torch.long),
    }
    trainer.model.train()
    trainer.train_step(batch, Step(0, 0, iters, 1))  # warm-up (oneDNN / cuDNN autotuning)
    start = time.perf_counter()
    for i in range(iters):
        trainer.train_step(batch, Step(0, i, iters, 1))
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return iters * s.batch_size / (time.perf_counter() - start)


def data_only_rate(dataset, batch_size: int, iters: int, num_workers: int) -> float:
    """Steady-state slices/s of the loader alone: timed from the arrival of batch ``max(1, num_workers)`` (every
    worker started and done with its first batch; ssp_pretrain starts its workers once per run) to ``iters``
    batches later."""
    warmup = max(1, num_workers)
    start = None
    for k, _ in enumerate(make_loader(dataset, batch_size, warmup + iters, epoch=1, seed=0, num_workers=num_workers)):
        if k == warmup - 1:
            start = time.perf_counter()
    return iters * batch_size / (time.perf_counter() - start)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="preprocessed dataset id/name (default: a fresh phantom workspace)")
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS))
    parser.add_argument("--batch-size", type=int, help="default: the method's paper batch on CUDA, 8 on CPU")
    parser.add_argument(
        "--iters", type=int, help="timed iterations per measurement (default 15 on CPU; on CUDA max(40, 3 x workers))"
    )
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="phantom in-plane size for the default workspace (default 128; 256 with --plan-like)",
    )
    parser.add_argument(
        "--plan-like",
        choices=["phantom", "cardiac"],
        default="phantom",
        help="the phantom's own nnU-Net plan (default) or the paper-like one (256x256, 7 stages)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        help="precision/memory-format variants (default: bf16 fp32 bf16+cl on CUDA, fp32 on CPU)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="pretrain_throughput.json")
    return parser


def _print_rows(rows: list, plans: str, num_workers: int, device: str, cached_slices: int) -> None:
    print(
        f"{'method':8s} {'variant':8s} {'ratio a/b':>9s} {'(a) e2e/s':>10s} {'(b) bare/s':>10s} {'data/s':>9s} "
        f"{'peak RSS':>9s}"
    )
    for r in rows:
        print(
            f"{r['method']:8s} {r['variant']:8s} {r['ratio']:9.2f} {r['end_to_end_slices_per_s']:10.1f} "
            f"{r['bare_step_slices_per_s']:10.1f} {r['data_only_slices_per_s']:9.1f} {r['peak_rss_mb']:7.0f}MB"
        )
    device = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(
        f"plans {plans}, batches {sorted({r['batch_size'] for r in rows})}, patch {rows[0]['patch_size']}, "
        f"{num_workers} workers, {device}, {cached_slices} cached slices"
    )


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="ssp_bench_")
    size = args.size or (256 if args.plan_like == "cardiac" else 128)
    if not args.dataset:
        os.environ.update(workspace_env(workdir))
    dataset = args.dataset or phantom_workspace(os.environ, 990, "Bench", subjects=4, size=size, processes=2)
    plans = write_cardiac_like_plans(dataset) if args.plan_like == "cardiac" else "nnUNetPlans"
    target = PlannedConfiguration.from_preprocessed(dataset, plans)
    variants = args.variants or (["bf16", "fp32", "bf16+cl"] if args.device.startswith("cuda") else ["fp32"])
    iters = args.iters or (max(40, 3 * args.num_workers) if args.device.startswith("cuda") else 15)
    raw = os.path.join(os.environ["nnUNet_raw"], target.dataset_name)
    cache = build_or_load_cache(target, discover_sources(raw), os.path.join(workdir, "cache"), progress=False)
    rows = []
    for name in args.methods:
        method = METHODS[name](target.network_spec, target.configuration_manager.patch_size)
        views = SliceViewDataset(cache, method.view_transforms())
        d = method.defaults
        batch_size = args.batch_size or (d.batch_size if args.device.startswith("cuda") else 8)
        data = data_only_rate(views, batch_size, iters, args.num_workers)
        for variant in variants:
            settings = PretrainSettings.of_method(
                method,
                epochs=2,
                iters_per_epoch=iters,
                batch_size=batch_size,
                device=args.device,
                num_workers=args.num_workers,
                **VARIANTS[variant],
            )
            trainer = make_pretrainer(method, target, cache, settings, os.path.join(workdir, f"{name}_{variant}"))
            trainer.train_epoch(0)  # warm-up epoch: worker start-up, allocator, oneDNN / cuDNN autotuning
            trainer.train_epoch(1)  # the same loader and workers go on (as in ssp_pretrain): steady state
            end_to_end = trainer.history["slices_per_s"][-1]
            bare = bare_step_rate(trainer, views[0], iters)
            rows.append(
                {
                    "method": name,
                    "variant": variant,
                    "end_to_end_slices_per_s": end_to_end,
                    "bare_step_slices_per_s": bare,
                    "ratio": end_to_end / bare,
                    "data_only_slices_per_s": data,
                    "peak_rss_mb": peak_rss_mb(),
                    "batch_size": batch_size,
                    "patch_size": list(method.patch_size),
                    "num_workers": args.num_workers,
                    "device": args.device,
                    "plans": plans,
                    "slices_in_cache": len(cache),
                }
            )
            del trainer
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    _print_rows(rows, plans, args.num_workers, args.device, len(cache))
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
    return {"rows": rows}


if __name__ == "__main__":
    main()
