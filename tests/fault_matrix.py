"""The fault matrix: every bad input of the reliability issue, through the real command line.

    python tests/fault_matrix.py [--workdir DIR] [-k SUBSTRING] [--markdown docs/faults.md]

Builds a tiny phantom workspace (``nnunet_ssp phantom`` + ``nnUNetv2_plan_and_preprocess``) in --workdir (default: a
temporary folder), runs every case in its own scratch copy of the nnU-Net folders and prints one row per case: the bad
input, the command, its exit code, what became of the outputs, and its message. A case passes when

- the exit code is non-zero;
- stderr holds no traceback and exactly one error line, which contains the expected fragments (the file and the
  problem);
- its outputs are untouched: every file and folder under the case's folders is there as before, files with the same
  size and mtime (folder mtimes aside), nothing new; cases that must write check their own invariant instead.

Exits 1 if any case fails. --markdown writes the table as docs/faults.md (temporary folders shown as ``<case>`` and
``<workspace>``), only when every case passes; tests/test_faults.py runs the same cases and compares the table with
docs/faults.md. Write failures are real where they can be: a read-only folder (run as root, the command gets no
CAP_DAC_OVERRIDE, via util-linux's setpriv, so that permissions apply); a full disk is simulated by the
``NNUNET_SSP_FAULT`` hook of nnunet_ssp.io, which makes the named atomic write fail with ENOSPC once its temporary
file is written.
"""

import argparse
import csv
import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from conftest import PHANTOM_DATASET, PHANTOM_ID, PHANTOM_PARAMETERS
from test_convert import make_source, write_acdc, write_image  # the converter tests' ACDC layout

from nnunet_ssp.workspace import phantom_workspace, workspace_env

BIN = os.path.dirname(sys.executable)
DATASET_ID, DATASET = PHANTOM_ID, PHANTOM_DATASET  # the test suite's phantom
PHANTOM_ARGS = [a for k, v in PHANTOM_PARAMETERS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
LAST_CINE = "ph004_0000.nii.gz"  # the last subject: the cache builds the others first and must discard them
# run as root, a command gets no permission override, so that a read-only folder is read-only for it too
UNPRIVILEGED = (
    ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]
    if os.geteuid() == 0
    else []
)
ERROR_LINE = re.compile(r"^(nnunet_ssp )?error: ")


# ---------------------------------------------------------------------------------------------------- workspace
@dataclass
class Workspace:
    """A phantom dataset planned and preprocessed by the stock nnU-Net CLI, and the environment that points at it."""

    root: str
    env: Dict[str, str]

    def path(self, variable: str, *parts: str) -> str:
        return os.path.join(self.env[variable], *parts)


def base_env(root: str) -> Dict[str, str]:
    """The nnU-Net folders in ``root``, one process everywhere, and one-iteration runs."""
    return workspace_env(
        root, nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", nnUNet_ssp_num_epochs="1", nnUNet_ssp_iters_per_epoch="1"
    )


def make_workspace(root: str) -> Workspace:
    """The same tiny phantom as the test suite's (4 subjects, 64 px), planned for 2d; reused when already there."""
    env = base_env(root)
    phantom_workspace(env, DATASET_ID, "E2E", **PHANTOM_PARAMETERS)
    return Workspace(root, env)


