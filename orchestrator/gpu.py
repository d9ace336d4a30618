"""Local GPU discovery and sampling through NVML (nvidia-ml-py); an empty answer on CPU machines.

Indices are NVML's (PCI bus order). CUDA numbers devices the same way only with
CUDA_DEVICE_ORDER=PCI_BUS_ID, which the launcher sets for that reason.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import ModuleType

log = logging.getLogger("dinodist.gpu")

_NVML: ModuleType | None = None  # the initialised pynvml module, once init has succeeded


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total_bytes: int


@dataclass(frozen=True)
class GpuSample:
    index: int
    utilization_ratio: float  # fraction of the last sample period a kernel ran, 0..1
    memory_used_bytes: int


def _nvml() -> ModuleType | None:
    global _NVML
    if _NVML is not None:
        return _NVML
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, or NVMLError when there is no driver/library
        log.debug("gpu: NVML unavailable: %s", exc)
        return None
    _NVML = pynvml
    return _NVML


def _text(value: str | bytes) -> str:
    # Older bindings return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value


def _visible(index: int, uuid: str) -> bool:
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return True
    for item in (s.strip() for s in spec.split(",")):
        if item.isdigit() and int(item) == index:
            return True
        if item and not item.isdigit() and uuid.startswith(item):
            return True
    return False


def discover() -> list[GpuInfo]:
    """The GPUs this process may use (honouring CUDA_VISIBLE_DEVICES); [] without NVML."""
    nvml = _nvml()
    if nvml is None:
        return []
    found = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            if not _visible(i, uuid):
                continue
            found.append(GpuInfo(index=i, uuid=uuid, name=_text(nvml.nvmlDeviceGetName(handle)),
                                 memory_total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total)))
    except nvml.NVMLError as exc:
        log.warning("gpu: NVML query failed: %s", exc)
        return []
    return found


def sample(indices: list[int]) -> list[GpuSample]:
    """Utilisation and memory in use for the given NVML indices; devices that fail are left out."""
    nvml = _nvml()
    if nvml is None:
        return []
    out = []
    for i in indices:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError as exc:
            log.warning("gpu: cannot sample GPU %d: %s", i, exc)
            continue
        out.append(GpuSample(index=i, utilization_ratio=float(util.gpu) / 100.0,
                             memory_used_bytes=int(mem.used)))
    return out
