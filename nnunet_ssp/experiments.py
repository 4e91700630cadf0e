"""The protocol's experiments (``--experiment``): what each changes in the paper's protocol. An experiment says which
folds it fine-tunes on (the options of ``nnunet_ssp splits``), which test cases it evaluates (the filter of
``nnunet_ssp predict --evaluate``), its output folder and its title.

Pretraining is no part of an experiment: every experiment fine-tunes from the same ``ssp_pretrain`` checkpoints,
pretrained on the unlabelled cine of every training subject, as the paper's were.
"""

import os
from typing import List, Optional, Sequence

from nnunet_ssp.errors import SSPError
from nnunet_ssp.raw_layout import PHASES, SUBJECTS_TABLE, TEST, TRAIN, read_subjects

PROTOCOL_FOLDER = "ssp_protocol"
_SPLITS_FLAGS = (
    ("budgets", "--budgets"),
    ("from_yaml", "--from-yaml"),
    ("vendors", "--vendors"),
    ("seeds", "--seeds"),
    ("num_val", "--val"),
    ("phases", "--phases"),
)


class PaperExperiment:
    """The paper's: fine-tuned on both phases of the sampled (or the split files') subjects, tested on every test
    case."""

    name = "paper"
    folder_name = PROTOCOL_FOLDER
    title = "the paper's: every test case"

    def splits_options(self, sampled: dict) -> dict:
        """The ``nnunet_ssp.splits`` options of the experiment's folds, from the protocol's budget options."""
        return sampled

    def test_filter(self, raw_folder: str) -> Optional[List[str]]:
        """The ``nnunet_ssp predict --evaluate`` arguments that choose the evaluated test cases; None while the raw
        dataset cannot tell them yet."""
        return []


class UnseenPhase(PaperExperiment):
    """Fine-tuned on the cases of one cardiac phase, tested on the other phase's."""

    name = "unseen-phase"

    def __init__(self, train_phase: str):
        self.train_phase = train_phase
        self.test_phase = next(p for p in PHASES if p != train_phase)
        self.folder_name = f"{PROTOCOL_FOLDER}_{self.name}_{train_phase}"
        self.title = f"unseen phase: trained on {train_phase}, tested on {self.test_phase}"

    def splits_options(self, sampled: dict) -> dict:
        return {**sampled, "phases": [self.train_phase]}

    def test_filter(self, raw_folder: str) -> Optional[List[str]]:
        return ["--phases", self.test_phase]


class UnseenVendor(PaperExperiment):
    """Fine-tuned on every training subject of some vendors, tested on the test subjects of the other vendors."""

    name = "unseen-vendor"

    def __init__(self, train_vendors: Sequence[str]):
        self.train_vendors = list(train_vendors)
        self.folder_name = f"{PROTOCOL_FOLDER}_{self.name}_{'+'.join(train_vendors)}"
        self.title = f"unseen vendor: trained on {'+'.join(train_vendors)}, tested on the other vendors"

    def splits_options(self, sampled: dict) -> dict:
        return {"vendors": self.train_vendors, "seeds": sampled["seeds"], "num_val": sampled["num_val"]}

    def test_filter(self, raw_folder: str) -> Optional[List[str]]:
        table = os.path.join(raw_folder, SUBJECTS_TABLE)
        return ["--vendors", *self.test_vendors(table)] if os.path.isfile(table) else None

    def test_vendors(self, table: str) -> List[str]:
        """The vendors of the test subjects in ``table`` (a subjects.csv) other than the training vendors; an SSPError
        when a training vendor has no training subjects or no other vendor has test subjects."""
        rows = read_subjects(table, required=("split", "vendor"))
        trained = sorted({row.vendor for row in rows if row.split == TRAIN})
        unknown = [v for v in self.train_vendors if v not in trained]
        if unknown:
            raise SSPError(
                f"--train-vendors {' '.join(unknown)}: no training subjects of that vendor in {table} "
                f"(training vendors: {', '.join(trained)})"
            )
        tested = sorted({row.vendor for row in rows if row.split == TEST})
        others = [v for v in tested if v not in self.train_vendors]
        if not others:
            raise SSPError(
                f"--train-vendors {' '.join(self.train_vendors)}: {table} has no test subjects of other "
                f"vendors (test vendors: {', '.join(tested) or 'none'})"
            )
        return others


EXPERIMENTS = (PaperExperiment.name, UnseenPhase.name, UnseenVendor.name)


def add_experiment_arguments(parser) -> None:
    """The protocol's --experiment, --train-phase and --train-vendors."""
    parser.add_argument(
        "--experiment",
        default=PaperExperiment.name,
        choices=EXPERIMENTS,
        help="paper (default): fine-tune on both phases of --budgets subjects, test on every test case; unseen-phase: "
        "fine-tune on the --train-phase cases only, test on the other phase's; unseen-vendor: fine-tune on every "
        "training subject of --train-vendors, test on the test subjects of the other vendors (subjects.csv). "
        "Each experiment fine-tunes on its own folds and has its own output folder and report; pretraining is "
        "shared by all of them (the same ssp_pretrain runs and checkpoints, on the unlabelled cine of every "
        "training subject, as the paper's)",
    )
    parser.add_argument("--train-phase", choices=PHASES, help="the phase unseen-phase fine-tunes on (default ED)")
    parser.add_argument("--train-vendors", nargs="+", metavar="V", help="the vendors unseen-vendor fine-tunes on")


def experiment_from_args(args) -> PaperExperiment:
    """The experiment of the protocol's parsed options; an SSPError for an option the experiment does not take."""
    name, train_phase, train_vendors = args.experiment, args.train_phase, args.train_vendors
    if train_phase and name != UnseenPhase.name:
        raise SSPError(f"--train-phase {train_phase}: only with --experiment {UnseenPhase.name}")
    if train_vendors and name != UnseenVendor.name:
        raise SSPError(f"--train-vendors {' '.join(train_vendors)}: only with --experiment {UnseenVendor.name}")
    if args.splits_yaml and name != PaperExperiment.name:
        raise SSPError(f"--splits-yaml: only with --experiment {PaperExperiment.name}")
    if name == UnseenPhase.name:
        return UnseenPhase(train_phase or PHASES[0])
    if name == UnseenVendor.name:
        if not train_vendors:
            raise SSPError(f"--experiment {name}: give the training vendors with --train-vendors (e.g. A B)")
        if args.budgets is not None:
            raise SSPError(
                f"--budgets: not with --experiment {name}, which fine-tunes on every training subject "
                f"of --train-vendors"
            )
        return UnseenVendor(train_vendors)
    return PaperExperiment()


def splits_arguments(options: dict) -> List[str]:
    """The ``nnunet_ssp splits`` arguments that write the folds of ``options`` (``nnunet_ssp.splits`` options)."""
    arguments = []
    for key, flag in _SPLITS_FLAGS:
        value = options.get(key)
        if value is not None:
            arguments += [flag, *map(str, value if isinstance(value, list) else [value])]
    return arguments