class Scratch:
    """A case's own nnU-Net folders under ``root``: a copy of the raw dataset, the plans, dataset.json and ground
    truth of the preprocessed one (or, ``shared_preprocessed``, the workspace's), an empty results folder."""

    def __init__(self, workspace: Workspace, root: str, shared_preprocessed: bool = False):
        self.root, self.workspace = root, workspace
        self.env = dict(workspace.env)
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            if not (shared_preprocessed and name == "nnUNet_preprocessed"):
                self.env[name] = os.path.join(root, name)
                os.makedirs(self.env[name])
        shutil.copytree(workspace.path("nnUNet_raw", DATASET), self.raw())
        if not shared_preprocessed:
            os.makedirs(self.preprocessed())
            for name in ("dataset.json", "nnUNetPlans.json"):
                shutil.copy(workspace.path("nnUNet_preprocessed", DATASET, name), self.preprocessed(name))
            shutil.copytree(
                workspace.path("nnUNet_preprocessed", DATASET, "gt_segmentations"),
                self.preprocessed("gt_segmentations"),
            )

    def raw(self, *parts: str) -> str:
        return os.path.join(self.env["nnUNet_raw"], DATASET, *parts)

    def preprocessed(self, *parts: str) -> str:
        return os.path.join(self.env["nnUNet_preprocessed"], DATASET, *parts)

    def file(self, *parts: str) -> str:
        """A path under the scratch folder, its parent created."""
        path = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def folder(self, name: str, mode: int = 0o755) -> str:
        """A new folder under the scratch folder (``mode`` 0o555: read-only)."""
        path = os.path.join(self.root, name)
        os.makedirs(path)
        os.chmod(path, mode)
        return path


def snapshot(root: str) -> Dict[str, tuple]:
    """Every file and folder under ``root``: (is folder, size, mtime) for files, the bare existence for folders."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            is_dir = stat.S_ISDIR(st.st_mode)
            entries[os.path.relpath(os.path.join(folder, name), root)] = (
                (True,) if is_dir else (False, st.st_size, st.st_mtime_ns)
            )
    return entries


# -------------------------------------------------------------------------------------------------- bad inputs
def _rewrite_cine(path: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """Rewrites a 4D cine with ``change`` applied to its (T, Z, Y, X) float32 voxels, geometry kept."""
    image = sitk.ReadImage(path)
    changed = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image).astype(np.float32)), isVector=False)
    changed.CopyInformation(image)
    sitk.WriteImage(changed, path, True)


def _set_voxels(value):
    """Sets 4 x 4 voxels of the first slice (and frame) to ``value``."""

    def change(array):
        array[(0,) * (array.ndim - 2) + (slice(4), slice(4))] = value
        return array

    return change


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _flip_bytes(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    open(path, "wb").write(bytes(data))


def _text(path: str) -> None:
    open(path, "w").write("this is not an image\n")


def _image_2d(path: str) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((64, 64), np.float32)), path)


def _image_5d(path: str) -> None:
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((48, 48, 6, 5, 2), dtype=np.float32), np.eye(4)), path)


def _edit_csv(path: str, subject: str, column: str, value) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["subject"] == subject:
            row[column] = str(value)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


class _Payload:
    """Unpickled without weights_only, it would create ``marker``: the proof that no code ran is its absence."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _malicious(path: str, marker: str, content: dict) -> None:
    import torch

    torch.save({**content, "payload": _Payload(marker)}, path)


# ---- ssp_pretrain
def pretrain_command(*extra: str, method: str = "mim", epochs: int = 1) -> List[str]:
    """A tiny ssp_pretrain run on the phantom (options in ``extra`` come last and win)."""
    return [
        "ssp_pretrain",
        "-d",
        str(DATASET_ID),
        "--method",
        method,
        "--epochs",
        str(epochs),
        "--iters-per-epoch",
        "1",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--probe-slices",
        "0",
        "--device",
        "cpu",
        *extra,
    ]


def _pretrain_with(change: Callable[[str], None], *extra: str, method: str = "mim"):
    """ssp_pretrain after ``change(path of the last cine)``."""

    def prepare(s: Scratch) -> List[str]:
        change(s.raw("cineTr", LAST_CINE))
        return pretrain_command(*extra, method=method)

    return prepare


def _pretrain_empty_data(s: Scratch) -> List[str]:
    return pretrain_command("--data", s.folder("empty"))


def _pretrain_empty_cine_folder(s: Scratch) -> List[str]:
    for name in os.listdir(s.raw("cineTr")):
        os.remove(s.raw("cineTr", name))
    return pretrain_command()


def _pretrain_es_frame(s: Scratch) -> List[str]:
    _edit_csv(s.raw("subjects.csv"), "ph004", "es_frame", 99)
    return pretrain_command()


