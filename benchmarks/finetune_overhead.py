"""Fine-tuning overhead: epoch time of nnUNetTrainerMIM (started from an SSP checkpoint) against stock nnUNetTrainer.

The plugin's trainers must cost nothing once initialised (goal: MIM/stock epoch time <= 1.02). Both trainers are
made by nnU-Net's own ``get_trainer_from_args`` (as ``nnUNetv2_train`` does) for the same plans, configuration and
fold, get the same schedule (iterations per epoch, epochs, no checkpoint files) and are started with their own
``on_train_start`` (for MIM: find, verify and load the SSP checkpoint). Initialisation is timed separately and left
out. Then both stay alive and their epochs are interleaved, one epoch per trainer per round in a fixed order
(S M S M ...: every timed epoch follows the other trainer's, so both pay the same switching cost), after untimed
warm-up epochs. Every epoch runs nnU-Net's own epoch body
(``nnUNetTrainer.run_training`` without the start/end) and re-seeds python/numpy/torch with the round's seed first,
so with ``nnUNet_n_proc_DA=0`` (the default here: augmentation in the main process) both trainers draw the same
batches and augmentations in a round. Timed per epoch:

- epoch:      nnU-Net's own epoch time (``epoch_end_timestamps - epoch_start_timestamps`` of the trainer's logger);
- train:      the training half (``on_train_epoch_start`` .. ``on_train_epoch_end``, data loading included);
- train_step: the sum of the ``train_step`` calls alone (no data loading), and the median time of one call over all
              timed iterations (robust to the odd slow epoch of a shared machine);
- full:       wall time including ``on_epoch_end`` (log lines, progress plot).

After the epochs a train_step duel runs ``train_step`` of each trainer back to back on copies of the same batch
(S M S M ... per iteration), the finest interleaving there is: its median per-pair ratio resolves a few percent even
where whole epochs of a shared machine swing by 10-20%. ``--control`` adds a second stock trainer whose ratios show
the measurement's own noise.

Prints a table (ratio MIM/stock of the medians first, and the median of the per-round ratios) and writes JSON. It
also lists which nnU-Net hooks the plugin trainer overrides and compares the two networks after initialisation
(parameter layouts, requires_grad, hooks, subnormal weights), the usual ways a fine-tuning trainer costs time later.

    python benchmarks/finetune_overhead.py                    # a fresh phantom workspace in /tmp
    python benchmarks/finetune_overhead.py --rounds 10 --iters 50 --control
    python benchmarks/finetune_overhead.py --dataset 501 --fold 0 --checkpoint /path/to/mim/checkpoint_final.pth
(with --dataset, nnUNet_raw/nnUNet_preprocessed must point at a preprocessed dataset; the trainers' output folders
go to a temporary nnUNet_results so no real training is touched; the MIM checkpoint is --checkpoint, else the one
ssp_pretrain wrote to the real nnUNet_results, else a new one.) nnUNet_compile defaults to false here; torch.compile, if
switched on, applies to both trainers alike.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from trainer_timing import Run, median, network_facts, overridden_hooks, step_duel  # benchmarks/, next to this file

from nnunet_ssp.workspace import phantom_workspace, workspace_env

STOCK, MIM, CONTROL = "nnUNetTrainer", "nnUNetTrainerMIM", "nnUNetTrainer (control)"
# nnU-Net hooks that run every epoch or every iteration: an override of any of them can cost time after start-up.
PER_EPOCH_HOOKS = (
    "run_training",
    "on_epoch_start",
    "on_train_epoch_start",
    "train_step",
    "on_train_epoch_end",
    "on_validation_epoch_start",
    "validation_step",
    "on_validation_epoch_end",
    "on_epoch_end",
    "save_checkpoint",
    "set_deep_supervision_enabled",
    "get_dataloaders",
    "get_training_transforms",
    "get_validation_transforms",
    "configure_optimizers",
    "_build_loss",
    "build_network_architecture",
    "_do_i_compile",
    "plot_network_architecture",
    "print_to_log_file",
)


def mim_checkpoint(args, target, workdir: str, real_results: str) -> tuple:
    """(path, how it was made) of a MIM contract checkpoint for ``target``."""
    from nnunet_ssp.checkpoint import FINAL_CHECKPOINT, default_checkpoint_folder, save_checkpoint

    if args.checkpoint:
        return os.path.abspath(args.checkpoint), "given (--checkpoint)"
    if real_results:
        existing = os.path.join(
            default_checkpoint_folder(
                real_results, target.dataset_name, "mim", target.plans_name, target.configuration
            ),
            FINAL_CHECKPOINT,
        )
        if os.path.isfile(existing):
            return existing, "ssp_pretrain's, found in nnUNet_results"
    out = os.path.join(workdir, "ssp_mim")
    if args.api_checkpoint:
        torch.manual_seed(args.seed)
        path = os.path.join(out, FINAL_CHECKPOINT)
        save_checkpoint(
            path,
            target.network_spec.build(num_output_channels=1),
            target,
            "mim",
            ("encoder", "decoder"),
            pretraining={"note": "random weights written by benchmarks/finetune_overhead.py"},
        )
        return path, "written through nnunet_ssp.checkpoint.save_checkpoint (random weights)"
    bin_dir = os.path.dirname(sys.executable)
    subprocess.run(
        [
            os.path.join(bin_dir, "ssp_pretrain"),
            "-d",
            target.dataset_name,
            "-p",
            target.plans_name,
            "-c",
            target.configuration,
            "--method",
            "mim",
            "--epochs",
            "1",
            "--iters-per-epoch",
            "2",
            "--batch-size",
            "4",
            "--num-workers",
            "1",
            "--probe-slices",
            "0",
            "--device",
            "cuda" if args.device == "cuda" else "cpu",
            "--seed",
            str(args.seed),
            "-o",
            out,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return os.path.join(out, FINAL_CHECKPOINT), "ssp_pretrain --method mim --epochs 1 --iters-per-epoch 2"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="preprocessed dataset id/name (default: a fresh phantom workspace)")
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("--fold", default=0, type=int)
    parser.add_argument("--checkpoint", help="MIM contract checkpoint (default: see above)")
    parser.add_argument(
        "--api-checkpoint",
        action="store_true",
        help="write a random-weight contract checkpoint instead of running ssp_pretrain (faster)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="timed epochs per trainer, interleaved")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per trainer first")
    parser.add_argument("--iters", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--val-iters", type=int, default=5, help="validation iterations per epoch")
    parser.add_argument(
        "--duel-steps",
        type=int,
        default=60,
        help="after the epochs: train_step pairs (stock, MIM) back to back on the same batch (0: off)",
    )
    parser.add_argument(
        "--n-proc-da",
        type=int,
        default=0,
        help="nnUNet_n_proc_DA for both trainers (default 0: augmentation in the main process, "
        "identical batches per round)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads (default: all cores, as nnUNetv2_train -device cpu)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also time a second stock nnUNetTrainer: its ratio is the measurement's noise",
    )
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="let nnU-Net write checkpoint_best/latest during epochs (default: off for both, as "
        "nnUNetv2_train --disable_checkpointing)",
    )
    parser.add_argument("--subjects", type=int, default=6, help="phantom subjects for the default workspace")
    parser.add_argument("--size", type=int, default=64, help="phantom in-plane size for the default workspace")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--goal", type=float, default=1.02)
    parser.add_argument("--verbose", action="store_true", help="show nnU-Net's console output")
    parser.add_argument("--json", default="finetune_overhead.json")
    return parser


def _prepare_environment(args) -> None:
    """The nnU-Net environment both trainers run in, and torch's threads."""
    from trainers import EXT_TRAINER_DIR

    os.environ["nnUNet_n_proc_DA"] = str(args.n_proc_da)
    os.environ["nnUNet_compile"] = os.environ.get("nnUNet_compile", "false")
    ext = os.environ.get("nnUNet_extTrainer", "")
    if EXT_TRAINER_DIR not in ext.split(os.pathsep):
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(p for p in (ext, EXT_TRAINER_DIR) if p)
    for name in ("nnUNet_ssp_num_epochs", "nnUNet_ssp_iters_per_epoch", "nnUNet_ssp_checkpoint"):
        os.environ.pop(name, None)  # stock nnUNetTrainer ignores them; both get their schedule from here
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True


