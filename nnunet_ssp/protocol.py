"""The paper's protocol as a resumable, shardable plan of stock commands (``scripts/reproduce_paper.sh``).

prepare   merge the converted datasets (when several), ``nnUNetv2_plan_and_preprocess``, with --width ``nnunet_ssp
          plans`` (width-scaled plans that every later run trains with, for CPU miniatures), ``nnunet_ssp splits``
pretrain  ``ssp_pretrain --method M`` for each method
finetune  for each (budget, seed) fold, each training seed (--train-seeds) and each trainer (the baseline and one per
          method and recipe; methods not in --every-budget at the smallest budget only) ``nnUNetv2_train`` of the
          trainer's seeded variant (``<trainer>_seed<K>``; ``--train-seeds none``: the unseeded trainer), so the
          baseline and every method of a fold train with the same seeds, paired; then ``nnunet_ssp predict
          --evaluate`` predicts imagesTs with every trained run and evaluates the predictions
          (the files of ``nnUNetv2_predict`` and ``nnunet_ssp evaluate``), many runs per process: up to --jobs
          processes share the runs, since on a small test set a process per run starts up for as long as it predicts
report    ``nnunet_ssp report`` over every evaluated prediction folder

``--experiment`` (``nnunet_ssp/experiments.py``) chooses the folds the fine-tuning runs train on and the test cases
they are evaluated on: the paper's, an unseen cardiac phase or unseen vendors. Each experiment has its own folds,
output folder and report; pretraining is shared by all of them (the same ``ssp_pretrain`` runs and checkpoints).

A run whose result exists is skipped (an interrupted training continues with ``--c``/``--continue``, ``nnunet_ssp
predict --continue`` skips prediction folders complete for the same model: a retrained run is predicted again), so
re-running the same command resumes. ``--shard i/n`` takes every n-th pretraining and fine-tuning run (training
seeds included) starting at i, so n machines split the work (each predicts the runs it trained); run ``--phase
pretrain`` on every shard before ``--phase finetune``, and ``--phase report`` once at the end. ``--dry-run`` prints
the plan and writes nothing. Each command's output goes to a log file under the output folder. Each completed phase
appends its wall time (start, end, seconds, the shard when sharded) to ``ssp_phase_times.json`` in the output folder
(``nnunet_ssp/provenance.py``), where the report finds it: a re-run adds its records after the earlier ones, and a
report lists the phases recorded before it was made (not its own).
"""

import argparse
import json
import os
import shlex
import sys
from collections import Counter
from typing import List, Optional, Sequence, Tuple

from nnunet_ssp.env import nnunet_path, ssp_method_trainers
from nnunet_ssp.errors import SSPError, run_command
from nnunet_ssp.experiments import PaperExperiment, add_experiment_arguments, experiment_from_args, splits_arguments
from nnunet_ssp.plans import width_plans_identifier
from nnunet_ssp.provenance import record_phase, utc_now
from nnunet_ssp.raw_layout import SUBJECTS_TABLE
from nnunet_ssp.runner import Command, Run, execute, file_exists, print_plan
from nnunet_ssp.schedule import (
    DECODER_METHOD_RECIPES,
    PAPER_RECIPE,
    PRETRAINED_ONLY_RECIPES,
    RECIPES,
    SCHEDULE_SUFFIX,
    SKIP_FINAL_VALIDATION_ENV,
    seeded_trainer_name,
    split_training_seed,
)

PHASES = ("prepare", "pretrain", "finetune", "report")
BASELINE_TRAINER = "nnUNetTrainerBaseline"
PAPER_BATCH_SIZE = 32
PAPER_BUDGETS = ["10", "15", "25", "50", "all"]


