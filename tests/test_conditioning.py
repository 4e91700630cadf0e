"""The decoder-conditioning figures on inputs of known covariance, the probe and the decoder's rescaling on nnU-Net's
U-Net, and both in a MIM pretraining run."""

import os

import numpy as np
import pytest
import torch
from test_seg_probe import phantom_cache, pretrainer  # noqa: F401 (a fixture)

from nnunet_ssp.checkpoint import load_checkpoint
from nnunet_ssp.network import load_parts
from pretraining.conditioning import (
    DecoderConditioningProbe,
    calibration_slices,
    channel_spectrum,
    conditioning,
    decoder_conditioning,
    decoder_stage_outputs,
    make_conditioning_probe,
    rescale_decoder_outputs,
)
from pretraining.methods import METHODS
from pretraining.progress_log import probe_panels
from pretraining.state import LATEST_CHECKPOINT


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
        f"decoder_condition_{i}" for i in range(3)
    }
    assert first["probe_decoder_rank_2"] == pytest.approx(stages[2].effective_rank / 8)
    with torch.no_grad():  # a decoder whose last stage carries one direction only
        for block in network.decoder.stages[-1].convs:
            block.norm.weight[1:] = 0
            block.norm.bias[1:] = 0
    second = probe.evaluate(network)
    assert second["probe_decoder_rank_2"] == pytest.approx(1 / 8, rel=1e-3)
    assert second["probe_decoder_rank_2_random_init"] == first["probe_decoder_rank_2_random_init"]


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


def test_mim_logs_each_decoder_stage_rescales_its_checkpoint_and_the_probe_changes_no_weight(
    phantom_cache,  # noqa: F811 (the fixture imported above)
    tmp_path,
):
    """Two MIM runs of one seed: with the probes and ``decoder_output_std`` 1, and with neither."""
    target, cache = phantom_cache
    probed = pretrainer(
        "mim", target, cache, str(tmp_path / "probed"), seg_probe=False, mask_patch_size=16, decoder_output_std=1.0
    )
    plain = pretrainer(
        "mim", target, cache, str(tmp_path / "plain"), seg_probe=False, probe_slices=0, mask_patch_size=16
    )
    weights = {
        name: load_checkpoint(run.run())["network_weights"] for name, run in (("probed", probed), ("plain", plain))
    }
    history = torch.load(os.path.join(probed.output_folder, LATEST_CHECKPOINT), weights_only=True)["history"]
    ranks = [f"probe_decoder_rank_{i}" for i in range(len(probed.method.export_network(probed.model).decoder.stages))]
    for key in ranks:
        assert len(history[key]) == 2 and all(0 < v <= 1 for v in history[key])
        assert len(set(history[key + "_random_init"])) == 1
        assert all(v >= 1 for v in history[key.replace("probe_decoder_rank", "decoder_condition")])
    panels = dict(probe_panels(history))
    assert set(panels["decoder effective rank / channels (up: better)"]) == {
        k + suffix for k in ranks for suffix in ("", "_random_init")
    }
    assert "decoder_condition_0" in open(os.path.join(probed.output_folder, "training_log.txt")).read()
    assert not any(k.startswith(("probe_decoder", "decoder_condition")) for k in plain.history)
    trained, alone = probed.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(value, alone[key]) for key, value in trained.items())  # probes and rescaling change no run
    changed = {k for k in weights["plain"] if not torch.equal(weights["plain"][k], weights["probed"][k])}
    network = target.network_spec.build(4, deep_supervision=True)
    changed_modules = {type(network.get_submodule(k.rsplit(".", 1)[0])) for k in changed}
    assert changed_modules == {torch.nn.InstanceNorm2d, torch.nn.ConvTranspose2d}, changed_modules
    load_parts(network, weights["probed"], ("encoder", "decoder"), source="checkpoint")
    images = calibration_slices(cache, target.configuration_manager.patch_size, 64, 0)
    for features in decoder_stage_outputs(network, images):
        torch.testing.assert_close(_channel_std(features), torch.ones(features.shape[1]), rtol=1e-3, atol=1e-4)
    encoder_method = METHODS["simclr"](target.network_spec, target.configuration_manager.patch_size)
    assert make_conditioning_probe(cache, encoder_method, 64, 0) is None  # encoder methods have no decoder to probe
