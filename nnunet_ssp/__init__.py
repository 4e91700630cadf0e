"""nnunet-ssp: self-supervised pretraining for nnU-Net v2 2D cine CMR segmentation."""

__version__ = "0.1.0"
