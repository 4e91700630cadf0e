"""Distributed data parallel (torch.distributed, gloo, 2 CPU processes) trains exactly as one process on the same
global batch: loss, every gradient and the weights after two steps, for each method; the sampler's shards; and
end to end through ``ssp_pretrain --num-gpus 2 --device cpu`` (stopped by a signal to one process) and ``torchrun
... --continue``."""

import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from conftest import DATASET_JSON, PHANTOM_DATASET, PHANTOM_ID, make_plans, run_cli

from nnunet_ssp.checkpoint import load_checkpoint
from nnunet_ssp.errors import SSPError
from nnunet_ssp.network import PlannedConfiguration
from pretraining import distributed
from pretraining.data.cache import build_or_load_cache
from pretraining.data.loader import EpochSampler, SliceViewDataset, make_loader
from pretraining.data.sources import discover_sources
from pretraining.loop import Pretrainer
from pretraining.methods import METHODS
from pretraining.methods.base import Step
from pretraining.run import PretrainSettings
from pretraining.state import LATEST_CHECKPOINT, load_state

WORLD = 2
GLOBAL_BATCH = 4
OPTIONS = {
    "simclr": {"temperature": 0.2},
    "pcl": {"position_threshold": 0.3},
    "dino": {"dino_out_dim": 64, "dino_local_views": 2},
    "mim": {"mask_patch_size": 16},
}
STEPS = [Step(1, 0, 2, 3), Step(1, 1, 2, 3)]  # epoch 1: DINO's last layer is trained too
RTOL, ATOL = 1e-4, 1e-6


# ------------------------------------------------------------------------------------------ one step, W vs 1
def _global_batch(method, step: Step) -> dict:
    """A random global batch in the loader's format, the same in every process."""
    generator = torch.Generator().manual_seed(1000 + step.global_step)
    shapes = [method.patch_size] * len(method.view_transforms())
    if method.name == "dino":
        shapes = [method.patch_size] * 2 + [method.local_patch_size] * method.dino_local_views
    views = [torch.randn(GLOBAL_BATCH, 1, *shape, generator=generator) for shape in shapes]
    return {
        "views": views,
        "slice_position": torch.rand(GLOBAL_BATCH, generator=generator),
        "index": torch.arange(GLOBAL_BATCH),
    }


def _rows(batch: dict, rank: int, world: int) -> dict:
    share = GLOBAL_BATCH // world
    block = slice(rank * share, (rank + 1) * share)
    return {
        "views": [v[block] for v in batch["views"]],
        "slice_position": batch["slice_position"][block],
        "index": batch["index"][block],
    }


def _train_two_steps(name: str, output: str, rank: int, world: int) -> dict:
    """Loss, metrics and gradients of step 1, and the model's state after step 2, of a Pretrainer (under DDP when
    a process group is up) fed this rank's rows of two global batches."""
    target = PlannedConfiguration(make_plans(), "2d", DATASET_JSON)
    method = METHODS[name](target.network_spec, (64, 64), **OPTIONS[name])
    settings = PretrainSettings.of_method(
        method, epochs=3, iters_per_epoch=2, batch_size=GLOBAL_BATCH, seed=3, world_size=world
    )
    trainer = Pretrainer(method, None, target, settings, output, data_summary={})
    trainer.model.train()
    torch.manual_seed(11)  # what the loop does at an epoch start: MIM's masks come from here
    results = {}
    for step in STEPS:
        loss, metrics = trainer.train_step(_rows(_global_batch(method, step), rank, world), step)
        if step.iteration == 0:
            results.update(
                loss=loss,
                metrics=metrics,
                grads={k: None if p.grad is None else p.grad.clone() for k, p in trainer.model.named_parameters()},
            )
    results["state"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    results["ddp"] = trainer.ddp is not None
    return results


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu")
    try:
        results = {
            name: _train_two_steps(name, os.path.join(folder, f"out_{name}_rank{rank}"), rank, WORLD)
            for name in OPTIONS
        }
        # a stop request on one rank stops all; a non-finite step is skipped on all ranks and DDP goes on
        results["agreed_signal"] = distributed.agreed_signal(15 if rank == 1 else None, torch.device("cpu"))
        results["skip"] = _skip_then_step(os.path.join(folder, "out_skip"), rank)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        distributed.teardown()


def _skip_then_step(output: str, rank: int) -> list:
    target = PlannedConfiguration(make_plans(), "2d", DATASET_JSON)
    method = METHODS["mim"](target.network_spec, (64, 64), mask_patch_size=16)
    settings = PretrainSettings.of_method(
        method, epochs=3, iters_per_epoch=2, batch_size=GLOBAL_BATCH, seed=3, skip_nonfinite=1, world_size=WORLD
    )
    trainer = Pretrainer(method, None, target, settings, output, data_summary={})
    loss = method.loss

    def nan_on_rank_1(model, batch, step):
        value, metrics = loss(model, batch, step)
        return (value * float("nan") if rank == 1 else value), metrics

    method.loss = nan_on_rank_1
    skipped = trainer.train_step(_rows(_global_batch(method, STEPS[0]), rank, WORLD), STEPS[0])
    method.loss = loss
    done = trainer.train_step(_rows(_global_batch(method, STEPS[1]), rank, WORLD), STEPS[1])
    return [skipped, done is not None, trainer.skipped]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(_free_port(), folder), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)], folder


