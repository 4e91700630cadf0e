"""Seconds per iteration of both stages against the plans' width: nnU-Net's fine-tuning step and MIM's pretraining
step on width-scaled plans (``nnunet_ssp plans --width``), and the ratio to full width.

- fine-tuning: the plugin's ``nnUNetTrainerBaseline`` (nnU-Net's trainer, progress.png every 50 iterations) of fold
  ``--fold`` (``get_trainer_from_args``, nnU-Net's data
  loader and augmentation in the main process, as the demo runs it): seconds per ``train_step`` on its batches, and
  seconds per epoch of the paper schedule at one training iteration (nnU-Net's epoch hooks, one training and one
  validation step, its logging), i.e. what 1000 epochs of a 1-subject fold cost per epoch;
- pretraining: MIM's loss, backward and SGD step (``pretraining.methods``) on random views at ``--pretrain-batch``,
  without data loading (``benchmarks/pretrain_throughput.py`` measures the data path).

    python benchmarks/width_scaling.py -d 501 --widths 1 0.5 0.25 0.125 --fold 0 -o docs/benchmarks/width_scaling.json

(nnUNet_raw, nnUNet_preprocessed set, the dataset planned and split; trainers write into a temporary
nnUNet_results.) Prints one line per width and writes the figures as JSON, with the provenance of the run (commit,
command, date, hardware, library versions); ``python scripts/render_docs.py`` renders docs/performance.md's width
table from docs/benchmarks/width_scaling.json.
"""

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

import torch

from nnunet_ssp.io import save_json_atomic
from nnunet_ssp.provenance import collect_provenance


def _median_seconds(step, repeats: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def finetune_seconds(dataset: str, plans: str, fold: int, repeats: int) -> dict:
    """Seconds per training step and per one-iteration epoch (one training, one validation step) of
    nnUNetTrainerBaseline on ``plans``."""
    from nnunetv2.run.run_training import get_trainer_from_args

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints every log line
        trainer = get_trainer_from_args(dataset, "2d", fold, "nnUNetTrainerBaseline", plans, device=torch.device("cpu"))
        trainer.num_epochs = 10 * repeats
        trainer.set_training_iterations(1)
        trainer.on_train_start()

        def epoch():
            trainer.on_epoch_start()
            trainer.on_train_epoch_start()
            outputs = [trainer.train_step(next(trainer.dataloader_train))]
            trainer.on_train_epoch_end(outputs)
            with torch.no_grad():
                trainer.on_validation_epoch_start()
                validation = [trainer.validation_step(next(trainer.dataloader_val))]
                trainer.on_validation_epoch_end(validation)
            trainer.on_epoch_end()

        step = _median_seconds(lambda: trainer.train_step(next(trainer.dataloader_train)), repeats)
        per_epoch = _median_seconds(epoch, repeats)
        parameters = sum(p.numel() for p in trainer.network.parameters())
        trainer.on_train_end()
    return {
        "finetune_step_s": step,
        "paper_epoch_s": per_epoch,
        "parameters": parameters,
        "features_per_stage": list(trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"]),
        "finetune_batch": trainer.batch_size,
    }


def pretrain_seconds(dataset: str, plans: str, batch_size: int, repeats: int) -> dict:
    """Seconds per MIM step (loss, backward, SGD) on random views of the plans' patch size."""
    from nnunet_ssp.network import PlannedConfiguration
    from pretraining.methods import METHODS

    target = PlannedConfiguration.from_preprocessed(dataset, plans)
    method = METHODS["mim"](target.network_spec, target.configuration_manager.patch_size)
    model = method.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    batch = method.example_batch(batch_size, target.network_spec.num_input_channels, torch.device("cpu"))

    def step():
        optimizer.zero_grad(set_to_none=True)
        method.loss(model, batch, None)[0].backward()
        optimizer.step()

    return {"pretrain_step_s": _median_seconds(step, repeats), "pretrain_batch": batch_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("--widths", type=float, nargs="+", default=[1, 0.5, 0.25, 0.125])
    p.add_argument("--fold", type=int, default=0, help="the fold whose trainer is timed (default 0)")
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("-o", "--output", default="width_scaling.json")
    args = p.parse_args(argv)
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="width_scaling_")
    from nnunet_ssp.env import EXT_TRAINER_ENV, ext_trainer_value

    os.environ[EXT_TRAINER_ENV] = ext_trainer_value(os.environ.get(EXT_TRAINER_ENV))  # finds the plugin's trainers
    from nnunet_ssp.plans import width_plans_identifier, write_width_plans

    rows = []
    for width in args.widths:
        plans = "nnUNetPlans"
        if width != 1:
            write_width_plans(args.dataset, width)
            plans = width_plans_identifier("nnUNetPlans", width)
        row = {
            "width": width,
            "plans": plans,
            "threads": torch.get_num_threads(),
            **finetune_seconds(args.dataset, plans, args.fold, args.repeats),
            **pretrain_seconds(args.dataset, plans, args.pretrain_batch, args.repeats),
        }
        rows.append(row)
    full = next((r for r in rows if r["width"] == 1), None)
    print(
        f"{'width':>6s} {'parameters':>11s}  {'fine-tune step':>15s}  {'paper epoch':>12s}  {'MIM step':>9s}"
        + ("  (x full width: fine-tune step, paper epoch, MIM step)" if full else "")
    )
    for r in rows:
        ratios = (
            ""
            if not full
            else "  "
            + ", ".join(f"{r[key] / full[key]:.2f}" for key in ("finetune_step_s", "paper_epoch_s", "pretrain_step_s"))
        )
        print(
            f"{r['width']:6g} {r['parameters']:11,d}  {r['finetune_step_s']:13.3f} s  {r['paper_epoch_s']:10.3f} s  "
            f"{r['pretrain_step_s']:7.3f} s{ratios}"
        )
    provenance = collect_provenance(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    save_json_atomic({"provenance": provenance, "rows": rows}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
