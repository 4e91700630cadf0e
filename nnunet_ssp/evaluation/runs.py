"""The runs a report is made of: every folder evaluated by ``nnunet_ssp evaluate`` (``ssp_evaluation.json`` next to
nnU-Net's ``summary.json``), read into a :class:`Run` identified by (experiment, method row, budget, seed, training
seed), and the report's orders of experiments, methods, budgets, labels and seeds. The training seed tells repeats of
a fold apart (None for an unseeded trainer, and in files written before it was recorded); :func:`run_pairs` pairs
each run with its baseline run.

A run's experiment is named from what it was trained and tested on (its fold's ``train_vendors``/``train_phases``,
its evaluation's ``vendors``/``phases``): "" for the main experiment (no filter), ``unseen phase: trained on ED,
tested on ES``, ``unseen vendor: trained on A+B, tested on C+D``, else ``trained on …, tested on …``."""

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_ssp.errors import SSPError

EVALUATION_FILE = "ssp_evaluation.json"
METHOD_ORDER = ("baseline", "simclr", "pcl", "dino", "mim")
BASELINE = "baseline"
MEAN = "mean"  # the class key of nnU-Net's foreground mean
EF_MEASURES = ("lv_ef_pct", "rv_ef_pct")
Budget = Union[int, str, None]
NAN = float("nan")


@dataclass
class Run:
    """One evaluated prediction folder. Missing values are NaN."""

    folder: str
    method: str  # the row: the method, with its recipe unless the paper's
    budget: Budget
    seed: Optional[int]  # the split seed that drew the fold's labelled subjects
    training_seed: Optional[int]  # the fine-tuning's seed (repeats of a fold); None: unseeded
    num_train_subjects: Optional[int]
    labels: Dict[str, str]  # label key -> class name
    dice: Dict[str, float]  # MEAN and label key -> nnU-Net's 3D Dice
    case_dice: Dict[str, float]  # reference file name -> mean Dice over foreground classes
    hd95: Dict[str, float]  # label key -> mean HD95 (mm)
    clinical: Dict[str, Dict[str, float]]  # measure -> n, mae, bias, sd, loa_low, loa_high
    subjects: Dict[str, Dict[str, Dict[str, float]]]  # subject -> reference/prediction -> measure -> value
    schedule: Optional[dict] = None  # the fine-tuning schedule the run recorded (name, epochs, ...)
    tta: Optional[bool] = None  # whether its predictions used test-time augmentation
    plans: Optional[str] = None  # the plans identifier it was trained with (None: not recorded)
    width: Optional[float] = None  # their width factor (nnunet_ssp plans --width); None: as planned
    experiment: str = ""  # "" for the main experiment, see experiment_label


class Experiment(NamedTuple):
    """The runs of one experiment, by (method, budget), with the methods and budgets in report order."""

    label: str
    runs: List[Run]
    groups: Dict[Tuple[str, Budget], List[Run]]
    methods: List[str]
    budgets: List[Budget]


def _num(value) -> float:
    return NAN if value is None else float(value)


def _budget(value) -> Budget:
    """Budgets as ints where numeric ("10" -> 10); "all" and other strings as given."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if value is None or isinstance(value, (int, str)) and not isinstance(value, bool):
        return value
    raise ValueError(f"budget {value!r} is neither a number nor a string")


def budget_sort_key(budget: Budget) -> Tuple:
    """Numbers ascending, then "all", then other strings alphabetically, then no budget."""
    if isinstance(budget, int):
        return (0, budget, "")
    if budget is None:
        return (3, 0, "")
    return (1, 0, "") if budget == "all" else (2, 0, budget)


def row_label(method: str, recipe: Optional[str]) -> str:
    """A report row: the method, ``<method>_<recipe>`` for a recipe other than the paper's."""
    return f"{method}_{recipe}" if recipe else str(method)


def method_sort_key(label: str) -> Tuple:
    """The paper's methods in its order, then the others alphabetically; each method's paper recipe first."""
    method, _, recipe = label.partition("_")
    order = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (order, method if order == len(METHOD_ORDER) else "", recipe)


