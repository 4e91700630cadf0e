"""SimCLR, PCL and DINO as methods of the loop: views, heads, where gradients flow, schedules, and the k-NN probe."""

import math

import numpy as np
import pytest
import torch

from nnunet_ssp.errors import SSPError
from pretraining.data.views import SolarizeTransform
from pretraining.heads import NormalizedLinear, encoder_width
from pretraining.losses.ntxent import nt_xent
from pretraining.losses.positional_contrastive import positional_contrastive
from pretraining.methods import METHODS, all_options, get_method
from pretraining.methods.base import Step
from pretraining.methods.dino import DINO
from pretraining.methods.pcl import PCL
from pretraining.methods.simclr import SimCLR
from pretraining.probe import knn_errors

PATCH = (64, 64)


def _grads(module):
    return {name: p.grad for name, p in module.named_parameters()}


def test_every_method_is_available_and_options_are_unique_per_meaning():
    assert sorted(METHODS) == ["dino", "mim", "pcl", "simclr"]
    assert sorted(all_options()["temperature"][1]) == ["pcl", "simclr"]
    with pytest.raises(SSPError, match="unknown SSP method 'byol'"):
        get_method("byol")
    with pytest.raises(TypeError, match="mask_ratio"):
        SimCLR(None, PATCH, mask_ratio=0.5)


def test_simclr_views_and_head_width_follow_the_plans(target, seeded):
    method = SimCLR(target.network_spec, PATCH)
    model = method.build_model()
    width = encoder_width(model.network)
    assert width == target.network_spec.arch_kwargs["features_per_stage"][-1]
    linears = [m for m in model.head.layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4 * width, width), (width, width), (width, width)]
    views = method.view_transforms()
    assert len(views) == 2
    image = torch.randn(1, 80, 90)
    assert views[0](image=image.clone())["image"].shape == (1, *PATCH)


def test_simclr_loss_is_nt_xent_of_the_two_views_and_trains_the_encoder_only(target, seeded):
    method = SimCLR(target.network_spec, PATCH, temperature=0.2)
    model = method.build_model()
    batch = {"views": [torch.randn(4, 1, *PATCH), torch.randn(4, 1, *PATCH)]}
    loss, _ = method.loss(model, batch, Step(0, 0, 1, 1))
    with torch.no_grad():
        z = model(torch.cat(batch["views"]))
    assert loss.item() == pytest.approx(nt_xent(z[:4], z[4:], 0.2).item(), rel=1e-5)
    loss.backward()
    grads = _grads(model)
    kernels = [k for k, p in model.named_parameters() if k.startswith("network.encoder.") and p.ndim > 1]
    assert kernels and all(grads[k] is not None and grads[k].abs().sum() > 0 for k in kernels)
    assert all(g is None for k, g in grads.items() if k.startswith("network.decoder."))


def test_contrastive_collapse_is_measured_and_warned_about(target, seeded):
    method = SimCLR(target.network_spec, PATCH)
    model = method.build_model()
    views = [torch.randn(8, 1, *PATCH), torch.randn(8, 1, *PATCH)]
    _, healthy = method.loss(model, {"views": views}, Step(0, 0, 1, 1))
    with torch.no_grad():  # a head that maps everything to one point
        model.head.layers[-1].weight.zero_()
        model.head.layers[-1].bias.fill_(1.0)
    loss, collapsed = method.loss(model, {"views": views}, Step(0, 0, 1, 1))
    assert collapsed["projection_spread"] == pytest.approx(0, abs=1e-6)
    assert loss.item() == pytest.approx(math.log(15), abs=1e-5)  # chance: 2N - 1 = 15 equally similar views
    assert "collapsed" in method.epoch_warning(collapsed)
    assert healthy["projection_spread"] > collapsed["projection_spread"]
    assert method.epoch_warning({"projection_spread": 0.8}) is None


