"""``nnunet_ssp``: the plugin's user-facing subcommands."""

import argparse
import os
import sys

from nnunet_ssp.errors import OneLineArgumentParser, SSPError, run_command


def _phantom(args):
    """write a synthetic cine CMR dataset to $nnUNet_raw/DatasetID_NAME"""
    from nnunet_ssp.env import nnunet_path
    from nnunet_ssp.phantom import write_phantom_dataset

    path = write_phantom_dataset(
        nnunet_path("nnUNet_raw"),
        args.dataset_id,
        args.name,
        args.subjects,
        args.test_subjects,
        seed=args.seed,
        size=args.size,
        overwrite=args.overwrite,
    )
    print(path)


def _convert(args):
    """convert M&Ms, M&Ms-2 or ACDC to $nnUNet_raw/DatasetID_NAME (raw layout)

    Converts a public cardiac cine dataset, as distributed, to an nnU-Net raw dataset in the layout of
    nnunet_ssp/raw_layout.py; see nnunet_ssp/convert/__init__.py for SRC and splits."""
    from nnunet_ssp.convert import convert_dataset

    print(
        convert_dataset(
            args.dataset,
            args.source,
            args.dataset_id,
            args.name,
            overwrite=args.overwrite,
            test_split_file=args.test_split,
        )
    )


def _env(args):
    """print the export line that lets nnUNetv2_* find the plugin's trainers"""
    from nnunet_ssp.env import env_lines

    print("\n".join(env_lines()))


def _install_hooks(args):
    """install the torchvision guard into this Python environment"""
    from nnunet_ssp.env import install_hooks

    print(f"installed {install_hooks()}")


def _doctor(args):
    """check nnU-Net, paths, trainer discovery and torchvision"""
    from nnunet_ssp.env import doctor

    checks = doctor()
    for ok, message in checks:
        print(f"{'ok     ' if ok else 'PROBLEM'}  {message}")
    problems = sum(not ok for ok, _ in checks)
    if problems:
        raise SSPError(f"{problems} problem(s) found; fix them as described above")


def _checkpoint(args):
    """show an SSP checkpoint and optionally check it against plans"""
    from nnunet_ssp.checkpoint import load_checkpoint, verify_checkpoint
    from nnunet_ssp.network import PlannedConfiguration

    ckpt = load_checkpoint(args.path)
    tensors = ckpt["network_weights"]
    print(
        f"{args.path}: method {ckpt['method']}, parts {'+'.join(ckpt['parts'])}, {len(tensors)} tensors, "
        f"{sum(t.numel() for t in tensors.values()):,} values"
    )
    print(f"  plans: {ckpt['plans']}")
    print(f"  pretraining: {ckpt.get('pretraining')}")
    print(f"  data: {ckpt.get('data')}")
    print(f"  versions: {ckpt.get('versions')}, created {ckpt.get('created')}")
    if args.dataset:
        target = PlannedConfiguration.from_preprocessed(args.dataset, args.plans, args.configuration)
        for warning in verify_checkpoint(ckpt, target, ckpt["parts"], args.path):
            print(f"  warning: {warning}")
        print(f"  fits {target.plans_name} {target.configuration} of {target.dataset_name}")


def _plans(args):
    """write width-scaled plans (a narrower or wider network on the same preprocessed data) for CPU miniatures

    Writes <BASE>_w<W>.json beside $nnUNet_preprocessed/<Dataset>/<BASE>.json: features per stage times W (rounded, at
    least 1), all else as planned, the data identifier included, so nnUNetv2_train and ssp_pretrain -p <BASE>_w<W>
    train on the base plans' preprocessed data. See nnunet_ssp/plans.py."""
    from nnunet_ssp.io import load_json_file
    from nnunet_ssp.plans import features_per_stage, write_width_plans

    path = write_width_plans(args.dataset, args.width, args.plans)
    before = features_per_stage(load_json_file(os.path.join(os.path.dirname(path), f"{args.plans}.json"), dict))
    after = features_per_stage(load_json_file(path, dict))
    print(
        f"{path}: features per stage "
        + "; ".join(f"{name} {' '.join(map(str, before[name]))} -> {' '.join(map(str, after[name]))}" for name in after)
    )


