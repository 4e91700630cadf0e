"""The plugin's trainers, instantiated as nnU-Net does: schedules, checkpoint lookup, loading and refusals."""

import json
import math
import os

import pytest
import torch
from conftest import DATASET_JSON, make_plans

from nnunet_ssp.checkpoint import default_checkpoint_folder, save_checkpoint
from nnunet_ssp.network import PlannedConfiguration, tensor_digests
from pretraining.methods import METHODS
from trainers import ssp_trainers
from trainers.base import WarmupMixin
from trainers.schedules import WarmupPolyLRScheduler
from trainers.ssp_trainers import (
    nnUNetTrainerBaseline,
    nnUNetTrainerDINO,
    nnUNetTrainerMIM,
    nnUNetTrainerMIM_warmup,
    nnUNetTrainerSSP,
)

CPU = torch.device("cpu")


def _trainer(cls, plans=None, continue_training=False):
    plans = dict(plans or make_plans(), continue_training=continue_training)
    return cls(plans, "2d", 0, DATASET_JSON, CPU)


def _fold_folder(nnunet_env, cls):
    return os.path.join(nnunet_env["nnUNet_results"], "Dataset990_Unit", f"{cls.__name__}__nnUNetPlans__2d", "fold_0")


def _write_checkpoint(nnunet_env, method, plans=None, path=None):
    target = PlannedConfiguration(plans or make_plans(), "2d", DATASET_JSON)
    torch.manual_seed(123)
    net = target.network_spec.build(1 if method == "mim" else 4)
    path = path or os.path.join(
        default_checkpoint_folder(nnunet_env["nnUNet_results"], "Dataset990_Unit", method, "nnUNetPlans", "2d"),
        "checkpoint_final.pth",
    )
    save_checkpoint(path, net, target, method, METHODS[method].parts)
    return path, net


def test_schedules(nnunet_env, monkeypatch):
    baseline = _trainer(nnUNetTrainerBaseline)
    assert (baseline.initial_lr, baseline.num_epochs, baseline.num_iterations_per_epoch) == (1e-2, 1000, 250)
    _write_checkpoint(nnunet_env, "mim")
    mim = _trainer(nnUNetTrainerMIM)
    assert (mim.initial_lr, mim.num_epochs) == (5e-3, 1000)
    monkeypatch.setenv("nnUNet_ssp_num_epochs", "3")
    monkeypatch.setenv("nnUNet_ssp_iters_per_epoch", "7")
    short = _trainer(nnUNetTrainerMIM)
    assert (short.num_epochs, short.num_iterations_per_epoch, short.num_val_iterations_per_epoch) == (3, 7, 1)
    monkeypatch.setenv("nnUNet_ssp_iters_per_epoch", "250")
    assert _trainer(nnUNetTrainerMIM).num_val_iterations_per_epoch == 50  # nnU-Net's own 250 / 50
    monkeypatch.setenv("nnUNet_ssp_num_epochs", "three")
    with pytest.raises(SystemExit, match="nnUNet_ssp_num_epochs='three': expected a positive integer"):
        _trainer(nnUNetTrainerBaseline)


def test_progress_plot_is_drawn_once_per_50_iterations_and_after_the_last_epoch(nnunet_env, monkeypatch):
    drawn = []
    monkeypatch.setenv("nnUNet_ssp_num_epochs", "20")
    for iterations, expected in ((7, [7, 15, 19]), (50, list(range(20))), (250, list(range(20)))):
        monkeypatch.setenv("nnUNet_ssp_iters_per_epoch", str(iterations))
        trainer, drawn[:] = _trainer(nnUNetTrainerBaseline), []
        # nnU-Net's logger, which draws the plot (the trainer's logger hands it to its local logger)
        monkeypatch.setattr(
            type(trainer.logger.local_logger),
            "plot_progress_png",
            lambda logger, folder, trainer=trainer: drawn.append(trainer.current_epoch),
        )
        trainer.disable_checkpointing = True
        for epoch in range(20):
            trainer.on_epoch_start()
            for key, value in (
                ("train_losses", 1.0),
                ("val_losses", 1.0),
                ("mean_fg_dice", 0.5),
                ("dice_per_class_or_region", [0.5]),
                ("lrs", 0.01),
            ):
                trainer.logger.log(key, value, epoch)
            trainer.on_epoch_end()
        assert drawn == expected and trainer.current_epoch == 20  # 7 iterations: every 8th epoch and the last


