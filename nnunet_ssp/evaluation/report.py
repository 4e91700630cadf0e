"""The paper-style report: 3D Dice, HD95 and clinical errors per method x label budget over runs, run-level and
per-volume tests against the baseline, CSV files and figures, from folders evaluated by ``nnunet_ssp evaluate``.

A run is one evaluated prediction folder (``ssp_evaluation.json`` next to nnU-Net's ``summary.json``), identified
by (experiment, method, budget, seed, training seed); the experiment (the main one, an unseen phase or vendors:
``runs.py``) says what the run was trained and tested on. Every run is paired with its baseline run (same fold,
same training seed; ``runs.run_pairs``), unpaired runs are refused. The main experiment gets every table and figure,
each other experiment a section with its mean Dice and its tests against its own baseline; the CSV files hold every
run, with its experiment. Table cells are the mean over runs (split seeds and training repeats), ``± std`` (ddof=1)
when there are two or more, and ``(n=k)`` runs; a single run shows its value without the ``±`` part.

The run-level comparison (``statistics.py``) takes the fold (one draw of labelled subjects) as its unit, so it covers
training randomness and the choice of labelled subjects; the per-volume Wilcoxon test holds the trained networks
fixed.

report.md opens with the report's provenance (``nnunet_ssp/provenance.py``), which provenance.json holds too;
``nnunet_ssp results`` (``results_page.py``) rebuilds a results page from report folders.
"""

import csv
import math
import os
import sys
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ssp.errors import SSPError
from nnunet_ssp.evaluation.clinical import MEASURES
from nnunet_ssp.evaluation.runs import (
    EF_MEASURES,
    MEAN,
    NAN,
    Experiment,
    Run,
    budget_sort_key,
    cell_text,
    experiments,
    find_runs,
    label_sort_key,
    run_pairs,
    seed_sort_key,
)
from nnunet_ssp.evaluation.statistics import (
    ALPHA,
    MAX_UNITS,
    fewest_units,
    holm,
    paired_design,
    t_interval,
    unit_sd,
    unit_values,
    units_needed,
)
from nnunet_ssp.io import atomic_path, build_files_into, save_json_atomic
from nnunet_ssp.provenance import collect_provenance, render_provenance_markdown

#: the claim (3D Dice) that run_level.csv and --power size the design for
CLAIM_SIZE = 0.05
#: the numbers of repeats --power sizes the design for
POWER_REPEATS = (1, 3, 5)
#: the budget whose folds all hold the same subjects: its unit is the (fold, repeat) pair
POOLED_BUDGET = "all"
FOLD_UNIT, PAIR_UNIT = "fold", "(fold, repeat)"
PROVENANCE_FILE = "provenance.json"
#: what separates report.md's provenance header from the report proper
PROVENANCE_RULE = "\n\n---\n\n"


def seed_stats(values: Sequence[float]) -> Tuple[int, float, float]:
    """(n finite values, mean, std with ddof=1; NaN std below two values)."""
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    return v.size, float(v.mean()) if v.size else NAN, float(v.std(ddof=1)) if v.size > 1 else NAN


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "n/a"


def stats_cell(n: int, mean: float, std: float, digits: int) -> str:
    """A table cell of seed_stats' (n, mean, std): "mean ± std (n=k)", without "± std" for one value."""
    if not n:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "") + f" (n={n})"


def _cell(values: Sequence[float], digits: int) -> str:
    return stats_cell(*seed_stats(values), digits)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def grid_table(groups, methods, budgets, value, digits: int) -> str:
    """Methods x budgets, each cell the runs' ``value(run)`` as mean ± std (n); "–" where no run exists."""
    rows = [
        [m] + [_cell([value(r) for r in groups[(m, b)]], digits) if (m, b) in groups else "–" for b in budgets]
        for m in methods
    ]
    return markdown_table(["method"] + [cell_text(b) for b in budgets], rows)


