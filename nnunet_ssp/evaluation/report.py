"""The paper-style report: 3D Dice, HD95 and clinical errors per method x label budget over seeds, Wilcoxon tests
against the baseline, CSV files and figures, from folders evaluated by ``nnunet_ssp evaluate``.

A run is one evaluated prediction folder (``ssp_evaluation.json`` next to nnU-Net's ``summary.json``), identified
by (experiment, method, budget, seed); the experiment (the main one, an unseen phase or vendors: ``runs.py``) says what
the run was trained and tested on. The main experiment gets every table and figure, each other experiment a section
with its mean Dice and its Wilcoxon tests against its own baseline; the CSV files hold every run, with its experiment.
Table cells are the mean over seeds, ``± std`` (ddof=1) when there are two or more,
and ``(n=k)`` seeds; a single seed shows its value without the ``±`` part.
"""
import csv
import math
import os
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ssp.errors import SSPError
from nnunet_ssp.evaluation.clinical import MEASURES
from nnunet_ssp.io import atomic_path, build_files_into

from nnunet_ssp.evaluation.runs import (BASELINE, EF_MEASURES, MEAN, NAN, Experiment, Run, cell_text, experiments,
                                        find_runs, label_sort_key, seed_sort_key)


def seed_stats(values: Sequence[float]) -> Tuple[int, float, float]:
    """(n finite values, mean, std with ddof=1; NaN std below two values)."""
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    return v.size, float(v.mean()) if v.size else NAN, float(v.std(ddof=1)) if v.size > 1 else NAN


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "n/a"


def _cell(values: Sequence[float], digits: int) -> str:
    n, mean, std = seed_stats(values)
    if not n:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "") + f" (n={n})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def grid_table(groups, methods, budgets, value, digits: int) -> str:
    """Methods x budgets, each cell the seeds' ``value(run)`` as mean ± std (n); "–" where no run exists."""
    rows = [[m] + [_cell([value(r) for r in groups[(m, b)]], digits) if (m, b) in groups else "–" for b in budgets]
            for m in methods]
    return markdown_table(["method"] + [cell_text(b) for b in budgets], rows)


def class_tables(groups, methods, budgets, labels, value, digits: int) -> List[str]:
    """Markdown lines: one grid table per class of ``labels``, cells ``value(run, label)``."""
    lines = []
    for k, name in labels.items():
        lines += ["", f"### {name} (label {k})", "",
                  grid_table(groups, methods, budgets, lambda r, k=k: value(r, k), digits)]
    return lines


def _pooled_case_dice(runs: Sequence[Run]) -> Dict[str, float]:
    """Each case's foreground Dice averaged over ``runs`` (seeds), NaNs ignored."""
    values = defaultdict(list)
    for run in runs:
        for case, v in run.case_dice.items():
            if math.isfinite(v):
                values[case].append(v)
    return {case: float(np.mean(v)) for case, v in values.items()}


def wilcoxon_rows(groups, methods, budgets) -> List[dict]:
    """Paired two-sided Wilcoxon signed-rank test of each method against the baseline per budget, over the test
    cases (matched by reference file name), each case's Dice averaged over the seeds both have. Zero differences
    are dropped (scipy's default); fewer than two non-zero differences give no p."""
    from scipy.stats import wilcoxon
    rows = []
    for method in methods:
        for budget in budgets:
            if method == BASELINE or (method, budget) not in groups:
                continue
            row = {"method": method, "budget": budget, "seeds": [], "n_pairs": 0, "median_difference": NAN,
                   "p_value": NAN, "note": ""}
            rows.append(row)
            if (BASELINE, budget) not in groups:
                row["note"] = "no baseline at this budget"
                continue
            own = {r.seed: r for r in groups[(method, budget)]}
            base = {r.seed: r for r in groups[(BASELINE, budget)]}
            row["seeds"] = sorted(set(own) & set(base), key=seed_sort_key)
            if not row["seeds"]:
                row["note"] = "no seed in common with the baseline"
                continue
            a = _pooled_case_dice([own[s] for s in row["seeds"]])
            b = _pooled_case_dice([base[s] for s in row["seeds"]])
            cases = sorted(set(a) & set(b))
            diffs = np.array([a[c] - b[c] for c in cases])
            row["n_pairs"] = len(cases)
            row["median_difference"] = float(np.median(diffs)) if cases else NAN
            if np.count_nonzero(diffs) < 2:
                row["note"] = "fewer than 2 non-zero differences"
                continue
            row["p_value"] = float(wilcoxon([a[c] for c in cases], [b[c] for c in cases],
                                            alternative="two-sided").pvalue)
    return rows


