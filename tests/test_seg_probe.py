"""The segmentation probe: its Dice against numpy on known masks, its head against the concatenated upsampled
features, its data (training cases only, seeded, deterministic), ``--seg-probe``/``--no-seg-probe``, a dataset without
labels, the columns in the log, metrics and progress.png, and MIM beating the random network on the phantom."""

import glob
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PHANTOM_DATASET, PHANTOM_ID, run_cli

from nnunet_ssp.network import PlannedConfiguration
from nnunet_ssp.splits import subject_of_case
from pretraining.data.cache import build_or_load_cache
from pretraining.data.sources import discover_sources
from pretraining.methods import METHODS
from pretraining.progress_log import probe_panels
from pretraining.run import PretrainSettings, make_pretrainer
from pretraining.seg_probe import (
    LabelledSlices,
    LinearSegmentationHead,
    SegmentationProbe,
    features_at,
    make_seg_probe,
    pooled_dice,
    random_network_builder,
    sample_pixels,
)
from pretraining.state import LATEST_CHECKPOINT


def numpy_dice(predicted: np.ndarray, reference: np.ndarray, label: int) -> float:
    """2 TP / (2 TP + FP + FN) of one label, counted pixel by pixel."""
    tp = fp = fn = 0
    for p, r in zip(predicted.ravel(), reference.ravel()):
        tp += p == label and r == label
        fp += p == label and r != label
        fn += p != label and r == label
    return 2 * tp / (2 * tp + fp + fn)


def known_masks(num_slices=6, size=32, seed=0) -> np.ndarray:
    """(N, H, W) label maps: a square of label 1 inside a ring of label 2, and a separate square of label 3."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((num_slices, size, size), dtype=np.int64)
    for n in range(num_slices):
        y, x = rng.integers(4, 10, size=2)
        labels[n, y - 3 : y + 5, x - 3 : x + 5] = 2
        labels[n, y - 1 : y + 3, x - 1 : x + 3] = 1
        y, x = rng.integers(20, 26, size=2)
        labels[n, y : y + 5, x : x + 4] = 3
    return labels


class FeatureNetwork(torch.nn.Module):
    """Stands in for a pretrained network where only its features matter: the encoder's stages are the input and
    its 2x average pool; the decoder's last stage (an identity) sees the input."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.encoder = lambda x: [x, F.avg_pool2d(x, 2)]
        self.decoder = torch.nn.Module()
        self.decoder.stages = torch.nn.ModuleList([torch.nn.Identity()])

    def forward(self, x):
        return self.decoder.stages[-1](x)


def test_pooled_dice_matches_numpy_on_known_masks():
    reference = known_masks()
    predicted = reference.copy()
    predicted[0, :, :16] = 0  # misses part of slice 0's structures
    predicted[1, 28:, :] = 2  # a false-positive band in slice 1
    predicted[2][predicted[2] == 3] = 0  # misses label 3 in slice 2
    expected = [numpy_dice(predicted, reference, label) for label in (1, 2, 3)]
    assert 0 < min(expected) < 1
    np.testing.assert_allclose(pooled_dice(predicted, reference, (1, 2, 3)), expected)
    assert np.isnan(pooled_dice(reference, reference, (4,))[0])


@pytest.mark.parametrize("source", ["encoder", "decoder"])
def test_probe_dice_equals_numpy_dice_of_what_the_features_can_tell(source):
    """The images show labels 1 and 2 (one channel each) but not 3: the best linear head finds 1 and 2 exactly and
    calls 3 background, whose Dice numpy computes from the masks alone."""
    fit_labels, scored_labels = torch.from_numpy(known_masks(seed=0)), torch.from_numpy(known_masks(seed=1))

    def slices(labels):
        images = torch.stack([(labels == 1), (labels == 2)], dim=1).float()
        return LabelledSlices(images, labels, ["s"] * len(labels))

    probe = SegmentationProbe(
        slices(fit_labels), slices(scored_labels), 4, source, FeatureNetwork, seed=0, fit_pixels=4096
    )
    blind_to_3 = np.where(scored_labels.numpy() == 3, 0, scored_labels.numpy())
    expected = np.mean([numpy_dice(blind_to_3, scored_labels.numpy(), label) for label in (1, 2, 3)])
    assert expected == pytest.approx(2 / 3)
    result = probe.evaluate(FeatureNetwork())
    assert result["probe_seg_dice"] == pytest.approx(expected, abs=1e-9)
    assert result["probe_seg_dice_random_init"] == pytest.approx(expected, abs=1e-9)
    assert result["seg_probe_time_s"] > 0


