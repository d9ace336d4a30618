"""Data: image sources, deterministic sampling, multi-crop augmentation, iBOT masks, collate, loader.

Everything a group needs for a sample is a pure function of `(sample_id, sample_seed)`.
"""

from core.data.augment import CropConfig, make_crops
from core.data.collate import collate
from core.data.loader import BatchLoader
from core.data.masking import sample_masks
from core.data.sampler import derive_seed, global_batch
from core.data.sources import ImageSource, build_source

__all__ = [
    "BatchLoader",
    "CropConfig",
    "ImageSource",
    "build_source",
    "collate",
    "derive_seed",
    "global_batch",
    "make_crops",
    "sample_masks",
]
