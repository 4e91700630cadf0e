"""Masked image modeling (MIM), the paper's best method (de Mooij et al., arXiv 2409.18100, §3.4).

The whole nnU-Net U-Net (encoder and decoder) with a 1×1 reconstruction head restores an augmented slice in which
round(0.75 × number of patches) square 32-px patches per image were set to 0; the loss is the MSE over the masked
pixels only. Fine-tuning loads encoder and decoder, never the reconstruction head.

``--skip-features`` (not the paper's; default ``kept``): ``masked`` also sets the encoder's skip features to 0
wherever their position lies in a masked patch (the mask max-pooled to each skip's grid), so that the decoder restores
a masked patch from the deep path, not by copying its visible neighbours through the skips (the shortcut measured in
README, "Does pretraining help on the phantom?"); ``dropped`` sets all skip features of a random half of the images
to 0, so that the decoder learns to restore whole images from the deepest features alone.

``--reconstruction-head`` (not the paper's; default ``linear``, the paper's): the paper reconstructs through
``decoder.seg_layers[-1]``, a linear 1×1 conv on the last decoder stage, so every decoder stage's output
concentrates in the few directions the image's intensity needs (badly conditioned: ``pretraining.conditioning``)
and fresh segmentation heads fine-tuned on them barely move. ``nonlinear`` reconstructs through a throw-away head
(conv 3×3, norm, non-linearity, 1×1 conv, of the plans' operators) in its place. Either head lives under
``decoder.seg_layers``, which the checkpoint never holds: fine-tuning starts nnU-Net's own network.
``--decorrelation W`` (default 0, the paper's) adds W × the mean over the decoder stages of the mean squared
off-diagonal correlation of their output channels (``pretraining.losses.decorrelation``) to the loss.
``--decoder-output-std S`` (default 0: as trained, the paper's) reparametrises the checkpoint's decoder so that each
decoder stage's output channels have standard deviation S on the run's calibration slices, without changing what it
computes (``pretraining.conditioning.rescale_decoder_outputs``): the fresh segmentation heads of fine-tuning then
see features of that scale.

Distributed runs: every rank draws the masks of the whole global batch from the (identically seeded) torch RNG and
keeps its own rows, and the masked squared errors and masked-pixel counts are summed over the ranks before dividing:
the loss and the masks are the one-process run's.
"""

import copy
import math
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from nnunet_ssp.network import unwrap
from pretraining import distributed
from pretraining.conditioning import rescale_decoder_outputs
from pretraining.data.views import augmentation
from pretraining.losses.decorrelation import offdiagonal_correlation
from pretraining.losses.masked_mse import masked_squared_error
from pretraining.methods.base import Hyperparameters, Option, SSPMethod


def random_patch_mask(
    batch_size: int, height: int, width: int, patch_size: int, ratio: float, device=None
) -> torch.Tensor:
    """(B, 1, H, W) float mask, 1 on exactly round(ratio × patches) patches of each image.

    The patch grid is ceil(H / p) × ceil(W / p); patches at the right and bottom edges are cut off where the
    image does not divide into whole patches, so every patch counts, whole or partial.
    """
    grid_h, grid_w = math.ceil(height / patch_size), math.ceil(width / patch_size)
    num_patches = grid_h * grid_w
    num_masked = int(round(ratio * num_patches))
    chosen = torch.rand(batch_size, num_patches, device=device).argsort(dim=1)[:, :num_masked]
    grid = torch.zeros(batch_size, num_patches, device=device).scatter_(1, chosen, 1.0)
    mask = grid.view(batch_size, 1, grid_h, grid_w)
    mask = mask.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return mask[:, :, :height, :width]


SKIP_FEATURES = ("kept", "masked", "dropped")
RECONSTRUCTION_HEADS = ("linear", "nonlinear")


def nonlinear_head(network: torch.nn.Module, out_channels: int) -> torch.nn.Module:
    """Conv (the plans' first kernel) - norm - non-linearity - 1×1 conv on the last decoder stage's output, built from
    the operators the plans' encoder uses."""
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU

    encoder = network.encoder
    channels = network.decoder.stages[-1].output_channels
    return torch.nn.Sequential(
        ConvDropoutNormReLU(
            encoder.conv_op,
            channels,
            channels,
            encoder.kernel_sizes[0],
            1,
            encoder.conv_bias,
            encoder.norm_op,
            encoder.norm_op_kwargs,
            None,
            None,
            encoder.nonlin,
            encoder.nonlin_kwargs,
        ),
        encoder.conv_op(channels, out_channels, 1, 1, 0, bias=True),
    )


@contextmanager
def decoder_stage_outputs(network: torch.nn.Module):
    """A list that the forward passes within fill with every decoder stage's output, deepest first."""
    outputs: List[torch.Tensor] = []
    hooks = [
        stage.register_forward_hook(lambda module, args, output: outputs.append(output))
        for stage in network.decoder.stages
    ]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