def _prepare_workspace(args, workdir: str):
    """(dataset, target, checkpoint path, its origin, load average before): the phantom workspace (or --dataset), a
    results folder of its own, and the MIM checkpoint the SSP trainer loads."""
    load_before = os.getloadavg()[0]
    if load_before > (os.cpu_count() or 1) and args.device == "cpu":
        print(
            f"note: load average {load_before:.1f} on {os.cpu_count()} cores: timings are contended "
            f"(with more torch threads than free cores CPU steps can slow down many times; --threads 1 is steadier)"
        )
    real_results = None
    if args.dataset:
        dataset = args.dataset
        real_results = os.environ.get("nnUNet_results")
    else:
        os.environ.update(workspace_env(workdir))
        dataset = phantom_workspace(os.environ, 992, "Overhead", subjects=args.subjects, size=args.size, processes=2)
    os.environ["nnUNet_results"] = os.path.join(workdir, "nnUNet_results")  # trainers write only here
    os.makedirs(os.environ["nnUNet_results"], exist_ok=True)
    from nnunet_ssp.network import PlannedConfiguration

    target = PlannedConfiguration.from_preprocessed(dataset, args.plans, args.configuration)
    checkpoint, checkpoint_origin = mim_checkpoint(args, target, workdir, real_results)
    os.environ["nnUNet_ssp_checkpoint"] = checkpoint
    return dataset, target, checkpoint, checkpoint_origin, load_before