def _splits(args):
    """write label-budget, split-file or vendor folds into splits_final.json

    Writes folds into splits_final.json and describes them in splits_ssp.json: folds of the same options (seeds and
    budgets aside) replace those written before, others keep theirs; --phases keeps those cardiac phases' cases of the
    same subjects. See nnunet_ssp/splits.py."""
    from nnunet_ssp.env import nnunet_path
    from nnunet_ssp.network import preprocessed_dataset_folder
    from nnunet_ssp.splits import write_splits

    if args.from_yaml and (args.seeds or args.val is not None):
        raise SSPError("--seeds and --val do not apply to --from-yaml: the split files give train and validation")
    raw = (
        nnunet_path("nnUNet_raw", "--vendors reads the raw dataset's subjects.csv")
        if args.vendors
        else os.environ.get("nnUNet_raw")
    )
    folder = preprocessed_dataset_folder(args.dataset)
    options = {
        "budgets": args.budgets,
        "from_yaml": args.from_yaml,
        "vendors": args.vendors,
        "seeds": args.seeds,
        "num_val": args.val,
        "phases": args.phases,
    }
    folds = write_splits(folder, raw and os.path.join(raw, os.path.basename(folder)), options)
    for index, d in folds.items():
        source = f" ({os.path.basename(d['source'])})" if "source" in d else ""
        phases = f", {'+'.join(d['phases'])} only" if d.get("phases") else ""
        print(f"fold {index}: budget {d['budget']}, seed {d['seed']}: {len(d['subjects'])} subjects{phases}{source}")
    print(os.path.join(folder, "splits_final.json"))


def _merge(args):
    """combine raw datasets (e.g. M&Ms and M&Ms-2) into $nnUNet_raw/DatasetID_NAME

    Hard-links (or copies) the images, labels and cines of the source datasets into one raw dataset; subjects.csv gets a
    source_dataset column."""
    from nnunet_ssp.env import nnunet_path
    from nnunet_ssp.merge import merge_datasets

    print(merge_datasets(nnunet_path("nnUNet_raw"), args.dataset_id, args.name, args.sources, overwrite=args.overwrite))


def _evaluate(args):
    """3D Dice (nnU-Net's evaluation), HD95 and clinical measures of predictions

    Evaluates a folder written by nnUNetv2_predict: nnU-Net's Dice into PRED/summary.json; HD95, ventricular volumes, EF
    and myocardial mass into PRED/ssp_evaluation.json."""
    from nnunet_ssp.evaluation.evaluate import evaluate_predictions, summary_lines

    evaluation, dice = evaluate_predictions(
        args.prediction_folder,
        args.dataset,
        args.reference,
        args.trainer,
        args.fold,
        args.vendors,
        args.num_processes,
        args.configuration,
        None if args.tta is None else args.tta == "on",
        args.phases,
    )
    print("\n".join(summary_lines(evaluation, dice)))


def _predict(args):
    """predict an image folder with many trained runs in one process (as nnUNetv2_predict does for one), optionally
    evaluating each

    Predicts IMAGES with each --run in turn, in this one process, with nnU-Net's own predictor (as nnUNetv2_predict -npp
    0 -nps 0: no worker pools; the same files). Written last, ssp_model.json records the model that made the folder's
    predictions: trainer, fold, training seed, the checkpoint's sha256, a digest of the fold's cases."""
    from nnunet_ssp.predict import PredictionRun, predict_runs, use_nnunet_threads

    if (args.vendors or args.phases) and not args.evaluate:
        raise SSPError(
            f"{'--vendors' if args.vendors else '--phases'}: only with --evaluate (it chooses the "
            f"evaluated cases; every image is predicted)"
        )
    use_nnunet_threads(args.device)
    predict_runs(
        [PredictionRun(*run) for run in args.runs],
        args.i,
        args.d,
        configuration=args.c,
        plans=args.p,
        device=args.device,
        tta=not args.disable_tta,
        checkpoint=args.chk,
        step_size=args.step_size,
        on_device=not args.not_on_device,
        save_probabilities=args.save_probabilities,
        skip_complete=args.resume,
        evaluate=args.evaluate,
        reference=args.reference,
        num_processes=args.num_processes,
        vendors=args.vendors,
        phases=args.phases,
    )


def _report(args):
    """paper-style tables, tests and figures from evaluated prediction folders

    Collects every folder evaluated by 'nnunet_ssp evaluate' under RESULTS and writes report.md, CSV files and figures
    to OUT. Every run needs its baseline run (same fold, same training seed). --power prints instead what the design
    can detect and how many folds a claim needs."""
    from nnunet_ssp.evaluation.report import CLAIM_SIZE, POWER_REPEATS, power_table, write_report

    claim_size = CLAIM_SIZE if args.claim_size is None else args.claim_size
    if not claim_size > 0 or args.repeats and min(args.repeats) < 1:
        raise SSPError("report: --claim-size must be above 0 and --repeats at least 1")
    if args.power:
        print(power_table(args.results, claim_size, args.repeats or POWER_REPEATS))
        return
    if not args.output:
        raise SSPError("report: -o OUT is required (unless --power)")
    table, paths = write_report(args.results, args.output, claim_size, args.argv)
    print(table)
    print("\n".join(paths))


