"""Package attributes imported on first use (PEP 562).

`dinodist.core.models.arch` (the architecture table) and the cost formulas are plain Python, but
their packages' public names (`build_backbone`, `StoreWriter`, ...) need torch. Importing those
names lazily lets the driver (topology, plan, deploy) import the plain modules without loading
torch, while `from dinodist.core.models import build_backbone` keeps working.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: name -> the submodule (relative) that defines it."""

    def __getattr__(name: str) -> Any:
        sub = names.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{sub}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
