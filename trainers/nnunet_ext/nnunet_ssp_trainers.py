# Re-exports only: nnU-Net imports this folder's modules under bare names and evicts them after the lookup,
# so the classes must live in the real package (their __module__ stays importable and picklable).
from trainers.ssp_trainers import ALL_TRAINERS, seeded_trainer

globals().update({trainer.__name__: trainer for trainer in ALL_TRAINERS})


def __getattr__(name: str) -> type:
    """The seeded trainers (``<trainer>_seed<K>``), made on demand: nnU-Net's lookup asks ``hasattr`` first."""
    return seeded_trainer(name)