def _seed_mean(runs: Sequence[Run], measure: str, stat: str) -> float:
    return seed_stats([r.clinical.get(measure, {}).get(stat, NAN) for r in runs])[1]


def clinical_table(groups, measures) -> str:
    """Per method x budget and measure: MAE / bias [LoA low, LoA high], each averaged over seeds."""
    rows = []
    for (method, budget), runs in groups.items():
        cells = []
        for m in measures:
            mae, bias, low, high = (_seed_mean(runs, m, s) for s in ("mae", "bias", "loa_low", "loa_high"))
            cells.append("n/a" if not math.isfinite(mae) else
                         f"{mae:.2f} / {_fmt(bias, '+.2f')} [{_fmt(low, '.2f')}, {_fmt(high, '.2f')}]")
        rows.append([method, cell_text(budget), str(len(runs))] + cells)
    return markdown_table(["method", "budget", "seeds"] + list(measures), rows)


def _csv_value(value) -> str:
    if value is None or isinstance(value, float) and not math.isfinite(value):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([[_csv_value(v) for v in row] for row in rows])
    return path


def _write_text(path: str, text: str) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def label_efficiency_series(groups, methods, budgets):
    """method -> [(x, mean, min, max)] of the foreground 3D Dice over seeds, x = the mean num_train_subjects of
    the runs, else the numeric budget; also the (method, budget) pairs without an x (left out of the plot)."""
    series, skipped = {}, []
    for method in methods:
        points = []
        for budget in budgets:
            runs = groups.get((method, budget))
            if not runs:
                continue
            known = [r.num_train_subjects for r in runs if r.num_train_subjects is not None]
            x = float(np.mean(known)) if known else float(budget) if isinstance(budget, int) else None
            dice = [r.dice[MEAN] for r in runs if math.isfinite(r.dice[MEAN])]
            if x is None or not dice:
                skipped.append((method, budget))
                continue
            points.append((x, float(np.mean(dice)), min(dice), max(dice)))
        series[method] = sorted(points)
    return series, skipped


def bland_altman_panels(groups, methods, budgets):
    """(method, budget, {measure: (reference, prediction)}) per method at the smallest budget every method has
    (each method's smallest budget when there is none), subjects of all seeds pooled."""
    common = [b for b in budgets if all((m, b) in groups for m in methods)]
    panels = []
    for method in methods:
        budget = common[0] if common else next(b for b in budgets if (method, b) in groups)
        pairs = {m: ([], []) for m in EF_MEASURES}
        for run in groups[(method, budget)]:
            for subject in run.subjects.values():
                for m in EF_MEASURES:
                    pairs[m][0].append(subject["reference"].get(m, NAN))
                    pairs[m][1].append(subject["prediction"].get(m, NAN))
        panels.append((method, budget, pairs))
    return panels


def _schedule_text(schedule: Optional[dict]) -> str:
    if not schedule:
        return "not recorded"
    return (f"{schedule['name']} ({schedule['num_epochs']} epochs x {schedule['iterations_per_epoch']} iterations, "
            f"lr {schedule['initial_lr']:g})")


def _tta_text(tta: Optional[bool]) -> str:
    return "not recorded" if tta is None else ("on" if tta else "off")


def schedule_summary(runs: Sequence[Run]) -> str:
    """The schedules the runs recorded, e.g. "paper (1000 epochs, 8–214 iterations per epoch)"."""
    by_name = defaultdict(list)
    for run in runs:
        by_name[run.schedule["name"] if run.schedule else None].append(run.schedule)
    parts = []
    for name, schedules in sorted(by_name.items(), key=lambda item: str(item[0])):
        if name is None:
            parts.append(f"not recorded ({len(schedules)} runs)")
            continue
        epochs = sorted({s["num_epochs"] for s in schedules})
        iterations = sorted({s["iterations_per_epoch"] for s in schedules})
        parts.append(f"{name} ({'/'.join(map(str, epochs))} epochs, {iterations[0]}"
                     + (f"–{iterations[-1]}" if len(iterations) > 1 else "") + " iterations per epoch)")
    return "; ".join(parts)


