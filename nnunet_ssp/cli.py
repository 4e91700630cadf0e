"""``nnunet_ssp``: the plugin's user-facing subcommands."""
import argparse
import os
import sys

from nnunet_ssp.errors import SSPError, run_command


def _phantom(args):
    from nnunet_ssp.phantom import write_phantom_dataset
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise SSPError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (see README)")
    path = write_phantom_dataset(raw, args.dataset_id, args.name, args.subjects, args.test_subjects,
                                 seed=args.seed, size=args.size, overwrite=args.overwrite)
    print(path)


def _convert(args):
    from nnunet_ssp.convert import convert_dataset
    print(convert_dataset(args.dataset, args.source, args.dataset_id, args.name, overwrite=args.overwrite))


def _env(args):
    from nnunet_ssp.env import env_lines
    print("\n".join(env_lines()))


def _install_hooks(args):
    from nnunet_ssp.env import install_hooks
    print(f"installed {install_hooks()}")


def _doctor(args):
    from nnunet_ssp.env import doctor
    checks = doctor()
    for ok, message in checks:
        print(f"{'ok     ' if ok else 'PROBLEM'}  {message}")
    problems = sum(not ok for ok, _ in checks)
    if problems:
        raise SSPError(f"{problems} problem(s) found; fix them as described above")


def _checkpoint(args):
    from nnunet_ssp.checkpoint import load_checkpoint, verify_checkpoint
    from nnunet_ssp.methods import parts_of_method
    from nnunet_ssp.network import PlansTarget
    ckpt = load_checkpoint(args.path)
    tensors = ckpt["network_weights"]
    print(f"{args.path}: method {ckpt['method']}, parts {'+'.join(ckpt['parts'])}, {len(tensors)} tensors, "
          f"{sum(t.numel() for t in tensors.values()):,} values")
    print(f"  plans: {ckpt['plans']}")
    print(f"  pretraining: {ckpt.get('pretraining')}")
    print(f"  data: {ckpt.get('data')}")
    print(f"  versions: {ckpt.get('versions')}, created {ckpt.get('created')}")
    if args.dataset:
        target = PlansTarget.from_preprocessed(args.dataset, args.plans, args.configuration)
        for warning in verify_checkpoint(ckpt, target, parts_of_method(ckpt["method"]), args.path):
            print(f"  warning: {warning}")
        print(f"  fits {target.plans_name} {target.configuration} of {target.dataset_name}")


def _splits(args):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_ssp.network import preprocessed_dataset_folder
    from nnunet_ssp.splits import write_budget_splits
    folder = preprocessed_dataset_folder(args.dataset)
    gt = os.path.join(folder, "gt_segmentations")
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        raise SSPError(f"{folder}: not preprocessed; run nnUNetv2_plan_and_preprocess -d {args.dataset} first")
    ending = load_json(os.path.join(folder, "dataset.json"))["file_ending"]
    cases = [f[:-len(ending)] for f in sorted(os.listdir(gt)) if f.endswith(ending)] if os.path.isdir(gt) else []
    if not cases:
        raise SSPError(f"{gt}: no training cases; run nnUNetv2_plan_and_preprocess first")
    budgets = [b if b == "all" else int(b) for b in args.budgets]
    folds = write_budget_splits(folder, cases, budgets, args.seeds, args.val)
    for index, d in folds.items():
        print(f"fold {index}: budget {d['budget']}, seed {d['seed']}: {len(d['subjects'])} subjects")
    print(os.path.join(folder, "splits_final.json"))


def _evaluate(args):
    from nnunet_ssp.evaluation.evaluate import evaluate_predictions, summary_lines
    evaluation, dice = evaluate_predictions(args.prediction_folder, args.dataset, args.reference, args.trainer,
                                            args.fold, args.vendors, args.num_processes)
    print("\n".join(summary_lines(evaluation, dice)))


