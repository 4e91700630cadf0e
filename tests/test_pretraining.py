"""The pretraining loop on the phantom's real slice cache: outputs, a smoke run per method, exact resume, non-finite
losses, CLI errors."""

import os

import pytest
import torch
from conftest import PHANTOM_DATASET, PHANTOM_ID, run_cli

from nnunet_ssp.checkpoint import load_checkpoint
from nnunet_ssp.errors import SSPError
from nnunet_ssp.network import PlannedConfiguration
from pretraining.data.cache import build_or_load_cache
from pretraining.data.sources import discover_sources
from pretraining.methods import METHODS
from pretraining.run import PretrainSettings, make_pretrainer
from pretraining.state import LATEST_CHECKPOINT


@pytest.fixture
def pretrainer(phantom_env, tmp_path):
    """make(method, output, ...) -> a Pretrainer on the phantom's slice cache with the method's own recipe."""
    root, env = phantom_env
    target = PlannedConfiguration.from_preprocessed(str(PHANTOM_ID))
    cache = build_or_load_cache(
        target,
        discover_sources(os.path.join(env["nnUNet_raw"], PHANTOM_DATASET)),
        str(root / "pretraining_cache"),
        num_processes=1,
        progress=False,
    )

    def make(
        name,
        output,
        num_workers=0,
        epochs=3,
        iters=2,
        batch_size=4,
        lr=None,
        probe_slices=0,
        skip_nonfinite=0,
        **options,
    ):
        method = METHODS[name](target.network_spec, target.configuration_manager.patch_size, **options)
        settings = PretrainSettings.of_method(
            method,
            epochs=epochs,
            iters_per_epoch=iters,
            batch_size=batch_size,
            lr=lr,
            num_workers=num_workers,
            seed=5,
            skip_nonfinite=skip_nonfinite,
        )
        return make_pretrainer(method, target, cache, settings, str(tmp_path / output), probe_slices)

    return make


@pytest.fixture
def mim_setup(pretrainer):
    return lambda output, **kwargs: pretrainer("mim", output, **kwargs)


def test_outputs_of_a_run(mim_setup):
    trainer = mim_setup("run", epochs=2)
    final = trainer.run()
    folder = os.path.dirname(final)
    for name in (
        "training_log.txt",
        "progress.png",
        "previews/epoch_000.png",
        "previews/epoch_001.png",
        LATEST_CHECKPOINT,
        "checkpoint_final.pth",
    ):
        assert os.path.isfile(os.path.join(folder, name)), name
    checkpoint = load_checkpoint(final)
    assert checkpoint["parts"] == ["encoder", "decoder"] and checkpoint["pretraining"]["batch_size"] == 4
    assert len(trainer.history["loss"]) == 2 and all(v > 0 for v in trainer.history["slices_per_s"])
    assert trainer.history["lr"][0] == pytest.approx(0.01) and trainer.history["lr"][1] == pytest.approx(0.005)
    assert "epoch 1: loss" in open(os.path.join(folder, "training_log.txt")).read()
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