def _max_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for key, tensor in a.items():
        if tensor is None or not tensor.is_floating_point():
            continue
        worst = max(worst, (tensor - b[key]).abs().max().item())
    return worst


def _assert_close(mine: dict, reference: dict, what: str) -> None:
    assert mine.keys() == reference.keys(), what
    for key, tensor in reference.items():
        if tensor is None:
            assert mine[key] is None, f"{what} {key}: a gradient where one process has none"
            continue
        assert mine[key] is not None, f"{what} {key}: no gradient"
        if tensor.is_floating_point():
            torch.testing.assert_close(
                mine[key], tensor, rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"{what} {key}: {m}"
            )
        else:
            assert torch.equal(mine[key], tensor), f"{what} {key}"


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_two_processes_train_exactly_as_one_on_the_global_batch(two_process_results, name, tmp_path):
    ranks, folder = two_process_results
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        reference = _train_two_steps(name, str(tmp_path / "single"), 0, 1)
    finally:
        torch.set_num_threads(threads)
    assert not reference["ddp"] and all(r[name]["ddp"] for r in ranks)
    for rank, result in enumerate(ranks):
        assert result[name]["loss"] == pytest.approx(reference["loss"], rel=RTOL, abs=ATOL)
        for key, metric in reference["metrics"].items():
            assert result[name]["metrics"][key] == pytest.approx(metric, rel=1e-3, abs=1e-5), key
        _assert_close(result[name]["grads"], reference["grads"], f"rank {rank} gradient")
        _assert_close(result[name]["state"], reference["state"], f"rank {rank} after 2 steps")
    print(
        f"{name}: |loss difference| {abs(ranks[0][name]['loss'] - reference['loss']):.3g}, "
        f"max |grad difference| {_max_difference(ranks[0][name]['grads'], reference['grads']):.3g}, "
        f"max |weight difference| after 2 steps {_max_difference(ranks[0][name]['state'], reference['state']):.3g}"
    )
    # only rank 0 writes: rank 1 did not even create its output folder
    assert os.path.isdir(os.path.join(folder, f"out_{name}_rank0"))
    assert not os.path.exists(os.path.join(folder, f"out_{name}_rank1"))
    assert all(r["agreed_signal"] == 15 for r in ranks)
    assert all(r["skip"] == [None, True, 1] for r in ranks)


