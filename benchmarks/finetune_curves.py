"""Fine-tuning curves: validation and test 3D Dice of nnU-Net's own training step from random init and from an SSP
checkpoint's parts, at chosen iterations, without nnU-Net's per-epoch work (validation batch, logging, plots,
checkpoints), which costs as much as the iteration itself when an epoch is one iteration (1 subject on a CPU).

Each (fold, init) is one process: nnU-Net's ``get_trainer_from_args`` makes the stock ``nnUNetTrainer`` for the fold
(its loss, augmentation, data loader, SGD and poly decay over ``--iters`` iterations, i.e. one iteration per nnU-Net
epoch as in the paper schedule of a fold smaller than a batch), ``--init`` chooses what is loaded from
``--checkpoint`` (``random``, ``encoder``, ``encoder+decoder``) with the plugin's ``load_parts``, and python, numpy
and torch are seeded with ``--seed``. The controls are not recipes: ``encoder+decoder+whitening`` loads encoder and
decoder, then puts a frozen PCA-whitening 1x1 conv in front of each new segmentation head, fit on the decoder
stage's output for the fold's training images (:func:`add_whitening`); ``+standardising`` standardises each channel
only, ``+centring`` subtracts the mean only; ``random+whitening`` and ``random+centring`` do so on the random
network, which tells a decoder-specific cure from a faster start of any network. At each ``--eval-at`` iteration
the network predicts the fold's validation cases (imagesTr) and the test set (imagesTs) with nnU-Net's predictor (no
TTA), and nnU-Net's ``compute_metrics_on_folder`` scores them: the mean over cases of the mean Dice over the
foreground labels. Recipes are to be chosen on the validation Dice; the test Dice is the reported result.

    python benchmarks/finetune_curves.py -d 701 -p nnUNetPlans_w025 --folds 0 2 4 \\
        --inits random encoder encoder+decoder encoder+decoder+whitening \\
        --checkpoint $nnUNet_results/Dataset701_Ablation/ssp/mim__nnUNetPlans_w025__2d/checkpoint_final.pth \\
        --iters 250 --eval-at 125 250 --jobs 2 -o curves.jsonl

(nnUNet_raw, nnUNet_preprocessed set; the trainers write into a temporary nnUNet_results.) Prints one line per run
and a table: mean ± sd over the folds per init and iteration, and the paired difference to ``random`` per fold.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

INITS = {
    "random": (),
    "encoder": ("encoder",),
    "encoder+decoder": ("encoder", "decoder"),
    "encoder+decoder+whitening": ("encoder", "decoder"),
    "encoder+decoder+standardising": ("encoder", "decoder"),
    "encoder+decoder+centring": ("encoder", "decoder"),
    "random+whitening": (),
    "random+centring": (),
}
WHITENING_EPS = 1e-3  # added to each eigenvalue, as a fraction of their mean


def add_whitening(network, images, mode: str = "whitening") -> None:
    """Puts a frozen 1x1 conv y = Λ^(-1/2) Uᵀ (x − μ) in front of each segmentation head of nnU-Net's U-Net, with μ
    and U Λ Uᵀ the mean and channel covariance of its decoder stage's output on ``images`` (Λ + eps); ``mode``
    "standardising": y = D^(-1/2) (x − μ) with D the channels' variances (correlations kept); "centring": y = x − μ."""
    import torch

    from pretraining.conditioning import decoder_stage_outputs

    outputs = decoder_stage_outputs(network, images)
    for stage, features in enumerate(outputs):
        samples = features.double().movedim(1, -1).reshape(-1, features.shape[1])
        mean = samples.mean(0)
        covariance = (samples - mean).T @ (samples - mean) / (len(samples) - 1)
        if mode == "whitening":
            eigenvalues, basis = torch.linalg.eigh(covariance)
        else:
            eigenvalues, basis = covariance.diagonal(), torch.eye(len(mean), dtype=covariance.dtype)
        eigenvalues = eigenvalues.clamp_min(0) + WHITENING_EPS * eigenvalues.clamp_min(0).mean()
        weight = basis.T if mode == "centring" else torch.diag(eigenvalues.rsqrt()) @ basis.T
        whitening = torch.nn.Conv2d(len(mean), len(mean), 1).to(features.device)
        with torch.no_grad():
            whitening.weight.copy_(weight[:, :, None, None].float())
            whitening.bias.copy_((-weight @ mean).float())
        whitening.requires_grad_(False)
        network.decoder.seg_layers[stage] = torch.nn.Sequential(whitening, network.decoder.seg_layers[stage])


def fold_training_images(trainer):
    """Every slice of the fold's training cases (image-centred crops at the patch size), without their labels."""
    from nnunet_ssp.splits import subject_of_case
    from pretraining.seg_probe import read_slices

    dataset = trainer.get_tr_and_val_datasets()[0]
    subjects = {subject_of_case(case) for case in dataset.identifiers}
    return read_slices(dataset, subjects, trainer.configuration_manager.patch_size).images


