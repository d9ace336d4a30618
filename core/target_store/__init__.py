"""Target store: the teacher's targets on disk, so a student added later replays them.

Format spec: docs/target-store.md. Writer and reader meet only at the files described there.
"""

from dinodist.core.target_store.format import (
    FORMAT_VERSION,
    bytes_per_image,
    bytes_per_million_iterations,
    check_compatible,
    file_sha256,
    validate_manifest,
)
from dinodist.core.target_store.reader import StoreReader
from dinodist.core.target_store.writer import StoreWriter

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
