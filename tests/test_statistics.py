"""Run-level statistics (nnunet_ssp.evaluation.statistics) against references written here and scipy's, and one
report end to end on a synthetic design: 6 folds x 3 training repeats x 16 test volumes with a planted effect (main
experiment), and an unseen-phase experiment of 5 folds x 2 repeats plus budget "all"."""

import itertools
import math
import shutil

import numpy as np
import pytest
from scipy.stats import t as student_t
from scipy.stats import wilcoxon
from test_report import PNG_SIGNATURE, UNSEEN_PHASE, _read_csv, _table_after, _write_run

from nnunet_ssp.cli import main as cli_main
from nnunet_ssp.errors import SSPError
from nnunet_ssp.evaluation import statistics as st
from nnunet_ssp.evaluation.report import RUN_LEVEL_COLUMNS, write_report


def _sign_flip_reference(d):
    """Every sign vector of {±1}^S, one by one."""
    d = np.asarray(d, dtype=float)
    observed = abs(d.mean())
    hits = sum(abs(np.mean(np.array(s) * d)) >= observed - 1e-12 for s in itertools.product((1, -1), repeat=d.size))
    return hits / 2**d.size


def _holm_reference(p):
    """Holm's step-down procedure as textbooks state it, over the finite p-values."""
    finite = [i for i, v in enumerate(p) if not math.isnan(v)]
    adjusted, running = [math.nan] * len(p), 0.0
    for rank, i in enumerate(sorted(finite, key=lambda i: p[i])):
        running = max(running, min(1.0, (len(finite) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def _t_reference(values):
    v = np.asarray(values, dtype=float)
    low, high = student_t.interval(0.95, v.size - 1, loc=v.mean(), scale=v.std(ddof=1) / math.sqrt(v.size))
    return v.mean(), low, high


# ---------------------------------------------------------------------------------------------------- functions
def test_sign_flip_p_is_the_enumeration_of_every_sign_vector():
    rng = np.random.default_rng(0)
    designs = [rng.normal(0.02, 0.05, n) for n in range(1, 9) for _ in range(3)]
    designs += [[0.1, -0.1, 0.1, 0.1, -0.1, 0.1], [0.05, 0.0, 0.05, -0.05, 0.1, 0.02], [0.0] * 4, [0.3, 0.1, 0.1]]
    for d in designs:
        assert st.sign_flip_p(d) == _sign_flip_reference(d), d
    d = rng.normal(0.01, 0.05, 16)  # the two halves of the exact enumeration against all 2^16 sums at once
    signs = np.array(list(itertools.product((1, -1), repeat=16)))
    assert st.sign_flip_p(d) == np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12)
    assert math.isnan(st.sign_flip_p([])) and math.isnan(st.sign_flip_p([math.nan]))
    with pytest.raises(SSPError, match="at most 40 units"):
        st.sign_flip_p(np.ones(41))


def test_every_fold_ahead_gives_the_designs_smallest_p():
    for folds, p in ((3, 0.25), (5, 0.0625), (6, 0.03125)):
        d = np.linspace(0.01, 0.2, folds)
        assert st.sign_flip_p(d) == st.smallest_p(folds) == p
        assert st.sign_flip_p(-d) == p and st.wilcoxon_p(d) == wilcoxon(d, method="exact").pvalue == p
    assert st.smallest_p(1) == 1 and math.isnan(st.smallest_p(0))
    assert [st.fewest_units(m) for m in (1, 2, 4, 16)] == [6, 7, 8, 10]


def test_wilcoxon_is_scipys_exact_test():
    rng = np.random.default_rng(1)
    for n in (3, 6, 9):
        d = rng.normal(0.02, 0.05, n)
        assert st.wilcoxon_p(d) == wilcoxon(d, method="exact", alternative="two-sided").pvalue
    assert math.isnan(st.wilcoxon_p([]))


def test_interval_is_student_t():
    rng = np.random.default_rng(2)
    for n in (2, 3, 6, 18):
        values = rng.normal(0.05, 0.1, n)
        assert st.t_interval(values) == pytest.approx(_t_reference(values), abs=1e-12)
    mean, low, high = st.t_interval([0.3])
    assert mean == 0.3 and math.isnan(low) and math.isnan(high)


def test_holm_matches_the_textbook_procedure():
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = list(rng.choice([0.001, 0.01, 0.03125, 0.0625, 0.2, 0.5, 0.9, math.nan], size=rng.integers(1, 9)))
        np.testing.assert_allclose(st.holm(p), _holm_reference(p), rtol=1e-12)
    assert list(st.holm([0.04, 0.01, 0.03])) == pytest.approx([0.06, 0.03, 0.06])  # monotone: 0.06 not 0.04
    assert list(st.holm([0.6, 0.7])) == [1.0, 1.0]


def test_variance_components_and_probability_of_improvement():
    rng = np.random.default_rng(4)
    folds = [rng.normal(mu, 0.05, 3) for mu in rng.normal(0.05, 0.1, 6)]
    within, between = st.variance_components(folds)
    assert within == pytest.approx(np.mean([np.var(f, ddof=1) for f in folds]))
    assert between == pytest.approx(max(0.0, np.var([f.mean() for f in folds], ddof=1) - within / 3))
    assert st.unit_sd(within, between, 3) ** 2 == pytest.approx(np.var([f.mean() for f in folds], ddof=1))
    unbalanced = [[0.1, 0.2], [0.3], [0.0, 0.1, 0.5]]
    w = ((0.1 - 0.15) ** 2 + (0.2 - 0.15) ** 2 + (0.0 - 0.2) ** 2 + (0.1 - 0.2) ** 2 + (0.5 - 0.2) ** 2) / 3
    assert st.variance_components(unbalanced) == pytest.approx(
        (w, max(0.0, np.var([0.15, 0.3, 0.2], ddof=1) - w * np.mean([1 / 2, 1, 1 / 3])))
    )
    assert all(math.isnan(v) for v in st.variance_components([[0.1], [0.2]]))  # one repeat: not separable
    assert math.isnan(st.variance_components([[0.1, 0.2]])[1])  # one fold: no between
    assert st.probability_of_improvement([0.1, -0.2, 0.0, 0.3]) == 0.625


def test_detectable_difference_and_folds_needed():
    sd = 0.1
    for n in (6, 8, 12):
        expected = (student_t.ppf(0.975, n - 1) + student_t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
        assert st.detectable_difference(sd, n) == pytest.approx(expected)
    assert st.detectable_difference(sd, 5) == math.inf and math.isnan(st.detectable_difference(sd, 1))
    # reproducibility.md's sizing: run sd 0.17 within folds, none between, an effect of 0.1
    for repeats in (3, 5):
        s = st.unit_sd(0.17**2, 0.0, repeats)
        n = st.units_needed(0.1, s)
        assert st.detectable_difference(s, n) <= 0.1 < st.detectable_difference(s, n - 1)
    assert st.units_needed(0.1, st.unit_sd(0.17**2, 0.0, 3)) > st.units_needed(0.1, st.unit_sd(0.17**2, 0.0, 5))
    assert st.units_needed(0.05, 0.0) == 6  # no noise: the exact test's own floor
    assert math.isnan(st.units_needed(0.05, math.nan)) and math.isnan(st.units_needed(1e-6, 1.0))


# ---------------------------------------------------------------------------------------------------- end to end
CASES16 = [f"ph{s:03d}_{p}" for s in range(1, 9) for p in ("ED", "ES")]
UNSEEN = {"train_phases": ["ED"], "phases": ["ES"], "vendors": None, "train_vendors": None}


def _design():
    """(experiment, filters, method, budget, training subjects, seed, training seed, Dice offset) of every run: in
    the main experiment mim +0.06 (fold effects sd 0.02, run noise sd 0.01) over 6 folds x 3 repeats; in the
    unseen-phase one mim +0.03 and dino +0 over 5 folds x 2 repeats at 2 subjects, 3 repeats of one fold at "all"."""
    rng = np.random.default_rng(5)
    runs = []
    folds = rng.normal(0.06, 0.02, 6)
    for seed, training_seed in itertools.product(range(6), range(3)):
        runs += [
            ("", None, "baseline", 2, 2, seed, training_seed, 0.0),
            ("", None, "mim", 2, 2, seed, training_seed, folds[seed] + rng.normal(0, 0.01)),
        ]
    for (budget, n, seeds, repeats), (method, offset) in itertools.product(
        ((2, 2, range(5), range(2)), ("all", 8, [0], range(3))), (("baseline", 0.0), ("mim", 0.03), ("dino", 0.0))
    ):
        runs += [(UNSEEN_PHASE, UNSEEN, method, budget, n, s, r, offset) for s in seeds for r in repeats]
    return runs


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The design's evaluated folders and its report: (root, out, {(experiment, method, budget, seed, training
    seed): summary})."""
    root = tmp_path_factory.mktemp("design")
    rng = np.random.default_rng(6)
    summaries = {}
    for experiment, filters, method, budget, n, seed, training_seed, offset in _design():
        folder = root / (experiment[:6] or "main") / f"{method}_seed{training_seed}" / f"fold_{budget}_{seed}"
        summaries[(experiment, method, str(budget), seed, training_seed)] = _write_run(
            str(folder), method, budget, seed, n, offset, rng, filters, CASES16, training_seed
        )[0]
    out = root.parent / (root.name + "_report")
    write_report([str(root)], str(out))
    return root, out, summaries


def _case_dice(summary):
    return {
        c["reference_file"]: np.nanmean([m["Dice"] for m in c["metrics"].values()]) for c in summary["metric_per_case"]
    }


def _expected_folds(summaries, experiment, method, budget):
    """d_{f,r} by fold, from the summaries: the mean over the test volumes of the case Dice differences."""
    folds = {}
    for (e, m, b, seed, training_seed), summary in sorted(summaries.items(), key=lambda kv: kv[0][3:]):
        if (e, m, b) == (experiment, method, budget):
            own, base = _case_dice(summary), _case_dice(summaries[(e, "baseline", b, seed, training_seed)])
            folds.setdefault(seed, []).append(np.mean([own[c] - base[c] for c in own]))
    return list(folds.values())


def test_run_level_csv_against_independent_references(synthetic):
    _, out, summaries = synthetic
    rows = _read_csv(out / "run_level.csv")
    assert list(rows[0]) == list(RUN_LEVEL_COLUMNS)
    assert [(r["experiment"], r["method"], r["budget"], r["unit"]) for r in rows] == [
        ("", "mim", "2", "fold"),
        (UNSEEN_PHASE, "dino", "2", "fold"),
        (UNSEEN_PHASE, "dino", "all", "(fold, repeat)"),
        (UNSEEN_PHASE, "mim", "2", "fold"),
        (UNSEEN_PHASE, "mim", "all", "(fold, repeat)"),
    ]
    for row in rows:
        folds = _expected_folds(summaries, row["experiment"], row["method"], row["budget"])
        units = np.concatenate(folds) if row["unit"] != "fold" else np.array([np.mean(f) for f in folds])
        assert (int(row["n_folds"]), int(row["n_repeats"]), int(row["n_units"])) == (
            len(folds),
            len(folds[0]),
            units.size,
        )
        assert float(row["p_signflip"]) == _sign_flip_reference(units)
        assert float(row["p_wilcoxon"]) == wilcoxon(units, method="exact").pvalue
        assert float(row["min_p"]) == 2 / 2**units.size
        assert [float(row[k]) for k in ("mean_diff", "ci_low", "ci_high")] == pytest.approx(_t_reference(units))
        d = np.concatenate(folds)
        assert float(row["prob_improvement"]) == pytest.approx(np.mean(d > 0) + 0.5 * np.mean(d == 0))
        within = np.mean([np.var(f, ddof=1) for f in folds])
        assert float(row["var_within"]) == pytest.approx(within)
        if len(folds) > 1:
            between = max(0.0, np.var([np.mean(f) for f in folds], ddof=1) - within / len(folds[0]))
            assert float(row["var_between"]) == pytest.approx(between, abs=1e-15)
        else:
            assert row["var_between"] == ""
        n = units.size
        mde = (student_t.ppf(0.975, n - 1) + student_t.ppf(0.8, n - 1)) * np.std(units, ddof=1) / math.sqrt(n)
        assert float(row["mde_80"]) == (math.inf if 2 / 2**n >= 0.05 else pytest.approx(mde))
    main = rows[0]
    assert (main["n_folds"], main["n_repeats"], main["p_signflip"], main["p_holm"]) == ("6", "3", "0.03125", "0.03125")
    unseen = [r for r in rows if r["experiment"] == UNSEEN_PHASE]
    np.testing.assert_allclose(
        [float(r["p_holm"]) for r in unseen], _holm_reference([float(r["p_signflip"]) for r in unseen])
    )
    assert [(r["min_p"], r["mde_80"]) for r in unseen] == [("0.0625", "inf"), ("0.25", "inf")] * 2


def test_report_md_run_level_section_and_claims(synthetic):
    _, out, _ = synthetic
    text = (out / "report.md").read_text()
    assert text.index("## Run-level comparison against the baseline") < text.index(
        "## Per-volume Wilcoxon test, given these trained networks"
    )
    header, rows = _table_after(text, "## Run-level comparison against the baseline")
    assert header[:6] == ["method", "budget", "folds", "repeats", "unit", "difference [95% CI]"]
    main = _read_csv(out / "run_level.csv")[0]
    assert rows == [
        [
            "mim",
            "2",
            "6",
            "3",
            "fold",
            f"{float(main['mean_diff']):+.3f} [{float(main['ci_low']):+.3f}, {float(main['ci_high']):+.3f}]",
            "0.03125",
            "0.03125",
            "0.03125",
            "0.03125",
            "1.00",
            f"{math.sqrt(float(main['var_within'])):.3f}",
            f"{math.sqrt(float(main['var_between'])):.3f}",
            f"{float(main['mde_80']):.3f}",
        ]
    ]
    assert (
        f"- mim above baseline at 2 subjects: {float(main['mean_diff']):+.3f} [{float(main['ci_low']):+.3f}, "
        f"{float(main['ci_high']):+.3f}], p_holm = 0.031\n"
    ) in text
    section = text[text.index(f"## Experiment: {UNSEEN_PHASE}") :]
    _, unseen_rows = _table_after(section, "### Run-level comparison against the baseline")
    assert [r[:5] for r in unseen_rows] == [
        [method, *design]
        for method in ("dino", "mim")
        for design in (["2", "5", "2", "fold"], ["all", "1", "3", "(fold, repeat)"])
    ]
    assert (
        "Holm over this experiment's 4 comparisons: no p_holm can be below 0.25 with these designs; a claim "
        "needs at least 8 units per comparison."
    ) in section
    assert (
        "- No claim for mim at 2 subjects: with 5 folds the smallest reachable p is 0.0625, not below 0.05." in section
    )
    assert (
        "- No claim for dino at budget all: with 3 run pairs the smallest reachable p is 0.25, not below 0.05."
        in section
    )


def test_figures_are_written(synthetic):
    _, out, _ = synthetic
    for name in ("label_efficiency.png", "differences.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_power_prints_the_detectable_difference_and_the_folds_a_claim_needs(synthetic, capsys):
    root, out, _ = synthetic
    assert cli_main(["report", str(root), "--power", "--claim-size", "0.02", "--repeats", "1", "3"]) == 0
    printed = capsys.readouterr().out
    header, rows = _table_after("x\n" + printed, "x")
    assert header[-2:] == ["units for 0.02, R=1", "units for 0.02, R=3"]
    main = _read_csv(out / "run_level.csv")[0]
    within, between = float(main["var_within"]), float(main["var_between"])
    assert rows[0][:8] == [
        "main",
        "mim",
        "2",
        "fold",
        "6",
        "3",
        f"{float(main['sd_unit']):.3f}",
        f"{float(main['mde_80']):.3f}",
    ]
    assert rows[0][8:] == [str(st.units_needed(0.02, math.sqrt(between + within / r))) for r in (1, 3)]
    assert rows[2][2:4] == ["all", "(fold, repeat)"] and rows[2][-1] == "–"  # a run pair has no repeats
    assert f"{UNSEEN_PHASE}: Holm over this experiment's 4 comparisons" in printed


def test_report_refuses_a_run_without_its_baseline_run(synthetic, tmp_path, capsys):
    root, _, _ = synthetic
    shutil.copytree(root / "main", tmp_path / "main")
    shutil.rmtree(tmp_path / "main" / "baseline_seed2" / "fold_2_4")
    assert cli_main(["report", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith(
        "error: unpaired runs: no baseline run of budget 2, seed 4, training seed 2 to pair with "
        f"{tmp_path / 'main' / 'mim_seed2' / 'fold_2_4'};"
    ), stderr
    assert not (tmp_path / "out").exists()
