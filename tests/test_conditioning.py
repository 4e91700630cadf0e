"""The decoder-conditioning figures on inputs of known covariance, and the probe on nnU-Net's U-Net."""
import os

import numpy as np
import pytest
import torch

from pretraining.progress_log import probe_panels
from pretraining.state import LATEST_CHECKPOINT
from test_seg_probe import phantom_cache, pretrainer  # noqa: F401 (a fixture)
from nnunet_ssp.checkpoint import load_checkpoint
from nnunet_ssp.network import load_parts
from pretraining.conditioning import (DecoderConditioningProbe, calibration_slices, channel_spectrum, conditioning,
                                      decoder_conditioning, decoder_stage_outputs, rescale_decoder_outputs)


def _features_with_covariance(eigenvalues, pixels=200_000, seed=0) -> torch.Tensor:
    """(N, C, H, W) features whose channel covariance has ``eigenvalues`` in a random orthonormal basis."""
    rng = np.random.default_rng(seed)
    c = len(eigenvalues)
    basis, _ = np.linalg.qr(rng.normal(size=(c, c)))
    white = rng.normal(size=(pixels, c))
    white = (white - white.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(white.T))).T  # exactly whitened
    samples = white @ np.diag(np.sqrt(eigenvalues)) @ basis.T + 3.0  # an offset the covariance ignores
    return torch.from_numpy(samples.reshape(pixels // 100, 10, 10, c)).permute(0, 3, 1, 2).float()


def test_spectrum_condition_number_and_effective_rank_of_a_known_covariance():
    eigenvalues = np.array([100.0, 10.0, 4.0, 1.0, 0.5, 0.25])
    spectrum = channel_spectrum(_features_with_covariance(eigenvalues)).numpy()
    np.testing.assert_allclose(spectrum, eigenvalues, rtol=1e-4)
    figures = conditioning(torch.from_numpy(eigenvalues))
    p = eigenvalues / eigenvalues.sum()
    assert figures.condition_number == pytest.approx(400.0)
    assert figures.effective_rank == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert figures.top3_share == pytest.approx(114 / 115.75)
    assert figures.channels == 6


def test_isotropic_features_have_full_rank_and_one_direction_rank_one():
    isotropic = conditioning(torch.ones(8))
    assert isotropic.effective_rank == pytest.approx(8.0)
    assert isotropic.condition_number == pytest.approx(1.0)
    collapsed = conditioning(torch.tensor([5.0, 0, 0, 0]))
    assert collapsed.effective_rank == pytest.approx(1.0)
    assert collapsed.condition_number == pytest.approx(1e12)  # the floor keeps it finite


def test_probe_reads_every_decoder_stage_and_its_random_init_reference(target, seeded):
    network = target.network_spec.build(4)
    images = torch.randn(6, 1, 64, 64)
    stages = decoder_conditioning(network, images)
    assert [s.channels for s in stages] == [32, 16, 8]  # the unit plans' decoder, deepest first
    assert network.training  # the mode is restored
    probe = DecoderConditioningProbe(images, lambda: target.network_spec.build(4))
    first = probe.evaluate(network)
    assert set(first) == {f"probe_decoder_rank_{i}{s}" for i in range(3) for s in ("", "_random_init")} | {
        f"decoder_condition_{i}" for i in range(3)}
    assert first["probe_decoder_rank_2"] == pytest.approx(stages[2].effective_rank / 8)
    with torch.no_grad():  # a decoder whose last stage carries one direction only
        for block in network.decoder.stages[-1].convs:
            block.norm.weight[1:] = 0
            block.norm.bias[1:] = 0
    second = probe.evaluate(network)
    assert second["probe_decoder_rank_2"] == pytest.approx(1 / 8, rel=1e-3)
    assert second["probe_decoder_rank_2_random_init"] == first["probe_decoder_rank_2_random_init"]


def test_mim_pretraining_logs_and_plots_each_decoder_stage_and_the_probe_changes_nothing(phantom_cache, tmp_path):
    trainer = pretrainer("mim", *phantom_cache, str(tmp_path / "run"), seg_probe=False, mask_patch_size=16)
    trainer.run()
    history = torch.load(os.path.join(trainer.output_folder, LATEST_CHECKPOINT), weights_only=True)["history"]
    stages = len(trainer.method.export_network(trainer.model).decoder.stages)
    ranks = [f"probe_decoder_rank_{i}" for i in range(stages)]
    for key in ranks:
        assert len(history[key]) == 2 and all(0 < v <= 1 for v in history[key])
        assert len(set(history[key + "_random_init"])) == 1
        assert all(v >= 1 for v in history[key.replace("probe_decoder_rank", "decoder_condition")])
    panels = dict(probe_panels(history))
    assert set(panels["decoder effective rank / channels (up: better)"]) == {
        k + suffix for k in ranks for suffix in ("", "_random_init")}
    assert "decoder_condition_0" in open(os.path.join(trainer.output_folder, "training_log.txt")).read()
    without = pretrainer("mim", *phantom_cache, str(tmp_path / "without"), seg_probe=False, probe_slices=0,
                         mask_patch_size=16)
    without.run()
    assert not any(k.startswith(("probe_decoder", "decoder_condition")) for k in without.history)
    alone = without.model.state_dict()
    assert all(torch.equal(value, alone[key]) for key, value in trainer.model.state_dict().items())
    encoder_method = pretrainer("simclr", *phantom_cache, str(tmp_path / "simclr"), seg_probe=False, epochs=1)
    encoder_method.run()
    assert not any(k.startswith("probe_decoder") for k in encoder_method.history)


def _channel_std(features: torch.Tensor) -> torch.Tensor:
    return features.movedim(1, 0).reshape(features.shape[1], -1).std(dim=1)


def test_rescaling_gives_every_stage_output_the_target_std_and_changes_nothing_between_stages(target, seeded):
    network = target.network_spec.build(4)
    with torch.no_grad():  # channels of unequal scale, as pretraining leaves them
        for stage in network.decoder.stages:
            stage.convs[-1].norm.weight.uniform_(0.1, 3.0)
            stage.convs[-1].norm.bias.uniform_(-0.5, 0.5)
    images = torch.randn(5, 1, 64, 64)
    before = decoder_stage_outputs(network, images)
    medians = rescale_decoder_outputs(network, images, target_std=0.5)
    after = decoder_stage_outputs(network, images)
    for old, new in zip(before, after):
        scale = _channel_std(old) / 0.5
        torch.testing.assert_close(_channel_std(new), torch.full_like(scale, 0.5), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(new * scale.view(1, -1, 1, 1), old, rtol=1e-4, atol=1e-5)  # each stage only scaled
    assert len(medians) == 3 and all(m > 0 for m in medians)


def test_mim_checkpoint_holds_the_rescaled_decoder_and_the_same_encoder(phantom_cache, tmp_path):
    runs = {std: pretrainer("mim", *phantom_cache, str(tmp_path / f"std{std}"), seg_probe=False, probe_slices=0,
                            mask_patch_size=16, decoder_output_std=std) for std in (0.0, 1.0)}
    weights = {std: load_checkpoint(run.run())["network_weights"] for std, run in runs.items()}
    assert weights[0.0].keys() == weights[1.0].keys()
    changed = {k for k in weights[0.0] if not torch.equal(weights[0.0][k], weights[1.0][k])}
    assert changed and all(k.startswith("decoder.") for k in changed)  # the same training, a rescaled decoder
    target, cache = phantom_cache
    network = target.network_spec.build(4, deep_supervision=True)
    changed_modules = {type(network.get_submodule(k.rsplit(".", 1)[0])) for k in changed}
    assert changed_modules == {torch.nn.InstanceNorm2d, torch.nn.ConvTranspose2d}, changed_modules
    images = calibration_slices(cache, target.configuration_manager.patch_size, 64, 0)
    load_parts(network, weights[1.0], ("encoder", "decoder"), source="checkpoint")
    for features in decoder_stage_outputs(network, images):
        torch.testing.assert_close(_channel_std(features), torch.ones(features.shape[1]), rtol=1e-3, atol=1e-4)
    trained = runs[1.0].method.export_network(runs[1.0].model).state_dict()
    assert all(torch.equal(trained[k], weights[0.0][k]) for k in weights[0.0])  # the trained model is left as it was
