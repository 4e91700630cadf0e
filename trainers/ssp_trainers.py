"""The named trainers users pass to ``nnUNetv2_train -tr``: each is a name plus a method key."""
from trainers.base import WarmupMixin, nnUNetTrainerBaseline, nnUNetTrainerSSP


class nnUNetTrainerMIM(nnUNetTrainerSSP):
    ssp_method = "mim"


class nnUNetTrainerSimCLR(nnUNetTrainerSSP):
    ssp_method = "simclr"


class nnUNetTrainerPCL(nnUNetTrainerSSP):
    ssp_method = "pcl"


class nnUNetTrainerDINO(nnUNetTrainerSSP):
    ssp_method = "dino"


class nnUNetTrainerBaseline_warmup(WarmupMixin, nnUNetTrainerBaseline):
    pass


class nnUNetTrainerSSP_warmup(WarmupMixin, nnUNetTrainerSSP):
    pass


class nnUNetTrainerMIM_warmup(WarmupMixin, nnUNetTrainerMIM):
    pass


class nnUNetTrainerSimCLR_warmup(WarmupMixin, nnUNetTrainerSimCLR):
    pass


class nnUNetTrainerPCL_warmup(WarmupMixin, nnUNetTrainerPCL):
    pass


class nnUNetTrainerDINO_warmup(WarmupMixin, nnUNetTrainerDINO):
    pass


ALL_TRAINERS = (nnUNetTrainerBaseline, nnUNetTrainerSSP, nnUNetTrainerMIM, nnUNetTrainerSimCLR, nnUNetTrainerPCL,
                nnUNetTrainerDINO, nnUNetTrainerBaseline_warmup, nnUNetTrainerSSP_warmup, nnUNetTrainerMIM_warmup,
                nnUNetTrainerSimCLR_warmup, nnUNetTrainerPCL_warmup, nnUNetTrainerDINO_warmup)
