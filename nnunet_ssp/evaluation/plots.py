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
    """Mean 3D Dice against labelled subjects (log x), one line per method, its 95% interval as error bars and shaded
    between budgets (none where it is NaN). ``series``: method -> [(x, mean, low, high)] sorted by x."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    xs = sorted({p[0] for points in series.values() for p in points})
    for method, points in series.items():
        if not points:
            continue
        x, mean, low, high = (np.array(v, dtype=float) for v in zip(*points))
        bars = ax.errorbar(x, mean, yerr=np.nan_to_num([mean - low, high - mean]), marker="o", capsize=3, label=method)
        ax.fill_between(x, low, high, color=bars.lines[0].get_color(), alpha=0.2, linewidth=0)
    if xs:
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.legend()
    ax.set_xlabel("labelled training subjects")
    ax.set_ylabel("3D Dice (foreground mean)")
    ax.set_title("Label efficiency (band: 95% interval over folds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_differences(panels: Sequence[Tuple[str, Sequence[Tuple[str, float, float, float]]]], path: str) -> str:
    """Forest plot: one panel per (title, [(method, mean difference, 95% low, high)]), each method's mean
    difference to the baseline with its interval (none where NaN) and a dashed zero line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 1.2 + 0.45 * sum(len(rows) + 1 for _, rows in panels)))
    if not panels:
        fig.text(0.5, 0.5, "no method to compare with the baseline", ha="center", va="center")
        return _save(fig, path)
    axes = fig.subplots(
        len(panels), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": [len(rows) for _, rows in panels]}
    )[:, 0]
    for ax, (title, rows) in zip(axes, panels):
        methods, mean, low, high = zip(*rows)
        y = np.arange(len(rows))[::-1]
        mean, low, high = (np.asarray(v, dtype=float) for v in (mean, low, high))
        ax.errorbar(mean, y, xerr=np.nan_to_num([mean - low, high - mean]), fmt="o", capsize=3)
        ax.axvline(0, color="k", linestyle="--", linewidth=1)
        ax.set_yticks(y, methods)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_title(title, fontsize="medium")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("3D Dice difference to the baseline (mean, 95% interval)")
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
            for key, name, style in (
                ("bias", "bias", "k-"),
                ("loa_high", "LoA high", "r--"),
                ("loa_low", "LoA low", "r--"),
            ):
                if math.isfinite(stats[key]):
                    ax.axhline(
                        stats[key], color=style[0], linestyle=style[1:], linewidth=1, label=f"{name} {stats[key]:+.2f}"
                    )
            ax.legend(fontsize="small", title=f"n={stats['n']}", title_fontsize="small")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
