"""Base classes of the plugin's nnU-Net trainers.

- :class:`nnUNetTrainerBaseline`: stock nnU-Net training from random init (the from-scratch control), plus the
  plugin's schedule knobs ``nnUNet_ssp_num_epochs`` and ``nnUNet_ssp_iters_per_epoch`` and ``nnUNet_ssp_save_every``
  (checkpoint_latest.pth every so many epochs); progress.png is drawn once per 50 training iterations, not after
  every epoch, however short. ``--c`` of a fold trained under another training seed is refused
  (:mod:`trainers.seeding`).
- :class:`nnUNetTrainerSSP`: the same, but at the start of a fresh run (epoch 0, not ``--c``) it finds, verifies
  and loads an SSP contract checkpoint into the network parts its method declares, and fine-tunes at lr 5e-3.
- :class:`PaperScheduleMixin`: the paper's fine-tuning length (see :mod:`nnunet_ssp.schedule`), for any of them.
- :class:`WarmupMixin`: a linear learning-rate warm-up in front of the poly schedule, for any of them.
- :class:`BaselineLRMixin`, :class:`EncoderOnlyMixin`: the scratch lr, the encoder alone, for the SSP trainers
  (how the loaded parts train, frozen or at their own lr: :mod:`trainers.strategies`).
"""

import math
import os
from typing import Optional, Tuple

import torch
from nnunetv2.paths import nnUNet_results
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.file_path_utilities import get_output_folder

from nnunet_ssp.checkpoint import (
    CHECKPOINT_ENV,
    FINAL_CHECKPOINT,
    SSP_INIT_FILE,
    default_checkpoint_folder,
    load_checkpoint,
    sha256_of_file,
    verify_checkpoint,
)
from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import atomic_path, fault_point, load_json_file, save_json_atomic
from nnunet_ssp.network import PlannedConfiguration, load_parts, tensor_digests
from nnunet_ssp.schedule import (
    ITERS_PER_EPOCH_ENV,
    NUM_EPOCHS_ENV,
    PAPER_RECIPE,
    SAVE_EVERY_ENV,
    SKIP_FINAL_VALIDATION_ENV,
    paper_iterations_per_epoch,
    positive_int_from_env,
    shortened_epochs,
)
from trainers.schedules import WarmupPolyLRScheduler
from trainers.seeding import check_resumable

SSP_INITIAL_LR = 5e-3  # the paper's fine-tuning recommendation (its baseline: 1e-2)
SCRATCH_INITIAL_LR = 1e-2  # nnU-Net's and the paper's from-scratch lr
#: nnU-Net draws progress.png after every epoch, about 1.1 s on a CPU; when an epoch is one iteration (the paper
#: schedule of a small fold) that is more than the iteration. The plugin's trainers draw it once per this many
#: training iterations (so after every epoch of nnU-Net's 250) and after the last epoch.
PROGRESS_PLOT_ITERATIONS = 50


def _exit_with(error: SSPError):
    """Stock nnU-Net CLIs print tracebacks; a user error should be one line and a non-zero exit instead."""
    return SystemExit(f"nnunet_ssp error: {error}")


def _positive_int_from_env(name: str) -> Optional[int]:
    try:
        return positive_int_from_env(name)
    except SSPError as e:
        raise _exit_with(e) from None


def _recorded_parts(record: str) -> tuple:
    """The parts a run's ``ssp_init.json`` says it loaded."""
    try:
        loaded = load_json_file(record, dict).get("loaded")
    except SSPError as e:
        raise _exit_with(e) from None
    parts = loaded.get("parts") if isinstance(loaded, dict) else None
    if not isinstance(parts, list) or not parts:
        raise _exit_with(SSPError(f"{record}: no loaded parts recorded; restore the file or train afresh without --c"))
    return tuple(parts)


