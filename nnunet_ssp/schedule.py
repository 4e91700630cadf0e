"""Fine-tuning schedules and recipes: the arithmetic and names that the trainers and the protocol's plan share.

- ``nnunet``: nnU-Net's 1000 epochs x 250 iterations, at every label budget.
- ``paper``: the paper's epoch is one pass over the fold's labelled 2D training slices, ceil(slices / batch)
  iterations, for 1000 epochs (10 subjects, 231 slices, batch 32: 8 iterations per epoch, 8,000 in all).

``nnUNet_ssp_num_epochs`` and ``nnUNet_ssp_iters_per_epoch`` override the epochs and the training iterations per
epoch of every plugin trainer, whatever its schedule (short runs, tests, demos). ``nnUNet_ssp_skip_final_validation=1``
skips nnU-Net's validation after training, which changes no test-set result.
"""

import math
import os
import re
from typing import Optional, Tuple

from nnunet_ssp.errors import SSPError

NUM_EPOCHS_ENV = "nnUNet_ssp_num_epochs"
ITERS_PER_EPOCH_ENV = "nnUNet_ssp_iters_per_epoch"
#: "1": the plugin's trainers skip nnU-Net's final validation (the protocol predicts the test set instead)
SKIP_FINAL_VALIDATION_ENV = "nnUNet_ssp_skip_final_validation"
#: every this many epochs the plugin's trainers write checkpoint_latest.pth (nnU-Net's default: 50); no result changes
SAVE_EVERY_ENV = "nnUNet_ssp_save_every"
NNUNET_EPOCHS = 1000
NNUNET_ITERATIONS_PER_EPOCH = 250
#: --schedule -> the trainer-name suffix of that schedule's trainers (trainers/ssp_trainers.py)
SCHEDULE_SUFFIX = {"paper": "_paperSchedule", "nnunet": ""}
#: fine-tuning recipes besides the paper's (lr 1e-2 from scratch, 5e-3 from a checkpoint, no warm-up); a recipe's
#: trainers are named ``<trainer>_<recipe>`` (trainers/ssp_trainers.py) and it names their rows in the report
WARMUP, BASELINE_LR, ENCODER_ONLY = "warmup", "baselineLR", "baselineLR_encoderOnly"
#: how the parts loaded from the SSP checkpoint train (trainers/strategies.py): frozen for the first 50 epochs (of
#: nnU-Net's 1000; 5% of a shortened run), frozen throughout, or at a tenth of the trainer's lr
FREEZE_50_EPOCHS, FROZEN, PRETRAINED_TENTH_LR = "freeze50epochs", "frozen", "pretrainedTenthLR"
PAPER_RECIPE = "paper"
RECIPES = (PAPER_RECIPE, WARMUP, BASELINE_LR, ENCODER_ONLY, FREEZE_50_EPOCHS, FROZEN, PRETRAINED_TENTH_LR)
#: recipes that change nothing for the from-scratch baseline (it fine-tunes at 1e-2 already and loads nothing)
PRETRAINED_ONLY_RECIPES = (BASELINE_LR, ENCODER_ONLY, FREEZE_50_EPOCHS, FROZEN, PRETRAINED_TENTH_LR)
#: recipes that change only the trainers of methods that pretrain the decoder as well (MIM): loading the encoder
#: alone is what the encoder methods do already
DECODER_METHOD_RECIPES = (ENCODER_ONLY,)
#: a seeded trainer is any plugin trainer's name plus ``_seed<K>`` (last): ``nnUNetTrainerBaseline_paperSchedule_seed0``
SEED_SUFFIX = "_seed"
_SEEDED_NAME = re.compile(rf"^(?P<base>.+){SEED_SUFFIX}(?P<seed>0|[1-9][0-9]*)$")


def seeded_trainer_name(trainer: str, seed: Optional[int]) -> str:
    """The trainer's seeded variant for training seed ``seed`` (None: the unseeded trainer itself)."""
    return trainer if seed is None else f"{trainer}{SEED_SUFFIX}{int(seed)}"


def split_training_seed(trainer: str) -> Tuple[str, Optional[int]]:
    """(the unseeded trainer name, the training seed) of a trainer name; (name, None) for an unseeded one."""
    match = _SEEDED_NAME.match(trainer)
    return (match["base"], int(match["seed"])) if match else (trainer, None)


def positive_int_from_env(name: str) -> Optional[int]:
    """The positive integer in environment variable ``name``; None when it is unset or empty."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if not value.isdigit() or int(value) < 1:
        raise SSPError(f"environment variable {name}={value!r}: expected a positive integer")
    return int(value)


def paper_iterations_per_epoch(slices: int, batch_size: int) -> int:
    """One pass over ``slices`` at ``batch_size``: ceil(slices / batch_size), at least 1."""
    return max(1, math.ceil(slices / batch_size))


def shortened_epochs(nnunet_epochs: int, num_epochs: int) -> int:
    """A phase of ``nnunet_epochs`` of nnU-Net's 1000 epochs in a run of ``num_epochs``: the same share, rounded, at
    least 1 and at most ``nnunet_epochs`` (50: 50 of 1000 or more, 5 of 100, 1 of 20)."""
    return min(nnunet_epochs, max(1, round(nnunet_epochs / NNUNET_EPOCHS * num_epochs)))


def num_epochs() -> int:
    """The epochs of a plugin trainer's run: ``nnUNet_ssp_num_epochs`` or 1000."""
    return positive_int_from_env(NUM_EPOCHS_ENV) or NNUNET_EPOCHS


def iterations_per_epoch(schedule: str, slices: int, batch_size: int) -> int:
    """Training iterations per epoch of ``schedule`` for a fold of ``slices`` labelled slices at ``batch_size``
    (``nnUNet_ssp_iters_per_epoch`` wins when set)."""
    from_env = positive_int_from_env(ITERS_PER_EPOCH_ENV)
    if from_env:
        return from_env
    return paper_iterations_per_epoch(slices, batch_size) if schedule == "paper" else NNUNET_ITERATIONS_PER_EPOCH