def _case_files(folder: str, cases, file_ending: str):
    return [[os.path.join(folder, f"{case}_0000{file_ending}")] for case in cases]


def _score(trainer, cases_by_set, raw: str, out: str) -> dict:
    """Mean foreground Dice per case set ("val", "test") of the trainer's current network (nnU-Net's predictor and
    metrics); the network is left in training mode with deep supervision."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder

    from nnunet_ssp.predict import make_predictor

    trainer.set_deep_supervision_enabled(False)
    predictor = make_predictor("cpu", tta=False)
    net = trainer.network
    predictor.manual_initialization(
        net,
        trainer.plans_manager,
        trainer.configuration_manager,
        [{k: v.clone() for k, v in net.state_dict().items()}],
        trainer.dataset_json,
        type(trainer).__name__,
        None,
    )
    ending, labels = trainer.dataset_json["file_ending"], trainer.label_manager.foreground_labels
    scores = {}
    for name, (images, references, cases) in cases_by_set.items():
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        predictor.predict_from_files_sequential(
            _case_files(os.path.join(raw, images), cases, ending),
            [os.path.join(folder, case) for case in cases],
            False,
            True,
            None,
        )
        metrics = compute_metrics_on_folder(
            os.path.join(raw, references),
            folder,
            None,
            trainer.plans_manager.image_reader_writer_class(),
            ending,
            labels,
            None,
            1,
        )
        # nnU-Net's convention: a class empty in both masks has Dice NaN and is left out of the case's mean
        per_case = [
            statistics.fmean(d for d in (m["Dice"] for m in case["metrics"].values()) if d == d)
            for case in metrics["metric_per_case"]
        ]
        scores[name] = round(statistics.fmean(per_case), 4)
    net.train()
    trainer.set_deep_supervision_enabled(True)
    return scores


def run_one(args) -> dict:
    """One fine-tuning curve, in this process (curve keys: iterations as strings, as in the JSON lines)."""
    import random

    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_ssp.checkpoint import load_checkpoint
    from nnunet_ssp.network import load_parts
    from nnunet_ssp.predict import image_cases

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    work = os.environ["nnUNet_results"]
    trainer = get_trainer_from_args(
        args.dataset, args.configuration, args.fold, "nnUNetTrainer", args.plans, device=torch.device("cpu")
    )
    trainer.num_epochs, trainer.initial_lr = args.iters, args.lr
    trainer.initialize()
    trainer.on_train_start()
    parts = INITS[args.init]
    if parts:
        load_parts(trainer.network, load_checkpoint(args.checkpoint)["network_weights"], parts, source=args.checkpoint)
    control = args.init.rsplit("+", 1)[-1]
    if control in ("whitening", "standardising", "centring"):
        add_whitening(trainer.network, fold_training_images(trainer), control)
    dataset = trainer.plans_manager.dataset_name
    raw = os.path.join(os.environ["nnUNet_raw"], dataset)
    val_cases = load_json(os.path.join(trainer.preprocessed_dataset_folder_base, "splits_final.json"))[args.fold]["val"]
    test_cases = image_cases(os.path.join(raw, "imagesTs"), trainer.dataset_json["file_ending"])
    cases_by_set = {"val": ("imagesTr", "labelsTr", val_cases), "test": ("imagesTs", "labelsTs", test_cases)}
    curve, losses, training_seconds = {}, [], 0.0
    for iteration in range(args.iters):
        start = time.time()
        trainer.lr_scheduler.step(iteration)
        losses.append(float(trainer.train_step(next(trainer.dataloader_train))["loss"]))
        training_seconds += time.time() - start
        if iteration + 1 in args.eval_at:
            curve[str(iteration + 1)] = dict(
                _score(trainer, cases_by_set, raw, os.path.join(work, str(iteration + 1))),
                train_loss=round(statistics.fmean(losses[-10:]), 4),
            )
    return dict(
        fold=args.fold,
        init=args.init,
        plans=args.plans,
        lr=args.lr,
        seed=args.seed,
        iters=args.iters,
        checkpoint=args.checkpoint if parts else None,
        curve=curve,
        seconds_per_iteration=round(training_seconds / args.iters, 2),
    )


def skip_balance(weights) -> list:
    """Per decoder stage (deepest first): norm of the first conv's weights on the skip half of its input over the
    norm on the upsampled half (nnU-Net's decoder concatenates upsampled, then skip). He init gives about 1; a
    decoder that learned to copy the encoder's skip features weighs them more."""
    ratios, stage = [], 0
    while f"decoder.stages.{stage}.convs.0.conv.weight" in weights:
        w = weights[f"decoder.stages.{stage}.convs.0.conv.weight"]
        half = w.shape[1] // 2
        ratios.append(round(float(w[:, half:].norm() / w[:, :half].norm()), 2))
        stage += 1
    return ratios


def norm_scale_spread(weights) -> list:
    """Per encoder stage (top first): sd of the InstanceNorm scales of its last conv, 0 at init; how far
    pretraining moved the stage."""
    spreads, stage = [], 0
    while f"encoder.stages.{stage}.0.convs.1.norm.weight" in weights:
        spreads.append(round(float(weights[f"encoder.stages.{stage}.0.convs.1.norm.weight"].std()), 3))
        stage += 1
    return spreads


def _table(results, eval_at) -> str:
    """Per init and iteration: mean ± sd over the folds of the training loss (last 10 iterations), validation and
    test Dice; the test Dice per fold and its difference to random init on the same fold."""
    by = {(r["init"], r["fold"]): r for r in results}
    folds = sorted({r["fold"] for r in results})

    def ms(values):
        return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"

    lines = [
        f"{'init':26s} {'iters':>5s}  {'train loss':15s}  {'val Dice':15s}  {'test Dice':15s}  "
        f"{'test per fold':22s}  test minus random per fold"
    ]
    for init in (i for i in INITS if any(r["init"] == i for r in results)):
        for it in eval_at:
            points = {f: by[init, f]["curve"][str(it)] for f in folds if (init, f) in by}
            base = {f: by["random", f]["curve"][str(it)]["test"] for f in points if ("random", f) in by}
            column = {key: [p[key] for p in points.values()] for key in ("train_loss", "val", "test")}
            per_fold = " ".join(f"{t:.3f}" for t in column["test"])
            lines.append(
                f"{init:26s} {it:5d}  {ms(column['train_loss']):15s}  {ms(column['val']):15s}  "
                f"{ms(column['test']):15s}  {per_fold:22s}  "
                + " ".join(f"{points[f]['test'] - base[f]:+.3f}" for f in base)
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--folds", type=int, nargs="+", default=[0])
    p.add_argument("--inits", nargs="+", default=["random", "encoder+decoder"], choices=list(INITS))
    p.add_argument("--checkpoint", help="the SSP contract checkpoint (checkpoint_final.pth) for non-random inits")
    p.add_argument("--iters", type=int, default=250)
    p.add_argument("--eval-at", type=int, nargs="+", default=None, help="iterations to score at (default: --iters)")
    p.add_argument("--lr", type=float, default=1e-2, help="initial lr of every run (default nnU-Net's 1e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each with --threads torch threads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", default="finetune_curves.jsonl", help="one JSON line per run (appended)")
    p.add_argument("--fold", type=int, help=argparse.SUPPRESS)  # one run in this process (the worker)
    p.add_argument("--init", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.eval_at = sorted(set(args.eval_at or [args.iters]))
    if args.fold is not None:
        # read by nnU-Net at import: the trainers write into a temporary folder, never into real results
        os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="finetune_curves_")
        print(json.dumps(run_one(args)))
        return 0
    if any(INITS[i] for i in args.inits) and not (args.checkpoint and os.path.isfile(args.checkpoint)):
        sys.exit(
            f"finetune_curves: --checkpoint {args.checkpoint}: not a file (needed for --inits "
            f"{' '.join(i for i in args.inits if INITS[i])})"
        )
    if args.checkpoint:
        from nnunet_ssp.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(args.checkpoint)
        print(
            f"{args.checkpoint}: sd of the encoder's InstanceNorm scales per stage (top first; 0 at init): "
            f"{norm_scale_spread(checkpoint['network_weights'])}"
        )
        if "decoder" in checkpoint["parts"]:
            print(
                f"{args.checkpoint}: decoder skip/upsampled weight-norm ratio per stage (deepest first; about 1 "
                f"at init): {skip_balance(checkpoint['network_weights'])}"
            )
    worker = [sys.executable, os.path.abspath(__file__)] + [a for a in (argv or sys.argv[1:])]
    pending = [(fold, init) for fold in args.folds for init in args.inits]
    running, results = [], []
    env = dict(os.environ, nnUNet_n_proc_DA="0", OMP_NUM_THREADS=str(args.threads))
    logs = tempfile.mkdtemp(prefix="finetune_curves_logs_")
    while pending or running:
        while pending and len(running) < args.jobs:
            fold, init = pending.pop(0)
            log = os.path.join(logs, f"fold{fold}_{init}.log")
            with open(log, "w") as out:  # a file, not a pipe: nnU-Net prints a lot, and pipes fill up
                running.append(
                    (
                        subprocess.Popen(
                            worker + ["--fold", str(fold), "--init", init],
                            env=env,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        ),
                        log,
                    )
                )
        done, log = running.pop(0)
        if done.wait() != 0:
            sys.exit(f"finetune_curves: {log}: run failed (exit {done.returncode})")
        with open(log) as f:
            result = json.loads(f.read().strip().splitlines()[-1])
        results.append(result)
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        print(
            f"fold {result['fold']} {result['init']}: "
            + ", ".join(f"@{it} val {c['val']:.3f} test {c['test']:.3f}" for it, c in result["curve"].items())
            + f" ({result['seconds_per_iteration']} s/iteration)",
            flush=True,
        )
    print(_table(results, args.eval_at))
    return 0


if __name__ == "__main__":
    sys.exit(main())
