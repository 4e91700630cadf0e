"""``nnunet_ssp report`` on hand-written evaluated folders: tables, CSV files, Wilcoxon tests, figures, errors, run
identity and pairing (the run-level statistics: test_statistics.py)."""

import csv
import itertools
import json
import os
import shutil

import numpy as np
import pytest
from conftest import run_cli
from scipy.stats import wilcoxon

from nnunet_ssp.cli import main as cli_main
from nnunet_ssp.errors import SSPError
from nnunet_ssp.evaluation.report import PROVENANCE_RULE, RUN_LEVEL_HEADING, write_report
from nnunet_ssp.evaluation.results_page import DICE_HEADING, write_results_page
from nnunet_ssp.provenance import load_provenance, read_phase_times, record_phase, render_provenance_markdown, utc_now

LABELS = {"1": "LV blood pool", "2": "LV myocardium", "3": "RV blood pool"}
MEASURES = ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "rv_edv_ml", "rv_esv_ml", "rv_ef_pct", "lv_myo_mass_g")
CASES = [f"ph{s:03d}_{p}" for s in range(1, 5) for p in ("ED", "ES")]
# (method, budget as written, seed, training subjects, Dice offset): mim beats the baseline, "custom" (a method outside
# the paper) and its baseline have a string budget "10" and one seed; no training seed (files written before it was).
RUNS = (
    [
        (m, b, s, n, off)
        for m, off in (("baseline", 0.0), ("mim", 0.04))
        for b, n in ((2, 2), ("all", 8))
        for s in (0, 1)
    ]
    + [("dino", 2, s, 2, 0.02) for s in (0, 1)]
    + [(m, "10", 0, 10, off) for m, off in (("baseline", 0.0), ("custom", 0.01))]
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# schedule and TTA as evaluations record them; dino and custom stand for files written before they were recorded
RECORDED = {
    method: {
        "schedule": {"name": "paper", "num_epochs": 1000, "iterations_per_epoch": iterations, "initial_lr": lr},
        "tta": False,
        "plans": "nnUNetPlans_w025",
        "width": 0.25,
    }
    for method, iterations, lr in (("baseline", 3, 0.01), ("mim", 9, 0.005))
}


def _write_run(folder, method, budget, seed, num_train, offset, rng, filters=None, cases=CASES, training_seed=None):
    """A summary.json as nnU-Net writes it (NaN for a label absent in both) and a matching ssp_evaluation.json;
    ``filters``: the run's train_vendors, train_phases, vendors, phases (files written before them had none);
    ``training_seed`` recorded only when given (files written before it had none)."""
    os.makedirs(folder)
    per_case = []
    for i, case in enumerate(cases):
        dice = {k: float(np.clip(rng.uniform(0.6, 0.9) + offset, 0, 1)) for k in LABELS}
        if i == 0:
            dice["3"] = float("nan")
        per_case.append(
            {
                "prediction_file": f"{folder}/{case}.nii.gz",
                "reference_file": f"/ref/{case}.nii.gz",
                "metrics": {k: {"Dice": v, "IoU": v} for k, v in dice.items()},
            }
        )
    means = {k: {"Dice": float(np.nanmean([c["metrics"][k]["Dice"] for c in per_case]))} for k in LABELS}
    summary = {
        "foreground_mean": {"Dice": float(np.mean([m["Dice"] for m in means.values()]))},
        "mean": means,
        "metric_per_case": per_case,
    }
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)  # writes NaN as nnU-Net does
    subjects = {
        f"ph{s:03d}": {side: {m: float(rng.uniform(40, 160)) for m in MEASURES} for side in ("reference", "prediction")}
        for s in range(1, 5)
    }
    agreement = {
        m: {
            "n": 4,
            "mae": float(rng.uniform(1, 5)),
            "bias": float(rng.uniform(-2, 2)),
            "sd": float(rng.uniform(1, 3)),
            "loa_low": -5.0 + seed,
            "loa_high": 5.0 + seed,
        }
        for m in MEASURES
    }
    evaluation = {
        "format": "nnunet_ssp.evaluation",
        "format_version": 1,
        "run": {
            "dataset": "Dataset991_E2E",
            "trainer": f"nnUNetTrainer{method}",
            "method": method,
            "fold": "5",
            "budget": budget,
            "seed": seed,
            "num_train_subjects": num_train,
            "prediction_folder": folder,
            "reference_folder": "/ref",
            "vendors": None,
            **RECORDED.get(method, {}),
            **(filters or {}),
            **({} if training_seed is None else {"training_seed": training_seed}),
        },
        "dice_summary": "summary.json",
        "labels": LABELS,
        "hd95_per_case": {c: {k: 3.0 for k in LABELS} for c in cases},
        "hd95_mean": {"1": float(rng.uniform(2, 6)), "2": float(rng.uniform(2, 6)), "3": None},
        "hd95_undefined": {"1": 0, "2": 0, "3": 1},
        "clinical_per_subject": subjects,
        "clinical_agreement": agreement,
    }
    with open(os.path.join(folder, "ssp_evaluation.json"), "w") as f:
        json.dump(evaluation, f)
    return summary, evaluation


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Evaluated folders at different depths, plus an unrelated summary.json that must be ignored, in the
    ``predictions`` folder of a protocol output folder whose phase-time file holds two phases; the report written by
    the function. Returns (root, out, {(method, budget, seed): (summary, evaluation)}, returned)."""
    protocol = tmp_path_factory.mktemp("protocol")
    root = protocol / "predictions"
    start = utc_now()
    record_phase(str(protocol), "prepare", start)
    record_phase(str(protocol), "finetune", start, "1/2")
    rng = np.random.default_rng(0)
    runs = {}
    for method, budget, seed, num_train, offset in RUNS:
        folder = str(root / method / f"fold_{budget}_{seed}" / "pred")
        runs[(method, str(budget), seed)] = _write_run(folder, method, budget, seed, num_train, offset, rng)
    os.makedirs(root / "validation")
    (root / "validation" / "summary.json").write_text("{}")
    out = root.parent / (root.name + "_report")
    returned = write_report([str(root)], str(out))
    return root, out, runs, returned


def _table_after(text, heading):
    """Header and rows (lists of cells) of the first Markdown table after ``heading``."""
    lines = text[text.index(heading + "\n") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    return table[0], table[2:]


def _report_body(text):
    """report.md below its provenance header."""
    return text.split(PROVENANCE_RULE, 1)[1]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _expected_cell(values):
    mean = np.mean(values)
    if len(values) == 1:
        return f"{mean:.3f} (n=1)"
    return f"{mean:.3f} ± {np.std(values, ddof=1):.3f} (n={len(values)})"


def _seeds(runs, method, budget):
    return sorted(s for (m, b, s) in runs if (m, b) == (method, budget))


def test_main_and_class_tables(results):
    root, out, runs, (main, paths) = results
    text = (out / "report.md").read_text()
    assert (
        "Fine-tuning schedule: not recorded (3 runs); paper (1000 epochs, 3–9 iterations per epoch). "
        "Test-time augmentation: not recorded (3 runs), off (9 runs)."
    ) in text
    assert (
        "Network: plans nnUNetPlans_w025 (nnU-Net's features per stage x 0.25, a CPU miniature); plans not recorded."
    ) in text
    _, run_rows = _table_after(text, "## Runs")
    assert {tuple(r[3:7]) for r in run_rows if r[0] == "mim"} == {
        ("n/a", "2", "paper (1000 epochs x 9 iterations, lr 0.005)", "off"),
        ("n/a", "8", "paper (1000 epochs x 9 iterations, lr 0.005)", "off"),
    }  # no training seed recorded
    header, rows = _table_after(text, "## 3D Dice, mean over the foreground classes")
    assert main in text
    assert header == ["method", "2", "10", "all"]  # numbers ascending (the string "10" too), "all" last
    assert [r[0] for r in rows] == ["baseline", "dino", "mim", "custom"]  # paper order, then others
    for row in rows:
        for budget, cell in zip(header[1:], row[1:]):
            values = [runs[(row[0], budget, s)][0]["foreground_mean"]["Dice"] for s in _seeds(runs, row[0], budget)]
            assert cell == (_expected_cell(values) if values else "–"), (row[0], budget)
    for k, name in LABELS.items():
        header, rows = _table_after(text, f"### {name} (label {k})")
        assert header == ["method", "2", "10", "all"] and len(rows) == 4
        values = [runs[("mim", "all", s)][0]["mean"][k]["Dice"] for s in (0, 1)]
        assert rows[2][0] == "mim" and rows[2][3] == _expected_cell(values)
    _, hd_rows = _table_after(text, "## HD95 (mm) per class")
    hd = [runs[("baseline", "2", s)][1]["hd95_mean"]["1"] for s in (0, 1)]
    assert hd_rows[0][1] == f"{np.mean(hd):.2f} ± {np.std(hd, ddof=1):.2f} (n=2)"
    _, clinical_rows = _table_after(text, "## Clinical measures: prediction − reference")
    assert [r[:3] for r in clinical_rows][:3] == [
        ["baseline", "2", "2"],
        ["baseline", "10", "1"],
        ["baseline", "all", "2"],
    ]
    mae = np.mean([runs[("baseline", "2", s)][1]["clinical_agreement"]["lv_ef_pct"]["mae"] for s in (0, 1)])
    assert clinical_rows[0][3 + MEASURES.index("lv_ef_pct")].startswith(f"{mae:.2f} / ")
    assert clinical_rows[0][3].endswith("[-4.50, 5.50]")  # LoA averaged over seeds 0 and 1
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        [
            "report.md",
            "provenance.json",
            "dice.csv",
            "summary.csv",
            "clinical.csv",
            "run_level.csv",
            "wilcoxon.csv",
            "label_efficiency.png",
            "differences.png",
            "bland_altman_ef.png",
        ]
    )


def test_csv_files(results):
    _, out, runs, _ = results
    dice = _read_csv(out / "dice.csv")
    assert list(dice[0]) == [
        "experiment",
        "method",
        "budget",
        "seed",
        "training_seed",
        "num_train_subjects",
        "class",
        "dice",
    ]
    assert {(row["experiment"], row["training_seed"]) for row in dice} == {("", "")}
    assert len(dice) == len(RUNS) * 4
    for row in dice:
        summary = runs[(row["method"], row["budget"], int(row["seed"]))][0]
        expected = (
            summary["foreground_mean"]["Dice"] if row["class"] == "mean" else summary["mean"][row["class"]]["Dice"]
        )
        assert float(row["dice"]) == expected
    assert [r["num_train_subjects"] for r in dice if r["method"] == "mim" and r["class"] == "mean"] == [
        "2",
        "2",
        "8",
        "8",
    ]
    summary_rows = _read_csv(out / "summary.csv")
    assert list(summary_rows[0]) == ["experiment", "method", "budget", "class", "n_runs", "mean", "std"]
    assert len(summary_rows) == 7 * 4  # (method, budget) groups x classes
    for row in summary_rows:
        values = [runs[(row["method"], row["budget"], s)][0] for s in _seeds(runs, row["method"], row["budget"])]
        values = [
            v["foreground_mean"]["Dice"] if row["class"] == "mean" else v["mean"][row["class"]]["Dice"] for v in values
        ]
        assert int(row["n_runs"]) == len(values) and float(row["mean"]) == pytest.approx(np.mean(values))
        assert (row["std"] == "") if len(values) == 1 else float(row["std"]) == pytest.approx(np.std(values, ddof=1))
    clinical = _read_csv(out / "clinical.csv")
    assert list(clinical[0]) == [
        "experiment",
        "method",
        "budget",
        "seed",
        "training_seed",
        "measure",
        "n",
        "mae",
        "bias",
        "sd",
        "loa_low",
        "loa_high",
    ]
    assert len(clinical) == len(RUNS) * len(MEASURES)
    for row in clinical:
        expected = runs[(row["method"], row["budget"], int(row["seed"]))][1]["clinical_agreement"][row["measure"]]
        assert {k: float(row[k]) for k in expected} == expected and row["n"] == "4"


def test_wilcoxon_against_scipy(results):
    _, out, runs, _ = results

    def case_means(method, budget, seeds):
        per_seed = [
            {
                os.path.basename(c["reference_file"]): np.nanmean([m["Dice"] for m in c["metrics"].values()])
                for c in runs[(method, budget, s)][0]["metric_per_case"]
            }
            for s in seeds
        ]
        return np.array([np.mean([d[case + ".nii.gz"] for d in per_seed]) for case in CASES])

    rows = {(r["method"], r["budget"]): r for r in _read_csv(out / "wilcoxon.csv")}
    assert list(rows) == [("dino", "2"), ("mim", "2"), ("mim", "all"), ("custom", "10")]
    for (method, budget), seeds in {
        ("mim", "2"): [0, 1],
        ("mim", "all"): [0, 1],
        ("dino", "2"): [0, 1],
        ("custom", "10"): [0],
    }.items():
        a, b = case_means(method, budget, seeds), case_means("baseline", budget, seeds)
        row = rows[(method, budget)]
        assert row["seeds"] == " ".join(map(str, seeds)) and int(row["n_runs"]) == len(seeds)
        assert int(row["n_pairs"]) == len(CASES) and row["note"] == ""
        assert float(row["median_difference"]) == pytest.approx(np.median(a - b))
        assert float(row["p_value"]) == pytest.approx(wilcoxon(a, b).pvalue)
    assert float(rows[("mim", "2")]["p_value"]) < 0.05  # mim's +0.04 on every class
    text = (out / "report.md").read_text()
    _, md_rows = _table_after(text, "## Per-volume Wilcoxon test, given these trained networks")
    assert md_rows[-1][:5] == ["custom", "10", "0", "1", "8"]


def test_figures_are_png(results):
    _, out, _, _ = results
    for name in ("label_efficiency.png", "differences.png", "bland_altman_ef.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_report_opens_with_its_provenance(results):
    """report.md's header is provenance.json rendered, with the phase times recorded above the results folder; the
    report proper follows the rule."""
    root, out, _, _ = results
    text = (out / "report.md").read_text()
    provenance = load_provenance(str(out / "provenance.json"))
    header, _, body = text.partition(PROVENANCE_RULE)
    assert header == "**Provenance**\n\n" + render_provenance_markdown(provenance)
    assert body.startswith("# nnunet_ssp report\n") and "\n---\n" not in body
    phase_file = str(root.parent / "ssp_phase_times.json")
    assert provenance["phase_times"] == [{"file": phase_file, "phases": read_phase_times(phase_file)}]
    assert f"- Wall time per phase, from {phase_file}:" in header
    _, phases = _table_after(header, f"- Wall time per phase, from {phase_file}:")
    assert [(r[0], r[1]) for r in phases] == [("prepare", "–"), ("finetune", "1/2")]


def test_cli_matches_function(results, tmp_path):
    """The same tables and report below the header; the header records the command as typed."""
    root, out, _, (main, _) = results
    cli_out = tmp_path / "cli"
    argv = ["nnunet_ssp", "report", str(root), "-o", str(cli_out)]
    result = run_cli(argv, os.environ)
    assert main in result.stdout and str(cli_out / "wilcoxon.csv") in result.stdout
    for name in ("dice.csv", "summary.csv", "clinical.csv", "run_level.csv", "wilcoxon.csv"):
        assert (cli_out / name).read_bytes() == (out / name).read_bytes(), name
    assert _report_body((cli_out / "report.md").read_text()) == _report_body((out / "report.md").read_text())
    assert load_provenance(str(cli_out / "provenance.json"))["command"] == " ".join(argv)


def _as_shown(cell, spec):
    """A CSV number as report.md shows it: NaN (an empty cell) as n/a."""
    return format(float(cell), spec) if cell else "n/a"


def _run_results(*args):
    return run_cli(["nnunet_ssp", "results", *map(str, args)], os.environ, check=False)


def test_results_page_from_report_folders(results, tmp_path):
    """``nnunet_ssp results`` as a user types it, on the module's report and a copy of it elsewhere: a section each,
    titled apart, with the report's provenance, its run-level rows and its main table; the same folders give the
    same bytes; a folder without provenance.json is one error line and no page."""
    _, out, _, _ = results
    copy = tmp_path / "elsewhere" / out.name
    shutil.copytree(out, copy)
    (copy / "about.md").write_text("What was run, in a paragraph.\n")
    page = tmp_path / "page.md"
    done = _run_results(out, copy, "-o", page)
    assert done.returncode == 0 and done.stdout == f"{page}\n", done.stderr
    text = page.read_text()
    titles = [f"{out.parent.name}/{out.name}", f"elsewhere/{out.name}"]
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == titles
    assert f"## {titles[1]}\n\nWhat was run, in a paragraph.\n\n### Provenance" in text
    assert text.count("What was run") == 1
    section = text[text.index(f"## {titles[0]}\n") : text.index(f"## {titles[1]}\n")]
    assert render_provenance_markdown(load_provenance(str(out / "provenance.json"))) in section
    header, rows = _table_after(section, "### Run-level comparison against the baseline")
    assert header == [
        "method",
        "budget",
        "units",
        "difference [95% CI]",
        "p sign-flip",
        "p Wilcoxon",
        "p Holm",
        "claim",
    ]
    expected = _read_csv(out / "run_level.csv")
    assert len(rows) == len(expected) == 4
    report_body = _report_body((out / "report.md").read_text())
    for row, csv_row in zip(rows, expected):
        shown = {c: _as_shown(csv_row[c], ".4g") for c in ("p_signflip", "p_wilcoxon", "p_holm")}
        shown.update({c: _as_shown(csv_row[c], "+.3f") for c in ("mean_diff", "ci_low", "ci_high")})
        units = int(csv_row["n_units"])
        assert row[:3] == [
            csv_row["method"],
            csv_row["budget"],
            f"{units} {'fold' if csv_row['unit'] == 'fold' else 'run pair'}{'s' * (units != 1)}",
        ]
        assert row[3] == f"{shown['mean_diff']} [{shown['ci_low']}, {shown['ci_high']}]"
        assert row[4:7] == [shown["p_signflip"], shown["p_wilcoxon"], shown["p_holm"]]
        assert f"- {row[7]}\n" in report_body  # the report's claim sentence
    assert _table_after(section, "### 3D Dice, mean over the foreground classes") == _table_after(
        report_body, "## 3D Dice, mean over the foreground classes"
    )
    again = tmp_path / "again.md"
    assert _run_results(out, copy, "-o", again).returncode == 0 and again.read_bytes() == page.read_bytes()

    (copy / "provenance.json").unlink()
    refused = _run_results(out, copy, "-o", tmp_path / "refused.md")
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"error: {copy}: no provenance.json")
    assert not (tmp_path / "refused.md").exists()


def test_cli_errors_are_one_line(results, tmp_path, capsys):
    """Through the console script's entry point in-process (a subprocess per case would double the test time)."""
    root, _, _, _ = results
    duplicate = tmp_path / "dup"
    shutil.copytree(root / "mim" / "fold_2_0", duplicate / "again")
    shutil.copytree(root / "mim" / "fold_2_0", duplicate / "copy")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, expected in (
        (
            duplicate,
            [
                "two evaluations of method mim, budget 2, seed 0: ",
                str(duplicate / "again" / "pred"),
                str(duplicate / "copy" / "pred"),
            ],
        ),
        (empty, ["no evaluated prediction folder"]),
    ):
        assert cli_main(["report", str(folder), "-o", str(tmp_path / "x")]) == 2
        stderr = capsys.readouterr().err
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert all(e in stderr for e in expected), stderr
    assert not (tmp_path / "x").exists()