def _results(args):
    """a results page (Markdown) from report folders written by 'nnunet_ssp report'

    For each REPORT_DIR a section: its provenance (provenance.json: command, commit, date, hardware, wall time per
    phase), the run-level comparison with the baseline (run_level.csv) and the mean 3D Dice table (summary.csv),
    numbers as report.md formats them. The page is written atomically; the same folders give the same bytes."""
    from nnunet_ssp.evaluation.results_page import write_results_page

    print(write_results_page(args.reports, args.output))


def _command(sub, name: str, run, dataset: bool = False):
    """The subparser of command ``name``, which ``run(args)`` carries out: the first paragraph of its docstring is the
    command's help, the rest its description; ``dataset``: it takes -d DATASET."""
    summary, _, details = run.__doc__.partition("\n\n")
    p = sub.add_parser(name, help=" ".join(summary.split()), description=" ".join(details.split()) or None)
    p.set_defaults(run=run)
    if dataset:
        p.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    return p


def _add_new_dataset_arguments(p, example_id: int, example_name: str) -> None:
    """-d, -n and --overwrite of a command that writes $nnUNet_raw/DatasetID_NAME."""
    p.add_argument("-d", "--dataset-id", type=int, required=True, help=f"nnU-Net dataset id (e.g. {example_id})")
    p.add_argument("-n", "--name", required=True, help=f"dataset name (e.g. {example_name})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")


def _add_phantom_parser(sub) -> None:
    p = _command(sub, "phantom", _phantom)
    _add_new_dataset_arguments(p, 501, "CinePhantom")
    p.add_argument("--subjects", type=int, default=40, help="training subjects (default 40)")
    p.add_argument("--test-subjects", type=int, default=10, help="held-out test subjects (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="in-plane matrix size in pixels (default: phantom's)")


def _add_convert_parser(sub) -> None:
    from nnunet_ssp.convert import DATASETS

    p = _command(sub, "convert", _convert)
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument(
        "source",
        metavar="SRC",
        help="the dataset's folder (mnms: OpenDataset with Training/, Validation/, Testing/ and the CSV; "
        "mnms2: with dataset/ and dataset_information.csv; acdc: with training/ and testing/)",
    )
    _add_new_dataset_arguments(p, 511, "MnMs")
    p.add_argument(
        "--test-split",
        metavar="YAML",
        help="take the test subjects from a split file (the paper's: its test list) instead of the "
        "release's own test set; every other labelled subject becomes a training case",
    )


def _add_plans_parser(sub) -> None:
    p = _command(sub, "plans", _plans, dataset=True)
    p.add_argument(
        "--width",
        type=float,
        required=True,
        metavar="W",
        help="factor on the planned features per stage (e.g. 0.25: a 4x narrower network)",
    )
    p.add_argument(
        "-p", "--plans", default="nnUNetPlans", metavar="BASE", help="plans identifier to scale (default nnUNetPlans)"
    )


def _add_splits_parser(sub) -> None:
    p = _command(sub, "splits", _splits, dataset=True)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--budgets", nargs="+", help="labeled subjects per fold, or 'all' (nested per seed)")
    mode.add_argument(
        "--from-yaml", nargs="+", metavar="FILE", help="the paper's split files (test/train/valid YAML), one fold each"
    )
    mode.add_argument(
        "--vendors",
        nargs="+",
        metavar="V",
        help="one fold per seed with all training subjects of these vendors (subjects.csv)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds of --budgets/--vendors (default: 0)")
    p.add_argument("--val", type=int, default=None, help="validation subjects of --budgets/--vendors (default: 20%%)")
    _add_phases_argument(p, "train and validate on these phases' cases only (<subject>_ED/_ES), of the same subjects")


def _add_phases_argument(p, help_text: str) -> None:
    p.add_argument("--phases", nargs="+", choices=("ED", "ES"), metavar="PHASE", help=f"ED and/or ES: {help_text}")


def _add_test_filter_arguments(p, scope: str) -> None:
    """--vendors and --phases: which reference cases are evaluated."""
    p.add_argument("--vendors", nargs="+", metavar="V", help=f"{scope} subjects of these vendors (subjects.csv)")
    _add_phases_argument(p, f"{scope} the cases of these phases (<subject>_ED/_ES)")


def _add_evaluate_parser(sub) -> None:
    p = _command(sub, "evaluate", _evaluate, dataset=True)
    p.add_argument("prediction_folder", metavar="PRED", help="folder written by nnUNetv2_predict")
    p.add_argument("--reference", metavar="DIR", help="reference label maps (default: $nnUNet_raw/<Dataset>/labelsTs)")
    p.add_argument(
        "-tr",
        "--trainer",
        help="trainer that made the predictions (recorded; the method is what its run recorded, see -c)",
    )
    p.add_argument("-f", "--fold", help="fold of the model (recorded; budget and seed from splits_ssp.json)")
    p.add_argument(
        "-c",
        "--configuration",
        default="2d",
        help="configuration of the model (default 2d); with -tr and -f it locates the run's records (method, schedule)",
    )
    p.add_argument(
        "--tta",
        choices=("on", "off"),
        help="whether nnUNetv2_predict used test-time mirroring (recorded; default: not recorded)",
    )
    _add_test_filter_arguments(p, "evaluate only")
    p.add_argument(
        "-np",
        "--num-processes",
        type=int,
        default=None,
        metavar="N",
        help="processes for nnU-Net's Dice (default: nnU-Net's default)",
    )


def _add_predict_parser(sub) -> None:
    p = _command(sub, "predict", _predict)
    p.add_argument("-i", required=True, metavar="IMAGES", help="input folder (CASE_0000.nii.gz, ...)")
    p.add_argument(
        "--run",
        dest="runs",
        nargs=3,
        action="append",
        required=True,
        metavar=("TRAINER", "FOLD", "OUT"),
        help="a trained run and the folder for its predictions (repeat for more runs)",
    )
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", default="2d", help="configuration (default 2d)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="default cuda")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint of each run (default checkpoint_final.pth)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring")
    p.add_argument("--save_probabilities", action="store_true", help="also write the class probabilities")
    p.add_argument("--not_on_device", action="store_true", help="keep the sliding window's results off the GPU")
    p.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="skip runs whose folder is complete and predicted by the same model (not retrained, fold "
        "not re-split; and, with --evaluate, evaluated)",
    )
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="evaluate each folder as 'nnunet_ssp evaluate OUT -d D -tr TRAINER -f FOLD -c C --tta ...'",
    )
    p.add_argument(
        "--reference", metavar="DIR", help="--evaluate's reference label maps (default: $nnUNet_raw/<Dataset>/labelsTs)"
    )
    _add_test_filter_arguments(p, "--evaluate only")
    p.add_argument(
        "-np",
        "--num-processes",
        type=int,
        default=None,
        metavar="N",
        help="processes for --evaluate's nnU-Net Dice (default: nnU-Net's default)",
    )