def _report(args):
    from nnunet_ssp.evaluation.report import write_report
    table, paths = write_report(args.results, args.output)
    print(table)
    print("\n".join(paths))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet_ssp", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic cine CMR dataset to $nnUNet_raw/DatasetID_NAME")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (e.g. 501)")
    p.add_argument("-n", "--name", required=True, help="dataset name (e.g. CinePhantom)")
    p.add_argument("--subjects", type=int, default=40, help="training subjects (default 40)")
    p.add_argument("--test-subjects", type=int, default=10, help="held-out test subjects (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="in-plane matrix size in pixels (default: phantom's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.set_defaults(run=_phantom)

    from nnunet_ssp.convert import DATASETS
    p = sub.add_parser("convert", help="convert M&Ms, M&Ms-2 or ACDC to $nnUNet_raw/DatasetID_NAME (phantom layout)",
                       description="Converts a public cardiac cine dataset, as distributed, to an nnU-Net raw dataset "
                                   "in the phantom's layout; see nnunet_ssp/convert/__init__.py for SRC and splits.")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("source", metavar="SRC",
                   help="the dataset's folder (mnms: OpenDataset with Training/, Validation/, Testing/ and the CSV; "
                        "mnms2: with dataset/ and dataset_information.csv; acdc: with training/ and testing/)")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (e.g. 511)")
    p.add_argument("-n", "--name", required=True, help="dataset name (e.g. MnMs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.set_defaults(run=_convert)

    p = sub.add_parser("splits", help="write label-budget folds (nested per seed) into splits_final.json")
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    p.add_argument("--budgets", nargs="+", required=True, help="labeled subjects per fold, or 'all'")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--val", type=int, default=None, help="validation subjects (default: 20%%)")
    p.set_defaults(run=_splits)

    p = sub.add_parser("evaluate", help="3D Dice (nnU-Net's evaluation), HD95 and clinical measures of predictions",
                       description="Evaluates a folder written by nnUNetv2_predict: nnU-Net's Dice into "
                                   "PRED/summary.json; HD95, ventricular volumes, EF and myocardial mass into "
                                   "PRED/ssp_evaluation.json.")
    p.add_argument("prediction_folder", metavar="PRED", help="folder written by nnUNetv2_predict")
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    p.add_argument("--reference", metavar="DIR", help="reference label maps (default: $nnUNet_raw/<Dataset>/labelsTs)")
    p.add_argument("-tr", "--trainer", help="trainer that made the predictions (recorded, gives the method)")
    p.add_argument("-f", "--fold", help="fold of the model (recorded; budget and seed from splits_ssp.json)")
    p.add_argument("--vendors", nargs="+", metavar="V", help="evaluate only subjects of these vendors (subjects.csv)")
    p.add_argument("-np", "--num-processes", type=int, default=None, metavar="N",
                   help="processes for nnU-Net's Dice (default: nnU-Net's default)")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("report", help="paper-style tables, tests and figures from evaluated prediction folders",
                       description="Collects every folder evaluated by 'nnunet_ssp evaluate' under RESULTS and "
                                   "writes report.md, CSV files and figures to OUT.")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="folders searched recursively")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created)")
    p.set_defaults(run=_report)

    p = sub.add_parser("env", help="print the export line that lets nnUNetv2_* find the plugin's trainers")
    p.set_defaults(run=_env)
    p = sub.add_parser("install-hooks", help="install the torchvision guard into this Python environment")
    p.set_defaults(run=_install_hooks)
    p = sub.add_parser("doctor", help="check nnU-Net, paths, trainer discovery and torchvision")
    p.set_defaults(run=_doctor)

    p = sub.add_parser("checkpoint", help="show an SSP checkpoint and optionally check it against plans")
    p.add_argument("path")
    p.add_argument("-d", "--dataset", help="check that it fits this dataset's plans")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-c", "--configuration", default="2d")
    p.set_defaults(run=_checkpoint)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "phantom" and args.size is None:
        from nnunet_ssp.phantom import DEFAULT_SIZE
        args.size = DEFAULT_SIZE
    return run_command(lambda: args.run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