SMOKE = {
    "simclr": dict(epochs=4, iters=3),
    "pcl": dict(epochs=4, iters=3, position_threshold=0.2),
    # DINO's loss is H(teacher) + KL(teacher || student) and the centring raises H(teacher) in the first
    # epochs: the KL is what must fall (a constant teacher temperature keeps the schedule out of it)
    "dino": dict(epochs=5, iters=4, lr=0.03, dino_out_dim=256, dino_local_views=2, dino_teacher_temperature_start=0.04),
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_smoke_pretraining_lowers_the_loss_writes_a_contract_checkpoint_and_logs_the_probe(pretrainer, name):
    trainer = pretrainer(name, f"smoke_{name}", batch_size=8, probe_slices=32, **SMOKE[name])
    final = load_checkpoint(trainer.run())
    losses = trainer.history["student_teacher_kl" if name == "dino" else "loss"]
    assert losses[-1] < losses[0], losses
    assert final["method"] == name and final["parts"] == ["encoder"]
    assert final["network_weights"] and all(k.startswith("encoder.") for k in final["network_weights"])
    assert final["pretraining"]["options"] == trainer.method.option_values()
    for key in ("probe_position_mae", "probe_position_mae_chance", "probe_phase_error"):
        assert len(trainer.history[key]) == SMOKE[name]["epochs"] and all(0 <= v <= 1 for v in trainer.history[key])
    log = open(os.path.join(trainer.output_folder, "training_log.txt")).read()
    assert "epoch 3: loss" in log and "probe_position_mae" in log
    if name == "dino":
        assert "teacher_entropy" in log and "teacher_kl_to_uniform" in log


@pytest.mark.parametrize("name, options", [("mim", {}), ("dino", {"dino_out_dim": 64, "dino_local_views": 1})])
def test_interrupted_after_epoch_1_and_continued_equals_uninterrupted(pretrainer, name, options):
    reference = load_checkpoint(pretrainer(name, "straight", **options).run())
    pretrainer(name, "interrupted", **options).run(max_epochs_this_run=1)
    # a fresh process state; the worker count does not matter
    resumed = pretrainer(name, "interrupted", num_workers=1, **options)
    resumed.resume()
    assert resumed.start_epoch == 1
    final = load_checkpoint(resumed.run())
    assert final["network_weights"].keys() == reference["network_weights"].keys()
    for key, tensor in reference["network_weights"].items():
        assert torch.equal(final["network_weights"][key], tensor), key


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_state(mim_setup, monkeypatch):
    trainer = mim_setup("nan")
    trainer.run(max_epochs_this_run=1)
    latest = os.path.join(trainer.output_folder, LATEST_CHECKPOINT)
    good = open(latest, "rb").read()
    monkeypatch.setattr(trainer.method, "loss", lambda model, batch, step: (torch.tensor(float("nan")), {}))
    with pytest.raises(SSPError, match=r"non-finite loss \(nan\) at epoch 1, iteration 0.*checkpoint_latest.pth"):
        trainer.run()
    assert open(latest, "rb").read() == good
    assert not os.path.exists(os.path.join(trainer.output_folder, "checkpoint_final.pth"))


def test_non_finite_gradient_stops_and_keeps_the_last_good_state(mim_setup, monkeypatch):
    trainer = mim_setup("nan_gradient")
    trainer.run(max_epochs_this_run=1)
    latest = os.path.join(trainer.output_folder, LATEST_CHECKPOINT)
    good = open(latest, "rb").read()

    def finite_loss_nan_gradient(model, batch, step):  # d/dw sqrt(0 * w) = inf * 0
        return torch.sqrt((next(model.parameters()) * 0).sum()), {}

    monkeypatch.setattr(trainer.method, "loss", finite_loss_nan_gradient)
    with pytest.raises(SSPError, match=r"non-finite gradient \(loss 0\) at epoch 1, iteration 0: run stopped"):
        trainer.run()
    assert open(latest, "rb").read() == good


def _nan_at(trainer, monkeypatch, bad_steps):
    """Makes the loss NaN at the (epoch, iteration) pairs ``bad_steps``; returns the list the optimizer steps go to."""
    loss, step = trainer.method.loss, trainer.optimizer.step
    updates = []

    def patched_loss(model, batch, s):
        value, extra = loss(model, batch, s)
        return (value * float("nan") if (s.epoch, s.iteration) in bad_steps else value), extra

    monkeypatch.setattr(trainer.method, "loss", patched_loss)
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: updates.append(1) or step(*a, **k))
    return updates


def test_skip_nonfinite_skips_up_to_n_steps_without_an_update_and_logs_each(mim_setup, monkeypatch):
    bad_steps = {(0, 1), (1, 0), (2, 1)}
    trainer = mim_setup("skip", skip_nonfinite=2)
    updates = _nan_at(trainer, monkeypatch, bad_steps)
    with pytest.raises(SSPError, match=r"non-finite loss \(nan\) at epoch 2, iteration 1: run stopped"):
        trainer.run()
    assert len(updates) == 3 and trainer.skipped == 2  # (0, 0), (1, 1), (2, 0)
    log = open(trainer.progress_log.log_file).read()
    assert log.count("step skipped without an update") == 2 and "epoch 1, iteration 0: step skipped" in log
    resumed = mim_setup("skip", skip_nonfinite=3)  # --continue --skip-nonfinite 3
    updates = _nan_at(resumed, monkeypatch, bad_steps)
    assert resumed.resume() and resumed.start_epoch == 2
    resumed.run()
    assert len(updates) == 1 and resumed.skipped == 3 and resumed.history["epoch"] == [0, 1, 2]


def test_resume_refuses_other_settings(mim_setup):
    mim_setup("changed").run(max_epochs_this_run=1)
    other = mim_setup("changed", epochs=5)
    with pytest.raises(SSPError, match="settings differ.*epochs 3 -> 5"):
        other.resume()


