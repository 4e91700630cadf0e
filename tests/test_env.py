"""Trainer discovery through nnUNet_extTrainer, the torchvision guard, and `nnunet_ssp env/doctor`."""

import os
import subprocess
import sys

import pytest

from nnunet_ssp import torchvision_guard
from nnunet_ssp.env import ext_trainer_value, guard_pth_path
from trainers import EXT_TRAINER_DIR
from trainers.ssp_trainers import ALL_TRAINERS


def test_shim_folder_only_re_exports_classes_defined_in_the_package():
    modules = [f for f in os.listdir(EXT_TRAINER_DIR) if f.endswith(".py")]
    assert modules == ["nnunet_ssp_trainers.py"] and not os.path.exists(os.path.join(EXT_TRAINER_DIR, "__init__.py"))
    assert all(t.__module__ in ("trainers.base", "trainers.ssp_trainers") for t in ALL_TRAINERS)


def test_stock_lookup_finds_every_trainer_in_a_fresh_interpreter():
    names = [t.__name__ for t in ALL_TRAINERS]
    code = (
        "import pickle\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        f"for name in {names!r}:\n"
        "    cls = find(name)\n"
        "    assert pickle.loads(pickle.dumps(cls)) is cls\n"  # picklable for spawn and DDP
        "    print('FOUND', name, cls.__module__)\n"
    )
    env = dict(os.environ, nnUNet_extTrainer=EXT_TRAINER_DIR)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line.split()[1] for line in out.stdout.splitlines() if line.startswith("FOUND")] == names


def test_ext_trainer_value_puts_ours_first_and_keeps_others():
    assert ext_trainer_value(None) == EXT_TRAINER_DIR
    assert ext_trainer_value(os.pathsep.join(["/a", EXT_TRAINER_DIR, "/b"])) == os.pathsep.join(
        [EXT_TRAINER_DIR, "/a", "/b"]
    )


@pytest.mark.parametrize("importable", [True, False])
def test_guard_acts_only_when_torchvision_fails(monkeypatch, capsys, importable):
    monkeypatch.setattr(torchvision_guard, "torchvision_importable", lambda: importable)
    guard = torchvision_guard._PrimusTrainersGuard()
    monkeypatch.setattr(sys, "meta_path", [guard] + sys.meta_path)
    assert guard.find_spec("some.other.module", None) is None and guard in sys.meta_path
    spec = guard.find_spec(torchvision_guard.GUARDED_MODULE, None)
    assert guard not in sys.meta_path  # one-shot
    if importable:
        assert spec is None and capsys.readouterr().err == ""
    else:
        assert spec is not None and "torchvision cannot be imported" in capsys.readouterr().err


def test_setup_installed_the_guard_hook_and_env_prints_the_export_line():
    assert os.path.isfile(guard_pth_path())
    out = subprocess.run(["nnunet_ssp", "env"], capture_output=True, text=True, check=True).stdout
    assert f"export nnUNet_extTrainer={EXT_TRAINER_DIR}" in out.splitlines()[0]


def test_doctor_reports_problems_and_passes_when_set_up(nnunet_env, tmp_path):
    env = dict(os.environ, nnUNet_extTrainer=EXT_TRAINER_DIR)
    ok = subprocess.run(["nnunet_ssp", "doctor"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "finds -tr nnUNetTrainerMIM" in ok.stdout and "PROBLEM" not in ok.stdout
    env.pop("nnUNet_results")
    env["nnUNet_extTrainer"] = str(tmp_path)
    bad = subprocess.run(["nnunet_ssp", "doctor"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "nnUNet_results is not set" in bad.stdout and "does not list the plugin's trainers" in bad.stdout
    assert "cannot find -tr nnUNetTrainerBaseline" in bad.stdout
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