def test_head_is_a_linear_map_of_the_concatenated_upsampled_features():
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(3, c, 32 // 2**s, 32 // 2**s, generator=generator) for s, c in enumerate((4, 6, 8))]
    weight, bias = torch.randn(5, 18, generator=generator), torch.randn(5, generator=generator)
    concatenated = torch.cat(
        [
            F.interpolate(f, size=(32, 32), mode="bilinear", align_corners=False) if f.shape[-1] != 32 else f
            for f in features
        ],
        dim=1,
    )
    expected = torch.einsum("kc,nchw->nkhw", weight, concatenated) + bias[None, :, None, None]
    logits = LinearSegmentationHead([4, 6, 8], weight, bias, (32, 32))(features)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    grid, labels = sample_pixels(torch.zeros(3, 32, 32, dtype=torch.long), 300, seed=0)
    rows = torch.cat([features_at(f, grid) for f in features], dim=1)
    pixels = ((grid + 1) * 16 - 0.5).round().long()  # back from grid_sample's coordinates to (x, y)
    at = (
        torch.arange(3)[:, None].expand(-1, grid.shape[1]).reshape(-1),
        pixels[..., 1].reshape(-1),
        pixels[..., 0].reshape(-1),
    )
    torch.testing.assert_close(rows, concatenated.permute(0, 2, 3, 1)[at], rtol=1e-5, atol=1e-5)
    assert len(labels) == 3 * 100 and len(set(map(tuple, pixels[0].tolist()))) == 100


def test_probe_reads_only_training_cases_a_seeded_choice(phantom_env):
    root, env = phantom_env
    raw = os.path.join(env["nnUNet_raw"], PHANTOM_DATASET)
    training = {subject_of_case(os.path.basename(f)[: -len(".nii.gz")]) for f in glob.glob(f"{raw}/labelsTr/*.nii.gz")}
    test = {subject_of_case(os.path.basename(f)[: -len(".nii.gz")]) for f in glob.glob(f"{raw}/labelsTs/*.nii.gz")}
    assert training and test and not training & test
    target = PlannedConfiguration.from_preprocessed(str(PHANTOM_ID))
    method = METHODS["mim"](target.network_spec, target.configuration_manager.patch_size)
    probe, note = make_seg_probe(target, method, seed=0)
    fit, scored = set(probe.fit.subjects), set(probe.scored.subjects)
    assert fit | scored <= training and not fit & scored and len(fit) == len(scored) == 2
    assert probe.source == "decoder" and "decoder's last features" in note
    assert tuple(probe.fit.images.shape[2:]) == tuple(target.configuration_manager.patch_size)
    assert set(np.unique(probe.fit.labels.numpy())) == {0, 1, 2, 3}
    again, _ = make_seg_probe(target, method, seed=0)
    assert again.fit.subjects == probe.fit.subjects and torch.equal(again.fit.images, probe.fit.images)
    encoder_only = METHODS["simclr"](target.network_spec, target.configuration_manager.patch_size)
    assert make_seg_probe(target, encoder_only, seed=0)[0].source == "encoder"


def test_probe_is_deterministic_and_leaves_the_rngs_and_the_network_alone():
    generator = torch.Generator().manual_seed(0)
    labels = torch.from_numpy(known_masks(num_slices=4))
    images = torch.randn(4, 3, 32, 32, generator=generator) + labels[:, None].float()
    probe = SegmentationProbe(
        LabelledSlices(images, labels, ["a"] * 4),
        LabelledSlices(images, labels, ["b"] * 4),
        4,
        "encoder",
        FeatureNetwork,
    )
    network = FeatureNetwork().train()
    torch.manual_seed(7)
    first = probe.evaluate(network)
    assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(7)).item()
    assert network.training
    assert probe.evaluate(network)["probe_seg_dice"] == first["probe_seg_dice"]


def test_the_random_network_is_the_one_a_run_of_the_seed_starts_from(target):
    method = METHODS["mim"](target.network_spec, target.configuration_manager.patch_size)
    torch.manual_seed(11)
    random_network = random_network_builder(method, seed=3)()
    assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(11)).item()
    torch.manual_seed(3)  # as Pretrainer starts a run of seed 3
    start = method.export_network(method.build_model()).state_dict()
    assert all(torch.equal(value, start[key]) for key, value in random_network.state_dict().items())


@pytest.fixture
def phantom_cache(phantom_env):
    root, env = phantom_env
    target = PlannedConfiguration.from_preprocessed(str(PHANTOM_ID))
    cache = build_or_load_cache(
        target,
        discover_sources(os.path.join(env["nnUNet_raw"], PHANTOM_DATASET)),
        str(root / "pretraining_cache"),
        num_processes=1,
        progress=False,
    )
    return target, cache


def pretrainer(
    name,
    target,
    cache,
    output,
    epochs=2,
    iters=1,
    batch_size=4,
    lr=None,
    seed=0,
    probe_slices=16,
    seg_probe=True,
    **options,
):
    """A Pretrainer of method ``name`` on the phantom's slice cache, with the segmentation probe by default."""
    method = METHODS[name](target.network_spec, target.configuration_manager.patch_size, **options)
    settings = PretrainSettings.of_method(
        method, epochs=epochs, iters_per_epoch=iters, batch_size=batch_size, lr=lr, seed=seed
    )
    return make_pretrainer(method, target, cache, settings, output, probe_slices=probe_slices, seg_probe=seg_probe)


