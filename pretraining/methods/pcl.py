"""Positional contrastive learning (Zeng et al., MICCAI 2021) as the paper uses it (de Mooij et al., §3.2).

SimCLR's network and views; every view whose slice position (slice index / number of slices, 0 near the base) lies
within 0.1 of the anchor's is a positive, across subjects and frames, in a supervised-contrastive loss with τ = 0.1.
SGD lr 0.1, momentum 0.9, weight decay 1e-5, cosine to 0, batch 64 pairs.

Distributed runs: projections and slice positions of all ranks are gathered, so positives and negatives come from the
whole global batch.
"""

from typing import Dict, Tuple

import torch

from pretraining import distributed
from pretraining.losses.positional_contrastive import positional_contrastive
from pretraining.methods.base import Hyperparameters, Option
from pretraining.methods.simclr import SimCLR


class PCL(SimCLR):
    name = "pcl"
    defaults = Hyperparameters(batch_size=64, lr=0.1, momentum=0.9, weight_decay=1e-5)
    options = {
        **SimCLR.options,
        "position_threshold": Option(
            0.1, "PCL: views whose slice positions differ by less than this are positives (default 0.1)"
        ),
    }

    def loss(self, model, batch, step) -> Tuple[torch.Tensor, Dict[str, float]]:
        z_a, z_b, metrics = self.embed_views(model, batch)
        positions = distributed.gather_cat(
            torch.as_tensor(batch["slice_position"], device=z_a.device, dtype=torch.float32)
        )
        return positional_contrastive(
            z_a, z_b, positions, threshold=self.position_threshold, temperature=self.temperature
        ), metrics
