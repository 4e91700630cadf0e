"""``ssp_pretrain``: self-supervised pretraining of the exact 2D network that nnU-Net's plans define.

Example: ssp_pretrain -d Dataset501_CinePhantom --method mim
The checkpoint goes where the nnU-Net trainers look: $nnUNet_results/<Dataset>/ssp/<method>__<plans>__<config>/.
"""
import argparse
import os
import sys

from nnunet_ssp.errors import SSPError, run_command
from nnunet_ssp.methods import METHOD_PARTS
from pretraining.methods import all_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssp_pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id, as for nnUNetv2_train")
    p.add_argument("--method", required=True, choices=sorted(METHOD_PARTS), help="SSP method")
    p.add_argument("-c", "--configuration", default="2d", help="nnU-Net configuration (default 2d)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--data", nargs="+", default=[], metavar="DIR",
                   help="extra folders of unlabeled 3D/4D NIfTI images to pretrain on as well")
    p.add_argument("--epochs", type=int, help="epochs (default: the method's, 100 in the paper)")
    p.add_argument("--iters-per-epoch", type=int,
                   help="iterations per epoch (default: one pass over all slices, as the paper)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the method's; halved while memory is short)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the method's at its batch size, scaled "
                                            "linearly when the batch size differs)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading worker processes (default: min(8, CPU cores))")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--continue", dest="continue_training", action="store_true",
                   help="resume from checkpoint_latest.pth in the output folder")
    p.add_argument("-o", "--output", help="output folder (default: where the nnU-Net trainers look)")
    p.add_argument("--probe-slices", type=int, default=256,
                   help="slices of the per-epoch k-NN probe of slice position and phase (default 256; 0: off)")
    methods = p.add_argument_group("method options (each applies to the methods its help names)")
    for name, (option, _) in all_options().items():
        methods.add_argument("--" + name.replace("_", "-"), type=type(option.default), help=option.help)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def _positive(name: str, value):
    if value is not None and value < 1:
        raise SSPError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    return value


def pretrain(args) -> str:
    import torch
    from nnunet_ssp.checkpoint import FINAL_CHECKPOINT, default_checkpoint_folder
    from nnunet_ssp.network import PlansTarget
    from pretraining.data.cache import build_or_load_cache, discover_sources
    from pretraining.data.loader import SliceViewDataset, default_iters_per_epoch
    from pretraining.loop import LATEST_CHECKPOINT, PretrainSettings, Pretrainer
    from pretraining.memory import affordable_batch_size
    from pretraining.methods import get_method
    from pretraining.probe import make_probe

    method_class = get_method(args.method)
    for name in ("epochs", "iters_per_epoch", "batch_size"):
        _positive(name, getattr(args, name))
    foreign = [f"--{name.replace('_', '-')}" for name, (_, owners) in all_options().items()
               if getattr(args, name) is not None and args.method not in owners]
    if foreign:
        raise SSPError(f"{', '.join(foreign)} do(es) not apply to --method {args.method}")
    target = PlansTarget.from_preprocessed(args.dataset, args.plans, args.configuration)
    try:
        method = method_class(target.network_spec, target.configuration_manager.patch_size,
                              **{name: getattr(args, name) for name in method_class.options})
    except ValueError as e:
        raise SSPError(f"--method {args.method}: {e}") from None
    for env in ("nnUNet_raw", "nnUNet_results"):
        if not os.environ.get(env) and not (env == "nnUNet_results" and args.output):
            raise SSPError(f"{env} is not set: export nnUNet_raw, nnUNet_preprocessed and nnUNet_results")
    output = args.output or default_checkpoint_folder(os.environ["nnUNet_results"], target.dataset_name,
                                                      args.method, target.plans_name, target.configuration)
    if not args.continue_training:
        for name in (FINAL_CHECKPOINT, LATEST_CHECKPOINT):
            if os.path.isfile(os.path.join(output, name)):
                raise SSPError(f"{os.path.join(output, name)} exists: pass --continue to resume, or -o for a new run")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SSPError("--device cuda: no CUDA device is available")

    raw_folder = os.path.join(os.environ["nnUNet_raw"], target.dataset_name)
    sources = discover_sources(raw_folder, args.data)
    cache_dir = os.path.join(os.environ["nnUNet_preprocessed"], target.dataset_name,
                             f"ssp_cache__{target.configuration_manager.data_identifier}")
    cache = build_or_load_cache(target, sources, cache_dir, num_processes=max(1, args.num_workers))

    defaults = method.defaults
    batch_size = args.batch_size or defaults.batch_size
    os.makedirs(output, exist_ok=True)
    if args.batch_size is None:
        sizing_model = method.build_model().to(device)
        fitted = affordable_batch_size(sizing_model, target.network_spec.num_input_channels, method.patch_size, batch_size,
                                       len(method.view_transforms()), torch.device(device))
        del sizing_model
        if fitted < batch_size:
            print(f"warning: batch size {batch_size} would not fit in {device} memory; using {fitted} "
                  f"(set --batch-size to choose)", file=sys.stderr)
            batch_size = fitted
    if len(cache) < batch_size:
        raise SSPError(f"{cache_dir}: {len(cache)} slices are fewer than one batch of {batch_size}; "
                       f"lower --batch-size or add data")
    lr = args.lr or defaults.lr * batch_size / defaults.batch_size
    if args.lr is None and batch_size != defaults.batch_size:
        print(f"note: learning rate {lr:.4g} = {defaults.lr:g} x {batch_size}/{defaults.batch_size} (the paper's lr "
              f"scaled linearly to batch size {batch_size}; set --lr to choose)", file=sys.stderr)
    settings = PretrainSettings(
        method=args.method, epochs=args.epochs or defaults.epochs,
        iters_per_epoch=args.iters_per_epoch or default_iters_per_epoch(len(cache), batch_size),
        batch_size=batch_size, lr=lr, momentum=defaults.momentum,
        weight_decay=defaults.weight_decay, nesterov=defaults.nesterov, device=device,
        num_workers=args.num_workers, seed=args.seed, options=method.option_values())
    dataset = SliceViewDataset(cache, method.view_transforms())
    probe = make_probe(cache, method.patch_size, args.probe_slices, args.seed)
    trainer = Pretrainer(method, dataset, target, settings, output, data_summary=cache.summary(), probe=probe)
    if args.continue_training:
        trainer.resume()
    path = trainer.run()
    print(path)
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: pretrain(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
