"""SSP methods, one file each; :func:`get_method` maps a ``--method`` key to its class."""
from nnunet_ssp.errors import SSPError
from nnunet_ssp.methods import METHOD_PARTS
from pretraining.methods.base import SSPMethod
from pretraining.methods.mim import MIM

METHODS = {cls.name: cls for cls in (MIM,)}


def get_method(name: str) -> type:
    if name in METHODS:
        return METHODS[name]
    if name in METHOD_PARTS:
        raise SSPError(f"method '{name}' is not yet available in ssp_pretrain (available: {', '.join(METHODS)})")
    raise SSPError(f"unknown SSP method '{name}': choose one of {', '.join(METHOD_PARTS)}")


__all__ = ["METHODS", "SSPMethod", "get_method"]
