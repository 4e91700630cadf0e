"""SSP methods, one file each in this package: every :class:`SSPMethod` subclass with a ``name`` defined here is a
``--method`` of ``ssp_pretrain`` (:data:`METHODS`, the one registry); :func:`get_method` maps a key to its class."""

import importlib
import pkgutil

from nnunet_ssp.errors import SSPError
from pretraining.methods.base import SSPMethod

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def _named_methods(cls: type) -> list:
    return [m for sub in cls.__subclasses__() for m in ([sub] if sub.name else []) + _named_methods(sub)]


#: --method key -> its class, by key
METHODS = {cls.name: cls for cls in sorted(_named_methods(SSPMethod), key=lambda cls: cls.name)}


def get_method(name: str) -> type:
    if name not in METHODS:
        raise SSPError(f"unknown SSP method '{name}': choose one of {', '.join(METHODS)}")
    return METHODS[name]


def all_options() -> dict:
    """option name -> (Option, [method keys that have it]), over all methods."""
    table = {}
    for key, cls in METHODS.items():
        for name, option in cls.options.items():
            table.setdefault(name, (option, []))[1].append(key)
    return table


__all__ = ["METHODS", "SSPMethod", "all_options", "get_method"]