def test_pcl_uses_the_slice_positions_of_the_batch(target, seeded):
    method = PCL(target.network_spec, PATCH, position_threshold=0.3)
    assert method.defaults.batch_size == 64 and method.defaults.weight_decay == 1e-5
    model = method.build_model()
    views = [torch.randn(4, 1, *PATCH), torch.randn(4, 1, *PATCH)]
    positions = torch.tensor([0.0, 0.1, 0.5, 0.9])
    loss, _ = method.loss(model, {"views": views, "slice_position": positions}, Step(0, 0, 1, 1))
    with torch.no_grad():
        z = model(torch.cat(views))
    expected = positional_contrastive(z[:4], z[4:], positions, threshold=0.3, temperature=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.fixture
def dino(target):
    return DINO(target.network_spec, PATCH, dino_out_dim=64, dino_local_views=2)


def test_dino_views_are_two_global_at_the_patch_and_local_at_half(dino, seeded):
    views = dino.view_transforms()
    assert len(views) == 4
    shapes = [v(image=torch.randn(1, 100, 100))["image"].shape for v in views]
    assert shapes == [(1, 64, 64)] * 2 + [(1, 32, 32)] * 2


def test_dino_head_matches_the_recipe(dino, seeded):
    model = dino.build_model()
    head = model.student.head
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (4 * encoder_width(model.student.network), 2048),
        (2048, 2048),
        (2048, 256),
    ]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.mlp) == 2
    assert isinstance(head.last_layer, NormalizedLinear) and head.last_layer.weight.shape == (64, 256)
    x = torch.randn(3, 256)
    w = head.last_layer.weight.detach()
    expected = x @ (w / w.norm(dim=1, keepdim=True)).T  # weight norm with the gain fixed at 1
    assert torch.allclose(head.last_layer(x), expected, atol=1e-5)
    for s, t in zip(model.student.parameters(), model.teacher.parameters()):
        assert torch.equal(s, t) and not t.requires_grad  # teacher starts as a frozen copy


def test_dino_gradients_reach_the_student_only_and_the_last_layer_is_frozen_in_epoch_0(dino, seeded):
    model = dino.build_model()
    batch = {
        "views": [
            torch.randn(3, 1, 64, 64),
            torch.randn(3, 1, 64, 64),
            torch.randn(3, 1, 32, 32),
            torch.randn(3, 1, 32, 32),
        ]
    }
    for epoch, frozen in ((0, True), (1, False)):
        model.zero_grad(set_to_none=True)
        loss, metrics = dino.loss(model, batch, Step(epoch, 0, 1, 10))
        loss.backward()
        dino.before_optimizer_step(model, Step(epoch, 0, 1, 10))
        assert all(p.grad is None for p in model.teacher.parameters())
        assert all(
            p.grad is not None and p.grad.abs().sum() > 0
            for k, p in model.student.named_parameters()
            if k.startswith("network.encoder.") and p.ndim > 1
        )
        assert (model.student.head.last_layer.weight.grad is None) == frozen
        assert set(metrics) == {"teacher_entropy", "teacher_kl_to_uniform", "student_teacher_kl"}


def test_dino_parameter_groups_decay_weights_but_not_biases_or_norms(dino, seeded):
    model = dino.build_model()
    decayed, plain = dino.parameter_groups(model, 1e-4)
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.student.parameters()))
    teacher = {id(p) for p in model.teacher.parameters()}
    assert not teacher & {id(p) for g in (decayed, plain) for p in g["params"]}


def test_dino_schedules(dino):
    epochs, iters = 100, 10
    lr = [dino.lr_at(0.0075, Step(e, i, iters, epochs)) for e in range(epochs) for i in range(iters)]
    assert lr[0] == 0 and lr[50] == pytest.approx(0.0075 * 50 / 100)
    assert max(lr) == pytest.approx(0.0075) and lr.index(max(lr)) == 100  # peak after the 10-epoch warm-up
    assert lr[-1] == pytest.approx(1e-6, abs=1e-7) and all(a >= b for a, b in zip(lr[100:], lr[101:]))
    assert dino.teacher_temperature_at(Step(0, 0, iters, epochs)) == pytest.approx(0.02)
    assert dino.teacher_temperature_at(Step(30, 0, iters, epochs)) == pytest.approx(0.04)
    # short runs keep the paper's fractions: 10% lr warm-up, 30% temperature warm-up
    assert dino.lr_at(0.0075, Step(1, 0, iters, 10)) == pytest.approx(0.0075)
    assert dino.teacher_temperature_at(Step(3, 0, iters, 10)) == pytest.approx(0.04)


