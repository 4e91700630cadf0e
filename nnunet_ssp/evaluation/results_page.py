"""``nnunet_ssp results``: a results page (Markdown) rebuilt from report folders that ``nnunet_ssp report`` wrote.

Each folder gets a section, titled with its name (with as many parent folders as tell the folders apart): its
provenance (provenance.json), then per experiment the run-level comparison with the baseline in brief (run_level.csv)
and the mean 3D Dice table (summary.csv), numbers formatted as report.md formats them. The page holds nothing but
what the folders' files hold (no date of its own), so the same folders give the same bytes. A folder may hold an
``about.md`` beside the report's files: a paragraph on what was run, shown under the section's title.
"""

import csv
import math
import os
from typing import List, Sequence

from nnunet_ssp.errors import SSPError
from nnunet_ssp.evaluation.report import (
    PROVENANCE_FILE,
    RUN_LEVEL_HEADING,
    SUMMARY_COLUMNS,
    markdown_table,
    run_level_brief_table,
    stats_cell,
    write_text,
)
from nnunet_ssp.evaluation.runs import MEAN, _budget, budget_sort_key, cell_text
from nnunet_ssp.provenance import load_provenance, render_provenance_markdown

RUN_LEVEL_FILE, SUMMARY_FILE, ABOUT_FILE = "run_level.csv", "summary.csv", "about.md"
#: the run_level.csv columns the brief table shows, read as numbers
RUN_LEVEL_NUMBERS = ("mean_diff", "ci_low", "ci_high", "p_signflip", "p_wilcoxon", "p_holm", "min_p")
DICE_HEADING = "3D Dice, mean over the foreground classes"
PAGE_INTRO = (
    "One section per report folder of `nnunet_ssp report`: the provenance of the report (the command, commit, date, "
    "hardware and libraries that made it, and the wall time of each protocol phase behind it where recorded), the "
    "run-level comparison of each method with its baseline (difference in 3D Dice, method − baseline: the mean over "
    "the units with its Student t 95% interval; p Holm: the sign-flip p Holm-corrected over the experiment's "
    "comparisons; the folder's report.md explains each column) and the mean 3D Dice over the foreground classes "
    "(mean ± std over runs, (n=k) runs)."
)


def _read_csv(path: str, columns: Sequence[str]) -> List[dict]:
    """The rows of a CSV file of the report; one SSPError naming it when a column is missing."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise SSPError(f"{path}: no column {', '.join(missing)}; not written by 'nnunet_ssp report'")
        return list(reader)


def _number(text: str, path: str, kind=float):
    """A CSV cell as the report writes numbers (empty: NaN); one SSPError naming the file when it is not one."""
    try:
        return kind(text) if text else math.nan
    except ValueError:
        raise SSPError(f"{path}: {text!r} is not a number") from None


def _run_level_rows(path: str) -> List[dict]:
    """run_level.csv's rows with the budget, the number of units and the brief table's numbers as the report held
    them."""
    rows = _read_csv(path, ("experiment", "method", "budget", "unit", "n_units", *RUN_LEVEL_NUMBERS))
    return [
        {
            **row,
            "budget": _budget(row["budget"]),
            "n_units": _number(row["n_units"], path, int),
            **{c: _number(row[c], path) for c in RUN_LEVEL_NUMBERS},
        }
        for row in rows
    ]


def _dice_table(rows: Sequence[dict], path: str) -> str:
    """Methods x budgets of summary.csv ``rows`` of the foreground mean, as report.md's main table."""
    cells = {
        (r["method"], _budget(r["budget"])): stats_cell(
            _number(r["n_runs"], path, int), _number(r["mean"], path), _number(r["std"], path), 3
        )
        for r in rows
        if r["class"] == MEAN
    }
    methods = list(dict.fromkeys(method for method, _ in cells))
    budgets = sorted({budget for _, budget in cells}, key=budget_sort_key)
    return markdown_table(
        ["method", *map(cell_text, budgets)], [[m, *(cells.get((m, b), "–") for b in budgets)] for m in methods]
    )


def section_titles(folders: Sequence[str]) -> List[str]:
    """Each folder's name, with as many of its parent folders as make the titles differ (the whole path at most)."""
    parts = [os.path.abspath(folder).strip(os.sep).split(os.sep) for folder in folders]
    for depth in range(1, max(map(len, parts)) + 1):
        titles = ["/".join(p[-depth:]) for p in parts]
        if len(set(titles)) == len(titles):
            break
    return titles


def _check_report_folder(folder: str) -> None:
    if not os.path.isdir(folder):
        raise SSPError(f"{folder}: not a folder")
    for name in (PROVENANCE_FILE, RUN_LEVEL_FILE, SUMMARY_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise SSPError(
                f"{folder}: no {name}; not a report folder of 'nnunet_ssp report' (or one written before "
                f"it wrote {name})"
            )


def report_section(folder: str, title: str) -> List[str]:
    """The Markdown lines of one report folder's section."""
    run_level = _run_level_rows(os.path.join(folder, RUN_LEVEL_FILE))
    summary_path = os.path.join(folder, SUMMARY_FILE)
    summary = _read_csv(summary_path, SUMMARY_COLUMNS)
    about = os.path.join(folder, ABOUT_FILE)
    lines = [f"## {title}", ""]
    if os.path.isfile(about):
        with open(about, encoding="utf-8") as f:
            lines += [f.read().strip(), ""]
    lines += [
        "### Provenance",
        "",
        render_provenance_markdown(load_provenance(os.path.join(folder, PROVENANCE_FILE))),
    ]
    for label in dict.fromkeys(row["experiment"] for row in summary + run_level):
        suffix = f": {label}" if label else ""
        compared = [row for row in run_level if row["experiment"] == label]
        lines += [
            "",
            f"### {RUN_LEVEL_HEADING}{suffix}",
            "",
            run_level_brief_table(compared) if compared else "No method compared with the baseline.",
            "",
            f"### {DICE_HEADING}{suffix}",
            "",
            _dice_table([row for row in summary if row["experiment"] == label], summary_path),
        ]
    return lines


def render_results_page(folders: Sequence[str]) -> str:
    """The results page of the report ``folders``; a folder without provenance.json, run_level.csv or summary.csv is
    refused."""
    for folder in folders:
        _check_report_folder(folder)
    lines = ["# Results", "", PAGE_INTRO]
    for folder, title in zip(folders, section_titles(folders)):
        lines += ["", *report_section(folder, title)]
    return "\n".join(lines) + "\n"


def write_results_page(folders: Sequence[str], output: str) -> str:
    """Writes the results page of the report ``folders`` to ``output`` (atomically, only once every folder has been
    read) and returns its path."""
    return write_text(output, render_results_page(folders))