def class_tables(groups, methods, budgets, labels, value, digits: int) -> List[str]:
    """Markdown lines: one grid table per class of ``labels``, cells ``value(run, label)``."""
    lines = []
    for k, name in labels.items():
        lines += [
            "",
            f"### {name} (label {k})",
            "",
            grid_table(groups, methods, budgets, lambda r, k=k: value(r, k), digits),
        ]
    return lines


def _pooled_case_dice(runs: Sequence[Run]) -> Dict[str, float]:
    """Each case's foreground Dice averaged over ``runs``, NaNs ignored."""
    values = defaultdict(list)
    for run in runs:
        for case, v in run.case_dice.items():
            if math.isfinite(v):
                values[case].append(v)
    return {case: float(np.mean(v)) for case, v in values.items()}


def wilcoxon_rows(pairs) -> List[dict]:
    """Paired two-sided Wilcoxon signed-rank test of each method against the baseline per budget, over the test
    cases (matched by reference file name), each case's Dice averaged over the method's runs and over their baseline
    runs (``pairs``: runs.run_pairs). The networks are held fixed: training randomness and the choice of labelled
    subjects are not in it. Zero differences are dropped (scipy's default); fewer than two non-zero differences give
    no p."""
    from scipy.stats import wilcoxon

    rows = []
    for (method, budget), matched in pairs.items():
        own, base = (_pooled_case_dice(runs) for runs in zip(*matched))
        cases = sorted(set(own) & set(base))
        diffs = np.array([own[c] - base[c] for c in cases])
        row = {
            "method": method,
            "budget": budget,
            "seeds": sorted({r.seed for r, _ in matched}, key=seed_sort_key),
            "n_runs": len(matched),
            "n_pairs": len(cases),
            "median_difference": float(np.median(diffs)) if cases else NAN,
            "p_value": NAN,
            "note": "",
        }
        rows.append(row)
        if np.count_nonzero(diffs) < 2:
            row["note"] = "fewer than 2 non-zero differences"
            continue
        row["p_value"] = float(
            wilcoxon([own[c] for c in cases], [base[c] for c in cases], alternative="two-sided").pvalue
        )
    return rows


def run_difference(run: Run, base: Run) -> float:
    """d_{f,r}: the mean over the test cases with a finite Dice in both runs of (run − baseline run) case Dice; NaN
    without one."""
    cases = [c for c, v in run.case_dice.items() if math.isfinite(v) and math.isfinite(base.case_dice.get(c, NAN))]
    return float(np.mean([run.case_dice[c] - base.case_dice[c] for c in cases])) if cases else NAN


def _folds(values: Sequence[Tuple[Run, float]]) -> List[List[float]]:
    """The finite values of (run, value) grouped by the run's fold (split seed), in seed order."""
    folds = defaultdict(list)
    for run, value in values:
        if math.isfinite(value):
            folds[run.seed].append(value)
    return [folds[seed] for seed in sorted(folds, key=seed_sort_key)]


def _projected_sd(row: dict, repeats: int) -> float:
    """The sd of a unit of a design like ``row``'s with ``repeats`` runs per fold (1 where the unit is a run pair):
    from the variance components, else the observed sd of the units where ``repeats`` is the design's."""
    if math.isfinite(row["var_within"]) and math.isfinite(row["var_between"]):
        return unit_sd(row["var_within"], row["var_between"], repeats)
    return row["sd_unit"] if repeats == row["unit_repeats"] else NAN


def run_level_rows(label: str, pairs, claim_size: float = CLAIM_SIZE) -> List[dict]:
    """The run-level comparison (statistics.paired_design over d_{f,r} = run_difference of each pair of
    runs.run_pairs) of every method and budget of experiment ``label`` with its baseline; the sign-flip p
    Holm-corrected over these rows; the units a claim of ``claim_size`` needs with the design's repeats. The unit is
    the fold, the (fold, repeat) pair at budget "all" (every fold holds the same subjects)."""
    rows = []
    for (method, budget), matched in pairs.items():
        pooled = budget == POOLED_BUDGET
        folds = _folds([(run, run_difference(run, base)) for run, base in matched])
        counts = sorted({len(f) for f in folds}) or [0]
        row = {
            "experiment": label,
            "method": method,
            "budget": budget,
            "n_folds": len(folds),
            "n_repeats": counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}",
            "unit": PAIR_UNIT if pooled else FOLD_UNIT,
            "unit_repeats": 1 if pooled else counts[-1],
            **paired_design(folds, pooled),
            "claim_size": claim_size,
        }
        row["units_needed"] = units_needed(claim_size, _projected_sd(row, row["unit_repeats"]))
        rows.append(row)
    for row, p in zip(rows, holm([r["p_signflip"] for r in rows])):
        row["p_holm"] = float(p)
    return rows