def parse_shard(text: str):
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise SSPError(f"--shard {text}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise SSPError(f"--shard {text}: i must be in 0..n-1")
    return index, count


def parse_training_seeds(values: Sequence[str]) -> List[Optional[int]]:
    """--train-seeds: distinct non-negative integers, or ``none`` alone ([None]: nnU-Net's unseeded trainers)."""
    if list(values) == ["none"]:
        return [None]
    if not all(v.isdigit() for v in values) or len({int(v) for v in values}) < len(values):
        raise SSPError(f"--train-seeds {' '.join(values)}: expected distinct non-negative integers, or none alone")
    return [int(v) for v in values]


def _training_seed_text(seed: Optional[int]) -> str:
    return "unseeded training" if seed is None else f"training seed {seed}"


class Protocol:
    """Builds the runs of the protocol for one (merged) dataset from the parsed arguments."""

    def __init__(self, args):
        self.args = args
        self.training_seeds = parse_training_seeds(args.train_seeds)
        self.raw_root = nnunet_path("nnUNet_raw")
        self.preprocessed_root = nnunet_path("nnUNet_preprocessed")
        self.results_root = nnunet_path("nnUNet_results")
        self.experiment = experiment_from_args(args)
        self.dataset_id, self.dataset_name = self._target_dataset()
        #: the plans identifier of every run after planning: --plans, or its width-scaled plans (--width)
        self.plans = args.plans if args.width is None else width_plans_identifier(args.plans, args.width)
        self.experiment.test_filter(self.raw)  # refuses unknown vendors now, when the raw dataset can tell
        self.output = args.output or os.path.join(self.results_root, self.dataset_name, self.experiment.folder_name)
        trainer_of_method = ssp_method_trainers()
        self.methods = list(args.methods or trainer_of_method)
        unknown = [m for m in self.methods if m not in trainer_of_method]
        if unknown:
            raise SSPError(f"--methods {' '.join(unknown)}: unknown; choose from {', '.join(trainer_of_method)}")
        self.every_budget_methods = self.methods if args.every_budget is None else list(args.every_budget)
        self.pretrain_args_of = {}
        for method, extra in args.pretrain_args_of or []:
            if method not in self.methods:
                raise SSPError(f"--pretrain-args-of {method}: not one of --methods {' '.join(self.methods)}")
            self.pretrain_args_of[method] = shlex.split(extra)
        outside = [m for m in self.every_budget_methods if m not in self.methods]
        if outside:
            raise SSPError(f"--every-budget {' '.join(outside)}: not one of --methods {' '.join(self.methods)}")
        schedule = SCHEDULE_SUFFIX[args.schedule]
        self.method_of_trainer, trainers = {}, []  # by unseeded trainer name
        for recipe in args.recipes:
            name = "" if recipe == PAPER_RECIPE else f"_{recipe}"
            # a recipe that changes nothing for the baseline is compared with the paper's baseline
            baseline = BASELINE_TRAINER + ("" if recipe in PRETRAINED_ONLY_RECIPES else name) + schedule
            if baseline not in trainers:
                trainers.append(baseline)
            for method in self.methods:
                if recipe in DECODER_METHOD_RECIPES and "decoder" not in trainer_of_method[method].ssp_parts:
                    continue  # the encoder methods load the encoder alone anyway
                trainer = trainer_of_method[method].__name__ + name + schedule
                self.method_of_trainer[trainer] = method
                trainers.append(trainer)
        self.trainers = [seeded_trainer_name(trainer, seed) for seed in self.training_seeds for trainer in trainers]

    def method_of(self, trainer: str) -> Optional[str]:
        """The method whose checkpoint a (seeded or unseeded) trainer fine-tunes from; None for the baseline."""
        return self.method_of_trainer.get(split_training_seed(trainer)[0])

    # ------------------------------------------------------------------ dataset and folds
    def _target_dataset(self):
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        if len(self.args.datasets) == 1:
            name = _dataset_name(self.args.datasets[0], maybe_convert_to_dataset_name)
            return name[len("Dataset") : len("Dataset") + 3], name
        dataset_id = f"{int(self.args.merged_id):03d}"
        return dataset_id, f"Dataset{dataset_id}_{self.args.merged_name}"

    @property
    def preprocessed(self) -> str:
        return os.path.join(self.preprocessed_root, self.dataset_name)

    @property
    def raw(self) -> str:
        return os.path.join(self.raw_root, self.dataset_name)

    def folds(self) -> List[dict]:
        """[{fold, budget, seed}] of the protocol's folds, as ``nnunet_ssp splits`` writes (or would write) them."""
        from nnunet_ssp.splits import planned_folds

        return planned_folds(self.preprocessed, self.raw, self.splits_options())

    def splits_options(self) -> dict:
        """The ``nnunet_ssp.splits`` options of the experiment's folds."""
        a = self.args
        if a.splits_yaml:
            return {"from_yaml": a.splits_yaml}
        return self.experiment.splits_options(
            {"budgets": a.budgets or PAPER_BUDGETS, "seeds": a.seeds, "num_val": a.val}
        )

    # ------------------------------------------------------------------ runs
    def prepare_runs(self) -> List[Run]:
        a, runs = self.args, []
        if len(a.datasets) > 1:
            runs.append(
                Run(
                    "prepare",
                    f"merge {' '.join(a.datasets)} -> {self.dataset_name}",
                    [
                        Command(
                            ["nnunet_ssp", "merge", "-d", self.dataset_id, "-n", a.merged_name, "--from", *a.datasets],
                            file_exists(self.raw_root, self.dataset_name, "dataset.json"),
                        )
                    ],
                )
            )
        runs.append(
            Run(
                "prepare",
                "plan and preprocess",
                [
                    Command(
                        [
                            "nnUNetv2_plan_and_preprocess",
                            "-d",
                            self.dataset_id,
                            "-c",
                            a.configuration,
                            "-np",
                            str(a.num_processes),
                            "-npfp",
                            str(a.num_processes),
                            "--verify_dataset_integrity",
                        ],
                        file_exists(self.preprocessed, f"{a.plans}.json"),
                        # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0
                        env={"nnUNet_n_proc_DA": "1"} if os.environ.get("nnUNet_n_proc_DA") == "0" else {},
                    )
                ],
            )
        )
        if a.width is not None:
            runs.append(
                Run(
                    "prepare",
                    "width-scaled plans",
                    [
                        Command(
                            ["nnunet_ssp", "plans", "-d", self.dataset_id, "-p", a.plans, "--width", str(a.width)],
                            file_exists(self.preprocessed, f"{self.plans}.json"),
                        )
                    ],
                )
            )
        splits = ["nnunet_ssp", "splits", "-d", self.dataset_id, *splits_arguments(self.splits_options())]
        runs.append(Run("prepare", "label-budget folds", [Command(splits, self._splits_written)]))
        return runs

    def _splits_written(self) -> bool:
        from nnunet_ssp.splits import splits_match

        return splits_match(self.preprocessed, self.raw, self.splits_options())

    def ssp_folder(self, method: str) -> str:
        from nnunet_ssp.checkpoint import default_checkpoint_folder

        return default_checkpoint_folder(
            self.results_root, self.dataset_name, method, self.plans, self.args.configuration
        )

    def pretrain_runs(self) -> List[Run]:
        a, runs = self.args, []
        for method in self.methods:
            folder = self.ssp_folder(method)
            command = [
                "ssp_pretrain",
                "-d",
                self.dataset_id,
                "--method",
                method,
                "-c",
                a.configuration,
                "-p",
                self.plans,
                "--device",
                a.device,
                *shlex.split(a.pretrain_args),
                *self.pretrain_args_of.get(method, []),
            ]
            runs.append(
                Run(
                    "pretrain",
                    f"ssp_pretrain {method}",
                    [
                        Command(
                            command,
                            file_exists(folder, "checkpoint_final.pth"),
                            resume=lambda f=folder: (
                                ["--continue"] if os.path.isfile(os.path.join(f, "checkpoint_latest.pth")) else []
                            ),
                        )
                    ],
                )
            )
        return runs

    def training_env(self, trainer: str) -> dict:
        """A method's trainer fine-tunes from this protocol's checkpoint of that method, whatever the caller exported
        as nnUNet_ssp_checkpoint (one stale export would otherwise give every trainer the same file); nnU-Net's
        final validation is skipped, since the protocol predicts and evaluates the test set."""
        from nnunet_ssp.checkpoint import CHECKPOINT_ENV, FINAL_CHECKPOINT

        method = self.method_of(trainer)
        checkpoint = {CHECKPOINT_ENV: os.path.join(self.ssp_folder(method), FINAL_CHECKPOINT)} if method else {}
        return {SKIP_FINAL_VALIDATION_ENV: "1", **checkpoint}

    def prediction_folder(self, trainer: str, fold: int) -> str:
        return os.path.join(self.output, "predictions", trainer, f"fold_{fold}")

    def finetune_pairs(self) -> List[Tuple[dict, str]]:
        """(fold, seeded trainer) of every fine-tuning run, fold by fold and training seed by training seed: the
        baseline and the --every-budget methods at every budget, the other methods at the smallest budget only."""
        folds = self.folds()
        smallest = min((fold["budget"] for fold in folds), key=_budget_order, default=None)
        everywhere = (None, *self.every_budget_methods)  # None: the baseline, which is no method's trainer
        return [
            (fold, trainer)
            for fold in folds
            for trainer in self.trainers
            if fold["budget"] == smallest or self.method_of(trainer) in everywhere
        ]

    def training_run(self, fold: dict, trainer: str) -> Run:
        a, index = self.args, str(fold["fold"])
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        results = get_output_folder(self.dataset_name, trainer, self.plans, a.configuration, index)
        train = Command(
            [
                "nnUNetv2_train",
                self.dataset_id,
                a.configuration,
                index,
                "-tr",
                trainer,
                "-p",
                self.plans,
                "-device",
                a.device,
            ],
            file_exists(results, "checkpoint_final.pth"),
            resume=lambda: ["--c"] if os.path.isfile(os.path.join(results, "checkpoint_latest.pth")) else [],
            env=self.training_env(trainer),
        )
        seed_text = _training_seed_text(split_training_seed(trainer)[1])
        return Run(
            "finetune", f"{trainer} fold {index} (budget {fold['budget']}, seed {fold['seed']}, {seed_text})", [train]
        )

    def prediction_runs(self, pairs: Sequence[Tuple[dict, str]]) -> List[Run]:
        """The trained runs' predictions of imagesTs and their evaluation: the runs dealt out to up to --jobs
        ``nnunet_ssp predict`` processes; one is done when each of its runs is predicted by its current model and
        evaluated."""
        from nnunet_ssp.evaluation.evaluate import OUTPUT_FILE
        from nnunet_ssp.predict import prediction_complete

        a = self.args
        test_images = os.path.join(self.raw, "imagesTs")
        test_cases, test_filter = _cases_in(test_images), self.test_filter()
        workers = min(a.jobs, len(pairs))
        runs = []
        for worker in range(workers):
            mine = pairs[worker::workers]
            folders = [self.prediction_folder(trainer, fold["fold"]) for fold, trainer in mine]
            command = [
                "nnunet_ssp",
                "predict",
                "-i",
                test_images,
                "-d",
                self.dataset_id,
                "-c",
                a.configuration,
                "-p",
                self.plans,
                "-device",
                a.device,
                *([] if a.tta else ["--disable_tta"]),
                "--continue",
                "--evaluate",
                *test_filter,
                "-np",
                str(a.num_processes),
            ]
            for (fold, trainer), folder in zip(mine, folders):
                command += ["--run", trainer, str(fold["fold"]), folder]

            def done(mine=mine, folders=folders):
                return all(
                    prediction_complete(f, test_cases, ".nii.gz", self.model_identity(trainer, fold["fold"]))
                    and os.path.isfile(os.path.join(f, OUTPUT_FILE))
                    for (fold, trainer), f in zip(mine, folders)
                )

            runs.append(
                Run(
                    "finetune",
                    f"predict and evaluate {len(mine)} runs"
                    + (f" (process {worker + 1}/{workers})" if workers > 1 else ""),
                    [Command(command + a.predict_args, done)],
                )
            )
        return runs

    def model_identity(self, trainer: str, fold: int) -> dict:
        """The record of the trained run that ``nnunet_ssp predict`` writes into its prediction folder (its checkpoint:
        -chk of --predict-args, else checkpoint_final.pth)."""
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        from nnunet_ssp.predict import model_identity

        a = self.args
        checkpoint = (
            a.predict_args[a.predict_args.index("-chk") + 1] if "-chk" in a.predict_args else "checkpoint_final.pth"
        )
        return model_identity(
            get_output_folder(self.dataset_name, trainer, self.plans, a.configuration),
            trainer,
            fold,
            checkpoint,
            self.preprocessed,
        )

    def test_filter(self) -> List[str]:
        """The experiment's ``nnunet_ssp predict --evaluate`` arguments that choose the evaluated test cases; a dry run
        before the raw dataset can tell them names them by what they will be."""
        arguments = self.experiment.test_filter(self.raw)
        if arguments is not None:
            return arguments
        if not self.args.dry_run:
            raise SSPError(
                f"{self.raw}: no {SUBJECTS_TABLE}, which gives the test subjects' vendors; run --phase prepare first"
            )
        return [
            "--vendors",
            f"<the other vendors of the test subjects, from {os.path.join(self.raw, SUBJECTS_TABLE)} "
            f"once --phase prepare has written it>",
        ]

    def iteration_budget(self) -> List[str]:
        """Lines for the dry run: each fold's labelled training slices and the fine-tuning iterations of one run under
        each schedule, and the totals over every fine-tuning run, so GPU time can be budgeted before starting."""
        from nnunet_ssp.schedule import NNUNET_EPOCHS, iterations_per_epoch, num_epochs
        from nnunet_ssp.splits import make_folds

        raw = self.raw
        cases = _cases_in(os.path.join(raw, "imagesTr"))
        if not cases:
            return [f"fine-tuning iterations: known once {raw}/imagesTr exists (--phase prepare)"]
        folds, descriptions, _ = make_folds(cases, self.splits_options(), raw)
        batch, where = self._batch_size()
        epochs, totals = num_epochs(), {schedule: 0 for schedule in SCHEDULE_SUFFIX}
        lines = [f"fine-tuning iterations per run ({epochs} epochs, batch {batch}: {where}):"]
        runs_of_fold = Counter(fold["fold"] for fold, _ in self.finetune_pairs())
        for planned, fold, described in zip(self.folds(), folds, descriptions):
            slices = sum(_slices(os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz")) for case in fold["train"])
            per_run = {s: iterations_per_epoch(s, slices, batch) * epochs for s in SCHEDULE_SUFFIX}
            for schedule, iterations in per_run.items():
                totals[schedule] += iterations * runs_of_fold[planned["fold"]]
            lines.append(
                f"  budget {described['budget']}, seed {described['seed']}: {slices} labelled slices -> "
                + ", ".join(f"{s} {n:,}" for s, n in per_run.items())
            )
        seeds = (
            "training seeds " + " ".join(map(str, self.training_seeds))
            if len(self.training_seeds) > 1
            else _training_seed_text(self.training_seeds[0])
        )
        lines.append(
            f"all {sum(runs_of_fold.values())} fine-tuning runs ({seeds}): "
            + ", ".join(f"{s} {n:,}" for s, n in totals.items())
            + f" iterations; this plan runs --schedule {self.args.schedule}"
            + ("" if epochs == NNUNET_EPOCHS else " (epochs from nnUNet_ssp_num_epochs)")
        )
        return lines

    def _batch_size(self):
        """(the plans' batch size of the configuration, where it comes from); the paper's 32 before planning. The
        base plans': width-scaled plans keep their batch size."""
        plans = os.path.join(self.preprocessed, f"{self.args.plans}.json")
        if os.path.isfile(plans):
            with open(plans, encoding="utf-8") as f:
                return json.load(f)["configurations"][self.args.configuration]["batch_size"], "the plans'"
        return PAPER_BATCH_SIZE, "the paper's, until nnUNetv2_plan_and_preprocess has planned"

    def report_runs(self) -> List[Run]:
        report = os.path.join(self.output, "report")
        return [
            Run(
                "report",
                "report",
                [
                    Command(
                        ["nnunet_ssp", "report", os.path.join(self.output, "predictions"), "-o", report], lambda: False
                    )
                ],
            )
        ]

    def phase_runs(self, phase: str, shard=(0, 1)) -> List[List[Run]]:
        """The runs of one phase in stages: a stage starts once the one before has ended, and the runs of the
        pretraining and fine-tuning stages are independent of each other. Pretraining and fine-tuning runs are split
        over shards; a shard's trained runs are predicted and evaluated after its fine-tuning runs."""
        index, count = shard
        if phase == "finetune":
            pairs = self.finetune_pairs()[index::count]
            return [[self.training_run(fold, trainer) for fold, trainer in pairs], self.prediction_runs(pairs)]
        if phase == "pretrain":
            return [self.pretrain_runs()[index::count]]
        return [{"prepare": self.prepare_runs, "report": self.report_runs}[phase]()]


def _budget_order(budget) -> tuple:
    """Sort key of fold budgets: numbers by size, then "all", then named ones (vendor folds)."""
    if isinstance(budget, int):
        return (0, budget, "")
    return (1 if budget == "all" else 2, 0, str(budget))


def _dataset_name(dataset: str, convert) -> str:
    try:
        return convert(dataset)
    except RuntimeError as e:
        raise SSPError(f"dataset {dataset}: {str(e).strip().splitlines()[0]}") from None


def _cases_in(images_folder: str) -> List[str]:
    if not os.path.isdir(images_folder):
        return []
    return sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(images_folder) if f.endswith("_0000.nii.gz"))


def _slices(image_path: str) -> int:
    """2D slices of a 3D image as nnU-Net's 2D configuration cuts it: along its axis of largest spacing (header
    only)."""
    import nibabel as nib

    header = nib.load(image_path).header
    zooms, shape = header.get_zooms()[:3], header.get_data_shape()[:3]
    return int(shape[max(range(3), key=lambda axis: zooms[axis])])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reproduce_paper.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "-d",
        "--datasets",
        nargs="+",
        required=True,
        metavar="ID",
        help="converted dataset id(s) or name(s); several are merged into --merged-id first",
    )
    p.add_argument("--merged-id", type=int, default=600, help="id of the merged dataset (default 600)")
    p.add_argument("--merged-name", default="CineSSP", help="name of the merged dataset (default CineSSP)")
    add_experiment_arguments(p)
    p.add_argument(
        "--budgets",
        nargs="+",
        help="labelled subjects per fold (default: the paper's 10 15 25 50 all; not for unseen-vendor)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="subset seeds (default 0 1 2)")
    p.add_argument(
        "--train-seeds",
        nargs="+",
        default=["0"],
        metavar="K",
        help="training seeds (default 0): each fold's baseline and methods fine-tune once per seed, with "
        "the seeded trainers (<trainer>_seed<K>: reproducible, paired); 'none': nnU-Net's unseeded "
        "trainers, once",
    )
    p.add_argument("--val", type=int, help="validation subjects (default: 20%%)")
    p.add_argument(
        "--splits-yaml", nargs="+", metavar="FILE", help="the paper's split YAML files instead of sampled budgets"
    )
    p.add_argument("--methods", nargs="+", help="SSP methods (default: every method with a trainer, the paper's four)")
    p.add_argument(
        "--recipes",
        nargs="+",
        default=[PAPER_RECIPE],
        choices=RECIPES,
        metavar="RECIPE",
        help="fine-tuning recipes, each with its own trainers and report rows: paper (default; lr 1e-2 "
        "from scratch, 5e-3 pretrained), warmup (the _warmup trainers), baselineLR (pretrained at "
        "1e-2 too), baselineLR_encoderOnly (MIM: 1e-2 and the encoder alone), freeze50epochs "
        "(pretrained parts frozen for 50 epochs, 5%% of a shortened run), frozen (pretrained parts "
        "frozen throughout), pretrainedTenthLR (pretrained parts at 0.1 x the lr); the "
        "pretrained-only recipes are compared with the paper's baseline",
    )
    p.add_argument(
        "--schedule",
        default="paper",
        choices=sorted(SCHEDULE_SUFFIX),
        help="fine-tuning length: paper (default; an epoch is one pass over the fold's labelled slices, "
        "the _paperSchedule trainers) or nnunet (1000 x 250 iterations at every budget)",
    )
    p.add_argument(
        "--tta", action="store_true", help="predict with nnU-Net's test-time mirroring (default off, as the paper)"
    )
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument(
        "--width",
        type=float,
        metavar="W",
        help="for CPU miniatures: after planning, write the plans' width-scaled copy (features per stage "
        "times W, on the same preprocessed data; 'nnunet_ssp plans') and pretrain, fine-tune and "
        "predict with it (-p <plans>_w<W>). Default: nnU-Net's plans as planned, which real-data "
        "reproduction keeps",
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="default cuda")
    p.add_argument("--pretrain-args", default="", help="extra ssp_pretrain arguments, e.g. '--epochs 50'")
    p.add_argument(
        "--pretrain-args-of",
        nargs=2,
        action="append",
        metavar=("METHOD", "ARGS"),
        help="extra ssp_pretrain arguments of one method, after --pretrain-args, e.g. "
        "--pretrain-args-of mim '--mask-patch-size 16' (repeatable)",
    )
    p.add_argument(
        "--every-budget",
        nargs="*",
        metavar="METHOD",
        help="methods fine-tuned at every budget (default: all --methods); the others only at the "
        "smallest budget. The baseline runs at every budget",
    )
    p.add_argument(
        "--predict-args",
        default=[],
        type=shlex.split,
        help="extra 'nnunet_ssp predict' arguments, which are nnUNetv2_predict's: -chk, -step_size, "
        "--save_probabilities, --not_on_device, e.g. '-chk checkpoint_best.pth'",
    )
    p.add_argument(
        "--num-processes", type=int, default=2, help="processes for preprocessing and nnU-Net's Dice (default 2)"
    )
    p.add_argument(
        "-o",
        "--output",
        help="predictions, logs and report (default $nnUNet_results/<Dataset>/"
        "ssp_protocol, ssp_protocol_unseen-phase_ED, "
        "ssp_protocol_unseen-vendor_A+B, ... by experiment)",
    )
    p.add_argument("--phase", default="all", choices=("all",) + PHASES)
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th pretraining and fine-tuning run from i")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="pretraining or fine-tuning runs at a time, and processes that share the predictions "
        "(default 1; 2 suits a small CPU machine, where process start-up dominates short runs; "
        "parallel runs get OMP_WAIT_POLICY=PASSIVE)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan of runs and write nothing")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def go():
        protocol = Protocol(args)
        shard = parse_shard(args.shard)
        if args.jobs < 1:
            raise SSPError(f"--jobs {args.jobs}: must be at least 1")
        phases = PHASES if args.phase == "all" else (args.phase,)
        if shard[1] > 1 and "report" in phases and len(phases) > 1:
            phases = tuple(p for p in phases if p != "report")  # the report needs every shard: --phase report
        print(
            f"{protocol.dataset_name}: phases {', '.join(phases)}, shard {args.shard}; outputs in {protocol.output}"
            + (" (dry run: nothing is written)" if args.dry_run else "")
        )
        if protocol.experiment.name != PaperExperiment.name:
            print(f"experiment {protocol.experiment.title}; pretraining is the paper experiment's")
        for phase in phases:  # built phase by phase: fine-tuning runs need the folds that prepare writes
            start = utc_now()
            stages = protocol.phase_runs(phase, shard)
            if args.dry_run:
                print_plan(stages)
                if phase == "finetune":
                    print("\n".join(protocol.iteration_budget()))
            else:  # prepare and report are single steps in order; runs of the other phases are independent
                execute(
                    stages, os.path.join(protocol.output, "logs"), args.jobs if phase in ("pretrain", "finetune") else 1
                )
                record_phase(protocol.output, phase, start, f"{shard[0]}/{shard[1]}" if shard[1] > 1 else None)
        if "report" in phases and not args.dry_run:
            print(f"report: {os.path.join(protocol.output, 'report', 'report.md')}")

    return run_command(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
