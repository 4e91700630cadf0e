"""Pretraining data: the preprocessed slice cache, augmented views and the seeded slice loader.

- :mod:`pretraining.data.cache`: every frame of every cine (or imagesTr volume) preprocessed by nnU-Net's own
  preprocessor for the target plans, stored as memory-mapped ``.npy`` files plus a per-slice index.
- :mod:`pretraining.data.views`: batchgeneratorsv2 augmentation pipelines that turn one slice into one view.
- :mod:`pretraining.data.loader`: a torch Dataset of slices with their views and a DataLoader whose batches are a pure
  function of (seed, epoch).
"""
