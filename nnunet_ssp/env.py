"""Environment set-up and checks: ``nnunet_ssp env``, ``nnunet_ssp install-hooks`` and ``nnunet_ssp doctor``, and the
plugin's trainers as nnU-Net finds them."""

import contextlib
import functools
import importlib.util
import io
import os
import shlex
import subprocess
import sys
import sysconfig
from importlib import metadata

from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import atomic_path

EXT_TRAINER_ENV = "nnUNet_extTrainer"
NNUNET_PATH_ENVS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
GUARD_PTH = "nnunet_ssp_torchvision_guard.pth"
GUARD_PTH_LINE = (
    "import importlib.util as _u; _u.find_spec('nnunet_ssp') and "
    "__import__('nnunet_ssp.torchvision_guard').torchvision_guard.install()\n"
)
SUPPORTED_NNUNET = ((2, 8, 1), (2, 9, 0))
#: the base trainers users pass to ``nnUNetv2_train -tr`` (``trainers.ssp_trainers.BASE_TRAINERS``, named here since
#: the core never imports the trainers): ``doctor`` checks that nnU-Net's lookup finds them (their variants live in
#: the same module)
PUBLIC_TRAINERS = (
    "nnUNetTrainerBaseline",
    "nnUNetTrainerSSP",
    "nnUNetTrainerSimCLR",
    "nnUNetTrainerPCL",
    "nnUNetTrainerDINO",
    "nnUNetTrainerMIM",
)


def nnunet_path(name: str, why: str = "") -> str:
    """The folder in ``name`` (one of NNUNET_PATH_ENVS), read through ``nnunetv2.paths``; an SSPError saying how to
    set it when it is not set (``why``: what needs it)."""
    import nnunetv2.paths

    value = getattr(nnunetv2.paths, name).get()
    if not value:
        needed = f" ({why})" if why else ""
        raise SSPError(
            f"{name} is not set{needed}: export nnUNet_raw, nnUNet_preprocessed and nnUNet_results (see README)"
        )
    return value


@functools.lru_cache(maxsize=None)
def find_trainer_class(trainer: str) -> type:
    """The trainer class, found as nnUNetv2_train finds it (nnU-Net's trainers, then ``nnUNet_extTrainer``); the
    search imports every trainer module, so each name is looked up once."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the lookup narrates its search
            return recursive_find_trainer_class_by_name(trainer)
    except RuntimeError:
        raise SSPError(
            f"trainer {trainer}: not found among nnU-Net's trainers nor in {EXT_TRAINER_ENV}="
            f'{os.environ.get(EXT_TRAINER_ENV, "")} (run: eval "$(nnunet_ssp env)")'
        ) from None


def ssp_method_trainers() -> dict:
    """--method key -> its fine-tuning trainer class (``ssp_method``, ``ssp_parts``), in PUBLIC_TRAINERS' order, found
    in the plugin's ``nnUNet_extTrainer`` folder as nnU-Net's lookup searches it (without importing nnU-Net's own
    trainers)."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = ext_trainer_dir()
    found = {}
    for name in PUBLIC_TRAINERS:
        cls = recursive_find_python_class(folder, name, None, base_folder=folder, cleanup_imports_from_base_folder=True)
        if cls is None:
            raise SSPError(f"{folder}: no trainer {name}; reinstall nnunet-ssp (pip install -e .)")
        if getattr(cls, "ssp_method", None):
            found[cls.ssp_method] = cls
    return found


def ext_trainer_dir() -> str:
    """The plugin's folder for ``nnUNet_extTrainer`` (``trainers.EXT_TRAINER_DIR``), located without importing the
    ``trainers`` package: the core never imports the trainers."""
    package_folder = importlib.util.find_spec("trainers").submodule_search_locations[0]
    return os.path.join(os.path.abspath(package_folder), "nnunet_ext")


def ext_trainer_value(current: str = None) -> str:
    """``nnUNet_extTrainer`` with the plugin's folder first, keeping any other folders already listed."""
    ours = ext_trainer_dir()
    others = [p for p in (current or "").split(os.pathsep) if p and os.path.abspath(p) != ours]
    return os.pathsep.join([ours] + others)


def env_lines() -> list:
    lines = [f"export {EXT_TRAINER_ENV}={shlex.quote(ext_trainer_value(os.environ.get(EXT_TRAINER_ENV)))}"]
    lines += [
        f"# {name} is not set: export it to a folder of your choice (see README)"
        for name in NNUNET_PATH_ENVS
        if not os.environ.get(name)
    ]
    return lines


def guard_pth_path() -> str:
    return os.path.join(sysconfig.get_paths()["purelib"], GUARD_PTH)


def install_hooks() -> str:
    """Writes the torchvision guard's ``.pth`` into this environment's site-packages (idempotent)."""
    path = guard_pth_path()
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(GUARD_PTH_LINE)
    return path


def _version_tuple(version: str) -> tuple:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def _find_trainers_in_subprocess(names) -> subprocess.CompletedProcess:
    code = (
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        f"for name in {list(names)!r}:\n"
        "    print('FOUND', name, find(name).__module__, flush=True)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def doctor() -> list:
    """(ok, message) pairs describing what is set up right and what is not, each problem with its fix."""
    from nnunet_ssp.torchvision_guard import torchvision_importable

    checks = []
    try:
        version = metadata.version("nnunetv2")
        ok = SUPPORTED_NNUNET[0] <= _version_tuple(version) < SUPPORTED_NNUNET[1]
        checks.append((ok, f"nnunetv2 {version}" + ("" if ok else " (supported: >=2.8.1,<2.9)")))
    except metadata.PackageNotFoundError:
        checks.append((False, "nnunetv2 is not installed: pip install 'nnunetv2>=2.8.1,<2.9'"))
    for name in NNUNET_PATH_ENVS:
        value = os.environ.get(name)
        if not value:
            checks.append((False, f"{name} is not set: export {name}=/path/to/{name}"))
        else:
            checks.append(
                (
                    os.path.isdir(value),
                    f"{name}={value}" + ("" if os.path.isdir(value) else " does not exist: create it"),
                )
            )
    listed = [os.path.abspath(p) for p in os.environ.get(EXT_TRAINER_ENV, "").split(os.pathsep) if p]
    checks.append(
        (
            ext_trainer_dir() in listed,
            f"{EXT_TRAINER_ENV} lists {ext_trainer_dir()}"
            if ext_trainer_dir() in listed
            else f'{EXT_TRAINER_ENV} does not list the plugin\'s trainers: eval "$(nnunet_ssp env)"',
        )
    )
    if torchvision_importable():
        checks.append((True, "torchvision imports"))
    else:
        installed = os.path.isfile(guard_pth_path())
        checks.append(
            (
                installed,
                "torchvision is broken; the guard hook is installed"
                if installed
                else "torchvision cannot be imported and the guard hook is missing: nnunet_ssp install-hooks",
            )
        )
    lookup = _find_trainers_in_subprocess(PUBLIC_TRAINERS)
    found = {line.split()[1] for line in lookup.stdout.splitlines() if line.startswith("FOUND ")}
    for name in PUBLIC_TRAINERS:
        if name in found:
            checks.append((True, f"nnUNetv2_train finds -tr {name}"))
        else:
            error = (lookup.stderr.strip().splitlines() or ["lookup failed"])[-1]
            checks.append((False, f"nnUNetv2_train cannot find -tr {name}: {error[:300]}"))
            break
    return checks