def test_probe_columns_reach_the_log_the_metrics_and_progress_png_and_leave_the_run_unchanged(phantom_cache, tmp_path):
    trainer = pretrainer("simclr", *phantom_cache, str(tmp_path / "run"))
    trainer.run()
    history = torch.load(os.path.join(trainer.output_folder, LATEST_CHECKPOINT), weights_only=True)["history"]
    for key in ("probe_seg_dice", "probe_seg_dice_random_init", "seg_probe_time_s"):
        assert len(history[key]) == 2 and history[key] == trainer.history[key]
    assert 0 <= history["probe_seg_dice"][-1] <= 1 and len(set(history["probe_seg_dice_random_init"])) == 1
    assert probe_panels(history) == [
        ("segmentation probe Dice, held out (up: better)", ["probe_seg_dice", "probe_seg_dice_random_init"]),
        (
            "k-NN probe error, held out (down: better)",
            ["probe_position_mae", "probe_position_mae_chance", "probe_phase_error"],
        ),
    ]
    assert os.path.isfile(os.path.join(trainer.output_folder, "progress.png"))
    log = open(os.path.join(trainer.output_folder, "training_log.txt")).read()
    assert "segmentation probe: a linear head on every encoder stage's features" in log
    assert "epoch 1: loss" in log and "probe_seg_dice_random_init" in log and "seg_probe_time_s" in log
    without = pretrainer("simclr", *phantom_cache, str(tmp_path / "without"), seg_probe=False)
    without.run()
    assert "probe_seg_dice" not in without.history
    pretrained, alone = trainer.model.state_dict(), without.model.state_dict()
    assert all(torch.equal(value, alone[key]) for key, value in pretrained.items())  # the probe changes nothing


def test_a_dataset_without_labelled_cases_turns_the_probe_off_with_a_log_line(phantom_cache, tmp_path, monkeypatch):
    target, cache = phantom_cache
    unlabelled = tmp_path / "preprocessed" / target.dataset_name
    os.makedirs(unlabelled)
    for name in ("nnUNetPlans.json", "dataset.json"):  # planned, never preprocessed: no cases with labels
        shutil.copy(os.path.join(os.environ["nnUNet_preprocessed"], target.dataset_name, name), unlabelled)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    trainer = pretrainer("mim", target, cache, str(tmp_path / "run"), epochs=1)
    assert not any(isinstance(probe, SegmentationProbe) for probe in trainer.probes)  # the k-NN and decoder ones stay
    assert len(trainer.probes) == 2
    log = open(os.path.join(trainer.output_folder, "training_log.txt")).read()
    assert (
        f"segmentation probe off: {unlabelled / 'nnUNetPlans_2d'} holds no preprocessed labelled training cases" in log
    )


def test_ssp_pretrain_runs_the_probe_by_default_and_not_with_no_seg_probe(phantom_env):
    root, env = phantom_env
    logs = {}
    for flag in ([], ["--no-seg-probe"]):
        output = str(root / f"cli_seg_probe{'_'.join(flag)}")
        run_cli(
            [
                "ssp_pretrain",
                "-d",
                str(PHANTOM_ID),
                "--method",
                "simclr",
                "--epochs",
                "1",
                "--iters-per-epoch",
                "1",
                "--batch-size",
                "4",
                "--num-workers",
                "0",
                "--device",
                "cpu",
                "--probe-slices",
                "0",
                "-o",
                output,
                *flag,
            ],
            env,
        )
        logs[tuple(flag)] = open(os.path.join(output, "training_log.txt")).read()
    assert "segmentation probe: a linear head on every encoder stage's features" in logs[()]
    assert "probe_seg_dice" in logs[()]
    assert "segmentation probe" not in logs[("--no-seg-probe",)] and "probe_seg" not in logs[("--no-seg-probe",)]


def test_mim_pretraining_lifts_the_probe_above_the_random_network(phantom_cache, tmp_path):
    """20 MIM steps at batch 16 (16-px masks) on the 4-subject phantom: the k-NN probe beats chance and the
    segmentation probe the random network it started from (0.505 against 0.363 when measured; 3 x 30 steps at seed 2
    gave 0.449, 0.378, 0.407: the decoder's last features drift towards reconstruction)."""
    trainer = pretrainer(
        "mim",
        *phantom_cache,
        str(tmp_path / "mim"),
        epochs=1,
        iters=20,
        batch_size=16,
        lr=0.02,
        seed=2,
        probe_slices=256,
        mask_patch_size=16,
    )
    trainer.run()
    h = trainer.history
    assert h["probe_position_mae"][-1] < h["probe_position_mae_chance"][-1]
    assert h["probe_seg_dice"][-1] > h["probe_seg_dice_random_init"][-1] + 0.05, h
