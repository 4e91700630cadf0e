"""MIM: patch masking and the masked-pixel loss against hand computations."""

import math

import numpy as np
import pytest
import torch

from nnunet_ssp.checkpoint import load_checkpoint, save_checkpoint
from nnunet_ssp.network import load_parts
from pretraining.losses.decorrelation import offdiagonal_correlation
from pretraining.losses.masked_mse import masked_mse
from pretraining.methods.mim import MIM, decoder_stage_outputs, random_patch_mask


@pytest.mark.parametrize("height, width, patch", [(256, 256, 32), (64, 64, 32), (80, 48, 32), (70, 45, 16)])
def test_mask_has_exactly_round_ratio_of_whole_or_cut_patches(height, width, patch, seeded):
    mask = random_patch_mask(6, height, width, patch, 0.75)
    assert mask.shape == (6, 1, height, width) and set(mask.unique().tolist()) <= {0.0, 1.0}
    grid_h, grid_w = math.ceil(height / patch), math.ceil(width / patch)
    expected = round(0.75 * grid_h * grid_w)
    for image in mask[:, 0].numpy():
        masked_patches = 0
        for gy in range(grid_h):
            for gx in range(grid_w):
                cell = image[gy * patch : (gy + 1) * patch, gx * patch : (gx + 1) * patch]
                assert cell.min() == cell.max()  # a patch is masked entirely or not at all
                masked_patches += int(cell[0, 0])
        assert masked_patches == expected
    assert not torch.equal(mask[0], mask[1])  # each image gets its own patches


def test_paper_grid_masks_48_of_64_patches(seeded):
    mask = random_patch_mask(3, 256, 256, 32, 0.75)
    assert (mask.sum(dim=(1, 2, 3)) == 48 * 32 * 32).all()


def test_masked_pixels_are_set_to_zero_and_visible_ones_kept(target, seeded):
    method = MIM(target.network_spec, (64, 64))
    images = torch.randn(4, 1, 64, 64) + 5
    masked, mask = method.mask_batch(images)
    assert torch.all(masked[mask == 1] == 0)
    assert torch.equal(masked[mask == 0], images[mask == 0])


def test_loss_is_the_mse_over_masked_pixels_only(seeded):
    reconstruction, target = torch.randn(3, 1, 40, 40), torch.randn(3, 1, 40, 40)
    mask = random_patch_mask(3, 40, 40, 16, 0.5)
    r, t, m = reconstruction.numpy(), target.numpy(), mask.numpy()
    total, count = 0.0, 0
    for idx in np.ndindex(*r.shape):
        if m[idx] == 1:
            total += (float(r[idx]) - float(t[idx])) ** 2
            count += 1
    assert masked_mse(reconstruction, target, mask).item() == pytest.approx(total / count, rel=1e-5)
    changed_visible = reconstruction + 100 * (1 - mask)  # errors on visible pixels do not count
    assert masked_mse(changed_visible, target, mask).item() == pytest.approx(total / count, rel=1e-5)


def test_mim_model_reconstructs_one_channel_and_gradients_reach_encoder_and_decoder(target, seeded):
    method = MIM(target.network_spec, (64, 64))
    model = method.build_model()
    loss, _ = method.loss(model, {"views": [torch.randn(2, 1, 64, 64)]}, None)
    loss.backward()
    net = model.network
    assert net.decoder.seg_layers[-1].weight.shape[0] == 1
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    assert net.decoder.stages[0].convs[0].conv.weight.grad.abs().sum() > 0
    assert method.parts == ("encoder", "decoder")


def _block_any(mask: np.ndarray, grid) -> np.ndarray:
    """(H, W) 0/1 mask -> (h, w): 1 where any pixel of the cell is 1 (H, W multiples of h, w)."""
    fy, fx = mask.shape[0] // grid[0], mask.shape[1] // grid[1]
    return mask.reshape(grid[0], fy, grid[1], fx).max(axis=(1, 3))