def test_duplicate_names_both_folders_and_malformed_file_is_named(results, tmp_path):
    root, _, _, _ = results
    for name in ("a", "b"):
        shutil.copytree(root / "dino", tmp_path / name)
    with pytest.raises(SSPError) as info:
        write_report([str(tmp_path)], str(tmp_path / "out"))
    assert str(tmp_path / "a" / "fold_2_0" / "pred") in str(info.value)
    assert str(tmp_path / "b" / "fold_2_0" / "pred") in str(info.value)
    bad = tmp_path / "b" / "fold_2_0" / "pred" / "ssp_evaluation.json"
    evaluation = json.loads(bad.read_text())
    del evaluation["clinical_agreement"]
    bad.write_text(json.dumps(evaluation))
    shutil.rmtree(tmp_path / "a")
    with pytest.raises(SSPError, match=f"{bad}: malformed evaluation file .*clinical_agreement"):
        write_report([str(tmp_path)], str(tmp_path / "out"))
    (bad.parent / "summary.json").write_text("{not json")
    bad.write_text(json.dumps(dict(evaluation, clinical_agreement={})))
    with pytest.raises(SSPError, match="summary.json: cannot read JSON"):
        write_report([str(tmp_path)], str(tmp_path / "out"))


def test_a_failed_report_leaves_the_previous_one_untouched(results, tmp_path, monkeypatch):
    """A disk-full error on the last file (a figure) leaves the earlier report exactly as it was, with no temporary
    folder beside it."""
    root, out, _, _ = results
    previous = tmp_path / "report"
    shutil.copytree(out, previous)
    (previous / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    for method in ("baseline", "mim"):  # different runs: every file would change
        shutil.copytree(root / method, tmp_path / "results" / method)
    monkeypatch.setenv("NNUNET_SSP_FAULT", "write:bland_altman_ef.png=ENOSPC")
    with pytest.raises(SSPError, match=f"{previous / 'bland_altman_ef.png'}: cannot write"):
        write_report([str(tmp_path / "results")], str(previous))
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "results"]
    monkeypatch.delenv("NNUNET_SSP_FAULT")
    _, written = write_report([str(tmp_path / "results")], str(previous))
    assert all(os.path.dirname(p) == str(previous) for p in written) and (previous / "notes.txt").exists()
    assert (previous / "report.md").read_bytes() != before["report.md"]