def tta_summary(runs: Sequence[Run]) -> str:
    """"off", or how many runs had each setting when they differ."""
    counts = Counter(_tta_text(run.tta) for run in runs)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{text} ({n} runs)" for text, n in sorted(counts.items()))


def _intro(experiment: Experiment) -> List[str]:
    """The lines that say which runs an experiment's tables hold."""
    runs = experiment.runs
    return [f"{len(runs)} runs: methods {', '.join(experiment.methods)}; budgets "
            f"{', '.join(map(cell_text, experiment.budgets))}.",
            f"Fine-tuning schedule: {schedule_summary(runs)}. Test-time augmentation: {tta_summary(runs)}."]


def _wilcoxon_table(rows: Sequence[dict]) -> str:
    return markdown_table(["method", "budget", "seeds", "n pairs", "median difference", "p", "note"],
                          [[w["method"], cell_text(w["budget"]), " ".join(map(cell_text, w["seeds"])) or "–",
                            str(w["n_pairs"]), _fmt(w["median_difference"], "+.4f"), _fmt(w["p_value"], ".4g"),
                            w["note"]] for w in rows])


def _runs_table(runs: Sequence[Run]) -> str:
    return markdown_table(["method", "budget", "seed", "training subjects", "schedule", "TTA", "folder"],
                          [[r.method, cell_text(r.budget), cell_text(r.seed), cell_text(r.num_train_subjects),
                            _schedule_text(r.schedule), _tta_text(r.tta), r.folder] for r in runs])


def _report_markdown(main: Experiment, others: Sequence[Experiment], labels, measures, main_table: str, wilcoxon,
                     skipped) -> str:
    """report.md: for the ``main`` experiment the main table, the per-class Dice and HD95 tables, clinical errors,
    the Wilcoxon tests, the figures and the list of runs; for each of the ``others`` (``wilcoxon``: the tests by
    experiment) its main table, Wilcoxon tests and runs."""
    groups, methods, budgets = main.groups, main.methods, main.budgets
    md = ["# nnunet_ssp report" + (f": {main.label}" if main.label else ""), "", *_intro(main),
          "Cells are the mean over seeds, ± the standard deviation over seeds (ddof=1) when there are two or more, "
          "and (n=k) the number of seeds; a single seed shows its value without ±; – marks no run."]
    if others:
        md.append("Other experiments, each in its section below: "
                  + "; ".join(f"{e.label} ({len(e.runs)} runs)" for e in others) + ".")
    md += ["", "## 3D Dice, mean over the foreground classes", "",
           "A run's value is nnU-Net's `foreground_mean` Dice (the mean over classes of the per-class mean).", "",
           main_table, "", "## 3D Dice per class"]
    md += class_tables(groups, methods, budgets, labels, lambda r, k: r.dice.get(k, NAN), 3)
    md += ["", "## HD95 (mm) per class", "", "A run's value is its mean HD95 over the cases where it is defined."]
    md += class_tables(groups, methods, budgets, labels, lambda r, k: r.hd95.get(k, NAN), 2)
    md += ["", "## Clinical measures: prediction − reference", "",
           "Cells: MAE / bias [limits of agreement low, high] (bias ± 1.96 sd), each the mean of the per-run values "
           "over seeds.", "", clinical_table(groups, measures), "",
           "## Wilcoxon signed-rank test against the baseline", "",
           "Paired two-sided test over the test cases (matched by reference file name); a case's value is its mean "
           "Dice over the foreground classes, averaged over the seeds both methods have. Difference = method − "
           "baseline.", "", _wilcoxon_table(wilcoxon[main.label]), "",
           "## Figures", "", "![label efficiency](label_efficiency.png)", "",
           "![Bland-Altman EF](bland_altman_ef.png)"]
    if skipped:
        md += ["", "Not in label_efficiency.png (no number of training subjects): "
               + ", ".join(f"{m} budget {cell_text(b)}" for m, b in skipped) + "."]
    md += ["", "## Runs", "", _runs_table(main.runs)]
    for e in others:
        md += ["", f"## Experiment: {e.label}", "", *_intro(e), "", "### 3D Dice, mean over the foreground classes",
               "", grid_table(e.groups, e.methods, e.budgets, lambda r: r.dice[MEAN], 3), "",
               "### Wilcoxon signed-rank test against the baseline", "",
               "Against this experiment's baseline, as above.", "", _wilcoxon_table(wilcoxon[e.label]), "",
               "### Runs", "", _runs_table(e.runs)]
    return "\n".join(md) + "\n"