def test_dino_teacher_follows_the_student_by_ema(dino, seeded):
    model = dino.build_model()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in model.teacher.parameters()]
    dino.after_step(model, Step(0, 0, 10, 10))  # momentum 0.996 at step 0
    for t0, t, s in zip(before, model.teacher.parameters(), model.student.parameters()):
        assert torch.allclose(t, 0.996 * t0 + 0.004 * s, atol=1e-6)


def test_dino_warns_when_the_teacher_collapses(dino):
    log_k = math.log(64)
    assert dino.epoch_warning({"teacher_entropy": 0.5 * log_k, "teacher_kl_to_uniform": 0.1 * log_k}) is None
    assert "collapse" in dino.epoch_warning({"teacher_entropy": 0.99 * log_k, "teacher_kl_to_uniform": 0.0})
    assert "collapse" in dino.epoch_warning({"teacher_entropy": 0.001, "teacher_kl_to_uniform": 0.99 * log_k})


def test_solarize_inverts_positive_pixels_against_the_maximum():
    image = torch.tensor([[[-1.0, 0.0, 0.5], [2.0, 3.0, -0.2]]])
    out = SolarizeTransform()(image=image.clone())["image"]
    assert torch.equal(out, torch.tensor([[[-1.0, 0.0, 2.5], [1.0, 0.0, -0.2]]]))


def test_knn_probe_errors():
    rng = np.random.default_rng(0)
    position = {"reference": rng.uniform(0, 0.9, 200), "query": rng.uniform(0, 0.9, 100)}
    phase = {"reference": rng.uniform(0, 1, 200), "query": rng.uniform(0, 1, 100)}

    def informative(group):  # an embedding that encodes position and phase
        angle = 2 * np.pi * phase[group]
        return torch.nn.functional.normalize(
            torch.tensor(np.stack([np.cos(angle), np.sin(angle), 3 * position[group]], axis=1), dtype=torch.float32),
            dim=1,
        )

    good = knn_errors(informative("reference"), informative("query"), position, phase, k=3)
    noise = [torch.nn.functional.normalize(torch.randn(n, 16), dim=1) for n in (200, 100)]
    bad = knn_errors(*noise, position, phase, k=3)
    expected_chance = np.abs(np.median(position["reference"]) - position["query"]).mean()
    assert good["probe_position_mae_chance"] == bad["probe_position_mae_chance"] == pytest.approx(expected_chance)
    assert good["probe_position_mae"] < 0.25 * expected_chance and good["probe_phase_error"] < 0.1
    assert bad["probe_position_mae"] > 0.7 * expected_chance and bad["probe_phase_error"] > 0.15
    # circular phase: neighbours at 0.95 and 0.05 average to 0, not 0.5
    one = torch.tensor([[1.0, 0.0]])
    wrap = knn_errors(
        torch.cat([one, one]),
        one,
        {"reference": np.array([0.1, 0.1]), "query": np.array([0.1])},
        {"reference": np.array([0.95, 0.05]), "query": np.array([0.0])},
        k=2,
    )
    assert wrap["probe_phase_error"] == pytest.approx(0.0, abs=1e-9) and wrap["probe_position_mae"] == 0


@pytest.mark.parametrize("grid, trains", [(1, False), (2, True)])
def test_grid_pooling_makes_the_instance_norm_encoder_trainable_where_global_pooling_stalls(target, grid, trains):
    """Why the embedding is grid-pooled: with nnU-Net's InstanceNorm a global average barely depends on the image,
    and NT-Xent on a fixed batch stays at its chance value; a 2x2 grid learns at once."""
    torch.manual_seed(0)
    method = SimCLR(target.network_spec, PATCH, pool_grid=grid)
    model = method.build_model()
    images = torch.randn(16, 1, *PATCH)
    batch = {"views": [images + 0.3 * torch.randn_like(images), images + 0.3 * torch.randn_like(images)]}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(12):
        loss, _ = method.loss(model, batch, Step(0, 0, 1, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(31), abs=0.1)  # chance: 2N - 1 = 31 equally similar views
    assert (min(losses[-3:]) < 0.5 * losses[0]) == trains, losses