def test_rows_are_methods_with_their_recipe_in_the_papers_order():
    from nnunet_ssp.evaluation.runs import method_sort_key, row_label

    assert [row_label("mim", r) for r in ("", None, "warmup")] == ["mim", "mim", "mim_warmup"]
    labels = ["mim_warmup", "custom", "baseline_warmup", "mim", "baseline", "dino", "mim_baselineLR", "a_b"]
    assert sorted(labels, key=method_sort_key) == [
        "baseline",
        "baseline_warmup",
        "dino",
        "mim",
        "mim_baselineLR",
        "mim_warmup",
        "a_b",
        "custom",
    ]


# ---------------------------------------------------------------------------------------------------- experiments
UNSEEN_PHASE = "unseen phase: trained on ED, tested on ES"


def test_experiment_labels_from_the_training_and_test_filters():
    from nnunet_ssp.evaluation.runs import experiment_label

    assert experiment_label({"vendors": None}) == ""  # files written before the filters were recorded too
    assert experiment_label({"train_phases": ["ED"], "phases": ["ES"]}) == UNSEEN_PHASE
    assert (
        experiment_label({"train_vendors": ["A", "B"], "vendors": ["C", "D"], "phases": None})
        == "unseen vendor: trained on A+B, tested on C+D"
    )
    assert experiment_label({"train_vendors": ["A", "B"], "vendors": ["A"]}) == "trained on A+B, tested on A"
    assert experiment_label({"train_phases": ["ED"], "phases": ["ED"]}) == "trained on ED, tested on ED"
    assert experiment_label({"phases": ["ES"]}) == "trained on all cases, tested on ES"
    assert (
        experiment_label({"train_vendors": ["A"], "train_phases": ["ED"], "vendors": ["B"], "phases": ["ES"]})
        == "trained on A ED, tested on B ES"
    )


