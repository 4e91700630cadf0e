"""Standalone self-supervised pretraining of nnU-Net's 2D network (``ssp_pretrain``)."""