def label_sort_key(label: str) -> Tuple:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def seed_sort_key(seed: Optional[int]) -> Tuple:
    return (seed is None, seed or 0)


def _condition(vendors: Optional[Sequence[str]], phases: Optional[Sequence[str]]) -> str:
    """``A+B``, ``ED``, ``A+B ED``; ``all cases`` without a filter."""
    return " ".join("+".join(v) for v in (vendors, phases) if v) or "all cases"


def experiment_label(run: dict) -> str:
    """The experiment of an evaluation's ``run`` record (see the module docstring)."""
    train_vendors, train_phases, vendors, phases = (
        run.get(k) or None for k in ("train_vendors", "train_phases", "vendors", "phases")
    )
    if not any((train_vendors, train_phases, vendors, phases)):
        return ""
    for kind, (trained, tested), others in (
        ("phase", (train_phases, phases), (train_vendors, vendors)),
        ("vendor", (train_vendors, vendors), (train_phases, phases)),
    ):
        if trained and tested and not any(others) and not set(trained) & set(tested):
            return f"unseen {kind}: trained on {'+'.join(trained)}, tested on {'+'.join(tested)}"
    return f"trained on {_condition(train_vendors, train_phases)}, tested on {_condition(vendors, phases)}"


def cell_text(value) -> str:
    """Budgets, seeds and subject counts in tables: "n/a" for None."""
    return "n/a" if value is None else str(value)


def _draw_text(run: Run) -> str:
    """ "budget 2, seed 0", then ", training seed 1" when seeded and " (experiment)" outside the main one."""
    return (
        f"budget {cell_text(run.budget)}, seed {run.seed}"
        + (f", training seed {run.training_seed}" if run.training_seed is not None else "")
        + (f" ({run.experiment})" if run.experiment else "")
    )


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SSPError(f"{path}: cannot read JSON ({e})") from None