class nnUNetTrainerBaseline(nnUNetTrainer):
    """From-scratch control: nnU-Net's schedule (SGD, poly, 1000 x 250 iterations, lr 1e-2) from random init."""

    #: the fine-tuning schedule's name, recorded in nnU-Net's debug.json and so in every evaluation
    schedule_name = "nnunet"
    #: the fine-tuning recipe's name ("" = the paper's), recorded in every evaluation: it names the report's row
    recipe = ""
    #: the lr the run starts from (``initial_lr``): nnU-Net's 1e-2; the SSP trainers and the recipes set their own
    trainer_initial_lr = SCRATCH_INITIAL_LR
    #: the training seed of the ``_seed<K>`` variants (trainers/seeding.py); None: nnU-Net's unseeded training
    training_seed: Optional[int] = None

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        if plans["continue_training"] and nnUNet_results.is_set():  # refused before nnU-Net writes to the fold
            folder = get_output_folder(
                plans["dataset_name"], type(self).__name__, plans["plans_name"], configuration, fold
            )
            try:
                check_resumable(folder, type(self).__name__, self.training_seed)
            except SSPError as e:
                raise _exit_with(e) from None
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.trainer_initial_lr
        # nnU-Net's own ratio of training to validation iterations (250 : 50), kept whatever sets the iterations
        self.validation_ratio = self.num_iterations_per_epoch / self.num_val_iterations_per_epoch
        num_epochs = _positive_int_from_env(NUM_EPOCHS_ENV)
        iters = _positive_int_from_env(ITERS_PER_EPOCH_ENV)
        self.iterations_from_env = iters is not None
        if num_epochs is not None:
            self.num_epochs = num_epochs
        if iters is not None:
            self.set_training_iterations(iters)
        self.save_every = _positive_int_from_env(SAVE_EVERY_ENV) or self.save_every
        if num_epochs is not None or iters is not None:
            self.print_to_log_file(
                f"nnunet_ssp schedule from the environment: {self.num_epochs} epochs x "
                f"{self.num_iterations_per_epoch} iterations "
                f"({self.num_val_iterations_per_epoch} validation iterations)"
            )

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's validation of the final network, unless ``nnUNet_ssp_skip_final_validation=1``: the protocol
        predicts the test set anyway, and this validation costs a fine-tune on a CPU 35-50 s of pool start-ups."""
        if os.environ.get(SKIP_FINAL_VALIDATION_ENV) == "1":
            self.print_to_log_file(f"final validation skipped ({SKIP_FINAL_VALIDATION_ENV}=1)")
            return
        super().perform_actual_validation(save_probabilities)

    def on_epoch_end(self):
        """nnU-Net's, with progress.png drawn only when due (:data:`PROGRESS_PLOT_ITERATIONS`); then the test hook's
        point ``epoch_end:E`` (epoch E's checkpoints written)."""
        epoch = self.current_epoch
        every = math.ceil(PROGRESS_PLOT_ITERATIONS / self.num_iterations_per_epoch)
        if (epoch + 1) % every == 0 or epoch == self.num_epochs - 1:
            super().on_epoch_end()
        else:
            self.logger.plot_progress_png = lambda output_folder: None
            try:
                super().on_epoch_end()
            finally:
                del self.logger.plot_progress_png  # the logger's own method again
        fault_point(f"epoch_end:{epoch}")

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically: a run killed while saving leaves the previous file, never a torn
        one that ``--c`` or the protocol would take for a finished run."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        with atomic_path(filename) as tmp:
            super().save_checkpoint(tmp)

    def set_training_iterations(self, iterations: int) -> None:
        """Training iterations per epoch; validation iterations at nnU-Net's ratio (at least 1)."""
        self.num_iterations_per_epoch = iterations
        self.num_val_iterations_per_epoch = max(1, round(iterations / self.validation_ratio))


class nnUNetTrainerSSP(nnUNetTrainerBaseline):
    """Fine-tunes from an SSP checkpoint: loads the method's parts at the start of a fresh run, lr 5e-3.

    Checkpoint lookup: ``$nnUNet_ssp_checkpoint``, else
    ``$nnUNet_results/<Dataset>/ssp/<method>__<plans>__<configuration>/checkpoint_final.pth``. A named trainer
    (``ssp_method`` set) refuses a checkpoint of another method. Without a method (this class itself) the checkpoint
    must be given by ``nnUNet_ssp_checkpoint`` and the parts it holds are loaded. What was loaded goes to the
    training log and to ``fold_X/ssp_init.json``.
    """

    ssp_method: Optional[str] = None
    #: the network parts a method's checkpoints hold (``nnunet_ssp.network.PARTS``), which this trainer loads
    ssp_parts: Tuple[str, ...] = ()
    trainer_initial_lr = SSP_INITIAL_LR

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        # Verify before nnU-Net creates the fold folder, so a refused checkpoint writes nothing there.
        # --c skips this: the weights then come from nnU-Net's own checkpoint.
        self._ssp_pending = None
        self._ssp_warnings = []
        if not plans["continue_training"]:
            self._ssp_pending = self._find_and_verify(
                PlannedConfiguration(dict(plans), configuration, dataset_json), required=False
            )
        super().__init__(plans, configuration, fold, dataset_json, device)

    def _checkpoint_path(self, target: PlannedConfiguration) -> str:
        from_env = os.environ.get(CHECKPOINT_ENV)
        if from_env:
            return from_env
        if self.ssp_method is None:
            raise SSPError(f"{type(self).__name__} has no method: set {CHECKPOINT_ENV} to a checkpoint file")
        if not nnUNet_results.is_set():
            raise SSPError(f"nnUNet_results is not set and {CHECKPOINT_ENV} is empty: no SSP checkpoint to load")
        return os.path.join(
            default_checkpoint_folder(
                nnUNet_results.get(), target.dataset_name, self.ssp_method, target.plans_name, target.configuration
            ),
            FINAL_CHECKPOINT,
        )

    def _find_and_verify(self, target: PlannedConfiguration, required: bool):
        """(path, checkpoint, parts) of a verified checkpoint; None if absent and not ``required``."""
        try:
            path = self._checkpoint_path(target)
            if not os.path.isfile(path):
                if not required:
                    return None  # --val needs no SSP file; a fresh run reports the absence in on_train_start
                raise SSPError(
                    f"{path}: SSP checkpoint not found; run ssp_pretrain -d {target.dataset_name} "
                    f"--method {self.ssp_method or '<method>'} or set {CHECKPOINT_ENV}"
                )
            checkpoint = load_checkpoint(path)
            if self.ssp_method is not None and checkpoint["method"] != self.ssp_method:
                raise SSPError(
                    f"{path}: checkpoint pretrained with '{checkpoint['method']}', but "
                    f"{type(self).__name__} fine-tunes from '{self.ssp_method}' checkpoints; unset "
                    f"{CHECKPOINT_ENV}, or train with nnUNetTrainerSSP to load any method's checkpoint"
                )
            parts = self.parts_to_load(checkpoint)
            self._ssp_warnings = verify_checkpoint(checkpoint, target, parts, source=path)
        except SSPError as e:
            raise _exit_with(e) from None
        return path, checkpoint, parts

    def parts_to_load(self, checkpoint: dict) -> tuple:
        """The network parts this trainer loads: its method's; without a method, every part the checkpoint holds."""
        return self.ssp_parts if self.ssp_method else tuple(checkpoint["parts"])

    def pretrained_parts(self) -> tuple:
        """The parts this run loads (a fresh run: from the verified checkpoint) or loaded (``--c``, ``--val``: as its
        ``ssp_init.json`` recorded them), for what must know them before the weights arrive (the optimizer)."""
        if self._ssp_pending is None:
            record = os.path.join(self.output_folder, SSP_INIT_FILE)
            if os.path.isfile(record):
                return _recorded_parts(record)
            target = PlannedConfiguration(self.plans_manager, self.configuration_name, self.dataset_json)
            self._ssp_pending = self._find_and_verify(target, required=True)
        return self._ssp_pending[2]

    def fine_tuning_strategy(self) -> dict:
        """How the loaded parts are fine-tuned, recorded in ``ssp_init.json``; the recipe's mixins add to it."""
        return {"recipe": self.recipe or PAPER_RECIPE}

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.current_epoch == 0:
            try:
                self._load_ssp_weights()
            except SSPError as e:
                raise _exit_with(e) from None
        super().on_train_start()

    def _load_ssp_weights(self):
        target = PlannedConfiguration(self.plans_manager, self.configuration_name, self.dataset_json)
        path, checkpoint, parts = self._ssp_pending or self._find_and_verify(target, required=True)
        for warning in self._ssp_warnings:
            self.print_to_log_file(f"WARNING: {warning}")
        report = load_parts(self.network, checkpoint["network_weights"], parts, source=path)
        self.print_to_log_file(f"Loaded SSP checkpoint {path} (method {checkpoint['method']}): {report}")
        if self.local_rank == 0:
            save_json_atomic(
                {
                    "trainer": type(self).__name__,
                    "checkpoint": os.path.abspath(path),
                    "sha256": sha256_of_file(path),
                    "method": checkpoint["method"],
                    "loaded": report.as_dict(),
                    "initial_lr": self.initial_lr,
                    "num_epochs": self.num_epochs,
                    "warnings": self._ssp_warnings,
                    "fine_tuning": self.fine_tuning_strategy(),
                    **{
                        k: checkpoint.get(k) for k in ("network", "plans", "pretraining", "data", "versions", "created")
                    },
                    "network_tensor_sha256_after_load": tensor_digests(self.network, ("encoder", "decoder")),
                },
                os.path.join(self.output_folder, SSP_INIT_FILE),
            )
        self._ssp_pending = None


class PaperScheduleMixin:
    """The paper's fine-tuning length: an epoch is one pass over the fold's labelled training slices, i.e.
    ceil(slices / batch size) iterations (10 subjects, 231 slices, batch 32: 8), for 1000 epochs with nnU-Net's poly
    decay; validation iterations follow at nnU-Net's ratio.

    ``nnUNet_ssp_iters_per_epoch``, when set, still wins. Put it first in the bases:
    ``class X_paperSchedule(PaperScheduleMixin, X)``."""

    schedule_name = "paper"

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if not self.iterations_from_env:
            slices = labelled_slices(dataset_tr)
            batch = self.configuration_manager.batch_size  # the global batch, also under DDP
            self.set_training_iterations(paper_iterations_per_epoch(slices, batch))
            self.print_to_log_file(
                f"nnunet_ssp paper schedule: an epoch is one pass over the fold's {slices} "
                f"labelled training slices at batch {batch}: {self.num_iterations_per_epoch} "
                f"iterations ({self.num_val_iterations_per_epoch} validation iterations), "
                f"{self.num_epochs} epochs"
            )
        return dataset_tr, dataset_val


class BaselineLRMixin:
    """Fine-tunes a pretrained network at the from-scratch baseline's learning rate (nnU-Net's 1e-2) instead of the
    paper's 5e-3, so that the lr does not differ between the arms of the comparison.

    For the SSP trainers; put it first in the bases: ``class X_baselineLR(BaselineLRMixin, X)``."""

    trainer_initial_lr = SCRATCH_INITIAL_LR


class EncoderOnlyMixin:
    """Loads only the encoder of a checkpoint that holds the decoder too (MIM); the decoder starts from nnU-Net's
    random init.

    On the phantom, MIM's decoder learns to copy the high-resolution skip features (its top stage weighs the skip half
    of its input about 1.5x the upsampled half, against 1x at init) and fine-tuning from it fits the labels more slowly
    (README, "Does pretraining help"). Put it first in the bases."""

    def parts_to_load(self, checkpoint: dict) -> tuple:
        return ("encoder",)


def labelled_slices(dataset) -> int:
    """2D slices of an nnU-Net dataset's cases (the first spatial axis of each preprocessed case)."""
    return sum(int(dataset.load_case(key)[0].shape[1]) for key in dataset.identifiers)


class WarmupMixin:
    """Linear warm-up of the whole network (50 epochs, as nnssl's fine-tuning; 5% of a shortened schedule),
    then poly decay.

    Put it first in the bases: ``class X_warmup(WarmupMixin, X)``."""

    @property
    def warmup_epochs(self) -> int:
        return shortened_epochs(50, self.num_epochs)

    def configure_optimizers(self):
        optimizer, _ = super().configure_optimizers()
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)
