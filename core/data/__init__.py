"""Data: image sources, deterministic sampling, multi-crop augmentation, iBOT masks, collate, loader.

Everything a group needs for a sample is a pure function of `(sample_id, sample_seed)`.
"""

from dinodist.core.data.augment import CropConfig, make_crops
from dinodist.core.data.collate import collate
from dinodist.core.data.loader import BatchLoader
from dinodist.core.data.masking import sample_masks
from dinodist.core.data.sampler import derive_seed, global_batch
from dinodist.core.data.sources import ImageSource, build_source

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
