"""The segmentation probe's cost per epoch, measured on a phantom run and estimated at the paper's scale, and what
it reports on the phantom.

1. Phantom run: a phantom workspace (16 subjects, 64 px; the probe fits on 4 and scores 4) and ``ssp_pretrain``'s
   run of MIM with both probes, by default the demo's recipe (3 x 100 iterations at batch 32, lr 0.02, 16-px masks).
   Per epoch: the epoch's seconds, the probe's (``seg_probe_time_s``) and their ratio; the probe's Dice against the
   random network's, the k-NN position error against chance.
2. Paper scale: the paper-like plans (256x256, 7 stages with 32-512 features, as benchmarks/pretrain_throughput.py
   writes them) on the same workspace, its slices padded to 256 px. Per method (MIM: the decoder's features; SimCLR:
   every encoder stage's), the probe's seconds on a random network against one epoch of the paper (90,618 slices)
   at the training step's measured seconds per slice (forward, backward and update at ``--paper-batch``); the ratio
   is the probe's share of an epoch (goal: at most 10%).

    python benchmarks/seg_probe_cost.py                         # both parts, in a fresh temporary workspace
    python benchmarks/seg_probe_cost.py --epochs 1 --iters 20   # a shorter phantom run
    python benchmarks/seg_probe_cost.py --skip-run              # the paper-scale estimate only
"""

import argparse
import json
import os
import tempfile
import time

import torch
from pretrain_throughput import write_cardiac_like_plans  # this folder is on sys.path when run as a script

from nnunet_ssp.network import PlannedConfiguration
from nnunet_ssp.workspace import phantom_workspace, workspace_env
from pretraining.data.cache import build_or_load_cache
from pretraining.data.sources import discover_sources
from pretraining.loop import Pretrainer
from pretraining.methods import METHODS
from pretraining.methods.base import Step
from pretraining.run import PretrainSettings, make_pretrainer
from pretraining.seg_probe import make_seg_probe, random_network_builder

PAPER_EPOCH_SLICES = 90_618  # every cine frame and slice of the paper's 296 training subjects


def phantom_run(target, cache, args, output: str) -> list:
    """Per-epoch rows of a MIM run with both probes on the phantom."""
    method = METHODS["mim"](target.network_spec, target.configuration_manager.patch_size, mask_patch_size=16)
    settings = PretrainSettings.of_method(
        method,
        epochs=args.epochs,
        iters_per_epoch=args.iters,
        batch_size=args.batch_size,
        lr=0.02,
        device=args.device,
        num_workers=args.num_workers,
        seed=args.seed,
    )
    trainer = make_pretrainer(method, target, cache, settings, output, probe_slices=256, seg_probe=True)
    trainer.run()
    h = trainer.history
    return [
        {
            "epoch": e,
            "epoch_s": h["epoch_time_s"][e],
            "seg_probe_s": h["seg_probe_time_s"][e],
            "ratio": h["seg_probe_time_s"][e] / h["epoch_time_s"][e],
            "seg_dice": h["probe_seg_dice"][e],
            "seg_dice_random_init": h["probe_seg_dice_random_init"][e],
            "position_mae": h["probe_position_mae"][e],
            "position_mae_chance": h["probe_position_mae_chance"][e],
        }
        for e in range(len(h["epoch"]))
    ]


def seconds_per_slice(method, target, batch_size: int, device: str, steps: int = 3) -> float:
    """Seconds of one optimisation step per slice (after a warm-up step) on a batch of ``method``'s views."""
    settings = PretrainSettings.of_method(
        method, epochs=1, iters_per_epoch=steps, batch_size=batch_size, device=device, seed=0
    )
    trainer = Pretrainer(method, None, target, settings, tempfile.mkdtemp(prefix="seg_probe_cost_"), data_summary={})
    batch = method.example_batch(batch_size, target.network_spec.num_input_channels, "cpu")
    trainer.model.train()
    trainer.train_step(batch, Step(0, 0, steps, 1))
    start = time.perf_counter()
    for i in range(steps):
        trainer.train_step(batch, Step(0, i, steps, 1))
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (steps * batch_size)


def paper_scale(dataset: str, args) -> list:
    """Per method: the probe's seconds at the paper-like plans against a paper epoch at the measured step time."""
    target = PlannedConfiguration.from_preprocessed(dataset, write_cardiac_like_plans(dataset))
    rows = []
    for name in ("mim", "simclr"):
        method = METHODS[name](target.network_spec, target.configuration_manager.patch_size)
        probe, note = make_seg_probe(target, method, seed=0)
        network = random_network_builder(method, seed=0)().to(args.device)
        start = time.perf_counter()
        probe.dice(network)
        probe_s = time.perf_counter() - start
        epoch_s = PAPER_EPOCH_SLICES * seconds_per_slice(method, target, args.paper_batch, args.device)
        rows.append(
            {
                "method": name,
                "probe_s": probe_s,
                "epoch_s": epoch_s,
                "ratio": probe_s / epoch_s,
                "fit_slices": len(probe.fit.labels),
                "scored_slices": len(probe.scored.labels),
                "patch_size": list(method.patch_size),
            }
        )
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=100, help="iterations per epoch (default 100)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--paper-batch", type=int, default=4, help="batch of the paper-scale step timing (default 4)")
    parser.add_argument("--skip-run", action="store_true", help="only the paper-scale estimate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", help="workspace folder (default: a new temporary one)")
    parser.add_argument("--json", default="seg_probe_cost.json")
    return parser


def _report(run: list, paper: list, device: str) -> None:
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    if run:
        print(f"phantom run (MIM, {where}):")
        print(
            f"{'epoch':>5s} {'epoch s':>8s} {'probe s':>8s} {'ratio':>6s} {'Dice':>6s} {'random':>6s} "
            f"{'pos err':>7s} {'chance':>6s}"
        )
        for r in run:
            print(
                f"{r['epoch']:5d} {r['epoch_s']:8.1f} {r['seg_probe_s']:8.1f} {r['ratio']:6.1%} {r['seg_dice']:6.3f} "
                f"{r['seg_dice_random_init']:6.3f} {r['position_mae']:7.3f} {r['position_mae_chance']:6.3f}"
            )
    print(f"paper scale ({where}; an epoch is {PAPER_EPOCH_SLICES:,} slices at the measured step time):")
    for r in paper:
        print(
            f"{r['method']:7s} probe {r['probe_s']:7.1f} s ({r['fit_slices']} + {r['scored_slices']} slices at "
            f"{r['patch_size']}), epoch {r['epoch_s']:9.0f} s, ratio {r['ratio']:.2%} (goal <= 10%)"
        )


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="seg_probe_cost_")
    os.environ.update(workspace_env(workdir))
    dataset = phantom_workspace(os.environ, 994, "SegProbeCost", subjects=16, size=64, processes=2)
    target = PlannedConfiguration.from_preprocessed(dataset)
    run = []
    if not args.skip_run:
        cache = build_or_load_cache(
            target,
            discover_sources(os.path.join(os.environ["nnUNet_raw"], dataset)),
            os.path.join(workdir, "cache"),
            progress=False,
        )
        run = phantom_run(target, cache, args, os.path.join(workdir, "mim"))
    paper = paper_scale(dataset, args)
    _report(run, paper, args.device)
    result = {"phantom_run": run, "paper_scale": paper, "device": args.device, "threads": torch.get_num_threads()}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