def _pretrain_malicious_state(s: Scratch) -> List[str]:
    output = s.folder("ssp_out")
    _malicious(
        os.path.join(output, "checkpoint_latest.pth"), s.file("payload_ran"), {"format": "nnunet_ssp.pretrain_state"}
    )
    return pretrain_command("-o", output, "--continue")


def _pretrain_read_only(s: Scratch) -> List[str]:
    return pretrain_command("-o", os.path.join(s.folder("locked", 0o555), "out"))


def _pretrain_disk_full(s: Scratch) -> List[str]:
    s.env["NNUNET_SSP_FAULT"] = "write:checkpoint_latest.pth#2=ENOSPC"
    return pretrain_command("-o", os.path.join(s.root, "ssp_out"), epochs=2)


def _last_good_checkpoint_kept(s: Scratch) -> Tuple[bool, str]:
    """After a failed write of epoch 2's state: epoch 1's intact, no temporary file left."""
    import torch

    output = os.path.join(s.root, "ssp_out")
    state = torch.load(os.path.join(output, "checkpoint_latest.pth"), weights_only=True)
    leftovers = [f for f in os.listdir(output) if ".tmp" in f]
    return state["epoch"] == 1 and not leftovers, "last good checkpoint kept"


# ---- nnunet_ssp convert (ACDC layout)
def _acdc(s: Scratch, change: Callable[[str, object], None]):
    """An ACDC folder with one subject, ``change(subject folder, source)`` applied; the convert command line."""
    source = make_source(1, "patient001", "train", "A", "DCM")
    root = s.folder("acdc")
    write_acdc(root, [source])
    change(os.path.join(root, "training", "patient001"), source)
    return ["nnunet_ssp", "convert", "acdc", root, "-d", "701", "-n", "Bad"]


def _frame_file(folder: str, frame: int, suffix: str = "") -> str:
    return os.path.join(folder, f"patient001_frame{frame + 1:02d}{suffix}.nii.gz")


def _convert_with(change: Callable[[str, object], None]):
    return lambda s: _acdc(s, change)


def _ed_image(change: Callable[[np.ndarray], np.ndarray]):
    """Rewrites the ED image with ``change`` applied to its float32 voxels."""

    def rewrite(folder, source):
        write_image(change(source.cine[source.ed].astype(np.float32)), source, _frame_file(folder, source.ed))

    return rewrite


def _labels_outside(folder, source) -> None:
    labels = source.labels[source.ed].copy()
    labels[0, 0, 0] = 7
    write_image(labels, source, _frame_file(folder, source.ed, "_gt"))


def _labels_other_geometry(folder, source) -> None:
    write_image(
        source.labels[source.ed],
        dataclasses.replace(source, spacing=(2.0, 2.0, 10.0)),
        _frame_file(folder, source.ed, "_gt"),
    )


def _ed_beyond_frames(folder, source) -> None:
    for suffix in ("", "_gt"):
        shutil.copy(_frame_file(folder, source.ed, suffix), _frame_file(folder, 98, suffix))
    info = os.path.join(folder, "Info.cfg")
    text = open(info).read().replace(f"ED: {source.ed + 1}\n", "ED: 99\n")
    open(info, "w").write(text)


def _convert_empty(s: Scratch) -> List[str]:
    root = s.folder("acdc")
    for split in ("training", "testing"):
        os.makedirs(os.path.join(root, split))
    return ["nnunet_ssp", "convert", "acdc", root, "-d", "701", "-n", "Bad"]


def _convert_read_only(s: Scratch) -> List[str]:
    command = _acdc(s, lambda folder, source: None)
    s.env["nnUNet_raw"] = s.folder("locked", 0o555)
    return command


# ---- nnunet_ssp phantom / splits / report
PHANTOM = ["nnunet_ssp", "phantom", "-d", "702", "-n", "New", *PHANTOM_ARGS]
SPLITS = ["nnunet_ssp", "splits", "-d", str(DATASET_ID), "--budgets", "1", "2"]


