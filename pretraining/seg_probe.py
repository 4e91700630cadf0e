"""A segmentation probe: how well a linear head on the frozen network's features segments held-out subjects.

- Data: the labelled training cases of nnU-Net's preprocessed folder of the plans' configuration (the ED and ES
  cases ``<subject>_ED``/``_ES``, read with nnU-Net's own dataset class, as its trainers read them; the test set is
  never preprocessed there), grouped by subject. A seeded choice of subjects fits the head (4 by default) and as many
  others score it; every 2D slice of their cases, image-centred crop at the patch size.
- Features, computed in eval mode without gradients at every evaluation: for a method that pretrains the decoder
  (``"decoder"`` in its ``parts``) the decoder's last, full-resolution features; otherwise every encoder stage's
  output.
- Head: one 1x1 convolution on the concatenated feature maps upsampled bilinearly to full resolution, computed as a
  1x1 convolution per map whose logits are upsampled and summed (the same function), so the upsampled maps are never
  held. It is fit on a seeded sample of 2^15 pixels of the fit slices (the upsampled features read there, each
  channel standardised): zero start, 100 full-batch Adam steps on nnU-Net's Dice + cross-entropy loss. Deterministic
  given the seed; the global random number generators are left alone.
- Score: Dice of the argmax prediction per foreground class over the scored slices pooled (one Dice per class over
  all their pixels), averaged over the classes.
- Reference: the same probe on the randomly initialised network a run of the seed starts from, computed once (at
  the first evaluation).
"""

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_ssp.splits import subject_of_case
from pretraining.data.views import augmentation

FIT_SUBJECTS = 4
SCORED_SUBJECTS = 4
FIT_STEPS = 100
FIT_LR = 0.05
FIT_PIXELS = 2**15


@dataclass
class LabelledSlices:
    """2D slices with their labels: ``images`` (N, C, H, W) float32, ``labels`` (N, H, W) int64 (0 background)."""

    images: torch.Tensor
    labels: torch.Tensor
    subjects: List[str]


def preprocessed_cases_folder(target) -> str:
    """nnU-Net's preprocessed folder of ``target``'s configuration (``$nnUNet_preprocessed/<Dataset>/<data id>``)."""
    return os.path.join(
        os.environ["nnUNet_preprocessed"], target.dataset_name, target.configuration_manager.data_identifier
    )


def labelled_dataset(folder: str):
    """nnU-Net's dataset of the preprocessed cases in ``folder`` (its own class for the files found), or None when
    the folder holds none."""
    from nnunetv2.training.dataloading.nnunet_dataset import file_ending_dataset_mapping, infer_dataset_class

    if not os.path.isdir(folder) or not any(f.endswith(tuple(file_ending_dataset_mapping)) for f in os.listdir(folder)):
        return None
    dataset_class = infer_dataset_class(folder)
    return dataset_class(folder) if dataset_class.get_identifiers(folder) else None


