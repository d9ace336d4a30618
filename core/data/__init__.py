"""Data: image sources, deterministic sampling, multi-crop augmentation, iBOT masks, collate, loader.

Everything a group needs for a sample is a pure function of `(sample_id, sample_seed)`.
`index` (the dataset index the driver writes) is plain Python; the other names load torch on first
use (core/lazy.py), so the driver can write an index without loading torch.
"""

import sys
import types

from dinodist.core.lazy import lazy_exports


class _Package(types.ModuleType):
    # `collate` names both a submodule and the function in it. Importing the submodule rebinds the
    # package attribute to the module; the eager package always exposed the function, so keep that.
    def __setattr__(self, name: str, value: object) -> None:
        if name == "collate" and isinstance(value, types.ModuleType):
            value = value.collate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__getattr__, __dir__ = lazy_exports(__name__, {
    "BatchLoader": "loader",
    "CropConfig": "augment",
    "ImageSource": "sources",
    "agree_fingerprint": "agree",
    "build_source": "sources",
    "collate": "collate",
    "derive_seed": "sampler",
    "fingerprint_from_index": "index",
    "global_batch": "sampler",
    "make_crops": "augment",
    "read_index": "index",
    "sample_masks": "masking",
    "write_index": "index",
})

__all__ = [
    "BatchLoader",
    "CropConfig",
    "ImageSource",
    "agree_fingerprint",
    "build_source",
    "collate",
    "derive_seed",
    "fingerprint_from_index",
    "global_batch",
    "make_crops",
    "read_index",
    "sample_masks",
    "write_index",
]