def _without(variable: str, command: List[str]):
    def prepare(s: Scratch) -> List[str]:
        del s.env[variable]
        return command

    return prepare


def _phantom_read_only(s: Scratch) -> List[str]:
    s.env["nnUNet_raw"] = s.folder("locked", 0o555)
    return PHANTOM


def _splits_unplanned(s: Scratch) -> List[str]:
    for name in ("dataset.json", "nnUNetPlans.json"):
        os.remove(s.preprocessed(name))
    return SPLITS


def _splits_disk_full(s: Scratch) -> List[str]:
    s.env["NNUNET_SSP_FAULT"] = "write:splits_final.json=ENOSPC"
    return SPLITS


def _report_empty(s: Scratch) -> List[str]:
    return ["nnunet_ssp", "report", s.folder("evaluated"), "-o", os.path.join(s.root, "report")]


# ---- nnUNetv2_train with an SSP checkpoint
def _contract_checkpoint(s: Scratch, path: str, method: str = "mim", edit_plans=None, channels: int = 1) -> str:
    """A contract checkpoint for the workspace's plans, edited by ``edit_plans(architecture dict)``, with
    ``channels`` input channels."""
    import torch

    from nnunet_ssp.checkpoint import save_checkpoint
    from nnunet_ssp.network import PlannedConfiguration
    from pretraining.methods import METHODS

    plans = json.load(open(s.workspace.path("nnUNet_preprocessed", DATASET, "nnUNetPlans.json")))
    dataset_json = json.load(open(s.workspace.path("nnUNet_preprocessed", DATASET, "dataset.json")))
    dataset_json["channel_names"] = {str(c): "cineMRI" for c in range(channels)}
    if edit_plans:
        edit_plans(plans["configurations"]["2d"]["architecture"])
    target = PlannedConfiguration(plans, "2d", dataset_json)
    torch.manual_seed(0)
    save_checkpoint(path, target.network_spec.build(num_output_channels=1), target, method, METHODS[method].parts)
    return path


def _wider(architecture: dict) -> None:
    architecture["arch_kwargs"]["features_per_stage"][-1] *= 2