def _time_epochs(args, runs) -> None:
    """Warm-up epochs, then the timed rounds, interleaved A B A B."""
    for w in range(args.warmup):
        for r in runs:
            r.epoch(seed=10_000 + w)
    for r in runs:
        r.epochs.clear()
    for i in range(args.rounds):
        for r in runs:  # strict A B A B: every timed epoch follows another trainer's epoch (same switching cost)
            r.epoch(seed=args.seed * 1000 + i)
        print(
            f"round {i + 1}/{args.rounds}: " + ", ".join(f"{r.label} {r.epochs[-1]['epoch_s']:.2f}s" for r in runs),
            flush=True,
        )


def _summary_rows(runs, duel) -> list:
    """One row per trainer: median times, their ratios to the stock trainer's (paired per round too), the duel."""
    keys = ("epoch_s", "train_s", "train_step_s", "data_s", "full_s")
    stock = runs[0]
    stock_it = statistics.median(x for e in stock.epochs for x in e["step_times_s"])
    rows = []
    for r in runs:
        row = {"trainer": r.label, "init_s": r.init_s, **{f"median_{k}": median(r.epochs, k) for k in keys}}
        for k in keys:
            row[f"ratio_{k}"] = row[f"median_{k}"] / median(stock.epochs, k)
            paired = [a[k] / b[k] for a, b in zip(r.epochs, stock.epochs)]
            row[f"paired_ratio_{k}"] = statistics.median(paired)
            row[f"paired_ratio_{k}_range"] = [min(paired), max(paired)]
        row["median_iteration_step_s"] = statistics.median(x for e in r.epochs for x in e["step_times_s"])
        row["ratio_iteration_step_s"] = row["median_iteration_step_s"] / stock_it
        if duel:
            ours, theirs = duel[r.label], duel[STOCK]
            row["duel_median_step_s"] = statistics.median(ours)
            row["duel_ratio"] = statistics.median(ours) / statistics.median(theirs)
            row["duel_paired_ratio"] = statistics.median(a / b for a, b in zip(ours, theirs))
            row["duel_step_times_s"] = ours
        row["epochs"] = r.epochs
        rows.append(row)

    return rows


