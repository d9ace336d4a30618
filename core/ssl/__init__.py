"""The SSL stages that make a teacher: pretraining (DINO + iBOT + KoLeo), Gram anchoring, high-res adaptation.

Read in the order the data moves: config (the recipe) -> loop (data, schedules, checkpoints) -> step (losses)
-> model (student, EMA teacher, Gram teacher) -> optim (param groups).
"""

from dinodist.core.ssl.config import StageConfig, load_stage_config

__all__ = ["StageConfig", "load_stage_config"]
