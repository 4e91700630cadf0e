"""The pretraining loop on the phantom's real slice cache: outputs, exact resume, non-finite losses, CLI errors."""
import os

import pytest
import torch

from nnunet_ssp.checkpoint import load_checkpoint
from nnunet_ssp.errors import SSPError
from nnunet_ssp.network import PlansTarget
from pretraining.data.cache import build_or_load_cache, discover_sources
from pretraining.data.loader import SliceViewDataset
from pretraining.loop import LATEST_CHECKPOINT, PretrainSettings, Pretrainer
from pretraining.methods.mim import MIM

from conftest import PHANTOM_DATASET, PHANTOM_ID, run_cli


@pytest.fixture
def mim_setup(phantom_env, tmp_path):
    root, env = phantom_env
    target = PlansTarget.from_preprocessed(str(PHANTOM_ID))
    cache = build_or_load_cache(target, discover_sources(os.path.join(env["nnUNet_raw"], PHANTOM_DATASET)),
                                str(root / "pretraining_cache"), num_processes=1, progress=False)
    method = MIM(target.network_spec, target.configuration_manager.patch_size)

    def make(output, num_workers=0, epochs=3):
        settings = PretrainSettings("mim", epochs=epochs, iters_per_epoch=2, batch_size=4, lr=0.01, momentum=0.99,
                                    weight_decay=3e-5, nesterov=True, device="cpu", num_workers=num_workers, seed=5)
        return Pretrainer(method, SliceViewDataset(cache, method.view_transforms()), target, settings,
                          str(tmp_path / output), cache.summary())
    return make


def test_outputs_of_a_run(mim_setup):
    trainer = mim_setup("run", epochs=2)
    final = trainer.run()
    folder = os.path.dirname(final)
    for name in ("training_log.txt", "progress.png", "previews/epoch_000.png", "previews/epoch_001.png",
                 LATEST_CHECKPOINT, "checkpoint_final.pth"):
        assert os.path.isfile(os.path.join(folder, name)), name
    checkpoint = load_checkpoint(final)
    assert checkpoint["parts"] == ["encoder", "decoder"] and checkpoint["pretraining"]["batch_size"] == 4
    assert len(trainer.history["loss"]) == 2 and all(v > 0 for v in trainer.history["slices_per_s"])
    assert trainer.history["lr"][0] == pytest.approx(0.01) and trainer.history["lr"][1] == pytest.approx(0.005)
    assert "epoch 1: loss" in open(os.path.join(folder, "training_log.txt")).read()
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_interrupted_after_epoch_1_and_continued_equals_uninterrupted(mim_setup):
    reference = load_checkpoint(mim_setup("straight").run())
    mim_setup("interrupted").run(max_epochs_this_run=1)
    resumed = mim_setup("interrupted", num_workers=1)  # a fresh process state; worker count does not matter
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
    monkeypatch.setattr(trainer.method, "loss", lambda model, batch: (torch.tensor(float("nan")), {}))
    with pytest.raises(SSPError, match=r"non-finite loss \(nan\) at epoch 1, iteration 0.*checkpoint_latest.pth"):
        trainer.run()
    assert open(latest, "rb").read() == good
    assert not os.path.exists(os.path.join(trainer.output_folder, "checkpoint_final.pth"))


def test_resume_refuses_other_settings(mim_setup):
    mim_setup("changed").run(max_epochs_this_run=1)
    other = mim_setup("changed", epochs=5)
    with pytest.raises(SSPError, match="settings differ.*epochs 3 -> 5"):
        other.resume()


def test_cli_errors_are_one_line(phantom_env):
    root, env = phantom_env
    not_yet = run_cli(["ssp_pretrain", "-d", str(PHANTOM_ID), "--method", "dino"], env, check=False)
    assert not_yet.returncode == 2 and not_yet.stderr.strip() == (
        "error: method 'dino' is not yet available in ssp_pretrain (available: mim)")
    unknown = run_cli(["ssp_pretrain", "-d", str(PHANTOM_ID), "--method", "byol"], env, check=False)
    assert unknown.returncode == 2 and "invalid choice: 'byol'" in unknown.stderr
    no_plans = run_cli(["ssp_pretrain", "-d", str(PHANTOM_ID), "--method", "mim", "-p", "missingPlans"], env,
                       check=False)
    assert no_plans.returncode == 2 and "missingPlans.json: plans not found" in no_plans.stderr
    assert "Traceback" not in no_plans.stderr and len(no_plans.stderr.strip().splitlines()) == 1
    out = str(root / "cli_exists")
    os.makedirs(out)
    open(os.path.join(out, "checkpoint_final.pth"), "wb").close()
    exists = run_cli(["ssp_pretrain", "-d", str(PHANTOM_ID), "--method", "mim", "-o", out], env, check=False)
    assert exists.returncode == 2 and "pass --continue to resume" in exists.stderr
    too_big = run_cli(["ssp_pretrain", "-d", str(PHANTOM_ID), "--method", "mim", "-o", str(root / "big"),
                       "--batch-size", "100000", "--num-workers", "0"], env, check=False)
    assert too_big.returncode == 2 and "fewer than one batch of 100000" in too_big.stderr
