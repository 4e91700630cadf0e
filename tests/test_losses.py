"""The self-supervised losses against independent float64 NumPy references written with explicit loops."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pretraining.losses.decorrelation import offdiagonal_correlation
from pretraining.losses.dino import DINOLoss
from pretraining.losses.ntxent import nt_xent
from pretraining.losses.positional_contrastive import positional_contrastive, positive_mask, supervised_contrastive
from pretraining.methods.dino import collapse_warning, ema_update, teacher_momentum, teacher_temperature


def normalised(z):
    z = np.asarray(z, dtype=np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(x):
    return np.exp(log_softmax(x))


def supervised_contrastive_reference(z, positives, tau):
    """Khosla et al.'s L_out, anchor by anchor; anchors without positives are skipped."""
    z = normalised(z)
    per_anchor = []
    for i in range(len(z)):
        members = [p for p in range(len(z)) if p != i and positives[i][p]]
        if not members:
            continue
        denominator = sum(math.exp(z[i] @ z[a] / tau) for a in range(len(z)) if a != i)
        per_anchor.append(-np.mean([math.log(math.exp(z[i] @ z[p] / tau) / denominator) for p in members]))
    return np.mean(per_anchor)


def nt_xent_reference(a, b, tau):
    z = normalised(np.concatenate([a, b]))
    n = len(a)
    losses = []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        denominator = sum(math.exp(z[i] @ z[k] / tau) for k in range(2 * n) if k != i)
        losses.append(-math.log(math.exp(z[i] @ z[partner] / tau) / denominator))
    return np.mean(losses)


def positive_mask_reference(positions, threshold):
    m = len(positions)
    return [[i != j and abs(positions[i] - positions[j]) < threshold for j in range(m)] for i in range(m)]


@pytest.mark.parametrize("n, d, tau", [(1, 3, 0.1), (4, 8, 0.1), (7, 5, 0.5), (16, 32, 0.05)])
def test_nt_xent_matches_reference(n, d, tau):
    generator = torch.Generator().manual_seed(n * d)
    z_a, z_b = torch.randn(n, d, generator=generator), torch.randn(n, d, generator=generator)
    assert nt_xent(z_a, z_b, tau).item() == pytest.approx(nt_xent_reference(z_a.numpy(), z_b.numpy(), tau), abs=1e-5)


@pytest.mark.parametrize("n, tau", [(3, 0.1), (5, 0.5)])
def test_nt_xent_analytic_values(n, tau):
    one_hot = torch.eye(n + 2)[:n]  # partners identical (s = 1), all other views orthogonal (s = 0)
    aligned = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (2 * n - 2)))
    assert nt_xent(one_hot, one_hot, tau).item() == pytest.approx(aligned, rel=1e-5, abs=1e-6)
    identical = torch.ones(n, 4)  # all 2N views the same: every one of the 2N − 1 candidates is equally likely
    assert nt_xent(identical, identical, tau).item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)


