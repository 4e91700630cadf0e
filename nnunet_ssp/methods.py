"""The SSP methods this project knows, and which network parts each one pretrains.

This table is the single source of truth shared by ``ssp_pretrain`` (what it trains and saves) and the nnU-Net
trainers (what they load at fine-tuning start).
"""
from nnunet_ssp.errors import SSPError

#: method key -> parts of the nnU-Net network that the method pretrains and the fine-tuning trainer loads.
METHOD_PARTS = {
    "simclr": ("encoder",),
    "pcl": ("encoder",),
    "dino": ("encoder",),
    "mim": ("encoder", "decoder"),
}


def pretrains_decoder(method: str) -> bool:
    """Whether ``method`` pretrains the decoder as well as the encoder (MIM)."""
    return "decoder" in parts_of_method(method)


def parts_of_method(method: str) -> tuple:
    """The network parts that ``method`` pretrains; a clear error for an unknown method."""
    try:
        return METHOD_PARTS[method]
    except KeyError:
        raise SSPError(f"unknown SSP method '{method}': choose one of {', '.join(METHOD_PARTS)}") from None