def choose_subjects(
    subjects: Sequence[str], seed: int, fit: int = FIT_SUBJECTS, scored: int = SCORED_SUBJECTS
) -> Tuple[List[str], List[str]]:
    """A seeded choice of ``fit`` subjects and ``scored`` others (at most half of them fit)."""
    order = [str(s) for s in np.random.default_rng(seed).permutation(sorted(subjects))]
    num_fit = min(fit, len(order) // 2)
    return order[:num_fit], order[num_fit : num_fit + scored]


def read_slices(dataset, subjects: Sequence[str], patch_size: Sequence[int]) -> LabelledSlices:
    """Every 2D slice of the subjects' cases, image and labels cropped (or zero-padded) around the image centre to
    ``patch_size``; nnU-Net's label -1 (outside the nonzero mask) is background."""
    crop = augmentation(patch_size, p_rotation=0, p_scaling=0, mirror=False, translation=0, intensity=None)
    images, labels, owners = [], [], []
    for case in dataset.identifiers:
        if subject_of_case(case) not in subjects:
            continue
        data, seg, _, _ = dataset.load_case(case)
        data, seg = np.asarray(data, dtype=np.float32), np.asarray(seg)
        for z in range(data.shape[1]):
            out = crop(
                image=torch.from_numpy(data[:, z].copy()), segmentation=torch.from_numpy(seg[:, z].astype(np.int16))
            )
            images.append(out["image"])
            labels.append(out["segmentation"][0].clamp_min(0).long())
            owners.append(subject_of_case(case))
    return LabelledSlices(torch.stack(images), torch.stack(labels), owners)


def pooled_dice(predicted: np.ndarray, reference: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Dice per class over all slices pooled: 2|P∩R| / (|P| + |R|); NaN where a class is in neither."""
    scores = []
    for c in classes:
        p, r = predicted == c, reference == c
        total = p.sum() + r.sum()
        scores.append(2.0 * np.logical_and(p, r).sum() / total if total else np.nan)
    return np.array(scores)


def upsampled(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` (N, C, h, w) upsampled bilinearly to ``size``."""
    return (
        x
        if tuple(x.shape[2:]) == tuple(size)
        else F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    )


class LinearSegmentationHead:
    """A linear map of the concatenated feature maps, upsampled bilinearly to ``size``, to class logits; computed as
    a 1x1 convolution per map whose logits are upsampled and summed (the same function: upsampling is linear and its
    weights sum to 1), so the upsampled maps are never held in memory. ``weight`` (K, sum of channels), ``bias``
    (K)."""

    def __init__(self, channels: Sequence[int], weight: torch.Tensor, bias: torch.Tensor, size: Sequence[int]):
        self.size = tuple(size)
        self.weights = [w[:, :, None, None] for w in weight.split(list(channels), dim=1)]
        self.bias = bias[None, :, None, None]

    def __call__(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        logits = self.bias
        for weight, x in zip(self.weights, features):
            logits = logits + upsampled(F.conv2d(x, weight), self.size)
        return logits


def features_at(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(N * P, C): ``x`` (N, C, h, w) upsampled bilinearly to full resolution as :func:`upsampled` does, read only at
    ``grid`` (N, P, 2), pixel centres in grid_sample's (-1, 1) coordinates (clamping at the border is what
    interpolate does there)."""
    values = F.grid_sample(
        x, grid[:, None].to(x.device, x.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    return values[:, :, 0].permute(0, 2, 1).reshape(-1, x.shape[1])


@torch.no_grad()
def feature_maps(network: torch.nn.Module, images: torch.Tensor, source: str) -> List[torch.Tensor]:
    """The probe's features of ``images`` (on the network's device): the decoder's last stage output
    (``source`` "decoder") or every encoder stage's output ("encoder")."""
    if source == "encoder":
        return list(network.encoder(images))
    captured = []
    hook = network.decoder.stages[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        network(images)
    finally:
        hook.remove()
    return captured


@contextmanager
def one_cpu_thread(device: torch.device):
    """On the CPU, torch runs on one thread within: the fit's operations are small, and more threads only wait for
    each other (many times slower on a busy machine)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_linear(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = FIT_STEPS, lr: float = FIT_LR
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight (K, D), bias (K)) of a softmax classifier of the rows of ``x`` (P, D) into ``labels`` (P): each column
    standardised, zero start, full-batch Adam on nnU-Net's Dice (foreground, over all rows) + cross-entropy loss;
    returned for the unstandardised ``x``."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    loss_function = DC_and_CE_loss(
        {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, dice_class=MemoryEfficientSoftDiceLoss
    )
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    target = labels[None, None]  # nnU-Net's losses take (batch, classes, spatial...): one batch of P "pixels"
    with torch.enable_grad(), one_cpu_thread(x.device):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_function((weight @ x.T + bias[:, None])[None], target).backward()
            optimizer.step()
    weight, bias = weight.detach() / std, bias.detach()
    return weight, bias - weight @ mean


def sample_pixels(labels: torch.Tensor, count: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A seeded choice of about ``count`` pixels of ``labels`` (N, H, W), the same number from each slice: their
    centres in grid_sample's coordinates (N, P, 2: x, y) and their labels (N * P)."""
    n, height, width = labels.shape
    rng = np.random.default_rng(seed)
    per_slice = min(height * width, max(1, -(-count // n)))
    flat = np.stack([rng.choice(height * width, size=per_slice, replace=False) for _ in range(n)])
    rows, columns = torch.from_numpy(flat // width), torch.from_numpy(flat % width)
    grid = torch.stack([(2 * columns + 1) / width - 1, (2 * rows + 1) / height - 1], dim=-1).float()
    return grid, labels[torch.arange(n)[:, None], rows, columns].reshape(-1)


class SegmentationProbe:
    """:meth:`evaluate` fits a head on the features of a frozen network at ``fit`` pixels (a seeded sample of
    ``fit_pixels`` of its slices) and returns its Dice on the ``scored`` slices (``probe_seg_dice``), the same for a
    random network of ``build_random_network()`` (``probe_seg_dice_random_init``, computed once) and the probe's
    seconds (``seg_probe_time_s``)."""

    def __init__(
        self,
        fit: LabelledSlices,
        scored: LabelledSlices,
        num_classes: int,
        source: str,
        build_random_network: Callable[[], torch.nn.Module],
        seed: int = 0,
        fit_pixels: int = FIT_PIXELS,
        batch_size: int = 16,
    ):
        self.fit, self.scored, self.num_classes, self.source = fit, scored, num_classes, source
        self.build_random_network, self.batch_size = build_random_network, batch_size
        self.fit_pixels = sample_pixels(fit.labels, fit_pixels, seed)
        self.random_init_dice: Optional[float] = None

    def _chunks(self, network: torch.nn.Module, images: torch.Tensor):
        """(first slice index, feature maps) of ``images`` in chunks of ``batch_size``."""
        device = next(network.parameters()).device
        for i in range(0, len(images), self.batch_size):
            yield i, [f.float() for f in feature_maps(network, images[i : i + self.batch_size].to(device), self.source)]

    def _fit_head(self, network: torch.nn.Module) -> LinearSegmentationHead:
        grid, labels = self.fit_pixels
        rows, channels = [], []
        for first, features in self._chunks(network, self.fit.images):
            at = grid[first : first + len(features[0])]
            rows.append(torch.cat([features_at(f, at) for f in features], dim=1))
            channels = [f.shape[1] for f in features]
        x = torch.cat(rows)
        weight, bias = fit_linear(x, labels.to(x.device), self.num_classes)
        return LinearSegmentationHead(channels, weight, bias, self.fit.labels.shape[1:])

    def dice(self, network: torch.nn.Module) -> float:
        """Mean Dice over the foreground classes of the head fit on ``network``'s features (left in its mode)."""
        was_training = network.training
        network.eval()
        try:
            head = self._fit_head(network)
            with torch.no_grad():
                predicted = [
                    head(features).argmax(1).cpu() for _, features in self._chunks(network, self.scored.images)
                ]
        finally:
            network.train(was_training)
        scores = pooled_dice(torch.cat(predicted).numpy(), self.scored.labels.numpy(), range(1, self.num_classes))
        return float(np.nanmean(scores))

    def _random_init_dice(self, device) -> float:
        if self.random_init_dice is None:
            self.random_init_dice = self.dice(self.build_random_network().to(device))
        return self.random_init_dice

    def evaluate(self, network: torch.nn.Module) -> Dict[str, float]:
        reference = self._random_init_dice(next(network.parameters()).device)
        start = time.perf_counter()
        dice = self.dice(network)
        return {
            "probe_seg_dice": dice,
            "probe_seg_dice_random_init": reference,
            "seg_probe_time_s": time.perf_counter() - start,
        }


def random_network_builder(method, seed: int) -> Callable[[], torch.nn.Module]:
    """Builds ``method``'s network as a run of ``seed`` starts it, leaving the global RNG as it was."""

    def build() -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return method.export_network(method.build_model())

    return build


def make_seg_probe(target, method, seed: int) -> Tuple[Optional[SegmentationProbe], str]:
    """The probe of ``method`` on ``target``'s labelled training cases and a line saying what it does, or None and a
    line saying why it is off."""
    folder = preprocessed_cases_folder(target)
    label_manager = target.plans_manager.get_label_manager(target.dataset_json)
    if label_manager.has_regions or label_manager.has_ignore_label:
        return None, "segmentation probe off: region-based or ignore labels are not supported"
    dataset = labelled_dataset(folder)
    if dataset is None:
        return None, (
            f"segmentation probe off: {folder} holds no preprocessed labelled training cases (run "
            f"nnUNetv2_plan_and_preprocess -c {target.configuration} to have them)"
        )
    subjects = sorted({subject_of_case(case) for case in dataset.identifiers})
    if len(subjects) < 2:
        return None, f"segmentation probe off: {folder} holds the cases of {len(subjects)} subject, 2 are needed"
    fit_subjects, scored_subjects = choose_subjects(subjects, seed)
    patch_size = target.configuration_manager.patch_size
    fit, scored = (read_slices(dataset, s, patch_size) for s in (fit_subjects, scored_subjects))
    if not (fit.labels > 0).any() or not (scored.labels > 0).any():
        return None, f"segmentation probe off: the cases in {folder} hold no foreground labels"
    source = "decoder" if "decoder" in method.parts else "encoder"
    probe = SegmentationProbe(
        fit, scored, label_manager.num_segmentation_heads, source, random_network_builder(method, seed), seed=seed
    )
    features = "the decoder's last features" if source == "decoder" else "every encoder stage's features"
    return probe, (
        f"segmentation probe: a linear head on {features}, fit on subjects {', '.join(fit_subjects)} "
        f"({len(fit.labels)} slices), Dice on subjects {', '.join(scored_subjects)} "
        f"({len(scored.labels)} slices) after every epoch"
    )