def test_nt_xent_is_scale_invariant_with_finite_gradients(seeded):
    z_a, z_b = torch.randn(6, 10), torch.randn(6, 10)
    scaled_a = (z_a * 1e3).requires_grad_()
    loss = nt_xent(scaled_a, z_b * 1e-3, 0.1)
    assert loss.item() == pytest.approx(nt_xent(z_a, z_b, 0.1).item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(scaled_a.grad).all() and scaled_a.grad.abs().sum() > 0
    assert torch.isfinite(nt_xent(z_a.half(), z_b.half(), 0.01))  # cast to float32 inside, no overflow


def test_nt_xent_rejects_bad_shapes():
    with pytest.raises(ValueError):
        nt_xent(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError):
        nt_xent(torch.randn(0, 8), torch.randn(0, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_positive_mask_by_hand(dtype):
    # The one boundary pair is (0.0, 0.1): 0.1 − 0.0 is exactly the threshold in either dtype (the scalar is
    # rounded to the tensor's dtype), so strict < excludes it. The other differences are clearly off 0.1.
    positions = torch.tensor([0.0, 0.05, 0.1, 0.3, 0.32], dtype=dtype)
    expected = torch.tensor(
        [[0, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.bool
    )
    assert torch.equal(positive_mask(positions, 0.1), expected)


def test_positional_contrastive_matches_reference(seeded):
    positions = [0.0, 0.1, 0.15, 0.5, 0.55, 0.9]  # N = 6 slices of several subjects -> 12 views
    z_a, z_b = torch.randn(6, 8), torch.randn(6, 8)
    views = np.concatenate([positions, positions])
    mask = positive_mask_reference(views, 0.12)
    assert all(mask[i][(i + 6) % 12] for i in range(12))  # each view's partner is a positive
    expected = supervised_contrastive_reference(torch.cat([z_a, z_b]).numpy(), mask, 0.1)
    actual = positional_contrastive(z_a, z_b, torch.tensor(positions), threshold=0.12, temperature=0.1)
    assert actual.item() == pytest.approx(expected, abs=1e-5)


def test_supervised_contrastive_skips_anchors_without_positives(seeded):
    z = torch.randn(5, 4)
    positives = torch.zeros(5, 5, dtype=torch.bool)
    positives[0, 2] = positives[2, 0] = positives[1, 2] = True
    positives[3, 3] = True  # the diagonal is ignored: anchor 3 has no positive either
    expected = supervised_contrastive_reference(z.numpy(), positives.numpy() & ~np.eye(5, dtype=bool), 0.2)
    assert supervised_contrastive(z, positives, 0.2).item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError):
        supervised_contrastive(z, torch.eye(5, dtype=torch.bool))


def test_supervised_contrastive_with_partners_only_is_nt_xent(seeded):
    z_a, z_b = torch.randn(5, 6), torch.randn(5, 6)
    partners = torch.eye(10, dtype=torch.bool).roll(5, dims=1)
    assert supervised_contrastive(torch.cat([z_a, z_b]), partners, 0.3).item() == pytest.approx(
        nt_xent(z_a, z_b, 0.3).item(), rel=1e-5
    )


def dino_reference(students, teachers, center, tau_s, tau_t):
    pair_losses = []
    for i, t in enumerate(teachers):
        p = softmax((t - center) / tau_t)
        for v, s in enumerate(students):
            if v == i:
                continue
            log_q = log_softmax(s / tau_s)
            pair_losses.append(np.mean([-np.sum(p[b] * log_q[b]) for b in range(len(t))]))
    return np.mean(pair_losses)


def teacher_statistics_reference(teachers, center, tau_t):
    p = softmax((np.concatenate(teachers) - center) / tau_t)
    entropy = np.mean([-np.sum(row * np.log(row)) for row in p])
    mean_p = p.mean(axis=0)
    return entropy, np.sum(mean_p * np.log(mean_p * p.shape[1]))


def test_dino_loss_centre_and_statistics_match_reference(seeded):
    k, b, tau_s, tau_t, m = 16, 4, 0.1, 0.2, 0.9
    criterion = DINOLoss(k, student_temperature=tau_s, center_momentum=m)
    center = np.random.default_rng(0).normal(size=(1, k)) * 0.1
    criterion.center.copy_(torch.from_numpy(center))
    for _ in range(2):
        students = [torch.randn(b, k) for _ in range(5)]  # 2 global, then 3 local views
        teachers = [torch.randn(b, k) * 0.3 for _ in range(2)]
        teachers_np = [t.double().numpy() for t in teachers]
        loss = criterion(students, teachers, tau_t)
        expected = dino_reference([s.double().numpy() for s in students], teachers_np, center, tau_s, tau_t)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        entropy, kl = teacher_statistics_reference(teachers_np, center, tau_t)
        assert criterion.last_statistics["teacher_entropy"] == pytest.approx(entropy, rel=1e-5, abs=1e-6)
        assert criterion.last_statistics["teacher_kl_to_uniform"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
        center = m * center + (1 - m) * np.concatenate(teachers_np).mean(axis=0, keepdims=True)
        np.testing.assert_allclose(criterion.center.numpy(), center, rtol=1e-5, atol=1e-6)
    assert "center" in criterion.state_dict()


def test_dino_uniform_teacher_statistics(seeded):
    criterion = DINOLoss(32)
    criterion([torch.randn(3, 32) for _ in range(3)], [torch.full((3, 32), 2.0)] * 2, 0.04)
    assert criterion.last_statistics["teacher_entropy"] == pytest.approx(math.log(32), rel=1e-5)
    assert criterion.last_statistics["teacher_kl_to_uniform"] == pytest.approx(0.0, abs=1e-5)


def test_dino_gradients_reach_the_student_only(seeded):
    student, teacher = nn.Linear(6, 10), nn.Linear(6, 10)
    global_views, local_views = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    student_out = [student(x) for x in (*global_views, *local_views)]
    teacher_out = [teacher(x) for x in global_views]  # computed with grad: the loss must detach them
    DINOLoss(10)(student_out, teacher_out, 0.04).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_temperature_schedule():
    assert teacher_temperature(0, 30) == pytest.approx(0.02)
    assert teacher_temperature(15, 30) == pytest.approx(0.02 + 0.02 * 15 / 29)
    assert teacher_temperature(29, 30) == pytest.approx(0.04)
    assert teacher_temperature(30, 30) == teacher_temperature(100, 30) == 0.04
    assert [teacher_temperature(e, 5, 0.1, 0.5) for e in range(7)] == pytest.approx(
        list(np.linspace(0.1, 0.5, 5)) + [0.5, 0.5]
    )
    assert teacher_temperature(0, 1) == teacher_temperature(0, 0) == 0.04


def test_teacher_momentum_schedule():
    assert teacher_momentum(0, 100) == pytest.approx(0.996)
    assert teacher_momentum(50, 100) == pytest.approx(0.998)
    assert teacher_momentum(100, 100) == pytest.approx(1.0)


def test_ema_update_follows_formula_and_leaves_buffers(seeded):
    teacher, student = (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2))
    teacher[1].running_mean.fill_(5.0)
    student[1].running_mean.fill_(-1.0)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new.detach(), 0.9 * old + 0.1 * s.detach())
    assert torch.equal(teacher[1].running_mean, torch.full((4,), 5.0))


def test_collapse_warning():
    k = 1000
    log_k = math.log(k)
    assert collapse_warning(0.5 * log_k, 0.1 * log_k, k) is None
    assert collapse_warning(0.01 * log_k, 0.1 * log_k, k) is None  # sharp but diverse outputs are healthy
    uniform = collapse_warning(0.99 * log_k, 0.001, k)
    one_dimension = collapse_warning(0.01 * log_k, 0.9 * log_k, k)
    assert "uniform" in uniform and "one dimension" in one_dimension
    assert all("teacher temperature" in w and "\n" not in w for w in (uniform, one_dimension))


def _offdiagonal_correlation_reference(features: np.ndarray) -> float:
    """Mean squared off-diagonal correlation of the channels of (N, C, H, W), every pixel a sample (NumPy)."""
    samples = np.moveaxis(features, 1, -1).reshape(-1, features.shape[1]).astype(np.float64)
    correlation = np.corrcoef(samples.T)
    c = len(correlation)
    return float(((correlation - np.eye(c)) ** 2).sum() / (c * (c - 1)))


def test_decorrelation_matches_reference_and_its_extremes(seeded):
    features = torch.randn(4, 6, 9, 9) @ torch.eye(9) + torch.randn(4, 1, 9, 9)  # channels share a component
    assert offdiagonal_correlation(features).item() == pytest.approx(
        _offdiagonal_correlation_reference(features.numpy()), rel=1e-3
    )
    same = torch.randn(4, 1, 9, 9).repeat(1, 5, 1, 1) * torch.arange(1.0, 6.0).view(1, 5, 1, 1)
    assert offdiagonal_correlation(same).item() == pytest.approx(1.0, rel=1e-3)
    features.requires_grad_(True)
    offdiagonal_correlation(features).backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
