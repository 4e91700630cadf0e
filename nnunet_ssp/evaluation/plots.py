"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state) and written atomically."""
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from nnunet_ssp.evaluation.clinical import agreement
from nnunet_ssp.io import atomic_path


def _save(fig, path: str) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def plot_label_efficiency(series: Dict[str, List[Tuple[float, float, float, float]]], path: str) -> str:
    """Mean 3D Dice against labelled subjects (log x), one line per method, the seeds' min..max shaded.
    ``series``: method -> [(x, mean, min, max)] sorted by x."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    xs = sorted({p[0] for points in series.values() for p in points})
    for method, points in series.items():
        if not points:
            continue
        x, mean, low, high = (np.array(v) for v in zip(*points))
        line, = ax.plot(x, mean, marker="o", label=method)
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if xs:
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.legend()
    ax.set_xlabel("labelled training subjects")
    ax.set_ylabel("3D Dice (foreground mean)")
    ax.set_title("Label efficiency (band: min..max over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_bland_altman(panels: Sequence[Tuple[str, object, Dict[str, Tuple[list, list]]]], path: str) -> str:
    """One row per (method, budget, {measure: (reference, prediction)}), one column per measure: difference
    (prediction − reference) against the mean of the two, with the bias and the limits of agreement."""
    from matplotlib.figure import Figure
    measures = list(panels[0][2])
    fig = Figure(figsize=(5 * len(measures), 3.6 * len(panels)))
    axes = fig.subplots(len(panels), len(measures), squeeze=False)
    for row, (method, budget, pairs) in zip(axes, panels):
        for ax, measure in zip(row, measures):
            ref, pred = (np.asarray(v, dtype=float) for v in pairs[measure])
            valid = np.isfinite(ref) & np.isfinite(pred)
            ax.set_title(f"{method}, budget {budget}: {measure}")
            ax.set_xlabel("mean of prediction and reference")
            ax.set_ylabel("prediction − reference")
            if not valid.any():
                ax.text(0.5, 0.5, "no subjects", ha="center", va="center", transform=ax.transAxes)
                continue
            ax.scatter((ref[valid] + pred[valid]) / 2, pred[valid] - ref[valid], s=12, alpha=0.7)
            stats = agreement(ref, pred)
            for key, name, style in (("bias", "bias", "k-"), ("loa_high", "LoA high", "r--"),
                                     ("loa_low", "LoA low", "r--")):
                if math.isfinite(stats[key]):
                    ax.axhline(stats[key], color=style[0], linestyle=style[1:], linewidth=1,
                               label=f"{name} {stats[key]:+.2f}")
            ax.legend(fontsize="small", title=f"n={stats['n']}", title_fontsize="small")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
