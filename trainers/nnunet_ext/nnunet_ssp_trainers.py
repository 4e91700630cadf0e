# Re-exports only: nnU-Net imports this folder's modules under bare names and evicts them after the lookup,
# so the classes must live in the real package (their __module__ stays importable and picklable).
from trainers.ssp_trainers import (nnUNetTrainerBaseline, nnUNetTrainerBaseline_warmup, nnUNetTrainerDINO,  # noqa: F401
                                   nnUNetTrainerDINO_warmup, nnUNetTrainerMIM, nnUNetTrainerMIM_warmup,
                                   nnUNetTrainerPCL, nnUNetTrainerPCL_warmup, nnUNetTrainerSimCLR,
                                   nnUNetTrainerSimCLR_warmup, nnUNetTrainerSSP, nnUNetTrainerSSP_warmup)