def _residual(architecture: dict) -> None:
    architecture["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kwargs = architecture["arch_kwargs"]
    del kwargs["n_conv_per_stage"]
    kwargs["n_blocks_per_stage"] = [1] + [2] * (kwargs["n_stages"] - 1)


def _train_with(make: Callable[[Scratch, str], None], trainer: str = "nnUNetTrainerMIM"):
    """nnUNetv2_train -tr ``trainer`` with nnUNet_ssp_checkpoint = the file ``make(scratch, path)`` writes."""

    def prepare(s: Scratch) -> List[str]:
        path = s.file("ssp", "checkpoint.pth")
        make(s, path)
        s.env["nnUNet_ssp_checkpoint"] = path
        return ["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", "cpu"]

    return prepare


def _truncated_checkpoint(s: Scratch, path: str) -> None:
    _contract_checkpoint(s, path)
    _truncate(path)


def _nnunet_style_checkpoint(s: Scratch, path: str) -> None:
    import torch

    torch.save({"network_weights": {"encoder.x": torch.zeros(2)}, "current_epoch": 5}, path)


# ------------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str  # the bad input
    prepare: Callable[[Scratch], List[str]]  # makes it in a scratch copy; returns the command line
    expect: Tuple[str, ...]  # fragments of the one-line message
    check: Optional[Callable[[Scratch], Tuple[bool, str]]] = None  # instead of "untouched": (ok, what it checked)
    shared_preprocessed: bool = False  # nnUNetv2_train needs the preprocessed data, which it only reads
    unprivileged: bool = False  # runs without permission override (see UNPRIVILEGED)


CASES = [
    # ssp_pretrain: data, options, environment, outputs
    Case("truncated NIfTI (cine)", _pretrain_with(_truncate), (LAST_CINE, "truncated")),
    Case("corrupt NIfTI (flipped bytes)", _pretrain_with(_flip_bytes), (LAST_CINE, "corrupt")),
    Case("non-image file (cine)", _pretrain_with(_text), (LAST_CINE, "not a readable image")),
    Case("2D image where a 3D/4D cine is expected", _pretrain_with(_image_2d), (LAST_CINE, "not 2D")),
    Case("5D image (cine)", _pretrain_with(_image_5d), (LAST_CINE, "not 5D")),
    Case(
        "NaN voxels (cine)",
        _pretrain_with(lambda p: _rewrite_cine(p, _set_voxels(np.nan))),
        (LAST_CINE, "16 NaN voxel(s)"),
    ),
    Case(
        "Inf voxels (cine)",
        _pretrain_with(lambda p: _rewrite_cine(p, _set_voxels(np.inf))),
        (LAST_CINE, "16 infinite voxel(s)"),
    ),
    Case(
        "constant image (cine)",
        _pretrain_with(lambda p: _rewrite_cine(p, lambda a: np.full_like(a, 100.0))),
        (LAST_CINE, "frame 0", "constant image"),
    ),
    Case("ES frame index beyond the cine's frames", _pretrain_es_frame, ("subjects.csv", "es_frame 99", "ph004")),
    Case("empty data folder (--data)", _pretrain_empty_data, ("empty", "no *.nii.gz images")),
    Case("empty data folder (cineTr)", _pretrain_empty_cine_folder, ("cineTr", "no *.nii.gz cine files")),
    Case(
        "fewer slices than one batch",
        _pretrain_with(lambda p: None, "--batch-size", "100000"),
        (DATASET, "fewer than one batch of 100000"),
    ),
    Case("unknown method", lambda s: pretrain_command(method="byol"), ("--method", "invalid choice: 'byol'")),
    Case(
        "missing env variable (ssp_pretrain)",
        _without("nnUNet_preprocessed", pretrain_command()),
        ("nnUNet_preprocessed is not set",),
    ),
    Case(
        "missing plans (ssp_pretrain)",
        _pretrain_with(lambda p: None, "-p", "missingPlans"),
        ("missingPlans.json", "plans not found"),
    ),
    Case(
        "pickle that would run code (--continue)",
        _pretrain_malicious_state,
        ("checkpoint_latest.pth", "refused to load"),
    ),
    Case(
        "no write permission (ssp_pretrain -o)",
        _pretrain_read_only,
        ("out", "cannot write", "Permission denied"),
        unprivileged=True,
    ),
    Case(
        "full disk (checkpoint write)",
        _pretrain_disk_full,
        ("checkpoint_latest.pth", "cannot write", "No space left on device"),
        check=_last_good_checkpoint_kept,
    ),
    # nnunet_ssp convert acdc
    Case(
        "truncated NIfTI (convert)",
        _convert_with(lambda d, s: _truncate(os.path.join(d, "patient001_4d.nii.gz"))),
        ("patient001_4d.nii.gz", "cannot read image"),
    ),
    Case(
        "non-image file (convert)",
        _convert_with(lambda d, s: _text(_frame_file(d, s.ed))),
        ("patient001_frame", "cannot read image"),
    ),
    Case(
        "2D image where 4D is expected (convert)",
        _convert_with(lambda d, s: _image_2d(os.path.join(d, "patient001_4d.nii.gz"))),
        ("patient001_4d.nii.gz", "expected a 4D image"),
    ),
    Case(
        "5D image (convert)",
        _convert_with(lambda d, s: _image_5d(os.path.join(d, "patient001_4d.nii.gz"))),
        ("patient001_4d.nii.gz", "expected a 4D image"),
    ),
    Case("NaN voxels (convert)", _convert_with(_ed_image(_set_voxels(np.nan))), ("patient001_frame", "16 NaN")),
    Case(
        "constant image (convert)",
        _convert_with(_ed_image(lambda a: np.full_like(a, 100.0))),
        ("patient001_frame", "constant image"),
    ),
    Case("label values outside dataset.json", _convert_with(_labels_outside), ("_gt.nii.gz", "label values 7")),
    Case(
        "image and label with other geometry", _convert_with(_labels_other_geometry), ("_gt.nii.gz", "affine differs")
    ),
    Case(
        "ED frame index beyond the cine's frames",
        _convert_with(_ed_beyond_frames),
        ("patient001_4d.nii.gz", "ED frame 98", "outside"),
    ),
    Case("empty data folder (convert)", _convert_empty, ("acdc", "no acdc subjects found")),
    Case(
        "no write permission (convert)",
        _convert_read_only,
        ("Dataset701_Bad", "cannot write", "Permission denied"),
        unprivileged=True,
    ),
    # nnunet_ssp phantom, splits, report
    Case("missing env variable (phantom)", _without("nnUNet_raw", PHANTOM), ("nnUNet_raw is not set",)),
    Case(
        "no write permission (phantom)",
        _phantom_read_only,
        ("Dataset702_New", "cannot write", "Permission denied"),
        unprivileged=True,
    ),
    Case("missing env variable (splits)", _without("nnUNet_preprocessed", SPLITS), ("nnUNet_preprocessed is not set",)),
    Case("missing plans (splits)", _splits_unplanned, (DATASET, "not preprocessed")),
    Case("full disk (splits)", _splits_disk_full, ("splits_final.json", "No space left on device")),
    Case("empty data folder (report)", _report_empty, ("evaluated", "no evaluated prediction folder")),
    # nnUNetv2_train: the trainers' checkpoint loading
    Case(
        "checkpoint for other plans",
        _train_with(lambda s, p: _contract_checkpoint(s, p, edit_plans=_wider)),
        ("checkpoint.pth", "other plans", "features_per_stage"),
        shared_preprocessed=True,
    ),
    Case(
        "checkpoint of another architecture",
        _train_with(lambda s, p: _contract_checkpoint(s, p, edit_plans=_residual)),
        ("checkpoint.pth", "network_class_name"),
        shared_preprocessed=True,
    ),
    Case(
        "checkpoint for another input-channel count",
        _train_with(lambda s, p: _contract_checkpoint(s, p, channels=2)),
        ("checkpoint.pth", "num_input_channels 2 vs 1"),
        shared_preprocessed=True,
    ),
    Case(
        "file that is not a contract checkpoint",
        _train_with(_nnunet_style_checkpoint),
        ("checkpoint.pth", "not an nnunet_ssp checkpoint"),
        shared_preprocessed=True,
    ),
    Case(
        "truncated checkpoint",
        _train_with(_truncated_checkpoint),
        ("checkpoint.pth", "not a readable PyTorch checkpoint"),
        shared_preprocessed=True,
    ),
    Case(
        "pickle that would run code (trainer)",
        _train_with(lambda s, p: _malicious(p, s.file("payload_ran"), {"format": "nnunet_ssp.checkpoint"})),
        ("checkpoint.pth", "refused to load"),
        shared_preprocessed=True,
    ),
    Case(
        "checkpoint of another method",
        _train_with(_contract_checkpoint, trainer="nnUNetTrainerDINO"),
        ("checkpoint.pth", "pretrained with 'mim'", "nnUNetTrainerDINO fine-tunes from 'dino' checkpoints"),
        shared_preprocessed=True,
    ),
]


# ------------------------------------------------------------------------------------------------------ running
@dataclass
class Row:
    case: str
    command: str
    exit_code: int
    outputs: str
    message: str
    passed: bool
    seconds: float


def _message(case: Case, stderr: str) -> Tuple[str, bool]:
    """The message and whether it is one line with the expected fragments (and no traceback)."""
    lines = [line for line in stderr.splitlines() if ERROR_LINE.match(line)]
    message = lines[0] if lines else (stderr.strip().splitlines() or ["(no message)"])[-1]
    return message, len(lines) == 1 and "Traceback" not in stderr and all(f in message for f in case.expect)


def run_case(workspace: Workspace, case: Case, folder: str) -> Row:
    """Runs one case in ``folder`` (created) and judges it."""
    scratch = Scratch(workspace, folder, case.shared_preprocessed)
    argv = case.prepare(scratch)
    before = snapshot(scratch.root)
    start = time.perf_counter()
    result = subprocess.run(
        (UNPRIVILEGED if case.unprivileged else []) + [os.path.join(BIN, argv[0]), *argv[1:]],
        env=scratch.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    message, clear = _message(case, result.stderr)
    if case.check is not None:
        kept, outputs = case.check(scratch)
    else:
        kept = snapshot(scratch.root) == before
        outputs = "untouched" if kept else "CHANGED"
    exit_ok = result.returncode != 0
    for root, short in ((scratch.root, "<case>"), (workspace.root, "<workspace>")):
        message = message.replace(root, short)
    return Row(
        case.name,
        " ".join(argv[:2] if argv[0] == "nnunet_ssp" else argv[:1]),
        result.returncode,
        outputs if kept else f"{outputs} (FAIL)",
        message,
        exit_ok and clear and kept,
        seconds,
    )


def format_table(rows: List[Row]) -> str:
    header = ("bad input", "command", "exit", "outputs", "result", "message (one line)")
    cells = [(r.case, r.command, str(r.exit_code), r.outputs, "pass" if r.passed else "FAIL", r.message) for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header) - 1)]

    def line(values):
        return " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " | " + values[-1]

    return "\n".join([line(header), "-+-".join("-" * w for w in widths) + "-+-" + "-" * 18, *map(line, cells)])