def test_baseline_lr_recipe_fine_tunes_at_the_scratch_lr_and_loads_the_same_parts(nnunet_env):
    path, source = _write_checkpoint(nnunet_env, "mim")
    trainer = _trainer(ssp_trainers.nnUNetTrainerMIM_baselineLR)
    assert trainer.initial_lr == _trainer(nnUNetTrainerBaseline).initial_lr == 1e-2 and trainer.recipe == "baselineLR"
    _load_like_on_train_start(trainer)
    source_state = source.state_dict()
    assert all(
        torch.equal(v, source_state[k])
        for k, v in trainer.network.state_dict().items()
        if not k.startswith("decoder.seg_layers.")
    )
    assert not hasattr(ssp_trainers, "nnUNetTrainerBaseline_baselineLR")  # it would be the baseline itself
    assert ssp_trainers.nnUNetTrainerMIM_warmup_paperSchedule.recipe == "warmup"
    assert nnUNetTrainerMIM.recipe == nnUNetTrainerBaseline.recipe == ""


def test_warmup_then_poly_matches_the_formula():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupPolyLRScheduler(opt, 5e-3, num_epochs=1000, warmup_epochs=50)
    for epoch in (0, 1, 24, 49, 50, 51, 500, 999):
        sched.step(epoch)
        expected = 5e-3 * (epoch + 1) / 50 if epoch < 50 else 5e-3 * (1 - (epoch - 50) / 950) ** 0.9
        assert math.isclose(opt.param_groups[0]["lr"], expected, rel_tol=1e-12)


def test_warmup_trainer_uses_the_warmup_schedule(nnunet_env, monkeypatch):
    _write_checkpoint(nnunet_env, "mim")
    trainer = _trainer(nnUNetTrainerMIM_warmup)
    assert isinstance(trainer, WarmupMixin) and trainer.warmup_epochs == 50 and trainer.initial_lr == 5e-3
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 4)
    optimizer, scheduler = trainer.configure_optimizers()
    assert isinstance(scheduler, WarmupPolyLRScheduler) and isinstance(optimizer, torch.optim.SGD)
    monkeypatch.setenv("nnUNet_ssp_num_epochs", "20")
    assert _trainer(nnUNetTrainerMIM_warmup).warmup_epochs == 1


def _load_like_on_train_start(trainer):
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 4)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer._load_ssp_weights()
    return before


def test_mim_trainer_loads_encoder_and_decoder_and_records_it(nnunet_env):
    path, source = _write_checkpoint(nnunet_env, "mim")
    trainer = _trainer(nnUNetTrainerMIM)
    before = _load_like_on_train_start(trainer)
    after = trainer.network.state_dict()
    source_state = source.state_dict()
    for k, v in after.items():
        if k.startswith("decoder.seg_layers."):
            assert torch.equal(v, before[k])  # segmentation heads keep their fresh init
        else:
            assert torch.equal(v, source_state[k]), k
    record = json.load(open(os.path.join(_fold_folder(nnunet_env, nnUNetTrainerMIM), "ssp_init.json")))
    assert record["checkpoint"] == os.path.abspath(path) and record["method"] == "mim"
    assert record["loaded"]["parts"] == ["encoder", "decoder"] and record["loaded"]["tensors"]["decoder"] > 0
    assert record["network_tensor_sha256_after_load"] == tensor_digests(source, ["encoder", "decoder"])
    assert record["initial_lr"] == 5e-3 and len(record["sha256"]) == 64