@pytest.mark.parametrize("skip_features", ["kept", "masked", "dropped"])
def test_skip_features_reach_the_decoder_kept_masked_at_masked_patches_or_dropped_per_image(
    target, seeded, skip_features
):
    method = MIM(target.network_spec, (64, 64), mask_patch_size=16, skip_features=skip_features)
    model = method.build_model().eval()
    images = torch.randn(12, 1, 64, 64)
    masked, mask = method.mask_batch(images)
    seen = []
    model.network.decoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        method.reconstruct(model, masked, mask)
        encoder_outputs = model.network.encoder(masked)
    skips = seen[0]
    assert torch.equal(skips[-1], encoder_outputs[-1])  # the deepest features feed the decoder unchanged
    dropped_rows = set()
    for row in range(len(images)):
        if skip_features == "dropped" and not skips[0][row].any():
            dropped_rows.add(row)
        for skip, full in zip(skips[:-1], encoder_outputs[:-1]):
            cells = _block_any(mask[row, 0].numpy(), full.shape[2:])
            keep = {"kept": 1, "masked": 1 - cells, "dropped": 0 if row in dropped_rows else 1}[skip_features]
            np.testing.assert_array_equal(skip[row].numpy(), full[row].numpy() * keep)
    if skip_features == "dropped":  # some images lose every skip, the others keep them all
        assert 0 < len(dropped_rows) < len(images)
    with pytest.raises(ValueError, match="skip_features"):
        MIM(target.network_spec, (64, 64), skip_features="removed")


def test_nonlinear_head_is_dropped_at_fine_tuning_into_nnunets_own_network(target, seeded, tmp_path):
    method = MIM(target.network_spec, (64, 64), reconstruction_head="nonlinear")
    model = method.build_model()
    head = model.network.decoder.seg_layers[-1]
    assert isinstance(head, torch.nn.Sequential) and head[-1].out_channels == 1
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1, 64, 64)
    loss, _ = method.loss(model, {"views": [torch.randn(2, 1, 64, 64)]}, None)
    loss.backward()
    assert head[0].conv.weight.grad.abs().sum() > 0
    path = str(tmp_path / "checkpoint_final.pth")
    save_checkpoint(path, method.export_network(model), target, "mim", method.parts, pretraining={}, data={})
    weights = load_checkpoint(path)["network_weights"]
    assert not any(".seg_layers." in key for key in weights)
    fine_tuned = target.network_spec.build(4, deep_supervision=True)  # nnU-Net's own network, 4 classes
    load_parts(fine_tuned, weights, ("encoder", "decoder"), source=path)
    state = fine_tuned.state_dict()
    for key, tensor in weights.items():
        assert torch.equal(state[key], tensor), key
    assert all(type(layer) is torch.nn.Conv2d for layer in fine_tuned.decoder.seg_layers)


def test_decorrelation_adds_the_weighted_penalty_of_every_decoder_stage(target, seeded):
    images = torch.randn(3, 1, 64, 64)
    losses = {}
    for weight in (0.0, 0.5):
        method = MIM(target.network_spec, (64, 64), mask_patch_size=16, decorrelation=weight)
        torch.manual_seed(1)
        model = method.build_model()
        torch.manual_seed(2)  # the same masks
        losses[weight], metrics = method.loss(model, {"views": [images]}, None)
    torch.manual_seed(2)
    masked, mask = method.mask_batch(images)
    with decoder_stage_outputs(model.network) as stages:
        method.reconstruct(model, masked, mask)
    assert len(stages) == 3
    penalty = torch.stack([offdiagonal_correlation(s) for s in stages]).mean()
    assert metrics["decorrelation"] == pytest.approx(penalty.item(), rel=1e-5)
    assert losses[0.5].item() == pytest.approx(losses[0.0].item() + 0.5 * penalty.item(), rel=1e-5)
    with pytest.raises(ValueError, match="reconstruction_head"):
        MIM(target.network_spec, (64, 64), reconstruction_head="mlp")