def _add_report_parser(sub) -> None:
    p = _command(sub, "report", _report)
    p.add_argument("results", nargs="+", metavar="RESULTS", help="folders searched recursively")
    p.add_argument("-o", "--output", metavar="OUT", help="output folder (created); required unless --power")
    p.add_argument(
        "--power",
        action="store_true",
        help="print, per experiment, method and budget, the difference the design detects at 80%% power "
        "and the folds a claim of --claim-size needs; writes nothing",
    )
    p.add_argument(
        "--claim-size", type=float, metavar="D", help="the difference in 3D Dice a claim is sized for (default 0.05)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        nargs="+",
        metavar="R",
        help="--power: the training repeats per fold to size for (default 1 3 5)",
    )


def _add_results_parser(sub) -> None:
    p = _command(sub, "results", _results)
    p.add_argument("reports", nargs="+", metavar="REPORT_DIR", help="folders written by 'nnunet_ssp report -o'")
    p.add_argument("-o", "--output", required=True, metavar="FILE.md", help="the results page to write")


def _add_merge_parser(sub) -> None:
    p = _command(sub, "merge", _merge)
    _add_new_dataset_arguments(p, 600, "MnMsBoth")
    p.add_argument(
        "--from",
        dest="sources",
        nargs="+",
        required=True,
        metavar="ID",
        help="source datasets in $nnUNet_raw, by id or folder name",
    )


def _add_environment_parser(sub) -> None:
    _command(sub, "env", _env)
    _command(sub, "install-hooks", _install_hooks)
    _command(sub, "doctor", _doctor)


def _add_checkpoint_parser(sub) -> None:
    p = _command(sub, "checkpoint", _checkpoint)
    p.add_argument("path")
    p.add_argument("-d", "--dataset", help="check that it fits this dataset's plans")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-c", "--configuration", default="2d")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="nnunet_ssp", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_phantom_parser,
        _add_convert_parser,
        _add_plans_parser,
        _add_splits_parser,
        _add_evaluate_parser,
        _add_predict_parser,
        _add_report_parser,
        _add_results_parser,
        _add_merge_parser,
        _add_environment_parser,
        _add_checkpoint_parser,
    ):
        add(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = ["nnunet_ssp", *argv]  # the command line as typed, recorded in provenance
    if args.command == "phantom" and args.size is None:
        from nnunet_ssp.phantom import DEFAULT_SIZE

        args.size = DEFAULT_SIZE
    return run_command(lambda: args.run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