def _budget_text(budget) -> str:
    return f"{budget} subjects" if isinstance(budget, int) else f"budget {cell_text(budget)}"


def _units_text(row: dict) -> str:
    n = row["n_units"]
    return f"{n} {'fold' if row['unit'] == FOLD_UNIT else 'run pair'}{'s' if n != 1 else ''}"


def claim_sentence(row: dict) -> str:
    """A claim where p_holm < ALPHA and the 95% interval excludes 0, else why none is made."""
    where = f"{row['method']} at {_budget_text(row['budget'])}"
    if not row["min_p"] < ALPHA:
        return (
            f"No claim for {where}: with {_units_text(row)} the smallest reachable p is "
            f"{_fmt(row['min_p'], '.4g')}, not below {ALPHA:g}."
        )
    if not row["p_holm"] < ALPHA:
        return f"No claim for {where}: p_holm = {_fmt(row['p_holm'], '.3g')}, not below {ALPHA:g}."
    if not (row["ci_low"] > 0 or row["ci_high"] < 0):
        return (
            f"No claim for {where}: the 95% interval [{_fmt(row['ci_low'], '+.3f')}, "
            f"{_fmt(row['ci_high'], '+.3f')}] includes 0."
        )
    return (
        f"{row['method']} {'above' if row['mean_diff'] > 0 else 'below'} baseline at "
        f"{_budget_text(row['budget'])}: {row['mean_diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}], "
        f"p_holm = {row['p_holm']:.2g}"
    )


def _sd_text(variance: float) -> str:
    return _fmt(math.sqrt(variance) if math.isfinite(variance) else NAN, ".3f")


def _mde_text(mde: float) -> str:
    return "none" if mde == math.inf else _fmt(mde, ".3f")


def _difference_text(row: dict) -> str:
    return f"{_fmt(row['mean_diff'], '+.3f')} [{_fmt(row['ci_low'], '+.3f')}, {_fmt(row['ci_high'], '+.3f')}]"


def _p_texts(row: dict) -> List[str]:
    return [_fmt(row[p], ".4g") for p in ("p_signflip", "p_wilcoxon", "p_holm")]


def _run_level_table(rows: Sequence[dict]) -> str:
    return markdown_table(
        [
            "method",
            "budget",
            "folds",
            "repeats",
            "unit",
            "difference [95% CI]",
            "p sign-flip",
            "p Wilcoxon",
            "p Holm",
            "min p",
            "P(improvement)",
            "sd within",
            "sd between",
            "MDE 80%",
        ],
        [
            [
                r["method"],
                cell_text(r["budget"]),
                str(r["n_folds"]),
                str(r["n_repeats"]),
                r["unit"],
                _difference_text(r),
                *_p_texts(r),
                _fmt(r["min_p"], ".4g"),
                _fmt(r["prob_improvement"], ".2f"),
                _sd_text(r["var_within"]),
                _sd_text(r["var_between"]),
                _mde_text(r["mde_80"]),
            ]
            for r in rows
        ],
    )


def run_level_brief_table(rows: Sequence[dict]) -> str:
    """The run-level comparison in brief (the results page): units, difference, p values and the claim sentence,
    formatted as in report.md."""
    return markdown_table(
        ["method", "budget", "units", "difference [95% CI]", "p sign-flip", "p Wilcoxon", "p Holm", "claim"],
        [
            [r["method"], cell_text(r["budget"]), _units_text(r), _difference_text(r), *_p_texts(r), claim_sentence(r)]
            for r in rows
        ],
    )


