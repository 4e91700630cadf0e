"""A pretraining run's log (``training_log.txt``, also printed) and its ``progress.png``: loss and learning rate per
epoch, and each probe's values on its own axis (k-NN errors, segmentation Dice), as nnU-Net's trainers show theirs."""

import os
from datetime import datetime
from typing import Dict, List, Tuple

from tqdm import tqdm

from nnunet_ssp.io import atomic_path, write_error


class ProgressLog:
    """Writes into ``output_folder`` when ``enabled`` (rank 0 of a distributed run); ``title`` heads the plot and
    ``loss_name`` labels its loss axis."""

    def __init__(self, output_folder: str, title: str, loss_name: str, enabled: bool = True):
        self.output_folder, self.title, self.loss_name, self.enabled = output_folder, title, loss_name, enabled
        self.log_file = os.path.join(output_folder, "training_log.txt")

    def log(self, message: str) -> None:
        """Prints and appends to training_log.txt."""
        if not self.enabled:
            return
        line = f"{datetime.now():%Y-%m-%d %H:%M:%S}: {message}"
        tqdm.write(line)
        try:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:
            raise write_error(self.log_file, e) from None

    def plot(self, history: Dict[str, List[float]]) -> None:
        """progress.png of ``history`` (per-epoch lists: epoch, loss, lr and the probes' ``probe_*`` values, one axis
        per probe, reference lines dashed)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = probe_panels(history)
        fig, axes = plt.subplots(1 + len(panels), 1, figsize=(8, 4.5 + 3.5 * len(panels)), squeeze=False)
        loss_axis = axes[0, 0]
        loss_axis.plot(history["epoch"], history["loss"], "b-o", markersize=3, label="loss")
        loss_axis.set_xlabel("epoch")
        loss_axis.set_ylabel(self.loss_name)
        lr_axis = loss_axis.twinx()
        lr_axis.plot(history["epoch"], history["lr"], "g--", label="learning rate")
        lr_axis.set_ylabel("learning rate")
        loss_axis.legend(loc="upper right")
        for axis, (label, keys) in zip(axes[1:, 0], panels):
            for key in keys:
                values = history[key]  # a probe switched on when a run was resumed covers its last epochs only
                axis.plot(
                    history["epoch"][len(history["epoch"]) - len(values) :],
                    values,
                    "--" if key.endswith(REFERENCE_SUFFIXES) else "-o",
                    markersize=3,
                    label=key[len("probe_") :],
                )
            axis.set_xlabel("epoch")
            axis.set_ylabel(label)
            axis.legend(loc="best")
        fig.suptitle(self.title)
        fig.tight_layout()
        with atomic_path(os.path.join(self.output_folder, "progress.png")) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)


#: keys of reference lines (drawn dashed): a k-NN probe's chance level, a probe of the randomly initialised network
REFERENCE_SUFFIXES = ("_chance", "_random_init")
#: (key prefix, axis label) of each probe's axis; a key goes to the first prefix it has
PROBE_AXES = (
    ("probe_seg_", "segmentation probe Dice, held out (up: better)"),
    ("probe_decoder_rank_", "decoder effective rank / channels (up: better)"),
    ("probe_", "k-NN probe error, held out (down: better)"),
)


def probe_panels(history: Dict[str, List[float]]) -> List[Tuple[str, List[str]]]:
    """(axis label, keys) of each probe in ``history`` that has values."""
    panels = {label: [] for _, label in PROBE_AXES}
    for key in history:
        label = next((label for prefix, label in PROBE_AXES if key.startswith(prefix)), None)
        if label is not None and history[key]:
            panels[label].append(key)
    return [(label, keys) for label, keys in panels.items() if keys]