@pytest.mark.parametrize(
    "method, cls, lr",
    [("dino", nnUNetTrainerDINO, 5e-3), ("mim", ssp_trainers.nnUNetTrainerMIM_baselineLR_encoderOnly, 1e-2)],
)
def test_encoder_trainer_loads_only_the_encoder(nnunet_env, method, cls, lr):
    """An encoder method's trainer, and MIM's encoder-only recipe: the encoder equals the checkpoint's, the decoder
    keeps its fresh init although the MIM checkpoint holds one."""
    _, source = _write_checkpoint(nnunet_env, method)
    trainer = _trainer(cls)
    before = _load_like_on_train_start(trainer)
    for k, v in trainer.network.state_dict().items():
        reference = (
            source.state_dict()[k] if k.startswith("encoder.") or k.startswith("decoder.encoder.") else before[k]
        )
        assert torch.equal(v, reference), k
    assert any(
        k.startswith("decoder.stages.") and not torch.equal(v, source.state_dict()[k])
        for k, v in trainer.network.state_dict().items()
    )
    record = json.load(open(os.path.join(_fold_folder(nnunet_env, cls), "ssp_init.json")))
    assert record["loaded"]["parts"] == ["encoder"] and record["method"] == method and record["warnings"] == []
    assert record["initial_lr"] == lr
    assert "Loaded SSP checkpoint" in open(trainer.log_file).read()


def test_encoder_only_recipe_exists_only_where_a_decoder_would_load():
    assert ssp_trainers.nnUNetTrainerMIM_baselineLR_encoderOnly_paperSchedule.recipe == "baselineLR_encoderOnly"
    assert hasattr(ssp_trainers, "nnUNetTrainerSSP_baselineLR_encoderOnly")
    for name in ("Baseline", "DINO", "SimCLR", "PCL"):
        assert not hasattr(ssp_trainers, f"nnUNetTrainer{name}_baselineLR_encoderOnly")


def test_named_trainer_refuses_another_methods_checkpoint_and_the_generic_one_loads_it(nnunet_env, monkeypatch):
    """nnUNet_ssp_checkpoint exported to a MIM file: nnUNetTrainerDINO stops with one line naming both methods
    before its fold folder exists; nnUNetTrainerSSP loads the parts the file holds (MIM: encoder and decoder)."""
    path, source = _write_checkpoint(nnunet_env, "mim", path=str(nnunet_env["nnUNet_results"]) + "/mim.pth")
    _write_checkpoint(nnunet_env, "dino")  # the DINO trainer's own checkpoint exists: the export still wins
    monkeypatch.setenv("nnUNet_ssp_checkpoint", path)
    with pytest.raises(SystemExit) as e:
        _trainer(nnUNetTrainerDINO)
    message = str(e.value.code)
    assert (
        message.startswith(
            f"nnunet_ssp error: {path}: checkpoint pretrained with 'mim', but nnUNetTrainerDINO "
            f"fine-tunes from 'dino' checkpoints"
        )
        and "\n" not in message
    )
    assert not os.path.exists(os.path.dirname(_fold_folder(nnunet_env, nnUNetTrainerDINO)))
    trainer = _trainer(nnUNetTrainerSSP)
    _load_like_on_train_start(trainer)
    source_state = source.state_dict()
    assert all(
        torch.equal(v, source_state[k])
        for k, v in trainer.network.state_dict().items()
        if not k.startswith("decoder.seg_layers.")
    )
    record = json.load(open(os.path.join(_fold_folder(nnunet_env, nnUNetTrainerSSP), "ssp_init.json")))
    assert record["method"] == "mim" and record["loaded"]["parts"] == ["encoder", "decoder"]


def test_checkpoint_for_other_plans_is_refused_before_anything_is_written(nnunet_env, capsys):
    _write_checkpoint(nnunet_env, "mim", plans=make_plans(features=(8, 16, 32, 48)))
    with pytest.raises(SystemExit) as e:
        _trainer(nnUNetTrainerMIM)
    assert "nnunet_ssp error:" in str(e.value.code) and "features_per_stage" in str(e.value.code)
    assert "\n" not in str(e.value.code)
    assert not os.path.exists(os.path.dirname(_fold_folder(nnunet_env, nnUNetTrainerMIM)))


def test_missing_checkpoint_fails_at_train_start_and_continue_never_needs_it(nnunet_env):
    trainer = _trainer(nnUNetTrainerMIM)  # --val and inference must work without an SSP file
    with pytest.raises(SystemExit, match="SSP checkpoint not found; run ssp_pretrain"):
        _load_like_on_train_start(trainer)
    _write_checkpoint(nnunet_env, "mim", plans=make_plans(features=(8, 16, 32, 48)))
    resumed = _trainer(nnUNetTrainerMIM, continue_training=True)  # --c: nnU-Net's own checkpoint has the weights
    assert resumed._ssp_pending is None


