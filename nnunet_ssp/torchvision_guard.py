"""The narrow fix for a broken torchvision (CPU torch next to PyPI's CUDA torchvision).

nnU-Net's trainer lookup imports every trainer module, including its Primus trainers, which import timm and so
torchvision. Where ``import torchvision`` fails, that aborts every ``-tr`` lookup, for training and prediction.
:func:`install` registers a one-shot import hook for that single module: when nnU-Net asks for it, the hook tries
``import torchvision``; only if that fails does it print a warning and hand nnU-Net an empty module instead.
Where torchvision works nothing changes. ``nnunet_ssp install-hooks`` makes every interpreter of the environment
call :func:`install` through a one-line ``.pth`` file.
"""

import importlib.abc
import importlib.util
import sys

GUARDED_MODULE = "nnunetv2.training.nnUNetTrainer.primus.primus_trainers"


def torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401

        return True
    except Exception:
        return False


class _EmptyModuleLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__doc__ = "Placeholder from nnunet_ssp: torchvision cannot be imported, Primus trainers are unavailable."


class _PrimusTrainersGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != GUARDED_MODULE:
            return None
        sys.meta_path.remove(self)
        if torchvision_importable():
            return None
        print(
            "nnunet_ssp warning: torchvision cannot be imported (a CUDA build next to a CPU torch?); nnU-Net's "
            "Primus trainers are skipped so that trainer lookup works.",
            file=sys.stderr,
        )
        return importlib.util.spec_from_loader(fullname, _EmptyModuleLoader())


def install() -> None:
    if GUARDED_MODULE not in sys.modules and not any(isinstance(f, _PrimusTrainersGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _PrimusTrainersGuard())
