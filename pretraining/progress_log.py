"""A pretraining run's log (``training_log.txt``, also printed) and its ``progress.png``: loss and learning rate per
epoch, and the probe's errors when there are any, as nnU-Net's trainers show theirs."""
import os
from datetime import datetime
from typing import Dict, List

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
        """progress.png of ``history`` (per-epoch lists: epoch, loss, lr and probe_* errors)."""
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        probe_keys = [k for k in history if k.startswith("probe_")]
        fig, axes = plt.subplots(2 if probe_keys else 1, 1, figsize=(8, 8 if probe_keys else 4.5), squeeze=False)
        loss_axis = axes[0, 0]
        loss_axis.plot(history["epoch"], history["loss"], "b-o", markersize=3, label="loss")
        loss_axis.set_xlabel("epoch")
        loss_axis.set_ylabel(self.loss_name)
        lr_axis = loss_axis.twinx()
        lr_axis.plot(history["epoch"], history["lr"], "g--", label="learning rate")
        lr_axis.set_ylabel("learning rate")
        loss_axis.legend(loc="upper right")
        if probe_keys:
            probe_axis = axes[1, 0]
            for key in probe_keys:
                probe_axis.plot(history["epoch"], history[key], "--" if key.endswith("chance") else "-o",
                                markersize=3, label=key[len("probe_"):])
            probe_axis.set_xlabel("epoch")
            probe_axis.set_ylabel("k-NN probe error (held-out subjects)")
            probe_axis.legend(loc="upper right")
        fig.suptitle(self.title)
        fig.tight_layout()
        with atomic_path(os.path.join(self.output_folder, "progress.png")) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