def _case_means(summary):
    return {
        os.path.basename(c["reference_file"]): np.nanmean([m["Dice"] for m in c["metrics"].values()])
        for c in summary["metric_per_case"]
    }


def test_two_experiments_get_their_own_tables_and_tests(tmp_path):
    """The same methods, budget and seeds in the main experiment and in an unseen-phase one: not duplicates; the
    main layout holds the main runs, a section the other's, each Wilcoxon test against its own baseline."""
    rng = np.random.default_rng(1)
    unseen = {"train_phases": ["ED"], "phases": ["ES"], "vendors": None, "train_vendors": None}
    runs = {}
    for experiment, filters, gain in (("", None, 0.0), (UNSEEN_PHASE, unseen, 0.05)):
        for method, offset in (("baseline", 0.0), ("mim", gain)):
            for seed in (0, 1):
                folder = str(tmp_path / "results" / (experiment[:6] or "main") / method / f"seed{seed}")
                runs[(experiment, method, seed)] = _write_run(folder, method, 2, seed, 2, offset, rng, filters)
    out = tmp_path / "report"
    main, _ = write_report([str(tmp_path / "results")], str(out))
    text = _report_body((out / "report.md").read_text())
    assert text.startswith("# nnunet_ssp report\n") and main in text
    assert f"Other experiments, each in its section below: {UNSEEN_PHASE} (4 runs)." in text
    for experiment, heading in (
        ("", "## 3D Dice, mean over the foreground classes"),
        (UNSEEN_PHASE, f"## Experiment: {UNSEEN_PHASE}"),
    ):
        header, rows = _table_after(text, heading)
        assert header == ["method", "2"] and [r[0] for r in rows] == ["baseline", "mim"]
        for method, cell in rows:
            assert cell == _expected_cell([runs[(experiment, method, s)][0]["foreground_mean"]["Dice"] for s in (0, 1)])
    section = text[text.index(f"## Experiment: {UNSEEN_PHASE}") :]
    _, section_tests = _table_after(section, "### Per-volume Wilcoxon test, given these trained networks")
    _, section_run_level = _table_after(section, "### Run-level comparison against the baseline")
    assert [r[:5] for r in section_run_level] == [["mim", "2", "2", "1", "fold"]]
    assert [r[:3] for r in section_tests] == [["mim", "2", "0 1"]]
    tests = _read_csv(out / "wilcoxon.csv")
    assert [(r["experiment"], r["method"]) for r in tests] == [("", "mim"), (UNSEEN_PHASE, "mim")]
    for row in tests:
        own, base = (
            [np.mean([_case_means(runs[(row["experiment"], m, s)][0])[c + ".nii.gz"] for s in (0, 1)]) for c in CASES]
            for m in ("mim", "baseline")
        )
        assert float(row["p_value"]) == pytest.approx(wilcoxon(own, base).pvalue)
        assert float(row["median_difference"]) == pytest.approx(np.median(np.subtract(own, base)))
    assert section_tests[0][6] == f"{float(tests[1]['p_value']):.4g}"
    assert [(r["experiment"], r["method"]) for r in _read_csv(out / "run_level.csv")] == [
        ("", "mim"),
        (UNSEEN_PHASE, "mim"),
    ]
    assert {r["experiment"] for r in _read_csv(out / "summary.csv")} == {"", UNSEEN_PHASE}

    only = tmp_path / "only"
    write_report([str(tmp_path / "results" / "unseen")], str(only))
    text = (only / "report.md").read_text()
    assert "- Wall time per phase: not recorded (no ssp_phase_times.json in or above the results folders)" in text
    text = _report_body(text)
    assert text.startswith(f"# nnunet_ssp report: {UNSEEN_PHASE}\n") and "## Experiment" not in text

    page = write_results_page([str(out)], str(tmp_path / "page.md"))
    page_text = open(page).read()
    for heading in (RUN_LEVEL_HEADING, DICE_HEADING):  # the other experiment under its own headings
        assert [
            _table_after(page_text, f"### {heading}{suffix}")[1][-1][0] for suffix in ("", f": {UNSEEN_PHASE}")
        ] == ["mim", "mim"]