def _print_summary(
    args,
    rows,
    duel,
    facts,
    hooks,
    per_epoch_overrides,
    target,
    ssp_init,
    checkpoint,
    checkpoint_origin,
    mim,
    stock,
    load_before,
    wall,
) -> bool:
    """The table and the facts behind it; returns whether the goal is met."""
    print()
    print(
        f"{'trainer':24s} {'ratio':>6s} {'paired':>6s} {'it ratio':>8s} {'duel':>6s} {'epoch s':>8s} "
        f"{'train s':>8s} {'steps s':>8s} {'step ms/it':>10s} {'data s':>7s} {'full s':>7s} {'init s':>7s}"
    )
    for row in rows:
        duel_ratio = f"{row['duel_paired_ratio']:6.3f}" if duel else f"{'-':>6s}"
        print(
            f"{row['trainer']:24s} {row['ratio_epoch_s']:6.3f} {row['paired_ratio_epoch_s']:6.3f} "
            f"{row['ratio_iteration_step_s']:8.3f} {duel_ratio} {row['median_epoch_s']:8.3f} "
            f"{row['median_train_s']:8.3f} {row['median_train_step_s']:8.3f} "
            f"{1000 * row['median_iteration_step_s']:10.1f} {row['median_data_s']:7.3f} {row['median_full_s']:7.3f} "
            f"{row['init_s']:7.2f}"
        )
    print(
        f"ratio = median epoch time (nnU-Net's epoch timestamps) / stock's; paired = median over rounds of that "
        f"round's ratio; it ratio = median train_step time per iteration / stock's; duel = median ratio of "
        f"train_step pairs run back to back on the same batch ({args.duel_steps} pairs); {args.rounds} interleaved "
        f"epochs per trainer after {args.warmup} warm-up; steps s = train_step time per epoch, data s = batch "
        f"wait per epoch, full s = epoch incl. on_epoch_end (log, progress plot)"
    )
    cm = target.configuration_manager
    print(
        f"{args.iters} train + {args.val_iters} val iterations per epoch, batch {cm.batch_size}, patch "
        f"{list(cm.patch_size)}, {facts[STOCK]['parameters']:,} parameters, {args.device}, {args.threads} threads, "
        f"nnUNet_n_proc_DA={args.n_proc_da}, fold {args.fold}, plans {target.plans_name} of {target.dataset_name}"
    )
    print(
        f"SSP load: {ssp_init['loaded']['parts']} {ssp_init['loaded']['tensors']} from {checkpoint} "
        f"({checkpoint_origin}); MIM init {mim.init_s:.2f}s vs stock {stock.init_s:.2f}s (excluded)"
    )
    print("MIM overrides of nnU-Net hooks: " + ", ".join(f"{k} ({'/'.join(v)})" for k, v in sorted(hooks.items())))
    print(
        "  of which run every epoch/iteration or shape the training objects: "
        + (", ".join(sorted(per_epoch_overrides)) or "none")
    )
    same_layout = facts[MIM]["layout"] == facts[STOCK]["layout"]
    diffs = [k for k in facts[STOCK] if k not in ("layout",) and facts[STOCK][k] != facts[MIM][k]]
    print(
        f"networks after start: same parameter shapes/strides/dtypes/requires_grad: {same_layout}; "
        f"hooks {facts[MIM]['hooks']} vs {facts[STOCK]['hooks']}; subnormal weights {facts[MIM]['subnormal_weights']} "
        f"vs {facts[STOCK]['subnormal_weights']}; other differences: "
        + (", ".join(f"{k} {facts[MIM][k]} vs {facts[STOCK][k]}" for k in diffs) or "none")
    )
    verdict = rows[1]["ratio_epoch_s"] <= args.goal
    noise = f", control stock/stock {rows[2]['ratio_epoch_s']:.3f} (the measurement's noise)" if args.control else ""
    noise += f"; train_step duel {rows[1]['duel_paired_ratio']:.3f}" if duel else ""
    print(
        f"goal MIM/stock <= {args.goal}: {'met' if verdict else 'NOT met'} ({rows[1]['ratio_epoch_s']:.3f}{noise}); "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores; "
        f"total {time.perf_counter() - wall:.0f}s"
    )

    return verdict


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    _prepare_environment(args)
    wall = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="ssp_overhead_")
    dataset, target, checkpoint, checkpoint_origin, load_before = _prepare_workspace(args, workdir)
    setup_s = time.perf_counter() - wall

    num_epochs = args.warmup + args.rounds
    labels = [(STOCK, "nnUNetTrainer"), (MIM, "nnUNetTrainerMIM")]
    if args.control:
        labels.append((CONTROL, "nnUNetTrainer"))
    runs = [Run(label, name, args, dataset, num_epochs) for label, name in labels]
    mim, stock = runs[1], runs[0]
    ssp_init = json.load(open(os.path.join(mim.trainer.output_folder, "ssp_init.json")))
    facts = {r.label: network_facts(r.trainer) for r in runs}
    hooks = overridden_hooks(type(mim.trainer))
    per_epoch_overrides = {k: v for k, v in hooks.items() if k in PER_EPOCH_HOOKS}
    _time_epochs(args, runs)
    duel = step_duel(runs, args.duel_steps, seed=args.seed * 1000 + 999) if args.duel_steps else None
    for r in runs:
        r.finish()
    rows = _summary_rows(runs, duel)
    verdict = _print_summary(
        args,
        rows,
        duel,
        facts,
        hooks,
        per_epoch_overrides,
        target,
        ssp_init,
        checkpoint,
        checkpoint_origin,
        mim,
        stock,
        load_before,
        wall,
    )
    cm = target.configuration_manager
    result = {
        "goal": args.goal,
        "goal_met": verdict,
        "rows": rows,
        "settings": {k: v for k, v in vars(args).items()},
        "plans": {
            "dataset": target.dataset_name,
            "plans": target.plans_name,
            "configuration": target.configuration,
            "batch_size": cm.batch_size,
            "patch_size": list(cm.patch_size),
        },
        "checkpoint": {"path": checkpoint, "origin": checkpoint_origin, "ssp_init": ssp_init["loaded"]},
        "overrides": hooks,
        "per_epoch_overrides": per_epoch_overrides,
        "network_facts": {k: {kk: vv for kk, vv in v.items() if kk != "layout"} for k, v in facts.items()},
        "same_parameter_layout": facts[MIM]["layout"] == facts[STOCK]["layout"],
        "setup_s": setup_s,
        "total_s": time.perf_counter() - wall,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