def load_run(folder: str) -> Run:
    """Reads one evaluated folder; a missing, unreadable or malformed file is an SSPError naming it."""
    path = os.path.join(folder, EVALUATION_FILE)
    ev = _load_json(path)
    try:
        if ev["format"] != "nnunet_ssp.evaluation" or ev["format_version"] != 1:
            raise ValueError(
                f"format {ev['format']!r} version {ev['format_version']!r}, expected 'nnunet_ssp.evaluation' version 1"
            )
        run = ev["run"]
        labels = {str(k): str(v) for k, v in ev["labels"].items()}
        fields = dict(
            folder=folder,
            method=row_label(run["method"], run.get("recipe")),
            budget=_budget(run["budget"]),
            seed=None if run["seed"] is None else int(run["seed"]),
            training_seed=None if run.get("training_seed") is None else int(run["training_seed"]),
            num_train_subjects=None if run["num_train_subjects"] is None else int(run["num_train_subjects"]),
            labels=labels,
            hd95={k: _num(ev["hd95_mean"].get(k)) for k in labels},
            schedule=run.get("schedule"),
            tta=run.get("tta"),
            experiment=experiment_label(run),
            plans=run.get("plans"),
            width=run.get("width"),
            clinical={
                m: {k: int(v) if k == "n" and v is not None else _num(v) for k, v in a.items()}
                for m, a in ev["clinical_agreement"].items()
            },
            subjects={
                s: {side: {k: _num(v) for k, v in d[side].items()} for side in ("reference", "prediction")}
                for s, d in ev["clinical_per_subject"].items()
            },
        )
        summary_path = os.path.join(folder, ev["dice_summary"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SSPError(f"{path}: malformed evaluation file ({type(e).__name__}: {e})") from None
    summary = _load_json(summary_path)
    try:
        dice = {MEAN: _num(summary["foreground_mean"]["Dice"])}
        dice.update({k: _num(summary["mean"][k]["Dice"]) for k in labels})
        case_dice = {}
        for case in summary["metric_per_case"]:
            values = [_num(m["Dice"]) for m in case["metrics"].values()]
            finite = [v for v in values if math.isfinite(v)]
            case_dice[os.path.basename(case["reference_file"])] = float(np.mean(finite)) if finite else NAN
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SSPError(f"{summary_path}: malformed nnU-Net summary ({type(e).__name__}: {e})") from None
    return Run(dice=dice, case_dice=case_dice, **fields)


def find_runs(results: Sequence[str]) -> List[Run]:
    """Every evaluated folder under the given folders (recursively), sorted by experiment, method, budget, seed and
    training seed."""
    folders, seen_paths = [], set()
    for root in results:
        if not os.path.isdir(root):
            raise SSPError(f"{root}: not a folder")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if EVALUATION_FILE in filenames and os.path.realpath(dirpath) not in seen_paths:
                seen_paths.add(os.path.realpath(dirpath))
                folders.append(dirpath)
    if not folders:
        raise SSPError(
            f"no evaluated prediction folder ({EVALUATION_FILE}) under {', '.join(results)}; "
            "run nnunet_ssp evaluate first"
        )
    runs, seen = [], {}
    for folder in folders:
        run = load_run(folder)
        key = (run.experiment, run.method, run.budget, run.seed, run.training_seed)
        if key in seen:
            raise SSPError(f"two evaluations of method {run.method}, {_draw_text(run)}: {seen[key]} and {folder}")
        seen[key] = folder
        runs.append(run)
    return sorted(
        runs,
        key=lambda r: (
            experiment_sort_key(r.experiment),
            method_sort_key(r.method),
            budget_sort_key(r.budget),
            seed_sort_key(r.seed),
            seed_sort_key(r.training_seed),
        ),
    )


def experiment_sort_key(label: str) -> Tuple:
    """The main experiment ("") first, then the others alphabetically."""
    return (label != "", label)


def group_runs(runs: Sequence[Run]) -> Dict[Tuple[str, Budget], List[Run]]:
    """(method, budget) -> its runs (one per seed and training seed), in report order."""
    groups = defaultdict(list)
    for run in runs:
        groups[(run.method, run.budget)].append(run)
    return dict(groups)


def experiments(runs: Sequence[Run]) -> List[Experiment]:
    """The runs' experiments in report order, each with its runs grouped (runs in report order)."""
    found = []
    for label in sorted({r.experiment for r in runs}, key=experiment_sort_key):
        mine = [r for r in runs if r.experiment == label]
        found.append(
            Experiment(
                label,
                mine,
                group_runs(mine),
                sorted({r.method for r in mine}, key=method_sort_key),
                sorted({r.budget for r in mine}, key=budget_sort_key),
            )
        )
    return found


def _by_draw(runs: Sequence[Run]) -> Dict[Tuple[Optional[int], Optional[int]], Run]:
    return {(r.seed, r.training_seed): r for r in runs}


def run_pairs(experiment: Experiment) -> Dict[Tuple[str, Budget], List[Tuple[Run, Run]]]:
    """(method, budget) -> [(run, its baseline run)] for every row but the baseline, in report order, matched by
    (split seed, training seed). Every such run needs its baseline run and, at a budget where a method has runs,
    every baseline run needs the method's: an SSPError names the first missing run."""
    pairs = {}
    for method in experiment.methods:
        for budget in experiment.budgets:
            if method == BASELINE or (method, budget) not in experiment.groups:
                continue
            own, base = (_by_draw(experiment.groups.get((m, budget), [])) for m in (method, BASELINE))
            for have, lack, lacking in ((own, base, BASELINE), (base, own, method)):
                missing = [run for key, run in have.items() if key not in lack]
                if missing:
                    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                    raise SSPError(
                        f"unpaired runs: no {lacking} run of {_draw_text(missing[0])} to pair with "
                        f"{missing[0].folder}{more}; every comparison with the baseline needs both "
                        "trained on the same fold with the same training seed"
                    )
            pairs[(method, budget)] = [(run, base[key]) for key, run in own.items()]
    return pairs
