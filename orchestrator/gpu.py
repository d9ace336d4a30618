"""Local GPU discovery and sampling through NVML (nvidia-ml-py); an empty answer on CPU machines.

Indices are NVML's (PCI bus order). CUDA numbers devices the same way only with
CUDA_DEVICE_ORDER=PCI_BUS_ID, which the launcher sets for that reason. The quantities read per
device are the ones ranks send with their heartbeats (core/control/telemetry.py:read_device).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from dinodist.core.control.telemetry import in_bounds, load_nvml, read_device

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
    # None: the device or the binding cannot tell (never a made-up zero)
    memory_total_bytes: int | None = None
    power_watts: float | None = None
    temperature_celsius: float | None = None
    throttle_reasons: int | None = None  # NVML bitmask; core/control/telemetry.py:THROTTLE_REASONS
    ecc_corrected_total: int | None = None
    ecc_uncorrected_total: int | None = None

    def telemetry(self) -> dict[str, Any]:
        """The reading under its heartbeat field names, for `MetricsExporter.update_gpu(group, rank,
        **sample.telemetry())`."""
        return {"gpu_utilization_ratio": self.utilization_ratio,
                "gpu_memory_used_bytes": self.memory_used_bytes,
                "gpu_memory_total_bytes": self.memory_total_bytes, "gpu_power_watts": self.power_watts,
                "gpu_temperature_celsius": self.temperature_celsius,
                "gpu_throttle_reasons": self.throttle_reasons,
                "gpu_ecc_corrected_total": self.ecc_corrected_total,
                "gpu_ecc_uncorrected_total": self.ecc_uncorrected_total}


def _nvml() -> ModuleType | None:
    global _NVML
    if _NVML is None:
        _NVML = load_nvml()  # None again without NVML: the next call tries again, cheaply
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
    """Readings of the given NVML indices; a device whose utilisation or memory cannot be read is
    left out, and any other quantity it cannot give is None."""
    nvml = _nvml()
    if nvml is None:
        return []
    out = []
    for i in indices:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
        except nvml.NVMLError as exc:
            log.warning("gpu: cannot sample GPU %d: %s", i, exc)
            continue
        r = in_bounds(read_device(nvml, handle))
        if r["gpu_utilization_ratio"] is None or r["gpu_memory_used_bytes"] is None:
            log.warning("gpu: cannot sample GPU %d: no utilisation or memory reading", i)
            continue
        out.append(GpuSample(index=i, utilization_ratio=r["gpu_utilization_ratio"],
                             memory_used_bytes=r["gpu_memory_used_bytes"],
                             memory_total_bytes=r["gpu_memory_total_bytes"], power_watts=r["gpu_power_watts"],
                             temperature_celsius=r["gpu_temperature_celsius"],
                             throttle_reasons=r["gpu_throttle_reasons"],
                             ecc_corrected_total=r["gpu_ecc_corrected_total"],
                             ecc_uncorrected_total=r["gpu_ecc_uncorrected_total"]))
    return out
