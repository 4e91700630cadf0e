"""A pretraining health signal beyond the loss: a k-NN probe of slice position and cardiac phase.

A fixed set of slices (image-centred crops at the patch size, no augmentation) from half of the subjects is the
reference, the same number from the other half the queries. Each epoch the encoder embeds both (the deepest
features pooled to a 2x2 grid, as the embedding methods read them); each query takes the mean position and the
circular mean phase of its k most cosine-similar references. A representation that knows where in the heart and
when in the cycle a slice is drives both errors below the chance level, whatever the method's own loss says.
"""

from typing import Dict, Optional, Protocol

import numpy as np
import torch

from pretraining.data.views import augmentation, make_view
from pretraining.heads import encoder_embedding


class Probe(Protocol):
    """What the loop runs after every epoch (rank 0 only): measures the frozen network, leaving it as it was.
    Keys starting with ``probe_`` are plotted in progress.png; a reference line's key ends in ``_chance`` or
    ``_random_init``."""

    def evaluate(self, network: torch.nn.Module) -> Dict[str, float]: ...


class PositionPhaseProbe:
    """k-NN probe on the encoder's embeddings; :meth:`evaluate` returns mean absolute errors (and chance levels).

    position = slice_index / num_slices in [0, 1); phase = frame_from_ed / num_frames, a fraction of the cycle whose
    error is circular (at most 0.5; 0.25 for guessing)."""

    def __init__(self, cache, patch_size, num_slices: int = 256, k: int = 10, seed: int = 0, batch_size: int = 64):
        meta = cache.meta
        subjects = np.unique(meta["subject"])
        if len(subjects) < 2:
            raise ValueError("the probe needs slices of at least 2 subjects")
        rng = np.random.default_rng(seed)
        query_subjects = rng.permutation(subjects)[: len(subjects) // 2]
        is_query = np.isin(meta["subject"], query_subjects)
        per_group = max(1, num_slices // 2)
        chosen = {}
        for name, members in (("reference", np.flatnonzero(~is_query)), ("query", np.flatnonzero(is_query))):
            chosen[name] = np.sort(rng.choice(members, size=min(per_group, len(members)), replace=False))
        self.k = min(k, len(chosen["reference"]))
        self.batch_size = batch_size
        crop = augmentation(patch_size, p_rotation=0, p_scaling=0, mirror=False, translation=0, intensity=None)
        self.images, self.position, self.phase = {}, {}, {}
        for name, indices in chosen.items():
            self.images[name] = torch.stack([make_view(crop, cache.slice_channels(i)) for i in indices])
            self.position[name] = meta["slice_index"][indices] / meta["num_slices"][indices]
            self.phase[name] = meta["frame_from_ed"][indices] / meta["num_frames"][indices]

    @torch.no_grad()
    def _embed(self, network: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        chunks = [
            encoder_embedding(network, images[i : i + self.batch_size].to(device)).float().cpu()
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.nn.functional.normalize(torch.cat(chunks), dim=1)

    def evaluate(self, network: torch.nn.Module) -> Dict[str, float]:
        was_training = network.training
        network.eval()
        device = next(network.parameters()).device
        try:
            reference = self._embed(network, self.images["reference"], device)
            query = self._embed(network, self.images["query"], device)
        finally:
            network.train(was_training)
        return knn_errors(reference, query, self.position, self.phase, self.k)


def knn_errors(reference: torch.Tensor, query: torch.Tensor, position: dict, phase: dict, k: int) -> Dict[str, float]:
    """Mean absolute errors of k-NN predictions for the queries from L2-normalised embeddings (cosine similarity):
    position as the neighbours' mean, phase as their circular mean; ``position``/``phase`` map "reference" and "query"
    to arrays. ``probe_position_mae_chance`` is the error of always predicting the references' median position."""
    neighbours = (query @ reference.T).topk(k, dim=1).indices.numpy()
    predicted_position = position["reference"][neighbours].mean(axis=1)
    angles = 2 * np.pi * phase["reference"][neighbours]
    predicted_phase = (np.arctan2(np.sin(angles).mean(1), np.cos(angles).mean(1)) / (2 * np.pi)) % 1.0
    phase_error = np.abs(predicted_phase - phase["query"])
    return {
        "probe_position_mae": float(np.abs(predicted_position - position["query"]).mean()),
        "probe_position_mae_chance": float(np.abs(np.median(position["reference"]) - position["query"]).mean()),
        "probe_phase_error": float(np.minimum(phase_error, 1 - phase_error).mean()),
    }


def make_probe(cache, patch_size, num_slices: int, seed: int) -> Optional[PositionPhaseProbe]:
    """The probe, or None when it is switched off (``num_slices`` 0) or the data has a single subject."""
    if num_slices <= 0 or len(np.unique(cache.meta["subject"])) < 2:
        return None
    return PositionPhaseProbe(cache, patch_size, num_slices=num_slices, seed=seed)