class ReconstructionModel(torch.nn.Module):
    """The plans' network with as many output channels as input channels: its last 1×1 head reconstructs.

    Given ``skip_mask`` (B, 1, H, W), the skip features (every encoder output but the deepest) are zeroed wherever
    the mask, max-pooled to their grid, is 1."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, skip_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if skip_mask is None:
            return self.network(x)
        skips = self.network.encoder(x)
        kept = [s * (1 - F.adaptive_max_pool2d(skip_mask.to(s.dtype), s.shape[2:])) for s in skips[:-1]]
        return self.network.decoder(kept + [skips[-1]])


class MIM(SSPMethod):
    name = "mim"
    parts = ("encoder", "decoder")
    defaults = Hyperparameters(batch_size=128, lr=0.01, momentum=0.99, weight_decay=3e-5, nesterov=True)
    options = {
        "mask_patch_size": Option(32, "MIM: side of the masked square patches in px (default 32)"),
        "mask_ratio": Option(0.75, "MIM: fraction of the patches masked per image (default 0.75)"),
        "skip_features": Option(
            "kept",
            "MIM: 'masked' also zeroes the encoder's skip features at the masked "
            "patches, so the decoder cannot copy visible neighbours; 'dropped' "
            "zeroes all of them for a random half of the images (default "
            "'kept', the paper's)",
        ),
        "reconstruction_head": Option(
            "linear",
            "MIM: 'nonlinear' reconstructs through a throw-away conv-norm-"
            "nonlinearity-1x1 head instead of the linear 1x1 conv on the "
            "last decoder stage (default 'linear', the paper's)",
        ),
        "decorrelation": Option(
            0.0,
            "MIM: weight of a penalty on the correlation between the channels of "
            "every decoder stage's output (default 0, the paper's)",
        ),
        "decoder_output_std": Option(
            0.0,
            "MIM: rescale the checkpoint's decoder, without changing what it "
            "computes, so that every decoder stage's output channels have this "
            "standard deviation on 64 un-augmented slices (default 0: as "
            "trained, the paper's)",
        ),
    }

    def __init__(self, spec, patch_size, **options):
        super().__init__(spec, patch_size, **options)
        if self.mask_patch_size < 1 or not 0 < self.mask_ratio < 1:
            raise ValueError("mask_patch_size must be >= 1 and mask_ratio in (0, 1)")
        if self.skip_features not in SKIP_FEATURES:
            raise ValueError(f"skip_features must be one of {', '.join(SKIP_FEATURES)} (got {self.skip_features!r})")
        if self.reconstruction_head not in RECONSTRUCTION_HEADS:
            raise ValueError(
                f"reconstruction_head must be one of {', '.join(RECONSTRUCTION_HEADS)} "
                f"(got {self.reconstruction_head!r})"
            )
        for name in ("decorrelation", "decoder_output_std"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a non-negative number (got {getattr(self, name)})")

    def build_model(self) -> torch.nn.Module:
        network = self.spec.build(num_output_channels=self.spec.num_input_channels)
        if self.reconstruction_head == "nonlinear":
            network.decoder.seg_layers[-1] = nonlinear_head(network, self.spec.num_input_channels)
        return ReconstructionModel(network)

    def view_transforms(self):
        return [augmentation(self.patch_size, intensity="paper")]

    def mask_batch(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(masked input with masked pixels set to 0, mask); in a distributed run the rows of this rank's block of
        the global batch's masks."""
        b, _, h, w = images.shape
        mask = random_patch_mask(
            b * distributed.world_size(), h, w, self.mask_patch_size, self.mask_ratio, device=images.device
        )
        mask = distributed.local_rows(mask)
        return images * (1 - mask), mask

    def skip_mask(self, mask: torch.Tensor) -> Optional[torch.Tensor]:
        """Where the skip features are set to 0 (1), as a (B, 1, H, W) mask; None keeps them all. ``dropped`` draws
        its images like the patch masks: over the global batch, this rank's rows."""
        if self.skip_features == "kept":
            return None
        if self.skip_features == "masked":
            return mask
        dropped = (torch.rand(len(mask) * distributed.world_size(), device=mask.device) < 0.5).to(mask.dtype)
        return distributed.local_rows(dropped).view(-1, 1, 1, 1).expand_as(mask)

    def reconstruct(self, model, masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(masked, self.skip_mask(mask))

    @staticmethod
    def _masked_mse(reconstruction: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The masked MSE of the global batch."""
        squared_error, count = masked_squared_error(reconstruction.float(), images.float(), mask)
        return distributed.all_reduce_sum(squared_error) / distributed.all_reduce_sum(count).clamp_min(1)

    def loss(self, model, batch, step) -> Tuple[torch.Tensor, Dict[str, float]]:
        images = batch["views"][0]
        masked, mask = self.mask_batch(images)
        if not self.decorrelation:
            return self._masked_mse(self.reconstruct(model, masked, mask), images, mask), {}
        with decoder_stage_outputs(unwrap(model).network) as stages:
            reconstruction = self.reconstruct(model, masked, mask)
        mse = self._masked_mse(reconstruction, images, mask)
        correlation = distributed.all_reduce_mean(torch.stack([offdiagonal_correlation(s) for s in stages]).mean())
        return mse + self.decorrelation * correlation, {"masked_mse": mse.item(), "decorrelation": correlation.item()}

    def checkpoint_network(self, model, calibration_images):
        """The network, with its decoder rescaled on ``calibration_images`` when ``decoder_output_std`` is set."""
        network = self.export_network(model)
        if not self.decoder_output_std:
            return network
        if calibration_images is None:
            raise ValueError("decoder_output_std needs calibration images")
        network = copy.deepcopy(network).cpu()
        rescale_decoder_outputs(network, calibration_images.cpu(), self.decoder_output_std)
        return network

    def write_preview(self, model, batch, path) -> bool:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        images = batch["views"][0][:4].to(next(model.parameters()).device)  # the loader's batch is on the CPU
        with torch.no_grad():
            masked, mask = self.mask_batch(images)
            reconstruction = self.reconstruct(model, masked, mask).float()
        columns = (("input", images), ("masked", masked), ("reconstruction", reconstruction))
        fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.5 * len(images)), squeeze=False)
        for row in range(len(images)):
            low, high = images[row, 0].min().item(), images[row, 0].max().item()
            for col, (title, tensor) in enumerate(columns):
                axes[row, col].imshow(tensor[row, 0].cpu().numpy(), cmap="gray", vmin=low, vmax=high)
                axes[row, col].set_axis_off()
                if row == 0:
                    axes[row, col].set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return True
