"""SimCLR (Chen et al. 2020) as the paper pretrains the nnU-Net encoder (de Mooij et al., arXiv 2409.18100, §3.1).

Two independently augmented views of every slice; encoder -> pooled deepest features (a 2x2 grid, see
``pretraining.heads``; the paper's global average is ``--pool-grid 1``) -> 3-layer MLP; NT-Xent with τ = 0.1 over
the 2N views of a batch. SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine to 0, batch 224 pairs.
Only the encoder is transferred: the decoder is never run and the projection head is never exported.

Distributed runs: the projections of all ranks are gathered (with gradients), so every view's negatives are the
other views of the whole global batch, as in one process.
"""

from typing import Dict, Optional, Tuple

import torch
from torch.nn import functional as F

from pretraining import distributed
from pretraining.data.views import augmentation
from pretraining.heads import EncoderWithHead, ProjectionMLP, encoder_width
from pretraining.losses.ntxent import nt_xent
from pretraining.methods.base import POOL_GRID_OPTION, Hyperparameters, Option, SSPMethod

COLLAPSED_SPREAD = 0.05


class SimCLR(SSPMethod):
    name = "simclr"
    defaults = Hyperparameters(batch_size=224, lr=0.1, momentum=0.9, weight_decay=1e-4)
    options = {
        "temperature": Option(0.1, "SimCLR/PCL: softmax temperature of the contrastive loss (default 0.1)"),
        "pool_grid": POOL_GRID_OPTION,
    }

    def build_model(self) -> torch.nn.Module:
        network = self.spec.build(num_output_channels=1)
        width = encoder_width(network)
        return EncoderWithHead(network, ProjectionMLP(width * self.pool_grid**2, width, width), self.pool_grid)

    def __init__(self, spec, patch_size, **options):
        super().__init__(spec, patch_size, **options)
        if self.temperature <= 0 or self.pool_grid < 1:
            raise ValueError("temperature must be > 0 and pool_grid >= 1")

    def view_transforms(self):
        return [augmentation(self.patch_size, intensity="paper") for _ in range(2)]

    def embed_views(self, model, batch) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, float]]:
        """Projections of the two views of the global batch (this rank's from one forward pass over both, shared
        normalisation statistics; gathered from all ranks in a distributed run), and their spread: the
        per-dimension standard deviation of the L2-normalised projections times sqrt(dimensions), about 1 for
        projections spread over the sphere and 0 when they have collapsed to one point."""
        view_a, view_b = batch["views"]
        z = model(torch.cat([view_a, view_b])).float()
        if distributed.is_distributed():
            z_a, z_b = (distributed.gather_cat(part) for part in z.chunk(2))
            z = torch.cat([z_a, z_b])
        with torch.no_grad():
            spread = F.normalize(z, dim=1).std(dim=0).mean().item() * z.shape[1] ** 0.5
        z_a, z_b = z.chunk(2)
        return z_a, z_b, {"projection_spread": spread}

    def loss(self, model, batch, step) -> Tuple[torch.Tensor, Dict[str, float]]:
        z_a, z_b, metrics = self.embed_views(model, batch)
        return nt_xent(z_a, z_b, temperature=self.temperature), metrics

    def epoch_warning(self, metrics: Dict[str, float]) -> Optional[str]:
        spread = metrics.get("projection_spread", 1.0)
        if spread < COLLAPSED_SPREAD:
            return (
                f"{self.name} projections have collapsed (spread {spread:.3g}, healthy ~1): the loss sits at its "
                f"chance value; try a lower --lr (scaled to the batch) or a larger batch"
            )
        return None