def test_every_pretraining_method_has_a_trainer_that_loads_its_parts():
    """The method registry (pretraining/methods) and the trainers (one line per method) agree."""
    assert sorted(ssp_trainers.TRAINER_OF_METHOD) == sorted(METHODS)
    for name, trainer in ssp_trainers.TRAINER_OF_METHOD.items():
        assert trainer.ssp_parts == METHODS[name].parts
        assert ssp_trainers.loads_decoder(trainer) == ("decoder" in METHODS[name].parts)


def test_the_core_finds_the_trainers_through_nnunets_lookup():
    """The core names the public trainers without importing them; nnU-Net's lookup finds exactly the registry's."""
    from nnunet_ssp.env import PUBLIC_TRAINERS, ext_trainer_dir, ssp_method_trainers
    from trainers import EXT_TRAINER_DIR

    assert ext_trainer_dir() == os.path.abspath(EXT_TRAINER_DIR)

    assert sorted(PUBLIC_TRAINERS) == sorted(trainer.__name__ for trainer in ssp_trainers.BASE_TRAINERS)
    found = ssp_method_trainers()
    assert list(found) == list(ssp_trainers.TRAINER_OF_METHOD)
    assert {m: c.__name__ for m, c in found.items()} == {
        m: c.__name__ for m, c in ssp_trainers.TRAINER_OF_METHOD.items()
    }


# ------------------------------------------------------------------ fine-tuning strategies (trainers/strategies.py)
STRATEGY_RECIPES = ("freeze50epochs", "frozen", "pretrainedTenthLR")


def _poly(epoch, num_epochs, lr=5e-3):
    """nnU-Net's PolyLRScheduler formula, written out: lr (1 - e / N) ** 0.9."""
    return lr * (1 - epoch / num_epochs) ** 0.9


def _pretrained_names(network, parts):
    """Parameter names of the loaded parts, by the key layout alone: encoder.*, and decoder.* but its heads."""
    names = set()
    for name, _ in network.named_parameters():
        decoder = name.startswith("decoder.") and not name.startswith("decoder.seg_layers.")
        if ("encoder" in parts and name.startswith("encoder.")) or ("decoder" in parts and decoder):
            names.add(name)
    return names


@pytest.mark.parametrize(
    "cls, method, parts",
    [
        (ssp_trainers.nnUNetTrainerMIM_pretrainedTenthLR, "mim", ("encoder", "decoder")),
        (ssp_trainers.nnUNetTrainerDINO_pretrainedTenthLR_paperSchedule, "dino", ("encoder",)),
    ],
)
def test_tenth_lr_groups_partition_the_network_and_follow_the_poly_lr(nnunet_env, monkeypatch, cls, method, parts):
    _write_checkpoint(nnunet_env, method)
    monkeypatch.setenv("nnUNet_ssp_num_epochs", "20")
    trainer = _trainer(cls)
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 4)
    optimizer, scheduler = trainer.configure_optimizers()
    new, pretrained = optimizer.param_groups
    assert (new["name"], pretrained["name"]) == ("new", "pretrained")
    name_of = {id(p): n for n, p in trainer.network.named_parameters()}
    assert {name_of[id(p)] for p in pretrained["params"]} == _pretrained_names(trainer.network, parts)
    assert {name_of[id(p)] for p in new["params"]} == set(name_of.values()) - _pretrained_names(trainer.network, parts)
    assert len(new["params"]) + len(pretrained["params"]) == len(name_of)  # each parameter once
    for epoch in (None, 1, 7, 19):  # None: as constructed (epoch 0)
        if epoch is not None:
            scheduler.step(epoch)
        expected = _poly(epoch or 0, 20)
        assert math.isclose(new["lr"], expected, rel_tol=1e-12)
        assert math.isclose(pretrained["lr"], expected / 10, rel_tol=1e-12)
    assert (
        optimizer.defaults
        == torch.optim.SGD([torch.zeros(1)], 5e-3, momentum=0.99, nesterov=True, weight_decay=3e-5).defaults
    )  # nnU-Net's SGD settings


