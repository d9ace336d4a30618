"""Target store: the teacher's targets on disk, so a student added later replays them.

Format spec: docs/target-store.md. Writer and reader meet only at the files described there.
`format.py` and `sizes.py` are plain Python (the planner's store-cost estimate reads them without
torch); the reader and writer load torch on first use (core/lazy.py).
"""

from dinodist.core.lazy import lazy_exports
from dinodist.core.target_store.format import (
    FORMAT_VERSION,
    bytes_per_image,
    bytes_per_million_iterations,
    check_compatible,
    file_sha256,
    validate_manifest,
)

__getattr__, __dir__ = lazy_exports(__name__, {"StoreReader": "reader", "StoreWriter": "writer"})

__all__ = [
    "FORMAT_VERSION",
    "StoreReader",
    "StoreWriter",
    "bytes_per_image",
    "bytes_per_million_iterations",
    "check_compatible",
    "file_sha256",
    "validate_manifest",
]
