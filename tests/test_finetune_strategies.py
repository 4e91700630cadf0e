"""The fine-tuning strategies (trainers/strategies.py) in real nnU-Net training on the phantom: the pretrained parts
frozen bit for bit while the others train, trained after the freeze, resumed by ``nnUNetv2_train --c`` with the same
parameter groups; and the freeze mechanism under DistributedDataParallel."""

import hashlib
import math
import os

import pytest
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from conftest import DATASET_JSON, PHANTOM_DATASET, PHANTOM_ID, make_plans, run_cli

from nnunet_ssp.checkpoint import default_checkpoint_folder, save_checkpoint
from nnunet_ssp.network import PlannedConfiguration
from pretraining.methods import METHODS
from trainers import ssp_trainers
from trainers.strategies import freeze_groups_at_zero_lr, split_parameters

CPU = torch.device("cpu")
#: the phantom's plans with a 4x narrower network (same preprocessed data), so that CPU training steps are quick
PLANS = "nnUNetPlansNarrow"


@pytest.fixture
def narrow_plans(phantom_env):
    """``PLANS``: a plans file of the phantom as users add their own, the stock plans with fewer features."""
    root, env = phantom_env
    folder = os.path.join(env["nnUNet_preprocessed"], PHANTOM_DATASET)
    plans = load_json(os.path.join(folder, "nnUNetPlans.json"))
    arch_kwargs = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    arch_kwargs["features_per_stage"] = [f // 4 for f in arch_kwargs["features_per_stage"]]
    save_json(dict(plans, plans_name=PLANS), os.path.join(folder, f"{PLANS}.json"), sort_keys=False)
    return root, env


def _poly(epoch, num_epochs, lr=5e-3):
    return lr * (1 - epoch / num_epochs) ** 0.9


def _digest(tensor):
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _phantom_checkpoint(env, method, path=None):
    """An SSP checkpoint of ``method`` for the phantom's plans (random weights: what it holds is what is checked)."""
    target = PlannedConfiguration.from_preprocessed(str(PHANTOM_ID), PLANS)
    torch.manual_seed(7)
    network = target.network_spec.build(1 if method == "mim" else 4)
    path = path or os.path.join(
        default_checkpoint_folder(env["nnUNet_results"], PHANTOM_DATASET, method, PLANS, "2d"), "checkpoint_final.pth"
    )
    return path, save_checkpoint(path, network, target, method, METHODS[method].parts)


def _train_in_process(cls, fold, monkeypatch, epochs):
    """The trainer as nnUNetv2_train builds it, trained ``epochs`` x 1 iteration in this process; returns it and, per
    epoch, its network's tensors and its groups' lrs at the epoch's end."""
    monkeypatch.setenv("nnUNet_ssp_num_epochs", str(epochs))
    monkeypatch.setenv("nnUNet_ssp_iters_per_epoch", "1")
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    preprocessed = os.path.join(os.environ["nnUNet_preprocessed"], PHANTOM_DATASET)
    plans = dict(load_json(os.path.join(preprocessed, f"{PLANS}.json")), continue_training=False)
    trainer = cls(plans, "2d", fold, load_json(os.path.join(preprocessed, "dataset.json")), CPU)
    epochs_seen, end_epoch = [], trainer.on_epoch_end

    def record_then_end_epoch():
        state = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        epochs_seen.append((state, [g["lr"] for g in trainer.optimizer.param_groups]))
        end_epoch()

    trainer.on_epoch_end = record_then_end_epoch
    trainer.run_training()
    return trainer, epochs_seen


def _ssp_init(trainer):
    return load_json(os.path.join(trainer.output_folder, "ssp_init.json"))


def test_freeze50epochs_freezes_the_encoder_in_epoch_0_trains_it_in_epoch_1_and_resumes_with_c(
    narrow_plans, monkeypatch
):
    """nnUNetTrainerSSP_freeze50epochs from an exported PCL checkpoint, 2 epochs (5% of 2: 1 frozen epoch): after
    epoch 0 the encoder is the checkpoint's bit for bit and the decoder has moved;
    after epoch 1 every encoder parameter has moved. ``nnUNetv2_train --c`` (3 epochs, without the export: the
    parts come from ssp_init.json) resumes it with the same groups and trains epoch 2 at the poly lr."""
    root, env = narrow_plans
    path, checkpoint = _phantom_checkpoint(env, "pcl", path=str(root / "pcl.pth"))
    monkeypatch.setenv("nnUNet_ssp_checkpoint", path)
    trainer, epochs = _train_in_process(ssp_trainers.nnUNetTrainerSSP_freeze50epochs, 0, monkeypatch, epochs=2)
    pretrained = checkpoint["network_weights"]
    (frozen_epoch, lrs0), (trained_epoch, lrs1) = epochs
    assert all(torch.equal(frozen_epoch[k], v) for k, v in pretrained.items())
    after_load = _ssp_init(trainer)["network_tensor_sha256_after_load"]
    moved = [k for k in after_load if k.startswith("decoder.") and _digest(frozen_epoch[k]) != after_load[k]]
    assert len(moved) > len([k for k in after_load if k.startswith("decoder.")]) / 2  # the decoder trains
    parameters = [k for k, _ in trainer.network.named_parameters() if k.startswith("encoder.")]
    assert all(not torch.equal(trained_epoch[k], pretrained[k]) for k in parameters)
    assert lrs0 == [_poly(0, 2), 0.0] and lrs1 == [_poly(1, 2)] * 2
    assert _ssp_init(trainer)["fine_tuning"] == {
        "recipe": "freeze50epochs",
        "pretrained_lr_factor": 1.0,
        "frozen_epochs": 1,
    }
    groups = trainer.optimizer.state_dict()["param_groups"]

    resume_env = dict(
        env, nnUNet_ssp_num_epochs="3", nnUNet_ssp_iters_per_epoch="1", nnUNet_ssp_skip_final_validation="1"
    )
    run_cli(
        [
            "nnUNetv2_train",
            str(PHANTOM_ID),
            "2d",
            "0",
            "-tr",
            "nnUNetTrainerSSP_freeze50epochs",
            "-p",
            PLANS,
            "--c",
            "-device",
            "cpu",
        ],
        resume_env,
    )
    final = torch.load(
        os.path.join(trainer.output_folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False
    )  # nnU-Net's own checkpoint holds numpy scalars
    assert final["current_epoch"] == 3
    resumed = final["optimizer_state"]["param_groups"]
    assert [(g["name"], g["params"]) for g in resumed] == [(g["name"], g["params"]) for g in groups]
    assert all(math.isclose(g["lr"], _poly(2, 3), rel_tol=1e-12) for g in resumed)
    assert not torch.equal(final["network_weights"][parameters[0]], trained_epoch[parameters[0]])
    log = open(
        sorted(
            os.path.join(trainer.output_folder, f)
            for f in os.listdir(trainer.output_folder)
            if f.startswith("training_log")
        )[-1]
    ).read()
    assert "the pretrained encoder (" in log and "frozen in epochs 0-0, from epoch 1 at 1 x the trainer's lr" in log


def test_frozen_mim_trains_only_the_segmentation_heads(narrow_plans, monkeypatch):
    """nnUNetTrainerMIM_frozen_paperSchedule, 2 epochs: the pretrained encoder and decoder are the checkpoint's after
    the run, bit for bit; the segmentation heads, the only parts not loaded, train (all but the lowest resolution's,
    which nnU-Net's deep supervision loss weighs 0)."""
    root, env = narrow_plans
    _, checkpoint = _phantom_checkpoint(env, "mim")
    trainer, epochs = _train_in_process(ssp_trainers.nnUNetTrainerMIM_frozen_paperSchedule, 1, monkeypatch, epochs=2)
    (first, lrs0), (last, lrs1) = epochs
    assert all(torch.equal(last[k], v) for k, v in checkpoint["network_weights"].items())
    heads = [
        k
        for k, _ in trainer.network.named_parameters()
        if k.startswith("decoder.seg_layers.") and not k.startswith("decoder.seg_layers.0.")
    ]
    assert heads and all(not torch.equal(first[k], last[k]) for k in heads)
    assert lrs0 == [_poly(0, 2), 0.0] and lrs1 == [_poly(1, 2), 0.0]
    assert "frozen in every epoch (0-1)" in open(trainer.log_file).read()


def _ddp_training(state=None):
    """A small nnU-Net network under DDP with an SGD as nnU-Net's over (new, pretrained encoder) groups, frozen at lr
    0; from ``state`` (network and optimizer state dicts) as ``--c`` restores them in a new process."""
    torch.manual_seed(0)
    network = PlannedConfiguration(make_plans(), "2d", DATASET_JSON).network_spec.build(4, deep_supervision=True)
    pretrained, new = split_parameters(network, ("encoder",))
    optimizer = torch.optim.SGD(
        [{"params": new}, {"params": pretrained}], lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5
    )
    freeze_groups_at_zero_lr(optimizer)
    if state:
        network.load_state_dict(state[0])
        optimizer.load_state_dict(state[1])
    return torch.nn.parallel.DistributedDataParallel(network), optimizer, pretrained, new


def test_a_frozen_group_stays_bit_identical_under_ddp_and_after_an_optimizer_reload(tmp_path):
    """The mechanism under DistributedDataParallel (gloo, one process): with the pretrained group at lr 0 its
    gradients reach DDP's reducer and the clipping as zeros (no unused-parameter error), the step leaves it
    bit-identical (weight decay and momentum included) while the other group trains; the same after a reload of the
    saved state (load_state_dict replaces the group dicts); at lr > 0 it trains, its momentum starting then."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp, optimizer, pretrained, new = _ddp_training()
        start = [p.detach().clone() for p in pretrained]
        for step, pretrained_lr in enumerate((0.0, 0.0, 0.01)):
            if step == 1:
                ddp, optimizer, pretrained, new = _ddp_training((ddp.module.state_dict(), optimizer.state_dict()))
            optimizer.param_groups[1]["lr"] = pretrained_lr
            new_before = [p.detach().clone() for p in new]
            optimizer.zero_grad(set_to_none=True)
            sum(output.square().mean() for output in ddp(torch.randn(2, 1, 64, 64))).backward()  # every head
            assert all(p.grad is not None and (pretrained_lr > 0 or not p.grad.any()) for p in pretrained)
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 12)
            optimizer.step()
            assert all(not torch.equal(p, q) for p, q in zip(new, new_before))
            unchanged = [torch.equal(p, q) for p, q in zip(pretrained, start)]
            assert all(unchanged) if pretrained_lr == 0 else not any(unchanged)
            assert all(("momentum_buffer" in optimizer.state[p]) == (pretrained_lr > 0) for p in pretrained)
    finally:
        dist.destroy_process_group()