MARKDOWN_INTRO = """# Fault matrix

> Regenerated by `python tests/fault_matrix.py --markdown docs/faults.md`: do not edit by hand. tests/test_faults.py
> runs the same cases and fails when this table differs from what they print.

Every bad input of `tests/fault_matrix.py`, through the real command on a tiny phantom workspace. In every row the
command exits non-zero, prints no traceback and exactly one error line, which names the file and the problem, and
leaves its outputs untouched (every file as before, nothing new) or, where the outputs column says so, as the case
requires. `<case>` stands for the case's temporary folder, `<workspace>` for the phantom workspace's.
"""


def _code(text: str) -> str:
    """``text`` as a Markdown code span in a table cell: pipes escaped, fenced by two backticks if it has one."""
    span = f"`` {text} ``" if "`" in text else f"`{text}`"
    return span.replace("|", "\\|")


def format_markdown(rows: List[Row]) -> str:
    """The rows as docs/faults.md: bad input, command, exit code, outputs, message."""
    lines = ["| bad input | command | exit code | outputs | message |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r.case} | `{r.command}` | {r.exit_code} | {r.outputs} | {_code(r.message)} |" for r in rows]
    return MARKDOWN_INTRO + "\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="workspace and scratch folders (default: a new temporary folder)")
    parser.add_argument("-k", dest="only", help="run only the cases whose name contains this")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as Markdown (docs/faults.md) if all pass")
    args = parser.parse_args(argv)
    if args.markdown and args.only:
        parser.error("--markdown documents every case: not with -k")
    workdir = args.workdir or tempfile.mkdtemp(prefix="fault_matrix_")
    workspace = make_workspace(os.path.join(workdir, "workspace"))
    rows = []
    for case in (c for c in CASES if not args.only or args.only in c.name):
        folder = os.path.join(workdir, "cases", re.sub(r"\W+", "_", case.name).strip("_"))
        shutil.rmtree(folder, ignore_errors=True)  # of an earlier run in the same --workdir
        rows.append(run_case(workspace, case, folder))
        print(f"{'pass' if rows[-1].passed else 'FAIL'} {rows[-1].seconds:5.1f} s  {case.name}", file=sys.stderr)
    print(format_table(rows))
    failed = [r.case for r in rows if not r.passed]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} cases pass" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    if args.markdown and not failed:
        with open(args.markdown, "w", encoding="utf-8", newline="\n") as f:
            f.write(format_markdown(rows))
        print(f"wrote {args.markdown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
