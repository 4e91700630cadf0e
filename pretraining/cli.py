"""``ssp_pretrain``: self-supervised pretraining of the exact 2D network that nnU-Net's plans define.

Example: ssp_pretrain -d Dataset501_CinePhantom --method mim
The checkpoint goes where the nnU-Net trainers look: $nnUNet_results/<Dataset>/ssp/<method>__<plans>__<config>/.
SIGINT or SIGTERM stops a run after the current step with its state saved; --continue resumes it exactly.

Several GPUs (distributed data parallel): ssp_pretrain --num-gpus 4 ... or torchrun --nproc_per_node 4 ssp_pretrain ...
--batch-size stays the global batch (each process takes an equal share), so the run trains as one process would.
"""

import argparse
import os
import sys
from contextlib import contextmanager
from typing import List

from nnunet_ssp.env import NNUNET_PATH_ENVS, nnunet_path
from nnunet_ssp.errors import OneLineArgumentParser, SSPError, run_command
from pretraining.methods import METHODS, all_options

LOCK_FILE = ".ssp_pretrain.lock"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="ssp_pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id, as for nnUNetv2_train")
    p.add_argument("--method", required=True, choices=sorted(METHODS), help="SSP method")
    p.add_argument("-c", "--configuration", default="2d", help="nnU-Net configuration (default 2d)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="DIR",
        help="extra folders of unlabeled 3D/4D NIfTI images to pretrain on as well",
    )
    p.add_argument(
        "--subjects-fraction",
        type=float,
        default=1.0,
        metavar="F",
        help="pretrain on this fraction of the subjects (default 1: all), drawn by --seed: nested across "
        "fractions of one seed; the subjects are recorded in the checkpoint",
    )
    p.add_argument("--epochs", type=int, help="epochs (default: the method's, 100 in the paper)")
    p.add_argument(
        "--iters-per-epoch", type=int, help="iterations per epoch (default: one pass over all slices, as the paper)"
    )
    p.add_argument("--batch-size", type=int, help="batch size (default: the method's; halved while memory is short)")
    p.add_argument(
        "--lr",
        type=float,
        help="peak learning rate (default: the method's at its batch size, scaled "
        "linearly when the batch size differs)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument(
        "--num-gpus",
        type=int,
        metavar="N",
        help="train on N GPUs of this machine with distributed data parallel (starts torchrun; with "
        "--device cpu: N CPU processes, gloo). --batch-size stays the global batch, N x its share",
    )
    p.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="CUDA only: bf16 autocast (default) or full fp32; CPU always runs fp32",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="CUDA only: channels_last (NHWC) model and batches (default NCHW: faster for nnU-Net's "
        "InstanceNorm U-Nets in benchmarks/pretrain_throughput.py on an H100)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="data-loading worker processes (default: min(8, CPU cores))",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--continue",
        dest="continue_training",
        action="store_true",
        help="resume from checkpoint_latest.pth in the output folder (from epoch 0 if there is none yet)",
    )
    p.add_argument(
        "--skip-nonfinite",
        type=int,
        default=0,
        metavar="N",
        help="skip up to N steps with a non-finite loss or gradient (no update, each logged) instead of "
        "stopping at the first (default 0)",
    )
    p.add_argument("-o", "--output", help="output folder (default: where the nnU-Net trainers look)")
    p.add_argument(
        "--probe-slices",
        type=int,
        default=256,
        help="slices of the per-epoch k-NN probe of slice position and phase (default 256; 0: off)",
    )
    p.add_argument(
        "--seg-probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-epoch segmentation probe: a linear head on the frozen network's features fit on the "
        "labelled training cases of 4 subjects, its Dice on 4 others, beside the same on a random "
        "network (default on; off when the preprocessed data holds no labels)",
    )
    methods = p.add_argument_group("method options (each applies to the methods its help names)")
    for name, (option, _) in all_options().items():
        methods.add_argument("--" + name.replace("_", "-"), type=type(option.default), help=option.help)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def _check_numbers(args) -> None:
    for name, minimum in (
        ("epochs", 1),
        ("iters_per_epoch", 1),
        ("batch_size", 1),
        ("num_workers", 0),
        ("skip_nonfinite", 0),
        ("probe_slices", 0),
        ("num_gpus", 1),
    ):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise SSPError(f"--{name.replace('_', '-')} must be at least {minimum} (got {value})")
    if args.lr is not None and not 0 < args.lr < float("inf"):
        raise SSPError(f"--lr must be a positive number (got {args.lr})")
    if not 0 < args.subjects_fraction <= 1:
        raise SSPError(f"--subjects-fraction must be in (0, 1] (got {args.subjects_fraction:g})")


