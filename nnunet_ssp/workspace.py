"""A phantom workspace: nnU-Net's three folders under one root, holding a phantom dataset planned and preprocessed by
the stock CLIs (``nnunet_ssp phantom``, ``nnUNetv2_plan_and_preprocess``). The test suite, the fault matrix and the
benchmarks all make theirs here."""

import os
import subprocess
import sys
from typing import Dict, Mapping, Optional

from nnunet_ssp.env import EXT_TRAINER_ENV, NNUNET_PATH_ENVS, ext_trainer_value
from nnunet_ssp.io import FAULT_ENV

# settings a workspace never inherits: a pinned SSP checkpoint or a test fault point would change every run in it
_NOT_INHERITED = ("nnUNet_ssp_checkpoint", FAULT_ENV)


def workspace_env(root: str, base: Optional[Mapping[str, str]] = None, **settings: str) -> Dict[str, str]:
    """``base`` (default: this process's environment) with nnUNet_raw, nnUNet_preprocessed and nnUNet_results in
    ``root`` (created), the plugin's trainers on nnUNet_extTrainer, torch.compile off, and ``settings`` on top."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _NOT_INHERITED}
    env[EXT_TRAINER_ENV] = ext_trainer_value(env.get(EXT_TRAINER_ENV))
    env["nnUNet_compile"] = "false"
    for name in NNUNET_PATH_ENVS:
        env[name] = os.path.join(os.path.abspath(root), name)
        os.makedirs(env[name], exist_ok=True)
    env.update(settings)
    return env


def _run(command, env: Mapping[str, str]) -> None:
    """Runs a console script of this environment; on failure raises with the end of its output."""
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), command[0]), *command[1:]],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )


def phantom_workspace(
    env: Mapping[str, str],
    dataset_id: int,
    name: str,
    subjects: int,
    test_subjects: int = 1,
    size: int = 64,
    seed: int = 0,
    processes: int = 1,
) -> str:
    """Writes the phantom ``Dataset{dataset_id:03d}_{name}`` into ``env``'s nnUNet_raw and plans and preprocesses it
    (2d, with nnU-Net's dataset integrity check) with ``processes`` processes, unless its plans are already there.
    Returns the dataset's folder name."""
    dataset = f"Dataset{dataset_id:03d}_{name}"
    if not os.path.isfile(os.path.join(env["nnUNet_preprocessed"], dataset, "nnUNetPlans.json")):
        _run(
            [
                "nnunet_ssp",
                "phantom",
                "-d",
                str(dataset_id),
                "-n",
                name,
                "--subjects",
                str(subjects),
                "--test-subjects",
                str(test_subjects),
                "--size",
                str(size),
                "--seed",
                str(seed),
            ],
            env,
        )
        # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA)
        _run(
            [
                "nnUNetv2_plan_and_preprocess",
                "-d",
                str(dataset_id),
                "-c",
                "2d",
                "-np",
                str(processes),
                "-npfp",
                str(processes),
                "--verify_dataset_integrity",
            ],
            dict(env, nnUNet_n_proc_DA=str(processes)),
        )
    return dataset
