"""Pretraining data: the preprocessed slice cache, augmented views and the seeded slice loader.

- :mod:`pretraining.data.sources`: what to pretrain on (a raw dataset's cines or imagesTr volumes, extra folders).
- :mod:`pretraining.data.frames`: one source read frame by frame as nnU-Net reads images, with integrity checks.
- :mod:`pretraining.data.cache`: builds the slice cache: every frame of every source preprocessed by nnU-Net's own
  preprocessor for the target plans, ``.npy`` blocks plus a per-slice index.
- :mod:`pretraining.data.slice_cache`: the cache format and its reader (positioned reads of single slices).
- :mod:`pretraining.data.views`: batchgeneratorsv2 augmentation pipelines that turn one slice into one view.
- :mod:`pretraining.data.loader`: a torch Dataset of slices with their views and a DataLoader whose batches are a pure
  function of (seed, epoch).
"""