# ------------------------------------------------------------------------------------------ sampler shards
def test_each_rank_takes_its_block_of_every_global_batch():
    for start in (0, 8):
        whole = list(EpochSampler(13, 24, seed=4, epoch=2, start=start))
        shards = [
            list(EpochSampler(13, 24, seed=4, epoch=2, start=start, rank=r, world_size=2, batch_size=8))
            for r in range(2)
        ]
        assert [len(s) for s in shards] == [len(whole) // 2] * 2
        rebuilt = [pair for k in range(len(whole) // 8) for s in shards for pair in s[4 * k : 4 * k + 4]]
        assert rebuilt == whole
    with pytest.raises(ValueError, match="does not split evenly over 2 processes"):
        EpochSampler(13, 24, seed=4, epoch=2, rank=0, world_size=2, batch_size=5)
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        make_loader(list(range(10)), 4, 2, 0, 0, 0, world_size=3)


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch):
    from pretraining.run import global_batch_size

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    method = SimpleNamespace(name="simclr", defaults=SimpleNamespace(batch_size=64))
    with pytest.raises(SSPError, match=r"^--batch-size 8 is the global batch and must split evenly over the 3 "):
        global_batch_size(method, None, "cpu", 8)
    with pytest.raises(SSPError, match="the simclr default batch size 64 is the global batch"):
        global_batch_size(method, None, "cpu", None)
    assert global_batch_size(method, None, "cpu", 9) == 9


# ------------------------------------------------------------------------------------------ end to end
def _workers(launcher_pid: int) -> list:
    """The processes torchrun (``ssp_pretrain --num-gpus`` becomes torchrun in place) started."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def test_ssp_pretrain_on_two_processes_writes_from_rank_0_only_stops_together_and_continues(phantom_env, tmp_path):
    root, env = phantom_env
    common = [
        "-d",
        str(PHANTOM_ID),
        "--method",
        "mim",
        "--epochs",
        "2",
        "--iters-per-epoch",
        "2",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--probe-slices",
        "16",
    ]
    output, hook = str(root / "ddp_mim"), str(tmp_path / "hook")
    os.makedirs(hook)
    # paused after step 0 of epoch 1; SIGTERM to one worker only: both stop after that step, rank 0 saves
    run = subprocess.Popen(
        ["ssp_pretrain", *common, "-o", output, "--num-gpus", "2"],
        text=True,
        env=dict(env, NNUNET_SSP_FAULT=f"iteration:1:0=pause:{hook}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    while not os.path.exists(os.path.join(hook, "reached")):
        assert run.poll() is None, run.communicate()
        time.sleep(0.1)
    workers = _workers(run.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGTERM)
    open(os.path.join(hook, "go"), "w").close()
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0
    assert stderr.count("error: SIGTERM: stopped at epoch 1, iteration 1; the state is saved in") == 2, stderr[-3000:]
    state = load_state(os.path.join(output, LATEST_CHECKPOINT))
    assert (state["epoch"], state["iteration"], state["settings"]["world_size"]) == (1, 1, 2)
    assert sorted(os.listdir(output)) == [LATEST_CHECKPOINT, "previews", "progress.png", "training_log.txt"]
    assert os.listdir(os.path.join(output, "previews")) == ["epoch_000.png"]
    log = open(os.path.join(output, "training_log.txt")).read()
    assert log.count("distributed data parallel: 2 processes (gloo), batch 2 per process, global batch 4") == 1
    assert log.count("epoch 0: loss") == 1 and "'world_size': 2" in log and "probe_position_mae" in log
    # torchrun itself, resuming in the middle of epoch 1
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    ssp_pretrain = os.path.join(os.path.dirname(sys.executable), "ssp_pretrain")
    resumed = run_cli(
        [torchrun, "--standalone", "--nproc_per_node", "2", ssp_pretrain, *common, "-o", output, "--continue"], env
    )
    assert resumed.stdout.strip().splitlines()[-1] == os.path.join(output, "checkpoint_final.pth")
    log = open(os.path.join(output, "training_log.txt")).read()
    assert log.count("continuing from") == 1 and "at epoch 1, iteration 1" in log and log.count("epoch 1: loss") == 1
    final = load_checkpoint(os.path.join(output, "checkpoint_final.pth"))
    assert final["pretraining"]["world_size"] == 2 and final["pretraining"]["batch_size"] == 4
    assert not [f for f in os.listdir(output) if ".tmp" in f]
    # one process, uninterrupted, with the run's settings on the same slice cache: the same weights (to the
    # float rounding that thread counts alone cause: 1 thread per process under torchrun)
    target = PlannedConfiguration.from_preprocessed(str(PHANTOM_ID))
    cache = build_or_load_cache(
        target,
        discover_sources(os.path.join(env["nnUNet_raw"], PHANTOM_DATASET)),
        os.path.join(
            env["nnUNet_preprocessed"], PHANTOM_DATASET, f"ssp_cache__{target.configuration_manager.data_identifier}"
        ),
        num_processes=1,
        progress=False,
    )
    method = METHODS["mim"](target.network_spec, target.configuration_manager.patch_size)
    settings = PretrainSettings(**dict(final["pretraining"], world_size=1))
    reference = load_checkpoint(
        Pretrainer(
            method,
            SliceViewDataset(cache, method.view_transforms()),
            target,
            settings,
            str(root / "single_mim"),
            cache.summary(),
        ).run()
    )
    assert final["network_weights"].keys() == reference["network_weights"].keys()
    for key, tensor in reference["network_weights"].items():
        torch.testing.assert_close(final["network_weights"][key], tensor, rtol=1e-3, atol=1e-5)


def test_num_gpus_errors_are_one_line(phantom_env, monkeypatch, capsys):
    from pretraining.cli import main

    root, _ = phantom_env
    base = ["-d", str(PHANTOM_ID), "--method", "mim", "-o", str(root / "num_gpus_errors")]
    assert main([*base, "--num-gpus", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --num-gpus must be at least 1 (got 0)"
    if not torch.cuda.is_available():
        assert main([*base, "--num-gpus", "2"]) == 2
        assert capsys.readouterr().err.strip() == (
            "error: --num-gpus 2: no CUDA device is available (add --device cpu to train with 2 CPU processes instead)"
        )
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "3")):
        monkeypatch.setenv(name, value)
    assert main([*base, "--num-gpus", "2", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == "error: --num-gpus 2, but torchrun started 3 processes; give one of them"
    assert not os.path.exists(root / "num_gpus_errors")