@pytest.mark.parametrize("num_epochs, frozen", [(1000, 50), (2000, 50), (100, 5), (20, 1), (2, 1)])
def test_freeze_recipes_freeze_the_pretrained_parts_for_50_epochs_or_all(nnunet_env, monkeypatch, num_epochs, frozen):
    """freeze50epochs: the pretrained group at lr 0 for 50 of nnU-Net's 1000 epochs (5% of a shorter run, at least
    1; the warm-up's rule), then at the trainer's poly lr; frozen: at lr 0 in every epoch."""
    _write_checkpoint(nnunet_env, "mim")
    monkeypatch.setenv("nnUNet_ssp_num_epochs", str(num_epochs))
    assert _trainer(nnUNetTrainerMIM_warmup).warmup_epochs == frozen
    for cls, last_frozen in (
        (ssp_trainers.nnUNetTrainerMIM_freeze50epochs, frozen - 1),
        (ssp_trainers.nnUNetTrainerMIM_frozen_paperSchedule, num_epochs - 1),
    ):
        trainer = _trainer(cls)
        trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 4)
        optimizer, scheduler = trainer.configure_optimizers()
        for epoch in sorted({0, last_frozen, min(last_frozen + 1, num_epochs - 1), num_epochs - 1}):
            scheduler.step(epoch)
            pretrained = 0.0 if epoch <= last_frozen else _poly(epoch, num_epochs)
            assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
                [_poly(epoch, num_epochs), pretrained], rel=1e-12, abs=0
            )


def _loaded_digests(record):
    return {
        k: v
        for k, v in record["network_tensor_sha256_after_load"].items()
        if k.split(".")[0] in record["loaded"]["parts"]
    }


def test_every_strategy_variant_loads_the_same_parts_as_its_parent(nnunet_env, monkeypatch):
    """The strategies change how the loaded parts train, not what is loaded: each variant's ssp_init.json records
    the parent's parts and the same tensors after loading, and its strategy."""
    for method in ("mim", "dino"):
        _write_checkpoint(nnunet_env, method)
    monkeypatch.setenv("nnUNet_ssp_num_epochs", "40")
    for parent in (
        nnUNetTrainerMIM,
        nnUNetTrainerDINO,
        ssp_trainers.nnUNetTrainerSimCLR,
        ssp_trainers.nnUNetTrainerPCL,
        nnUNetTrainerSSP,
    ):
        if parent.ssp_method in ("simclr", "pcl"):
            _write_checkpoint(nnunet_env, parent.ssp_method)
        if parent is nnUNetTrainerSSP:  # the generic trainer loads what the exported file holds
            monkeypatch.setenv("nnUNet_ssp_checkpoint", _write_checkpoint(nnunet_env, "mim")[0])
        _load_like_on_train_start(_trainer(parent))
        expected = json.load(open(os.path.join(_fold_folder(nnunet_env, parent), "ssp_init.json")))
        assert expected["fine_tuning"] == {"recipe": "paper"}
        for recipe in STRATEGY_RECIPES:
            cls = getattr(ssp_trainers, f"{parent.__name__}_{recipe}")
            assert cls.recipe == recipe and getattr(ssp_trainers, f"{cls.__name__}_paperSchedule").recipe == recipe
            _load_like_on_train_start(_trainer(cls))
            record = json.load(open(os.path.join(_fold_folder(nnunet_env, cls), "ssp_init.json")))
            for key in ("loaded", "method", "initial_lr"):
                assert record[key] == expected[key], (cls.__name__, key)
            assert _loaded_digests(record) == _loaded_digests(expected)  # the other parts keep their random init
            assert record["fine_tuning"] == {
                "recipe": recipe,
                "pretrained_lr_factor": 0.1 if "Tenth" in recipe else 1.0,
                "frozen_epochs": {"freeze50epochs": 2, "frozen": 40}.get(recipe, 0),
            }
    for recipe in STRATEGY_RECIPES:  # nothing is pretrained in the from-scratch baseline
        assert not hasattr(ssp_trainers, f"nnUNetTrainerBaseline_{recipe}")
