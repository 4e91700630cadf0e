"""The trainers users pass to ``nnUNetv2_train -tr``.

The base trainers are a name plus a method key (``nnUNetTrainerBaseline`` loads nothing, ``nnUNetTrainerSSP`` any
method's checkpoint). Each comes in variants whose name says what changes, as nnU-Net's own variants do
(``nnUNetTrainer_250epochs``), so the results folder records it:

- ``<base>_warmup``: a linear learning-rate warm-up before the poly decay (:class:`trainers.base.WarmupMixin`);
- ``<base>_paperSchedule``: the paper's fine-tuning length, an epoch = one pass over the fold's labelled slices
  (:class:`trainers.base.PaperScheduleMixin`);
- ``<base>_warmup_paperSchedule``: both.
"""
from trainers.base import PaperScheduleMixin, WarmupMixin, nnUNetTrainerBaseline, nnUNetTrainerSSP


class nnUNetTrainerMIM(nnUNetTrainerSSP):
    ssp_method = "mim"


class nnUNetTrainerSimCLR(nnUNetTrainerSSP):
    ssp_method = "simclr"


class nnUNetTrainerPCL(nnUNetTrainerSSP):
    ssp_method = "pcl"


class nnUNetTrainerDINO(nnUNetTrainerSSP):
    ssp_method = "dino"


BASE_TRAINERS = (nnUNetTrainerBaseline, nnUNetTrainerSSP, nnUNetTrainerMIM, nnUNetTrainerSimCLR, nnUNetTrainerPCL,
                 nnUNetTrainerDINO)
#: name suffix -> the mixins it puts in front of the base trainer
VARIANTS = {"_warmup": (WarmupMixin,), "_paperSchedule": (PaperScheduleMixin,),
            "_warmup_paperSchedule": (PaperScheduleMixin, WarmupMixin)}


def _define_variant(base: type, suffix: str) -> type:
    """``<base><suffix>``, defined in this module so that nnU-Net's lookup by name (and pickling) finds it."""
    mixins = VARIANTS[suffix]
    variant = type(base.__name__ + suffix, (*mixins, base), {
        "__module__": __name__, "__doc__": f"{base.__name__} with {' and '.join(m.__name__ for m in mixins)}."})
    globals()[variant.__name__] = variant
    return variant


ALL_TRAINERS = BASE_TRAINERS + tuple(_define_variant(base, suffix) for base in BASE_TRAINERS for suffix in VARIANTS)
