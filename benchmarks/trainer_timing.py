"""Timing nnU-Net trainers side by side, for benchmarks/finetune_overhead.py: a :class:`Run` keeps one trainer alive
and times its epochs (nnU-Net's own epoch body) and steps; :func:`step_duel` runs train_step of several trainers back
to back on the same batch; the facts that usually make a fine-tuning trainer slower (overridden hooks, parameter
layouts, subnormal weights)."""

import contextlib
import io
import random
import statistics
import time

import numpy as np
import torch


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def quiet(enabled: bool):
    """nnU-Net prints every log line to the console too; keep the benchmark's output readable."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def overridden_hooks(cls) -> dict:
    """{method: [classes defining it]} for every method the trainer class defines above nnU-Net's nnUNetTrainer."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    found = {}
    for klass in cls.__mro__:
        if klass is nnUNetTrainer:
            break
        for name, value in vars(klass).items():
            if callable(value) or isinstance(value, (property, staticmethod, classmethod)):
                if not (name.startswith("__") and name != "__init__"):
                    found.setdefault(name, []).append(klass.__name__)
    return found


def network_facts(trainer) -> dict:
    from nnunet_ssp.network import unwrap

    net = unwrap(trainer.network)
    params = list(net.named_parameters())
    hooks = sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in net.modules()
    )
    hooks += sum(len(getattr(p, "_backward_hooks", None) or {}) for _, p in params)
    tiny = torch.finfo(torch.float32).tiny
    subnormal = sum(
        int(((p.detach().abs() < tiny) & (p.detach() != 0)).sum()) for _, p in params if p.dtype == torch.float32
    )
    return {
        "parameters": sum(p.numel() for _, p in params),
        "layout": [(k, tuple(p.shape), tuple(p.stride()), str(p.dtype), p.requires_grad) for k, p in params],
        "frozen_parameters": sum(p.numel() for _, p in params if not p.requires_grad),
        "hooks": hooks,
        "subnormal_weights": subnormal,
        "optimizer": type(trainer.optimizer).__name__,
        "param_groups": len(trainer.optimizer.param_groups),
        "optimizer_params": sum(len(g["params"]) for g in trainer.optimizer.param_groups),
        "lr_scheduler": type(trainer.lr_scheduler).__name__,
        "compiled": hasattr(trainer.network, "_orig_mod"),
        "deep_supervision": bool(trainer.enable_deep_supervision),
        "dataloader_train": type(trainer.dataloader_train).__name__,
    }


class Run:
    """One trainer made and started as nnUNetv2_train does, then driven one epoch at a time."""

    def __init__(self, label, trainer_name, args, dataset, num_epochs):
        from nnunetv2.run.run_training import get_trainer_from_args
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        self.label = label
        seed_all(args.seed)
        start = time.perf_counter()
        with quiet(not args.verbose):
            self.trainer = get_trainer_from_args(
                dataset, args.configuration, args.fold, trainer_name, args.plans, False, torch.device(args.device)
            )
            t = self.trainer
            if type(t).run_training is not nnUNetTrainer.run_training:
                raise SystemExit(
                    f"{trainer_name} overrides run_training: this benchmark's epoch loop would not be "
                    f"its loop; time it through nnUNetv2_train instead"
                )
            t.num_iterations_per_epoch = args.iters
            t.num_val_iterations_per_epoch = args.val_iters
            t.num_epochs = num_epochs
            t.disable_checkpointing = not args.checkpointing
            t.on_train_start()
        self.init_s = time.perf_counter() - start
        self.epochs = []
        self.quiet = not args.verbose

    def epoch(self, seed: int) -> dict:
        """nnUNetTrainer.run_training's loop body for one epoch, with timers around its parts."""
        t = self.trainer
        seed_all(seed)
        if t.device.type == "cuda":
            torch.cuda.synchronize()
        with quiet(self.quiet):
            start = time.perf_counter()
            t.on_epoch_start()
            t.on_train_epoch_start()
            outputs, steps, waits = [], [], []
            for _ in range(t.num_iterations_per_epoch):
                a = time.perf_counter()
                batch = next(t.dataloader_train)
                b = time.perf_counter()
                outputs.append(t.train_step(batch))  # returns loss.cpu(): synchronises on cuda
                steps.append(time.perf_counter() - b)
                waits.append(b - a)
            t.on_train_epoch_end(outputs)
            train_end = time.perf_counter()
            with torch.no_grad():
                t.on_validation_epoch_start()
                val_outputs = [t.validation_step(next(t.dataloader_val)) for _ in range(t.num_val_iterations_per_epoch)]
                t.on_validation_epoch_end(val_outputs)
            epoch = t.current_epoch
            t.on_epoch_end()
            end = time.perf_counter()
        log = t.logger.get_value
        record = {
            "epoch": epoch,
            "seed": seed,
            "epoch_s": log("epoch_end_timestamps", epoch) - log("epoch_start_timestamps", epoch),
            "train_s": train_end - start,
            "train_step_s": sum(steps),
            "data_s": sum(waits),
            "full_s": end - start,
            "train_loss": float(log("train_losses", epoch)),
            "step_times_s": steps,
            "data_times_s": waits,
        }
        self.epochs.append(record)
        return record

    def finish(self):
        with quiet(self.quiet):
            self.trainer.on_train_end()


def clone_batch(batch):
    return {
        k: ([x.clone() for x in v] if isinstance(v, list) else v.clone() if torch.is_tensor(v) else v)
        for k, v in batch.items()
    }


def step_duel(runs, steps: int, seed: int) -> dict:
    """train_step alone, interleaved per iteration (S M S M ...) on identical copies of the same batch: noise slower
    than one step cancels in each pair. Returns {label: [seconds per step]}."""
    seed_all(seed)
    times = {r.label: [] for r in runs}
    for r in runs:
        r.trainer.network.train()
    for _ in range(steps):
        batch = next(runs[0].trainer.dataloader_train)
        for r in runs:
            copy = clone_batch(batch)
            if r.trainer.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            r.trainer.train_step(copy)  # returns loss.cpu(): synchronises on cuda
            times[r.label].append(time.perf_counter() - start)
    return times


def median(runs_epochs, key):
    return statistics.median(e[key] for e in runs_epochs)