def test_cli_errors_are_one_line(phantom_env):
    root, env = phantom_env
    foreign = run_cli(
        ["ssp_pretrain", "-d", str(PHANTOM_ID), "--method", "dino", "--mask-ratio", "0.5"], env, check=False
    )
    assert foreign.returncode == 2 and foreign.stderr.strip() == (
        "error: --mask-ratio do(es) not apply to --method dino"
    )
    bad_option = run_cli(
        ["ssp_pretrain", "-d", str(PHANTOM_ID), "--method", "mim", "--mask-ratio", "1.5"], env, check=False
    )
    assert bad_option.returncode == 2 and "mask_ratio in (0, 1)" in bad_option.stderr
    unknown = run_cli(["ssp_pretrain", "-d", str(PHANTOM_ID), "--method", "byol"], env, check=False)
    assert unknown.returncode == 2 and "invalid choice: 'byol'" in unknown.stderr
    no_plans = run_cli(
        ["ssp_pretrain", "-d", str(PHANTOM_ID), "--method", "mim", "-p", "missingPlans"], env, check=False
    )
    assert no_plans.returncode == 2 and "missingPlans.json: plans not found" in no_plans.stderr
    assert "Traceback" not in no_plans.stderr and len(no_plans.stderr.strip().splitlines()) == 1
    out = str(root / "cli_exists")
    os.makedirs(out)
    open(os.path.join(out, "checkpoint_final.pth"), "wb").close()
    exists = run_cli(["ssp_pretrain", "-d", str(PHANTOM_ID), "--method", "mim", "-o", out], env, check=False)
    assert exists.returncode == 2 and "pass --continue to resume" in exists.stderr
    finished = run_cli(
        ["ssp_pretrain", "-d", str(PHANTOM_ID), "--method", "mim", "-o", out, "--continue"], env, check=False
    )
    assert finished.returncode == 2 and "checkpoint_latest.pth does not: nothing to continue" in finished.stderr
    assert os.listdir(out) == ["checkpoint_final.pth"]
    too_big = run_cli(
        [
            "ssp_pretrain",
            "-d",
            str(PHANTOM_ID),
            "--method",
            "mim",
            "-o",
            str(root / "big"),
            "--batch-size",
            "100000",
            "--num-workers",
            "0",
        ],
        env,
        check=False,
    )
    assert too_big.returncode == 2 and "fewer than one batch of 100000" in too_big.stderr


@pytest.mark.parametrize("name", sorted(METHODS))
def test_example_batch_has_the_loaders_keys_shapes_and_types(pretrainer, name):
    """Batch sizing runs the method's loss on example_batch: it must look like a real loader batch."""
    trainer = pretrainer(name, f"example_{name}")
    real = torch.utils.data.default_collate([trainer.dataset[i] for i in range(2)])
    example = trainer.method.example_batch(2, 1, torch.device("cpu"))
    assert set(example) == set(real)
    assert [v.shape for v in example["views"]] == [v.shape for v in real["views"]]
    assert all(example[k].dtype == real[k].dtype for k in real if k != "views")


def test_batch_sizing_measures_every_view_and_halves_to_fit(target, monkeypatch):
    from pretraining import memory
    from pretraining.methods.dino import DINO

    patch = target.configuration_manager.patch_size
    small, large = (DINO(target.network_spec, patch, dino_out_dim=64, dino_local_views=n) for n in (0, 6))
    per_sample = {n: memory.activation_bytes_per_sample(m, m.build_model(), 1) for n, m in ((0, small), (6, large))}
    assert per_sample[6] > per_sample[0] > 0  # the local views are measured too
    budget = 5 * per_sample[6] * 3.0  # 5 samples' training memory (overhead 3)
    monkeypatch.setattr(memory, "available_bytes", lambda device: budget / 0.6)
    assert memory.affordable_batch_size(large, large.build_model(), 1, 64, torch.device("cpu")) == 4


@pytest.mark.parametrize("name", sorted(METHODS))
def test_ssp_pretrain_with_the_methods_default_batch(phantom_env, tmp_path, name):
    """The command users type, without --batch-size (the default batch, sized by one pass of the method's loss):
    exit 0, a checkpoint, the chosen batch in the log, and the precision that ran (fp32 on the CPU) recorded."""
    root, env = phantom_env
    out = tmp_path / name
    run_cli(
        [
            "ssp_pretrain",
            "-d",
            str(PHANTOM_ID),
            "--method",
            name,
            "--epochs",
            "1",
            "--iters-per-epoch",
            "1",
            "--device",
            "cpu",
            "-o",
            str(out),
        ],
        env,
    )
    pretraining = load_checkpoint(str(out / "checkpoint_final.pth"))["pretraining"]
    default = METHODS[name].defaults.batch_size
    assert pretraining["batch_size"] in {default >> k for k in range(default.bit_length())}
    assert pretraining["precision"] == "fp32"
    log = open(out / "training_log.txt").read()
    assert f"'batch_size': {pretraining['batch_size']}," in log and "'precision': 'fp32'" in log
