"""The trainers users pass to ``nnUNetv2_train -tr``.

The base trainers are a name plus a method key (``nnUNetTrainerBaseline`` loads nothing, ``nnUNetTrainerSSP`` any
method's checkpoint). Each comes in variants whose name says what changes, as nnU-Net's own variants do
(``nnUNetTrainer_250epochs``), so the results folder records it: ``<base><recipe><schedule>`` with

- recipe ``_warmup``: a linear learning-rate warm-up before the poly decay (:class:`trainers.base.WarmupMixin`);
- recipe ``_baselineLR`` (pretrained trainers only): the from-scratch lr 1e-2 instead of the paper's 5e-3
  (:class:`trainers.base.BaselineLRMixin`);
- recipe ``_baselineLR_encoderOnly`` (trainers that load a decoder: MIM and the generic one): lr 1e-2 and the
  encoder alone (:class:`trainers.base.EncoderOnlyMixin`);
- recipes ``_freeze50epochs``, ``_frozen``, ``_pretrainedTenthLR`` (pretrained trainers only): the parts loaded from
  the checkpoint frozen for the first 50 epochs (5% of a shortened run), frozen throughout, or at a tenth of the
  lr (:mod:`trainers.strategies`);
- schedule ``_paperSchedule``: the paper's fine-tuning length, an epoch = one pass over the fold's labelled slices
  (:class:`trainers.base.PaperScheduleMixin`).

e.g. ``nnUNetTrainerMIM_baselineLR_paperSchedule``, ``nnUNetTrainerPCL_frozen_paperSchedule``. A variant's
``recipe`` (``warmup``, ``frozen``; "" for the paper's) names its row in the report.

Any of them plus ``_seed<K>`` (last) trains with training seed K, reproducibly (:mod:`trainers.seeding`), e.g.
``nnUNetTrainerBaseline_seed0``; seeds are unbounded, so :func:`seeded_trainer` makes these classes on first use.
"""

from itertools import product

from nnunet_ssp.network import PARTS
from nnunet_ssp.schedule import (
    BASELINE_LR,
    DECODER_METHOD_RECIPES,
    ENCODER_ONLY,
    FREEZE_50_EPOCHS,
    FROZEN,
    PRETRAINED_ONLY_RECIPES,
    PRETRAINED_TENTH_LR,
    SCHEDULE_SUFFIX,
    WARMUP,
    split_training_seed,
)
from trainers.base import (
    BaselineLRMixin,
    EncoderOnlyMixin,
    PaperScheduleMixin,
    WarmupMixin,
    nnUNetTrainerBaseline,
    nnUNetTrainerSSP,
)
from trainers.seeding import SeededTrainingMixin
from trainers.strategies import FreezePretrained50EpochsMixin, FrozenPretrainedMixin, PretrainedTenthLRMixin

ENCODER, ENCODER_AND_DECODER = PARTS[:1], PARTS


# an SSP method's trainer: its --method key and the network parts its checkpoints hold
class nnUNetTrainerSimCLR(nnUNetTrainerSSP):
    ssp_method, ssp_parts = "simclr", ENCODER


class nnUNetTrainerPCL(nnUNetTrainerSSP):
    ssp_method, ssp_parts = "pcl", ENCODER


class nnUNetTrainerDINO(nnUNetTrainerSSP):
    ssp_method, ssp_parts = "dino", ENCODER


class nnUNetTrainerMIM(nnUNetTrainerSSP):
    ssp_method, ssp_parts = "mim", ENCODER_AND_DECODER


#: --method key -> its fine-tuning trainer: every subclass of nnUNetTrainerSSP above, in order
TRAINER_OF_METHOD = {cls.ssp_method: cls for cls in nnUNetTrainerSSP.__subclasses__() if cls.ssp_method}
BASE_TRAINERS = (nnUNetTrainerBaseline, nnUNetTrainerSSP, *TRAINER_OF_METHOD.values())
#: recipe -> its mixins; "" is the paper's recipe
RECIPES = {
    "": (),
    WARMUP: (WarmupMixin,),
    BASELINE_LR: (BaselineLRMixin,),
    ENCODER_ONLY: (BaselineLRMixin, EncoderOnlyMixin),
    FREEZE_50_EPOCHS: (FreezePretrained50EpochsMixin,),
    FROZEN: (FrozenPretrainedMixin,),
    PRETRAINED_TENTH_LR: (PretrainedTenthLRMixin,),
}
#: schedule name-suffix -> its mixins
SCHEDULES = {SCHEDULE_SUFFIX["nnunet"]: (), SCHEDULE_SUFFIX["paper"]: (PaperScheduleMixin,)}


def variant_name(base: str, recipe: str = "", schedule_suffix: str = "") -> str:
    return base + (f"_{recipe}" if recipe else "") + schedule_suffix


def loads_decoder(base: type) -> bool:
    """Whether the trainer may load a pretrained decoder: the generic SSP trainer, and those of decoder methods."""
    return issubclass(base, nnUNetTrainerSSP) and (base.ssp_method is None or "decoder" in base.ssp_parts)


def _applies(base: type, recipe: str) -> bool:
    """Some recipes change nothing for the from-scratch baseline (baselineLR) or for encoder methods
    (baselineLR_encoderOnly)."""
    if recipe in DECODER_METHOD_RECIPES:
        return loads_decoder(base)
    return not (recipe in PRETRAINED_ONLY_RECIPES and base is nnUNetTrainerBaseline)


def _define_variant(base: type, recipe: str, schedule_suffix: str) -> type:
    """The variant, defined in this module so that nnU-Net's lookup by name (and pickling) finds it."""
    mixins = SCHEDULES[schedule_suffix] + RECIPES[recipe]
    variant = type(
        variant_name(base.__name__, recipe, schedule_suffix),
        (*mixins, base),
        {
            "__module__": __name__,
            "recipe": recipe,
            "__doc__": f"{base.__name__} with {' and '.join(m.__name__ for m in mixins)}.",
        },
    )
    globals()[variant.__name__] = variant
    return variant


ALL_TRAINERS = BASE_TRAINERS + tuple(
    _define_variant(base, recipe, schedule)
    for base, recipe, schedule in product(BASE_TRAINERS, RECIPES, SCHEDULES)
    if (recipe or schedule) and _applies(base, recipe)
)


def seeded_trainer(name: str) -> type:
    """The trainer ``<trainer>_seed<K>`` of any trainer above: ``SeededTrainingMixin`` in front of it, training seed
    K, defined in this module on first use (so nnU-Net's lookup by name and pickling find it); AttributeError for
    any other name."""
    base, seed = split_training_seed(name)
    if seed is None or globals().get(base) not in ALL_TRAINERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in globals():
        globals()[name] = type(
            name,
            (SeededTrainingMixin, globals()[base]),
            {"__module__": __name__, "training_seed": seed, "__doc__": f"{base} with training seed {seed}."},
        )
    return globals()[name]


__getattr__ = seeded_trainer  # PEP 562: the names that are not defined above
