"""nnU-Net trainers that fine-tune from SSP checkpoints, found by nnU-Net through ``nnUNet_extTrainer``.

Point ``nnUNet_extTrainer`` at :data:`EXT_TRAINER_DIR` (``nnunet_ssp env`` prints the line).
"""

import os

#: the folder nnU-Net's trainer lookup scans; it only re-exports the classes defined in this package.
EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext")