def _write_tables(folder: str, experiments: Sequence[Experiment], classes, measures, wilcoxon) -> List[str]:
    """dice.csv, summary.csv, clinical.csv and wilcoxon.csv in ``folder`` (each row with its experiment);
    returns their paths."""
    stats = ("n", "mae", "bias", "sd", "loa_low", "loa_high")
    runs = [r for e in experiments for r in e.runs]
    return [
        write_csv(os.path.join(folder, "dice.csv"), ["experiment", "method", "budget", "seed", "num_train_subjects",
                                                     "class", "dice"],
                  [[r.experiment, r.method, r.budget, r.seed, r.num_train_subjects, k, r.dice.get(k, NAN)]
                   for r in runs for k in classes]),
        write_csv(os.path.join(folder, "summary.csv"), ["experiment", "method", "budget", "class", "n_seeds", "mean",
                                                        "std"],
                  [[e.label, m, b, k, *seed_stats([r.dice.get(k, NAN) for r in rs])]
                   for e in experiments for (m, b), rs in e.groups.items() for k in classes]),
        write_csv(os.path.join(folder, "clinical.csv"), ["experiment", "method", "budget", "seed", "measure", *stats],
                  [[r.experiment, r.method, r.budget, r.seed, m, *(r.clinical[m].get(s, NAN) for s in stats)]
                   for r in runs for m in measures if m in r.clinical]),
        write_csv(os.path.join(folder, "wilcoxon.csv"), ["experiment", "method", "budget", "seeds", "n_pairs",
                                                         "median_difference", "p_value", "note"],
                  [[e.label, w["method"], w["budget"], " ".join(map(cell_text, w["seeds"])), w["n_pairs"],
                    w["median_difference"], w["p_value"], w["note"]] for e in experiments for w in wilcoxon[e.label]])]


def write_report(results: Sequence[str], out: str) -> Tuple[str, List[str]]:
    """Writes report.md, dice.csv, summary.csv, clinical.csv, wilcoxon.csv, label_efficiency.png and
    bland_altman_ef.png into ``out``; returns the main table (Markdown) and the paths written. The main experiment
    (see runs.experiment_label; the first when there is no main one) gets every table and the figures, each other
    experiment its own section. The files are made in a temporary folder and moved into ``out`` only when all of
    them are complete: a failure leaves ``out`` as it was."""
    from nnunet_ssp.evaluation.plots import plot_bland_altman, plot_label_efficiency
    runs = find_runs(results)
    main, *others = found = experiments(runs)
    grid = (main.groups, main.methods, main.budgets)
    labels = {}
    for run in runs:
        for k, name in run.labels.items():
            labels.setdefault(k, name)
    labels = {k: labels[k] for k in sorted(labels, key=label_sort_key)}
    measures = [m for m in MEASURES if any(m in r.clinical for r in runs)]
    measures += sorted({m for r in runs for m in r.clinical} - set(measures))
    if os.path.exists(out) and not os.path.isdir(out):
        raise SSPError(f"{out}: exists and is not a folder")

    def build(folder: str) -> Tuple[str, List[str]]:
        main_table = grid_table(*grid, lambda r: r.dice[MEAN], 3)
        wilcoxon = {e.label: wilcoxon_rows(e.groups, e.methods, e.budgets) for e in found}
        series, skipped = label_efficiency_series(*grid)
        markdown = _report_markdown(main, others, labels, measures, main_table, wilcoxon, skipped)
        written = [_write_text(os.path.join(folder, "report.md"), markdown)]
        written += _write_tables(folder, found, [MEAN, *labels], measures, wilcoxon)
        written.append(plot_label_efficiency(series, os.path.join(folder, "label_efficiency.png")))
        written.append(plot_bland_altman(bland_altman_panels(*grid), os.path.join(folder, "bland_altman_ef.png")))
        return main_table, written

    return build_files_into(out, build)
