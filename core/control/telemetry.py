"""GPU telemetry through NVML (nvidia-ml-py's `pynvml`): the rank's own GPU, read in its control thread.

Optional all the way down. Without pynvml, its shared library or a driver, `GpuSampler.open`
returns None and no GPU field is ever sent, so the exporter has no GPU series at all (absent, not
zero). A quantity a device or binding cannot give (power on some boards, ECC on consumer GPUs,
anything on a MIG slice) is left out on its own. Nothing here imports torch: the driver
(orchestrator/gpu.py) reads devices with the same `read_device`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from dinodist.core.control import messages as m

log = logging.getLogger("dinodist.gpu")

# NVML's clocks-event ("throttle") reason bits (nvmlClocksEventReason*); stable across driver versions.
THROTTLE_REASONS = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
# what `read_device` measures; the rank's sampler adds the Xid counts
NVML_KEYS = ("gpu_utilization_ratio", "gpu_memory_used_bytes", "gpu_memory_total_bytes", "gpu_power_watts",
             "gpu_temperature_celsius", "gpu_throttle_reasons", "gpu_ecc_corrected_total",
             "gpu_ecc_uncorrected_total")
SAMPLER_KEYS = (*NVML_KEYS, "gpu_xid_errors_total", "gpu_last_xid")
_XID_CRITICAL = 0x8  # nvmlEventTypeXidCriticalError


def load_nvml() -> ModuleType | None:
    """pynvml, initialised; None where the package, its library or a driver is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, or NVMLError when there is no driver/library
        log.debug("gpu: NVML unavailable: %s", exc)
        return None
    return pynvml


def _optional(read: Callable[[], Any]) -> Any:
    try:
        return read()
    # NVMLError (NotSupported, NoPermission, GpuIsLost...) or AttributeError from older bindings:
    # either way this quantity is unknown, which is not the same as zero
    except Exception:
        return None


def _throttle_reasons(nvml: ModuleType, handle: Any) -> int | None:
    read = (getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None))
    return None if read is None else _optional(lambda: int(read(handle)))


def read_device(nvml: ModuleType, handle: Any) -> dict[str, Any]:
    """Every `NVML_KEYS` quantity of one device in base units, None for those it cannot give."""
    mem = _optional(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    util = _optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))

    def ecc(kind: str) -> int | None:
        return _optional(lambda: int(nvml.nvmlDeviceGetTotalEccErrors(
            handle, getattr(nvml, kind), nvml.NVML_VOLATILE_ECC)))

    return {
        "gpu_utilization_ratio": None if util is None else min(1.0, float(util.gpu) / 100.0),
        "gpu_memory_used_bytes": None if mem is None else int(mem.used),
        "gpu_memory_total_bytes": None if mem is None else int(mem.total),
        "gpu_power_watts": _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),  # NVML: mW
        "gpu_temperature_celsius": _optional(
            lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))),
        "gpu_throttle_reasons": _throttle_reasons(nvml, handle),
        "gpu_ecc_corrected_total": ecc("NVML_MEMORY_ERROR_TYPE_CORRECTED"),
        "gpu_ecc_uncorrected_total": ecc("NVML_MEMORY_ERROR_TYPE_UNCORRECTED"),
    }


def in_bounds(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every field the wire schema would refuse set to None: a driver's sentinel (say
    0xFFFFFFFF for an unknown temperature) must not make the rank's heartbeats fail."""
    out = dict(values)
    for key, value in values.items():
        if value is None:
            continue
        try:
            m.Telemetry.model_validate({key: value})
        except ValidationError:
            log.debug("gpu: dropping %s=%r, outside the wire schema's bounds", key, value)
            out[key] = None
    return out


def _text(value: str | bytes) -> str:
    # Older bindings return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value


def cuda_device_handle(nvml: ModuleType, cuda_device: int) -> Any:
    """NVML's handle for CUDA device ordinal `cuda_device` of this process, through
    CUDA_VISIBLE_DEVICES (indices, GPU UUIDs or their prefixes, MIG UUIDs). Integer entries are
    NVML (PCI bus) indices only with CUDA_DEVICE_ORDER=PCI_BUS_ID, which the launcher sets."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return nvml.nvmlDeviceGetHandleByIndex(cuda_device)
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not 0 <= cuda_device < len(items):
        raise LookupError(f"CUDA device {cuda_device} is not among CUDA_VISIBLE_DEVICES={spec!r}")
    item = items[cuda_device]
    if item.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(item))
    if item.startswith("MIG-"):
        return nvml.nvmlDeviceGetHandleByUUID(item)
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        if _text(nvml.nvmlDeviceGetUUID(handle)).startswith(item):
            return handle
    raise LookupError(f"no GPU matches CUDA_VISIBLE_DEVICES entry {item!r}")


class GpuSampler:
    """Samples one GPU for a rank's heartbeats: `sample()` gives every `SAMPLER_KEYS` field, None for
    those unknown (a heartbeat then clears them instead of repeating a stale value)."""

    def __init__(self, nvml: ModuleType, handle: Any) -> None:
        self._nvml = nvml
        self._handle = handle
        self.xid_errors = 0
        self.last_xid: int | None = None
        self._events: Any = None
        try:
            events = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(handle, _XID_CRITICAL, events)
            self._events = events
        except Exception as exc:  # not supported here (MIG, some containers): no Xid series, not zero
            log.debug("gpu: Xid events unavailable: %s", exc)

    @classmethod
    def open(cls, cuda_device: int) -> GpuSampler | None:
        """A sampler for this process's CUDA device `cuda_device`; None without NVML or that device."""
        nvml = load_nvml()
        if nvml is None:
            return None
        try:
            handle = cuda_device_handle(nvml, cuda_device)
        except Exception as exc:
            log.warning("gpu: no NVML handle for CUDA device %d, no GPU telemetry: %s", cuda_device, exc)
            return None
        return cls(nvml, handle)

    def _drain_xids(self) -> None:
        wait = getattr(self._nvml, "nvmlEventSetWait_v2", None) or self._nvml.nvmlEventSetWait
        for _ in range(64):  # bounded: a storm of events must not stall the control thread
            try:
                data = wait(self._events, 0)
            except Exception:  # NVML_ERROR_TIMEOUT: nothing pending
                return
            if int(data.eventType) & _XID_CRITICAL:
                self.xid_errors += 1
                self.last_xid = int(data.eventData)

    def sample(self) -> dict[str, Any]:
        out = read_device(self._nvml, self._handle)
        if self._events is not None:
            self._drain_xids()
            out["gpu_xid_errors_total"] = self.xid_errors
        else:
            out["gpu_xid_errors_total"] = None
        out["gpu_last_xid"] = self.last_xid
        return in_bounds(out)

    def close(self) -> None:
        if self._events is not None:
            _optional(lambda: self._nvml.nvmlEventSetFree(self._events))
            self._events = None