# ---------------------------------------------------------------------------------------------------- training seed
def test_the_training_seed_is_the_trainer_classs_else_its_names(monkeypatch):
    from nnunet_ssp.evaluation import evaluate

    classes = {
        "nnUNetTrainerMIM_seed3": type("Seeded", (), {"training_seed": 7}),
        "nnUNetTrainerBaseline_seed4": type("Plain", (), {}),
        "nnUNetTrainerBaseline": type("Plain", (), {}),
        "nnUNetTrainerDINO_seed5": type("Unseeded", (), {"training_seed": None}),
    }
    monkeypatch.setattr(evaluate, "find_trainer_class", classes.__getitem__)
    assert {name: evaluate.training_seed_of_run(name) for name in classes} == {
        "nnUNetTrainerMIM_seed3": 7,
        "nnUNetTrainerBaseline_seed4": 4,
        "nnUNetTrainerBaseline": None,
        "nnUNetTrainerDINO_seed5": 5,
    }


def test_training_seeds_tell_repeats_apart(tmp_path):
    """Runs of one fold with training seeds 0 and 1 are two repeats, not duplicates; the same training seed twice is
    a duplicate named with it; a file without the key reads as unseeded."""
    from nnunet_ssp.evaluation.runs import find_runs

    rng = np.random.default_rng(2)
    for method, training_seed in itertools.product(("baseline", "mim"), (0, 1)):
        _write_run(
            str(tmp_path / "runs" / f"{method}{training_seed}"), method, 2, 0, 2, 0.0, rng, training_seed=training_seed
        )
    _write_run(str(tmp_path / "old" / "baseline"), "baseline", 2, 0, 2, 0.0, rng)
    runs = find_runs([str(tmp_path)])
    assert [(r.method, r.training_seed) for r in runs] == [
        ("baseline", 0),
        ("baseline", 1),
        ("baseline", None),
        ("mim", 0),
        ("mim", 1),
    ]
    shutil.copytree(tmp_path / "runs" / "mim1", tmp_path / "runs" / "again")
    with pytest.raises(SSPError, match="two evaluations of method mim, budget 2, seed 0, training seed 1: "):
        find_runs([str(tmp_path / "runs")])