RUN_LEVEL_TEXT = (
    "A run's difference d is the mean over the test cases of its case Dice (mean over the foreground classes) minus "
    "that of its baseline run, trained on the same fold (budget and split seed) with the same training seed. The unit "
    "is the fold, its mean d over its repeats; at budget all, where every fold holds the same subjects, the unit is "
    "the (fold, repeat) pair. Difference: mean over the units with its Student t 95% interval. p sign-flip: exact "
    "two-sided sign-flip test over the units (the primary test); p Wilcoxon: exact signed-rank test over the same "
    "units; p Holm: the sign-flip p Holm-corrected over this experiment's rows; min p: the smallest p the design can "
    "reach (2 / 2^units). P(improvement): the share of paired runs where the method is ahead (ties count ½). sd "
    "within / between: of a run's d around its fold's mean, and of the fold effect (one-way random effects). MDE 80%: "
    f"the smallest true difference this design detects with 80% power at two-sided α = {ALPHA:g} (paired t "
    f"approximation; none where min p ≥ {ALPHA:g}). A claim needs p Holm < {ALPHA:g} and an interval without 0."
)


def holm_note(rows: Sequence[dict]) -> str:
    """What Holm's correction over an experiment's rows allows: the smallest p_holm its designs can reach and the
    units a comparison needs for any claim (statistics.fewest_units)."""
    tested = [r for r in rows if math.isfinite(r["p_signflip"])]
    if not tested:
        return "No comparison has a p-value."
    floor = min(1.0, len(tested) * min(r["min_p"] for r in tested))
    return (
        f"Holm over this experiment's {len(tested)} comparison{'s' if len(tested) > 1 else ''}: no p_holm can be "
        f"below {floor:.4g} with these designs; a claim needs at least {fewest_units(len(tested))} units per "
        "comparison."
    )


def _run_level_lines(rows: Sequence[dict]) -> List[str]:
    """The run-level section's table, Holm's floor and the claims."""
    return [_run_level_table(rows), "", holm_note(rows), "", *(f"- {claim_sentence(r)}" for r in rows)]


def power_table(results: Sequence[str], claim_size: float = CLAIM_SIZE, repeats: Sequence[int] = POWER_REPEATS) -> str:
    """``nnunet_ssp report --power``: per experiment, method and budget, the sd of a unit, the difference the design
    detects at 80% power, and the units a claim of ``claim_size`` needs with each number of ``repeats`` per fold
    (the sd from the variance components, sd² = between + within/R; at budget all the unit is one run pair, so
    only R = 1 applies); then what Holm's correction allows in each experiment (holm_note)."""
    by_experiment = {
        e.label: run_level_rows(e.label, run_pairs(e), claim_size) for e in experiments(find_runs(results))
    }
    table = markdown_table(
        [
            "experiment",
            "method",
            "budget",
            "unit",
            "units",
            "repeats",
            "sd of a unit",
            "MDE 80%",
            *(f"units for {claim_size:g}, R={n}" for n in repeats),
        ],
        [
            [
                label or "main",
                r["method"],
                cell_text(r["budget"]),
                r["unit"],
                str(r["n_units"]),
                str(r["n_repeats"]),
                _fmt(r["sd_unit"], ".3f"),
                _mde_text(r["mde_80"]),
                *(
                    _fmt(units_needed(claim_size, _projected_sd(r, n)), "d")
                    if r["unit"] == FOLD_UNIT or n == 1
                    else "–"
                    for n in repeats
                ),
            ]
            for label, rows in by_experiment.items()
            for r in rows
        ],
    )
    return "\n".join(
        [
            table,
            "",
            f"MDE 80%: the smallest true difference the design detects with 80% power at "
            f"two-sided α = {ALPHA:g} (paired t approximation; none where the exact sign-flip test cannot "
            f"reach p < {ALPHA:g}: 5 units or fewer). units for {claim_size:g}, R=n: the fewest folds "
            f"(run pairs at budget all) for a difference of {claim_size:g} with n repeats per fold, from "
            "the variance components; n/a where they are not estimable (one repeat per fold) or over "
            f"{MAX_UNITS}.",
            *(f"{label or 'main'}: {holm_note(rows)}" for label, rows in by_experiment.items()),
        ]
    )