def _check_environment(args) -> None:
    for env in NNUNET_PATH_ENVS:
        if not (env == "nnUNet_results" and args.output):
            nnunet_path(env)


def _refuse_to_overwrite(output: str, continue_training: bool) -> None:
    """A new run never replaces a finished or interrupted one; --continue never starts over on a finished one."""
    from nnunet_ssp.checkpoint import FINAL_CHECKPOINT
    from pretraining.state import LATEST_CHECKPOINT

    final, latest = os.path.join(output, FINAL_CHECKPOINT), os.path.join(output, LATEST_CHECKPOINT)
    if continue_training:
        if os.path.isfile(final) and not os.path.isfile(latest):
            raise SSPError(f"{final} exists but {LATEST_CHECKPOINT} does not: nothing to continue; -o for a new run")
        return
    for path in (final, latest):
        if os.path.isfile(path):
            raise SSPError(f"{path} exists: pass --continue to resume, or -o for a new run")


def _missing_folders(path: str) -> List[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


@contextmanager
def output_lock(output: str):
    """Holds the output folder for this run: a second run refuses with one line. The kernel drops the lock however
    this process ends, so a crashed run never blocks the next. A run that fails takes back the lock file and the
    folders it created, as far as they hold nothing else."""
    from nnunet_ssp.io import acquire_lock, write_error

    path = os.path.join(output, LOCK_FILE)
    created, lock_existed = _missing_folders(os.path.abspath(output)), os.path.exists(path)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise write_error(output, e) from None
    fd = acquire_lock(path)
    if fd is None:
        with open(path, encoding="utf-8", errors="replace") as f:
            holder = f.read().strip() or "?"
        raise SSPError(
            f"{output}: another ssp_pretrain run (pid {holder}) is writing here; wait for it to end or "
            f"choose another -o"
        )
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    except BaseException:
        if not lock_existed:
            os.remove(path)
        for folder in created:
            if os.listdir(folder):
                break
            os.rmdir(folder)
        raise
    finally:
        os.close(fd)


def _pretrainer(args, target, method, sources, batch_size: int, device: str, output: str):
    """The slice cache (built or reused) and a Pretrainer on it with the run's settings."""
    from pretraining import distributed
    from pretraining.data.loader import default_iters_per_epoch
    from pretraining.loop import PretrainSettings
    from pretraining.run import cache_folder, make_pretrainer, open_cache, scaled_lr, too_few_slices

    cache = open_cache(target, sources, args.num_workers)
    if args.subjects_fraction != 1:
        cache = cache.with_subjects_fraction(args.subjects_fraction, args.seed)
    if len(cache) < batch_size:
        raise too_few_slices(cache_folder(target), str(len(cache)), batch_size)
    defaults = method.defaults
    lr = args.lr or scaled_lr(defaults, batch_size)
    if args.lr is None and batch_size != defaults.batch_size and distributed.is_main():
        print(
            f"note: learning rate {lr:.4g} = {defaults.lr:g} x {batch_size}/{defaults.batch_size} (the paper's lr "
            f"scaled linearly to batch size {batch_size}; set --lr to choose)",
            file=sys.stderr,
        )
    settings = PretrainSettings.of_method(
        method,
        epochs=args.epochs or defaults.epochs,
        iters_per_epoch=args.iters_per_epoch or default_iters_per_epoch(len(cache), batch_size),
        batch_size=batch_size,
        lr=lr,
        device=device,
        num_workers=args.num_workers,
        seed=args.seed,
        subjects_fraction=args.subjects_fraction,
        skip_nonfinite=args.skip_nonfinite,
        precision=args.precision,
        channels_last=args.channels_last,
        world_size=distributed.world_size(),
    )
    return make_pretrainer(method, target, cache, settings, output, args.probe_slices, args.seg_probe)


def _launch_or_join(args, device: str) -> None:
    """--num-gpus N outside torchrun: re-runs this command under torchrun with N processes (never returns). Under
    torchrun: joins the process group (nccl on CUDA, gloo on the CPU)."""
    import torch

    from pretraining import distributed

    if distributed.launched_by_torchrun():
        world = distributed.requested_world_size()
        if args.num_gpus is not None and args.num_gpus != world:
            raise SSPError(f"--num-gpus {args.num_gpus}, but torchrun started {world} processes; give one of them")
        distributed.init_from_env(device)
        return
    if args.num_gpus is None or args.num_gpus == 1:
        return
    if device == "cpu" and args.device is None:
        raise SSPError(
            f"--num-gpus {args.num_gpus}: no CUDA device is available (add --device cpu to train with "
            f"{args.num_gpus} CPU processes instead)"
        )
    if device == "cuda" and args.num_gpus > torch.cuda.device_count():
        raise SSPError(f"--num-gpus {args.num_gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    distributed.launch(args.num_gpus, "pretraining.cli", getattr(args, "argv", sys.argv[1:]))


def pretrain(args) -> str:
    from pretraining import distributed

    try:
        return _pretrain(args)
    finally:
        distributed.teardown()


def _pretrain(args) -> str:
    from contextlib import nullcontext

    import torch

    from nnunet_ssp.checkpoint import default_checkpoint_folder
    from nnunet_ssp.io import remove_temporaries
    from nnunet_ssp.network import PlannedConfiguration
    from pretraining import distributed
    from pretraining.data.sources import discover_sources, max_slices
    from pretraining.methods import get_method
    from pretraining.run import global_batch_size, too_few_slices
    from pretraining.state import LATEST_CHECKPOINT, load_state

    # every check that needs no writing comes first; what fails later removes what it wrote (output, cache)
    method_class = get_method(args.method)
    _check_numbers(args)
    foreign = [
        f"--{name.replace('_', '-')}"
        for name, (_, owners) in all_options().items()
        if getattr(args, name) is not None and args.method not in owners
    ]
    if foreign:
        raise SSPError(f"{', '.join(foreign)} do(es) not apply to --method {args.method}")
    _check_environment(args)
    target = PlannedConfiguration.from_preprocessed(args.dataset, args.plans, args.configuration)
    try:
        method = method_class(
            target.network_spec,
            target.configuration_manager.patch_size,
            **{name: getattr(args, name) for name in method_class.options},
        )
    except ValueError as e:
        raise SSPError(f"--method {args.method}: {e}") from None
    output = args.output or default_checkpoint_folder(
        os.environ["nnUNet_results"], target.dataset_name, args.method, target.plans_name, target.configuration
    )
    _refuse_to_overwrite(output, args.continue_training)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SSPError("--device cuda: no CUDA device is available")
    _launch_or_join(args, device)
    raw_folder = os.path.join(os.environ["nnUNet_raw"], target.dataset_name)
    sources = discover_sources(raw_folder, args.data)
    batch_size = global_batch_size(method, target, device, args.batch_size)
    most = max_slices(sources, target.plans_manager.transpose_forward)
    if most < batch_size:
        raise too_few_slices(raw_folder, f"at most {most}", batch_size)

    main = distributed.is_main()
    with output_lock(output) if main else nullcontext():  # rank 0 holds the folder for a distributed run
        _refuse_to_overwrite(output, args.continue_training)  # again: a run may have finished in the meantime
        if main:
            remove_temporaries(output)  # of a killed run; no one else writes here now
        state = load_state(os.path.join(output, LATEST_CHECKPOINT)) if args.continue_training else None
        trainer = _pretrainer(args, target, method, sources, batch_size, device, output)
        if args.continue_training and not trainer.resume(state):
            trainer.log(f"--continue: no {LATEST_CHECKPOINT} yet, starting at epoch 0")
        path = trainer.run()
    if main:
        print(path)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for --num-gpus, which re-runs the command under torchrun
    return run_command(lambda: pretrain(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
