"""The resumable state of a pretraining run: ``checkpoint_latest.pth`` (written after every epoch, and mid-epoch when
a signal stops the run), what may change when a run continues, per-epoch seeds, RNG states and the stop request."""

import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from nnunet_ssp.checkpoint import load_weights_only
from nnunet_ssp.errors import SSPError
from pretraining import distributed

LATEST_CHECKPOINT = "checkpoint_latest.pth"
STATE_FORMAT = "nnunet_ssp.pretrain_state"
#: settings that may differ between an interrupted run and its continuation
RESUMABLE_CHANGES = ("device", "num_workers", "skip_nonfinite", "precision", "channels_last", "world_size")


@dataclass
class EpochProgress:
    """Where an epoch stands: the next iteration, the losses and extra metrics of the steps done, their seconds, and
    the torch RNG states after them (mid-epoch only)."""

    epoch: int
    iteration: int = 0
    losses: List[float] = field(default_factory=list)
    metrics: Dict[str, List[float]] = field(default_factory=dict)
    seconds: float = 0.0
    rng: Optional[dict] = None

    @classmethod
    def from_state(cls, state: dict) -> "EpochProgress":
        """The progress a saved state records (states written before the per-step values were named ``metrics``
        called them ``figures``)."""
        if "progress" not in state:
            return cls(state["epoch"])
        progress = dict(state["progress"])
        progress.setdefault("metrics", progress.pop("figures", {}))
        return cls(**progress)


def load_state(path: str) -> Optional[dict]:
    """The training state in ``path``, None if there is no such file. Loaded weights-only: a file that would run code
    is refused before any of it runs."""
    if not os.path.isfile(path):
        return None
    state = load_weights_only(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SSPError(f"{path}: not an ssp_pretrain state file")
    return state


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


class StopRequest:
    """Within ``with``: SIGINT and SIGTERM ask the loop to stop after the current step (``signum``); a second SIGINT
    interrupts at once. Only the main thread can install signal handlers; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, device: torch.device) -> Optional[int]:
        """The request all ranks of a distributed run act on (any rank's signal stops them all at the same step);
        ``signum`` in one process. Every rank must call it at the same point."""
        return distributed.agreed_signal(self.signum, device)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.random.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