def _seed_mean(runs: Sequence[Run], measure: str, stat: str) -> float:
    return seed_stats([r.clinical.get(measure, {}).get(stat, NAN) for r in runs])[1]


def clinical_table(groups, measures) -> str:
    """Per method x budget and measure: MAE / bias [LoA low, LoA high], each averaged over runs."""
    rows = []
    for (method, budget), runs in groups.items():
        cells = []
        for m in measures:
            mae, bias, low, high = (_seed_mean(runs, m, s) for s in ("mae", "bias", "loa_low", "loa_high"))
            cells.append(
                "n/a"
                if not math.isfinite(mae)
                else f"{mae:.2f} / {_fmt(bias, '+.2f')} [{_fmt(low, '.2f')}, {_fmt(high, '.2f')}]"
            )
        rows.append([method, cell_text(budget), str(len(runs))] + cells)
    return markdown_table(["method", "budget", "runs"] + list(measures), rows)


def _csv_value(value) -> str:
    """A CSV cell: empty for None and NaN, floats by repr (infinity too)."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([[_csv_value(v) for v in row] for row in rows])
    return path


def write_text(path: str, text: str) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def label_efficiency_series(groups, methods, budgets):
    """method -> [(x, mean, low, high)] of the foreground 3D Dice: the mean over the units (each fold's mean over
    its repeats; each run at budget all) and its Student t 95% interval (NaN with one unit), x = the mean
    num_train_subjects of the runs, else the numeric budget; also the (method, budget) pairs without an x (left out
    of the plot)."""
    series, skipped = {}, []
    for method in methods:
        points = []
        for budget in budgets:
            runs = groups.get((method, budget))
            if not runs:
                continue
            known = [r.num_train_subjects for r in runs if r.num_train_subjects is not None]
            x = float(np.mean(known)) if known else float(budget) if isinstance(budget, int) else None
            units = unit_values(_folds([(r, r.dice[MEAN]) for r in runs]), budget == POOLED_BUDGET)
            if x is None or not units.size:
                skipped.append((method, budget))
                continue
            points.append((x, *t_interval(units)))
        series[method] = sorted(points)
    return series, skipped


def difference_panels(rows: Sequence[dict]) -> List[Tuple[str, List[Tuple[str, float, float, float]]]]:
    """The forest plot's panels: per budget of the run-level ``rows``, its title and (method, mean difference, 95%
    low, high) per method."""
    panels = defaultdict(list)
    for r in rows:
        panels[r["budget"]].append((r["method"], r["mean_diff"], r["ci_low"], r["ci_high"]))
    titles = {r["budget"]: f"{_budget_text(r['budget'])} ({_units_text(r)})" for r in rows}
    return [(titles[b], panels[b]) for b in sorted(panels, key=budget_sort_key)]


def bland_altman_panels(groups, methods, budgets):
    """(method, budget, {measure: (reference, prediction)}) per method at the smallest budget every method has
    (each method's smallest budget when there is none), subjects of all runs pooled."""
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
    return (
        f"{schedule['name']} ({schedule['num_epochs']} epochs x {schedule['iterations_per_epoch']} iterations, "
        f"lr {schedule['initial_lr']:g})"
    )


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
        parts.append(
            f"{name} ({'/'.join(map(str, epochs))} epochs, {iterations[0]}"
            + (f"–{iterations[-1]}" if len(iterations) > 1 else "")
            + " iterations per epoch)"
        )
    return "; ".join(parts)


def tta_summary(runs: Sequence[Run]) -> str:
    """ "off", or how many runs had each setting when they differ."""
    counts = Counter(_tta_text(run.tta) for run in runs)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{text} ({n} runs)" for text, n in sorted(counts.items()))


def _intro(experiment: Experiment) -> List[str]:
    """The lines that say which runs an experiment's tables hold."""
    runs = experiment.runs
    return [
        f"{len(runs)} runs: methods {', '.join(experiment.methods)}; budgets "
        f"{', '.join(map(cell_text, experiment.budgets))}.",
        f"Fine-tuning schedule: {schedule_summary(runs)}. Test-time augmentation: {tta_summary(runs)}.",
        f"Network: {network_summary(runs)}.",
    ]


def network_summary(runs: Sequence[Run]) -> str:
    """The plans the runs trained with, e.g. "plans nnUNetPlans_w025 (nnU-Net's features per stage x 0.25)"."""
    parts = []
    for plans, width in sorted({(r.plans, r.width) for r in runs}, key=str):
        if plans is None:
            parts.append("plans not recorded")
        else:
            parts.append(
                f"plans {plans}"
                + (
                    f" (nnU-Net's features per stage x {width:g}, a CPU miniature)"
                    if width is not None
                    else " (as nnU-Net planned them)"
                )
            )
    return "; ".join(parts)


def _wilcoxon_table(rows: Sequence[dict]) -> str:
    return markdown_table(
        ["method", "budget", "seeds", "runs", "n pairs", "median difference", "p", "note"],
        [
            [
                w["method"],
                cell_text(w["budget"]),
                " ".join(map(cell_text, w["seeds"])),
                str(w["n_runs"]),
                str(w["n_pairs"]),
                _fmt(w["median_difference"], "+.4f"),
                _fmt(w["p_value"], ".4g"),
                w["note"],
            ]
            for w in rows
        ],
    )


def _runs_table(runs: Sequence[Run]) -> str:
    return markdown_table(
        ["method", "budget", "seed", "training seed", "training subjects", "schedule", "TTA", "folder"],
        [
            [
                r.method,
                cell_text(r.budget),
                cell_text(r.seed),
                cell_text(r.training_seed),
                cell_text(r.num_train_subjects),
                _schedule_text(r.schedule),
                _tta_text(r.tta),
                r.folder,
            ]
            for r in runs
        ],
    )


RUN_LEVEL_HEADING = "Run-level comparison against the baseline"
WILCOXON_HEADING = "Per-volume Wilcoxon test, given these trained networks"


def _report_markdown(
    main: Experiment, others: Sequence[Experiment], labels, measures, main_table: str, run_level, wilcoxon, skipped
) -> str:
    """report.md: for the ``main`` experiment the main table, the per-class Dice and HD95 tables, clinical errors,
    the run-level comparison, the per-volume Wilcoxon tests, the figures and the list of runs; for each of the
    ``others`` (``run_level``, ``wilcoxon``: the rows by experiment) its main table, tests and runs."""
    groups, methods, budgets = main.groups, main.methods, main.budgets
    md = [
        "# nnunet_ssp report" + (f": {main.label}" if main.label else ""),
        "",
        *_intro(main),
        "Cells are the mean over runs (split seeds and training repeats), ± the standard deviation over runs "
        "(ddof=1) when there are two or more, and (n=k) the number of runs; a single run shows its value without "
        "±; – marks no run.",
    ]
    if others:
        md.append(
            "Other experiments, each in its section below: "
            + "; ".join(f"{e.label} ({len(e.runs)} runs)" for e in others)
            + "."
        )
    md += [
        "",
        "## 3D Dice, mean over the foreground classes",
        "",
        "A run's value is nnU-Net's `foreground_mean` Dice (the mean over classes of the per-class mean).",
        "",
        main_table,
        "",
        "## 3D Dice per class",
    ]
    md += class_tables(groups, methods, budgets, labels, lambda r, k: r.dice.get(k, NAN), 3)
    md += ["", "## HD95 (mm) per class", "", "A run's value is its mean HD95 over the cases where it is defined."]
    md += class_tables(groups, methods, budgets, labels, lambda r, k: r.hd95.get(k, NAN), 2)
    md += [
        "",
        "## Clinical measures: prediction − reference",
        "",
        "Cells: MAE / bias [limits of agreement low, high] (bias ± 1.96 sd), each the mean of the per-run values "
        "over runs.",
        "",
        clinical_table(groups, measures),
        "",
        f"## {RUN_LEVEL_HEADING}",
        "",
        RUN_LEVEL_TEXT,
        "",
        *_run_level_lines(run_level[main.label]),
        "",
        f"## {WILCOXON_HEADING}",
        "",
        "Paired two-sided Wilcoxon signed-rank test over the test cases (matched by reference file name); a case's "
        "value is its mean Dice over the foreground classes, averaged over the method's runs (split seeds and "
        "training repeats) and over their baseline runs. Difference = method − baseline. It holds these trained "
        "networks fixed: its p says whether they differ on these test cases, not whether the method beats the "
        "baseline when trained again or on other labelled subjects (the run-level comparison does).",
        "",
        _wilcoxon_table(wilcoxon[main.label]),
        "",
        "## Figures",
        "",
        "![label efficiency](label_efficiency.png)",
        "",
        "label_efficiency.png: mean 3D Dice over the units (each fold's mean over its repeats; each run at budget "
        "all), shaded: its Student t 95% interval.",
        "",
        "![differences](differences.png)",
        "",
        "differences.png: per budget, each method's mean paired difference to the baseline (3D Dice, method − "
        "baseline) with its 95% interval, as in the run-level table; the dashed line is zero.",
        "",
        "![Bland-Altman EF](bland_altman_ef.png)",
    ]
    if skipped:
        md += [
            "",
            "Not in label_efficiency.png (no number of training subjects): "
            + ", ".join(f"{m} budget {cell_text(b)}" for m, b in skipped)
            + ".",
        ]
    md += ["", "## Runs", "", _runs_table(main.runs)]
    for e in others:
        md += [
            "",
            f"## Experiment: {e.label}",
            "",
            *_intro(e),
            "",
            "### 3D Dice, mean over the foreground classes",
            "",
            grid_table(e.groups, e.methods, e.budgets, lambda r: r.dice[MEAN], 3),
            "",
            f"### {RUN_LEVEL_HEADING}",
            "",
            "Against this experiment's baseline, as above.",
            "",
            *_run_level_lines(run_level[e.label]),
            "",
            f"### {WILCOXON_HEADING}",
            "",
            "Against this experiment's baseline, as above.",
            "",
            _wilcoxon_table(wilcoxon[e.label]),
            "",
            "### Runs",
            "",
            _runs_table(e.runs),
        ]
    return "\n".join(md) + "\n"


RUN_LEVEL_COLUMNS = (
    "experiment",
    "method",
    "budget",
    "n_folds",
    "n_repeats",
    "unit",
    "n_units",
    "mean_diff",
    "ci_low",
    "ci_high",
    "p_signflip",
    "p_wilcoxon",
    "p_holm",
    "min_p",
    "prob_improvement",
    "var_within",
    "var_between",
    "sd_unit",
    "mde_80",
    "claim_size",
    "units_needed",
)

SUMMARY_COLUMNS = ("experiment", "method", "budget", "class", "n_runs", "mean", "std")


def _write_tables(folder: str, experiments: Sequence[Experiment], classes, measures, run_level, wilcoxon) -> List[str]:
    """dice.csv, summary.csv, clinical.csv, run_level.csv and wilcoxon.csv in ``folder`` (each row with its
    experiment); returns their paths."""
    stats = ("n", "mae", "bias", "sd", "loa_low", "loa_high")
    runs = [r for e in experiments for r in e.runs]
    return [
        write_csv(
            os.path.join(folder, "dice.csv"),
            ["experiment", "method", "budget", "seed", "training_seed", "num_train_subjects", "class", "dice"],
            [
                [r.experiment, r.method, r.budget, r.seed, r.training_seed, r.num_train_subjects, k, r.dice.get(k, NAN)]
                for r in runs
                for k in classes
            ],
        ),
        write_csv(
            os.path.join(folder, "summary.csv"),
            SUMMARY_COLUMNS,
            [
                [e.label, m, b, k, *seed_stats([r.dice.get(k, NAN) for r in rs])]
                for e in experiments
                for (m, b), rs in e.groups.items()
                for k in classes
            ],
        ),
        write_csv(
            os.path.join(folder, "clinical.csv"),
            ["experiment", "method", "budget", "seed", "training_seed", "measure", *stats],
            [
                [
                    r.experiment,
                    r.method,
                    r.budget,
                    r.seed,
                    r.training_seed,
                    m,
                    *(r.clinical[m].get(s, NAN) for s in stats),
                ]
                for r in runs
                for m in measures
                if m in r.clinical
            ],
        ),
        write_csv(
            os.path.join(folder, "run_level.csv"),
            RUN_LEVEL_COLUMNS,
            [[row[c] for c in RUN_LEVEL_COLUMNS] for e in experiments for row in run_level[e.label]],
        ),
        write_csv(
            os.path.join(folder, "wilcoxon.csv"),
            ["experiment", "method", "budget", "seeds", "n_runs", "n_pairs", "median_difference", "p_value", "note"],
            [
                [
                    e.label,
                    w["method"],
                    w["budget"],
                    " ".join(map(cell_text, w["seeds"])),
                    w["n_runs"],
                    w["n_pairs"],
                    w["median_difference"],
                    w["p_value"],
                    w["note"],
                ]
                for e in experiments
                for w in wilcoxon[e.label]
            ],
        ),
    ]


def write_report(
    results: Sequence[str], out: str, claim_size: float = CLAIM_SIZE, argv: Optional[Sequence[str]] = None
) -> Tuple[str, List[str]]:
    """Writes report.md, provenance.json, dice.csv, summary.csv, clinical.csv, run_level.csv, wilcoxon.csv,
    label_efficiency.png, differences.png and bland_altman_ef.png into ``out``; returns the main table (Markdown) and
    the paths written. The main experiment (see runs.experiment_label; the first when there is no main one) gets every
    table and the figures, each other experiment its own section; run_level.csv sizes the design for a claim of
    ``claim_size``. Unpaired runs are refused (runs.run_pairs). report.md opens with the provenance
    (provenance.collect_provenance of the command ``argv``, this process's by default: commit, command, date,
    hardware, library versions and the phase times recorded in or above the ``results`` folders), then a rule
    (PROVENANCE_RULE); the rest depends on the runs alone, as do the CSV files. The files are made in a temporary
    folder and moved into ``out`` only when all of them are complete: a failure leaves ``out`` as it was."""
    from nnunet_ssp.evaluation.plots import plot_bland_altman, plot_differences, plot_label_efficiency

    runs = find_runs(results)
    main, *others = found = experiments(runs)
    pairs = {e.label: run_pairs(e) for e in found}
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
    provenance = collect_provenance(sys.argv if argv is None else argv, results)

    def build(folder: str) -> Tuple[str, List[str]]:
        main_table = grid_table(*grid, lambda r: r.dice[MEAN], 3)
        run_level = {e.label: run_level_rows(e.label, pairs[e.label], claim_size) for e in found}
        wilcoxon = {e.label: wilcoxon_rows(pairs[e.label]) for e in found}
        series, skipped = label_efficiency_series(*grid)
        markdown = _report_markdown(main, others, labels, measures, main_table, run_level, wilcoxon, skipped)
        header = f"**Provenance**\n\n{render_provenance_markdown(provenance)}{PROVENANCE_RULE}"
        written = [write_text(os.path.join(folder, "report.md"), header + markdown)]
        save_json_atomic(provenance, os.path.join(folder, PROVENANCE_FILE))
        written.append(os.path.join(folder, PROVENANCE_FILE))
        written += _write_tables(folder, found, [MEAN, *labels], measures, run_level, wilcoxon)
        written.append(plot_label_efficiency(series, os.path.join(folder, "label_efficiency.png")))
        written.append(
            plot_differences(difference_panels(run_level[main.label]), os.path.join(folder, "differences.png"))
        )
        written.append(plot_bland_altman(bland_altman_panels(*grid), os.path.join(folder, "bland_altman_ef.png")))
        return main_table, written

    return build_files_into(out, build)
