"""SSP methods, one file each; :func:`get_method` maps a ``--method`` key to its class."""
from nnunet_ssp.errors import SSPError
from nnunet_ssp.methods import METHOD_PARTS
from pretraining.methods.base import SSPMethod
from pretraining.methods.dino import DINO
from pretraining.methods.mim import MIM
from pretraining.methods.pcl import PCL
from pretraining.methods.simclr import SimCLR

METHODS = {cls.name: cls for cls in (SimCLR, PCL, DINO, MIM)}
assert set(METHODS) == set(METHOD_PARTS), "every method of nnunet_ssp.methods needs its file here"


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
