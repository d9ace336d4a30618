"""Prometheus exporter: scraped over HTTP, counters exact under repeats and reordering, GPU telemetry only
with GPUs (NVML faked by a module put in sys.modules), the console progress line."""

from __future__ import annotations

import json
import logging
import random
import re
import socket
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from dinodist.core.control import messages as m
from dinodist.core.control import telemetry
from dinodist.core.control.client import ControlClient
from dinodist.core.control.thread import ControlThread
from dinodist.core.errors import DinodistError
from dinodist.orchestrator import gpu
from dinodist.orchestrator.control import ControlServer, RankState
from dinodist.orchestrator.metrics import MetricsExporter, progress_line

pytestmark = pytest.mark.timeout(60)


def hb(rank: int, group: str, session: str, seq: int, iteration: int, steps: list[float], *, images: int,
       wait: float, step: float, forwards: int = 0, sent: int = 0, losses: dict | None = None,
       kind: str = "heartbeat", **extra) -> m.Heartbeat | m.Done:
    model = m.Heartbeat if kind == "heartbeat" else m.Done
    return model(**m.stamp(), kind=kind, rank=rank, group=group, session=session, seq=seq,
                 iteration=iteration, step_seconds=steps, step_seconds_total=step, wait_seconds_total=wait,
                 images_total=images, teacher_forwards_total=forwards, target_bytes_sent_total=sent,
                 losses=losses or {}, **extra)


def scrape(exporter: MetricsExporter) -> tuple[str, dict[tuple[str, frozenset], float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


def test_scrape_shows_names_labels_and_values():
    steps = {0: [0.1, 0.2, 0.3, 0.4], 1: [0.15, 0.25, 0.35, 0.45]}
    with MetricsExporter(port=0) as ex:
        assert ex.port and ex.bind == "127.0.0.1"
        for it in range(4):
            for rank in (0, 1):  # rank 0 reports each iteration first: its times enter the histogram
                s = steps[rank]
                ex.observe_message(hb(rank, "vits", f"{rank:016x}", it + 1, it, [s[it]], images=4 * (it + 1),
                                      wait=0.05 * (it + 1), step=sum(s[: it + 1]),
                                      losses={"dino": 10.0 - it, "koleo": -0.1 * it}))
        ex.observe_message(hb(2, "teacher", "2" * 16, 1, 3, [0.3], images=16, wait=0.0, step=1.2, forwards=4,
                              sent=4096))
        text, got = scrape(ex)
    assert got[key("dinodist_images_total", group="vits")] == 2 * 16
    assert got[key("dinodist_wait_seconds_total", group="vits")] == pytest.approx(2 * 0.2)
    step_total = sum(steps[0]) + sum(steps[1])
    assert got[key("dinodist_step_seconds_total", group="vits")] == pytest.approx(step_total)
    assert got[key("dinodist_iteration_seconds_count", group="vits")] == 4
    assert got[key("dinodist_iteration_seconds_sum", group="vits")] == pytest.approx(sum(steps[0]))
    assert got[key("dinodist_iteration_seconds_bucket", group="vits", le="0.25")] == sum(
        s <= 0.25 for s in steps[0])
    assert got[key("dinodist_loss", group="vits", term="dino")] == 7.0
    assert got[key("dinodist_loss", group="vits", term="koleo")] == pytest.approx(-0.3)
    assert got[key("dinodist_teacher_forwards_total", group="teacher")] == 4
    assert got[key("dinodist_target_bytes_sent_total", group="teacher")] == 4096
    assert got[key("dinodist_teacher_forwards_total", group="vits")] == 0  # present from the start
    for rank, group in ((0, "vits"), (1, "vits"), (2, "teacher")):
        assert got[key("dinodist_rank_up", group=group, rank=str(rank))] == 1
    assert "dinodist_gpu" not in text


def _deliveries(rng: random.Random):
    """Heartbeats of 3 ranks (rank 1 restarts once), with each rank's true final totals per session."""
    sent, finals = [], {}
    for rank, group in ((0, "a"), (1, "a"), (2, "b")):
        for session in ([f"{rank:02x}" * 8] + ([f"{rank:02x}" * 4 + "ff" * 4] if rank == 1 else [])):
            images = forwards = 0
            wait = step = 0.0
            for seq in range(1, 26):
                images += rng.randrange(0, 5)
                forwards += rng.randrange(0, 2)
                wait += rng.random() * 0.1
                step += 0.5
                sent.append(hb(rank, group, session, seq, seq - 1, [0.5], images=images, wait=wait, step=step,
                               forwards=forwards, sent=forwards * 100))
            finals[(group, session)] = (images, wait, forwards)
    return sent, finals


def _counters(ex: MetricsExporter, group: str) -> tuple[float, float, float]:
    reg = ex.registry
    return tuple(reg.get_sample_value(name, {"group": group}) for name in
                 ("dinodist_images_total", "dinodist_wait_seconds_total", "dinodist_teacher_forwards_total"))


def test_counters_do_not_double_count_on_repeats_or_reordering():
    rng = random.Random(5)
    sent, finals = _deliveries(rng)
    chaos = sent + rng.sample(sent, len(sent) // 2)  # every heartbeat, half of them twice
    rng.shuffle(chaos)
    in_order = MetricsExporter(port=None)
    shuffled = MetricsExporter(port=None)
    for msg in sent:
        in_order.update_from_heartbeat(msg)
    for msg in chaos:
        shuffled.update_from_heartbeat(msg)
    for group in ("a", "b"):
        truth = [sum(f[i] for (g, _), f in finals.items() if g == group) for i in range(3)]
        assert _counters(shuffled, group) == pytest.approx(truth)
        assert _counters(in_order, group) == pytest.approx(truth)
    # Each iteration of a group is observed once, however many ranks and repeats report it.
    dup = MetricsExporter(port=None)
    for msg in sent:
        dup.update_from_heartbeat(msg)
        dup.update_from_heartbeat(msg)
    for group in ("a", "b"):
        count = dup.registry.get_sample_value("dinodist_iteration_seconds_count", {"group": group})
        assert count == len({msg.iteration for msg in sent if msg.group == group})
        late = shuffled.registry.get_sample_value("dinodist_iteration_seconds_count", {"group": group})
        assert 1 <= late <= count


def test_gpu_metrics_absent_on_cpu_and_present_when_reported():
    if not gpu.discover():
        assert gpu.sample([0]) == []
    with MetricsExporter(port=0) as ex:
        ex.observe_message(hb(0, "vits", "a" * 16, 1, 0, [0.1], images=1, wait=0.0, step=0.1))
        text, _ = scrape(ex)
        assert "dinodist_gpu" not in text  # absent, not zero: no HELP/TYPE line either
        ex.observe_message(hb(0, "vits", "a" * 16, 2, 1, [0.1], images=2, wait=0.0, step=0.2,
                              gpu_utilization_ratio=0.75, gpu_memory_used_bytes=3 << 30))
        text, got = scrape(ex)
    assert got[key("dinodist_gpu_utilization_ratio", group="vits", rank="0")] == 0.75
    assert got[key("dinodist_gpu_memory_used_bytes", group="vits", rank="0")] == 3 << 30


class _FakeNVMLError(Exception):
    pass


def _fake_nvml(fail_init: bool = False) -> SimpleNamespace:
    """Three GPUs: 0 supports everything, 1 only utilisation and memory (and reports a sentinel
    temperature), 2 is lost after discovery. `xids` is the queue of pending Xid events."""
    name = "NVIDIA H100 80GB HBM3"
    devices = [("GPU-aa11", name, 37, 5 << 30), ("GPU-bb22", name, 80, 1), ("GPU-cc33", name, 0, 0)]
    xids: list[int] = []

    def init():
        if fail_init:
            raise _FakeNVMLError("NVML Shared Library Not Found")

    def handle(i):
        if i == 2 and not fail_init:
            handle.calls += 1
            if handle.calls > 1:  # the third device vanishes after discovery
                raise _FakeNVMLError("GPU is lost")
        return i
    handle.calls = 0

    def only_gpu0(value):
        def read(h, *args):
            if h != 0:
                raise _FakeNVMLError("Not Supported")
            return value(*args) if callable(value) else value
        return read

    def temperature(h, sensor):
        assert sensor == 0  # NVML_TEMPERATURE_GPU
        return 67 if h == 0 else 0xFFFFFFFF

    def wait(events, timeout_ms):
        assert timeout_ms == 0  # the control thread never blocks on NVML
        if not xids:
            raise _FakeNVMLError("Timeout")
        return SimpleNamespace(eventType=0x8, eventData=xids.pop(0))

    return SimpleNamespace(
        NVMLError=_FakeNVMLError, nvmlInit=init, nvmlDeviceGetCount=lambda: len(devices),
        nvmlDeviceGetHandleByIndex=handle, nvmlDeviceGetUUID=lambda h: devices[h][0].encode(),
        nvmlDeviceGetName=lambda h: devices[h][1],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=80 << 30, used=devices[h][3]),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=devices[h][2], memory=0),
        NVML_TEMPERATURE_GPU=0, NVML_VOLATILE_ECC=0, NVML_MEMORY_ERROR_TYPE_CORRECTED=0,
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
        nvmlDeviceGetPowerUsage=only_gpu0(312_500),  # milliwatts
        nvmlDeviceGetTemperature=temperature,
        # sw power cap, hw thermal slowdown, and a bit this code has no name for
        nvmlDeviceGetCurrentClocksEventReasons=only_gpu0(0x4 | 0x40 | 0x10000),
        nvmlDeviceGetTotalEccErrors=only_gpu0(lambda kind, counter: (3, 1)[kind]),
        nvmlEventSetCreate=lambda: "events", nvmlDeviceRegisterEvents=only_gpu0(None),
        nvmlEventSetWait_v2=wait, nvmlEventSetFree=lambda events: None, xids=xids)


def test_gpu_discovery_and_sampling_through_nvml(monkeypatch):
    monkeypatch.setattr(gpu, "_NVML", None)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,GPU-cc")
    found = gpu.discover()
    assert [(g.index, g.uuid) for g in found] == [(0, "GPU-aa11"), (2, "GPU-cc33")]
    assert found[0].name == "NVIDIA H100 80GB HBM3" and found[0].memory_total_bytes == 80 << 30
    samples = gpu.sample([0, 1, 2])
    assert [(s.index, s.utilization_ratio, s.memory_used_bytes) for s in samples] == [
        (0, 0.37, 5 << 30), (1, 0.80, 1)]
    full, partial = samples
    assert (full.memory_total_bytes, full.power_watts, full.temperature_celsius, full.throttle_reasons,
            full.ecc_corrected_total, full.ecc_uncorrected_total) == (80 << 30, 312.5, 67.0, 0x10044, 3, 1)
    # unsupported quantities and a driver sentinel (0xFFFFFFFF degrees) are unknown, not zero
    assert (partial.power_watts, partial.temperature_celsius, partial.throttle_reasons,
            partial.ecc_corrected_total) == (None, None, None, None)
    with MetricsExporter(port=None) as ex:
        ex.update_gpu("vits", 1, **partial.telemetry())
        names = {s.name for fam in ex.registry.collect() for s in fam.samples}
        assert {"dinodist_gpu_utilization_ratio", "dinodist_gpu_memory_used_bytes",
                "dinodist_gpu_memory_total_bytes"} <= names
        assert not names & {"dinodist_gpu_power_watts", "dinodist_gpu_temperature_celsius",
                            "dinodist_gpu_throttle_reasons", "dinodist_gpu_ecc_errors_total"}
        with pytest.raises(DinodistError, match="update_gpu: unknown telemetry field 'gpu_fan'"):
            ex.update_gpu("vits", 1, gpu_fan=3)
    monkeypatch.setattr(gpu, "_NVML", None)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(fail_init=True))
    assert gpu.discover() == [] and gpu.sample([0]) == []


def test_progress_line_one_line_per_group():
    a = hb(0, "vits", "0" * 16, 5, 10, [0.5, 0.7], images=44, wait=1.0, step=10.0,
           losses={"dino": 1.5, "ibot": 0.5})
    b = hb(1, "vits", "1" * 16, 5, 9, [0.6], images=40, wait=3.0, step=10.0, losses={"dino": 9.0})
    state = {0: RankState(0, "vits", "running", last=a), 1: RankState(1, "vits", "running", last=b),
             2: RankState(2, "vitb"), 3: RankState(3, "vitb", "dead")}
    lines = progress_line(state).splitlines()
    assert len(lines) == 2
    vits, vitb = lines
    mean = (0.5 + 0.7 + 0.6) / 3
    wait = 100 * (1.0 + 3.0) / (10.0 + 10.0)
    assert vits.split() == ["vits", "it", str(min(a.iteration, b.iteration)), f"{mean:.3f}", "s/it", "wait",
                            f"{wait:.1f}%", "loss", f"{1.5 + 0.5:.4f}", "ranks", "2/2", "up"]
    assert vitb.split()[:3] == ["vitb", "waiting", "(1/2"] and vitb.endswith("ranks 0/2 up, 1 failed")


def test_exporter_fed_by_control_server_end_to_end():
    with MetricsExporter(port=0) as ex, ControlServer(expected={0: "vits", 1: "vitb"},
                                                      on_message=ex.observe_message,
                                                      on_event=ex.observe_event) as srv:
        clients = [ControlClient(srv.address, r, g, key=srv.rank_key(r), heartbeat_interval_s=0)
                   for r, g in ((0, "vits"), (1, "vitb"))]
        for c in clients:
            c.register()
        images = defaultdict(int)
        for it in range(6):
            for c in clients:
                n = 2 + c.rank + it % 3
                images[c.group] += n
                c.heartbeat({"iteration": it, "step_seconds": 0.01, "images": n, "losses": {"dino": it}})
            srv.poll(0.01)
        deadline = 50
        while srv.ranks()[1].iteration < 5 or srv.ranks()[0].iteration < 5:
            srv.poll(0.05)
            deadline -= 1
            assert deadline > 0
        _, got = scrape(ex)
        assert got[key("dinodist_rank_up", group="vits", rank="0")] == 1
        for group, n in images.items():
            assert got[key("dinodist_images_total", group=group)] == n
            assert got[key("dinodist_iteration_seconds_count", group=group)] == 6
        srv.mark_exited(1, 1)  # a dead rank goes down in the metrics
        _, got = scrape(ex)
        assert got[key("dinodist_rank_up", group="vitb", rank="1")] == 0
        for c in clients:
            c.close()


def test_busy_port_is_a_one_line_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(DinodistError, match=r"metrics.port: cannot serve on 127.0.0.1:\d+"):
            MetricsExporter(port=s.getsockname()[1])


def test_dashboard_queries_use_only_exported_metrics():
    dash = json.loads((Path(__file__).resolve().parent.parent / "deploy/grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs.append(variables["group"]["definition"])
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
    ex = MetricsExporter(port=None)
    ex.observe_message(hb(0, "g", "a" * 16, 1, 0, [0.1], images=1, wait=0.0, step=0.1, forwards=1, sent=1,
                          losses={"dino": 1.0}, **FULL_TELEMETRY))
    ex.set_attached("g", True)
    ex.track_rejections(lambda: {})
    exported = {s.name for fam in ex.registry.collect() for s in fam.samples}
    used = {name for e in exprs for name in re.findall(r"dinodist_[a-z_]+", e)}
    assert used <= exported, used - exported
    for needed in ("dinodist_images_total", "dinodist_iteration_seconds_bucket",
                   "dinodist_wait_seconds_total", "dinodist_loss", "dinodist_teacher_forwards_total",
                   "dinodist_gpu_utilization_ratio", "dinodist_gpu_memory_used_bytes",
                   "dinodist_gpu_memory_total_bytes", "dinodist_gpu_power_watts",
                   "dinodist_gpu_temperature_celsius", "dinodist_gpu_throttle_reasons",
                   "dinodist_gpu_ecc_errors_total", "dinodist_gpu_xid_errors_total",
                   "dinodist_torch_peak_allocated_bytes", "dinodist_control_rejected_messages_total"):
        assert needed in used, needed
    # every panel's unit is set, and GPU panels use base units
    units = {t["expr"]: p["fieldConfig"]["defaults"]["unit"]
             for p in dash["panels"] for t in p.get("targets", [])}
    assert units['dinodist_gpu_power_watts{group=~"$group"}'] == "watt"
    assert units['dinodist_gpu_temperature_celsius{group=~"$group"}'] == "celsius"
    assert units['dinodist_torch_peak_allocated_bytes{group=~"$group"}'] == "bytes"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_restarts_and_attachment_per_group():
    ex = MetricsExporter(port=None)
    for g in ("vits", "vitb"):
        ex.set_attached(g, True)

    def value(name: str, group: str) -> float:
        return next(s.value for fam in ex.registry.collect() for s in fam.samples
                    if s.name == name and s.labels["group"] == group)

    assert value("dinodist_group_restarts_total", "vits") == 0  # present from the start, not absent
    ex.set_attached("vits", False)  # failed: waiting for its restart
    assert value("dinodist_group_attached", "vits") == 0 and value("dinodist_group_attached", "vitb") == 1
    ex.record_restart("vits")
    ex.set_attached("vits", True)
    assert value("dinodist_group_restarts_total", "vits") == 1
    assert value("dinodist_group_attached", "vits") == 1
    assert value("dinodist_group_restarts_total", "vitb") == 0


FULL_TELEMETRY = dict(gpu_utilization_ratio=0.5, gpu_memory_used_bytes=60 << 30,
                      gpu_memory_total_bytes=80 << 30, gpu_power_watts=612.5, gpu_temperature_celsius=71.0,
                      gpu_throttle_reasons=0x4 | 0x40, gpu_ecc_corrected_total=5, gpu_ecc_uncorrected_total=0,
                      gpu_xid_errors_total=1, gpu_last_xid=79, torch_peak_allocated_bytes=41 << 30)


def test_device_telemetry_per_group_and_rank_in_base_units():
    with MetricsExporter(port=0) as ex:
        ex.observe_message(hb(0, "vits", "a" * 16, 1, 0, [0.1], images=1, wait=0.0, step=0.1,
                              **FULL_TELEMETRY))
        ex.observe_message(hb(1, "vitb", "b" * 16, 1, 0, [0.1], images=1, wait=0.0, step=0.1,
                              torch_peak_allocated_bytes=7))
        text, got = scrape(ex)
        r0 = {"group": "vits", "rank": "0"}
        assert got[key("dinodist_gpu_memory_used_bytes", **r0)] == 60 << 30
        assert got[key("dinodist_gpu_memory_total_bytes", **r0)] == 80 << 30
        assert got[key("dinodist_gpu_power_watts", **r0)] == 612.5
        assert got[key("dinodist_gpu_temperature_celsius", **r0)] == 71.0
        assert got[key("dinodist_gpu_ecc_errors_total", **r0, type="corrected")] == 5
        assert got[key("dinodist_gpu_ecc_errors_total", **r0, type="uncorrected")] == 0
        assert got[key("dinodist_gpu_xid_errors_total", **r0)] == 1
        assert got[key("dinodist_gpu_last_xid", **r0)] == 79
        assert got[key("dinodist_torch_peak_allocated_bytes", **r0)] == 41 << 30
        # one series per throttle reason, 1 while active
        throttled = {dict(labels)["reason"]: v for (n, labels), v in got.items()
                     if n == "dinodist_gpu_throttle_reasons"}
        assert set(throttled) == {*telemetry.THROTTLE_REASONS.values(), "other"}
        assert {r for r, v in throttled.items() if v} == {"sw_power_cap", "hw_thermal_slowdown"}
        assert re.search(r"# TYPE dinodist_gpu_ecc_errors(_total)? counter", text)  # rate() works on it
        # a rank with torch's number but no NVML: that series only, no GPU series for it
        assert got[key("dinodist_torch_peak_allocated_bytes", group="vitb", rank="1")] == 7
        assert not [k for k in got if k[0].startswith("dinodist_gpu") and dict(k[1]).get("rank") == "1"]
        # the next report without power (the reading failed): that series goes, not to zero
        partial = {k: v for k, v in FULL_TELEMETRY.items() if k != "gpu_power_watts"}
        ex.observe_message(hb(0, "vits", "a" * 16, 2, 1, [0.1], images=2, wait=0.0, step=0.2, **partial))
        text, got = scrape(ex)
        assert "dinodist_gpu_power_watts" not in text
        assert got[key("dinodist_gpu_temperature_celsius", **r0)] == 71.0
        # a heartbeat with no telemetry at all (e.g. one the rank sent between samples) changes nothing
        ex.observe_message(hb(0, "vits", "a" * 16, 3, 2, [0.1], images=3, wait=0.0, step=0.3))
        assert scrape(ex)[1][key("dinodist_gpu_temperature_celsius", **r0)] == 71.0


def test_telemetry_fields_are_bounded_on_the_wire_and_in_the_client():
    base = dict(images=1, wait=0.0, step=0.1)
    for bad in ({"gpu_power_watts": -1.0}, {"gpu_temperature_celsius": float("nan")},
                {"gpu_memory_used_bytes": (1 << 50) + 1}, {"gpu_throttle_reasons": 1 << 64},
                {"gpu_ecc_corrected_total": -1}, {"torch_peak_allocated_bytes": 1.5},
                {"gpu_utilization_ratio": 1.01}):
        with pytest.raises(ValueError):
            hb(0, "g", "a" * 16, 1, 0, [0.1], **base, **bad)
    with ControlClient("tcp://127.0.0.1:1", 0, "g", key=b"k" * 32) as c:
        with pytest.raises(DinodistError, match="stats.gpu_temperature_celsius"):
            c.heartbeat({"gpu_temperature_celsius": 4000})
        with pytest.raises(DinodistError, match="stats.torch_peak_allocated_bytes"):
            c.heartbeat({"torch_peak_allocated_bytes": "12"})
        c.heartbeat({"torch_peak_allocated_bytes": 12.0, "gpu_power_watts": 300})  # integral float, int watts
        assert c._gauges == {"torch_peak_allocated_bytes": 12, "gpu_power_watts": 300.0}
        c.heartbeat({"gpu_power_watts": None})  # became unknown: no longer sent
        fields = c._totals_fields()
        assert "gpu_power_watts" not in fields and fields["torch_peak_allocated_bytes"] == 12


def test_rank_sampler_reads_its_own_gpu_through_nvml(monkeypatch, caplog):
    fake = _fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,GPU-aa")  # the rank's cuda:1 is NVML device 0
    sampler = telemetry.GpuSampler.open(1)
    first = sampler.sample()
    assert first == {"gpu_utilization_ratio": 0.37, "gpu_memory_used_bytes": 5 << 30,
                     "gpu_memory_total_bytes": 80 << 30, "gpu_power_watts": 312.5,
                     "gpu_temperature_celsius": 67.0, "gpu_throttle_reasons": 0x10044,
                     "gpu_ecc_corrected_total": 3, "gpu_ecc_uncorrected_total": 1, "gpu_xid_errors_total": 0,
                     "gpu_last_xid": None}
    fake.xids.extend([48, 79])
    after = sampler.sample()
    assert (after["gpu_xid_errors_total"], after["gpu_last_xid"]) == (2, 79) and not fake.xids
    sampler.close()
    # cuda:0 is NVML device 1: no power, ECC or Xid support, a sentinel temperature; all absent
    partial = telemetry.GpuSampler.open(0).sample()
    assert {k for k, v in partial.items() if v is not None} == {
        "gpu_utilization_ratio", "gpu_memory_used_bytes", "gpu_memory_total_bytes"}
    caplog.set_level(logging.WARNING, logger="dinodist.gpu")
    assert telemetry.GpuSampler.open(2) is None  # not a visible device: no telemetry, no failure
    assert "CUDA device 2 is not among CUDA_VISIBLE_DEVICES" in caplog.text
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert telemetry.GpuSampler.open(1).sample()["gpu_utilization_ratio"] == 0.80


def _run_rank_thread(srv: ControlServer, stats: list[dict], cuda_device: int | None) -> None:
    thread = ControlThread(srv.address, 0, "vits", "student", None, {}, 0.05, key=srv.rank_key(0),
                           cuda_device=cuda_device)
    pump_until(srv, lambda: srv.ranks()[0].status == "running")
    for s in stats:
        thread.report(s)
    pump_until(srv, lambda: srv.ranks()[0].iteration == stats[-1]["iteration"])
    if cuda_device is not None:  # and until a GPU sample has come along with a heartbeat
        pump_until(srv, lambda: srv.ranks()[0].last.gpu_xid_errors_total is not None)
    closer = threading.Thread(target=thread.close)
    closer.start()
    pump_until(srv, srv.all_done)
    closer.join(timeout=5)


def pump_until(srv: ControlServer, until, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "condition not reached in time"
        srv.poll(0.02)


def test_rank_thread_sends_gpu_telemetry_with_heartbeats(monkeypatch):
    fake = _fake_nvml()
    fake.xids.append(63)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with MetricsExporter(port=0) as ex, ControlServer(expected={0: "vits"}, on_message=ex.observe_message,
                                                      on_event=ex.observe_event) as srv:
        # what the rank loop passes: torch.cuda.max_memory_allocated() with its iteration's stats
        stats = [{"iteration": i, "torch_peak_allocated_bytes": (i + 1) << 20} for i in range(3)]
        _run_rank_thread(srv, stats, cuda_device=0)
        _, got = scrape(ex)
    r0 = {"group": "vits", "rank": "0"}
    assert got[key("dinodist_gpu_power_watts", **r0)] == 312.5
    assert got[key("dinodist_gpu_memory_used_bytes", **r0)] == 5 << 30
    assert got[key("dinodist_gpu_throttle_reasons", **r0, reason="other")] == 1
    assert got[key("dinodist_gpu_xid_errors_total", **r0)] == 1
    assert got[key("dinodist_gpu_last_xid", **r0)] == 63
    assert got[key("dinodist_torch_peak_allocated_bytes", **r0)] == 3 << 20
    assert not srv.rejected


def test_without_nvml_nothing_fails_and_gpu_series_are_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    monkeypatch.setattr(gpu, "_NVML", None)
    assert gpu.discover() == [] and gpu.sample([0]) == []
    assert telemetry.load_nvml() is None and telemetry.GpuSampler.open(0) is None
    with MetricsExporter(port=0) as ex, ControlServer(expected={0: "vits"}, on_message=ex.observe_message,
                                                      on_event=ex.observe_event) as srv:
        _run_rank_thread(srv, [{"iteration": 0}, {"iteration": 1}], cuda_device=None)
        text, got = scrape(ex)
        assert srv.ranks()[0].status == "done"
    assert "dinodist_gpu" not in text and "dinodist_torch" not in text  # absent: no HELP/TYPE lines either
    assert got[key("dinodist_rank_up", group="vits", rank="0")] == 0
    # asked to sample a GPU where NVML is missing: still nothing, still no failure
    with ControlServer(expected={0: "vits"}) as srv:
        thread = ControlThread(srv.address, 0, "vits", "student", None, {}, 0.05, key=srv.rank_key(0),
                               cuda_device=0)
        thread.report({"iteration": 0})
        pump_until(srv, lambda: srv.ranks()[0].iteration == 0)
        assert srv.ranks()[0].last.gpu_utilization_ratio is None
        closer = threading.Thread(target=thread.close)
        closer.start()
        pump_until(srv, srv.all_done)
        closer.join(timeout=5)


def test_rejected_control_messages_are_exported():
    with MetricsExporter(port=0) as ex, ControlServer(expected={0: "vits"}) as srv:
        ex.track_rejections(srv.rejected_counts)
        _, got = scrape(ex)
        assert got[key("dinodist_control_rejected_messages_total", reason="mac")] == 0
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(srv.address)
        head = m.header(0, "vits")
        for _ in range(3):
            sock.send_multipart([head, b"\x80", b"\0" * 32])
        pump_until(srv, lambda: srv.rejected["mac"] == 3)
        _, got = scrape(ex)
        assert got[key("dinodist_control_rejected_messages_total", reason="mac")] == 3
        sock.close()


def test_quality_gauges_per_group_from_the_newest_iteration_and_bounded_on_the_wire():
    base = dict(images=1, wait=0.0, step=0.1)
    ex = MetricsExporter(port=None)

    def value(name: str, group: str) -> float | None:
        return ex.registry.get_sample_value(name, {"group": group})

    ex.observe_message(hb(0, "s", "a" * 16, 1, 4, [0.1], **base, teacher_agreement_ratio=0.25,
                          teacher_cosine=0.5))
    assert value("dinodist_teacher_agreement_ratio", "s") == 0.25
    assert value("dinodist_teacher_cosine", "s") == 0.5
    assert value("dinodist_knn_top1_ratio", "s") is None  # not measured yet: absent, not 0
    # a late heartbeat of an older iteration (another rank of the group) does not win
    ex.observe_message(hb(1, "s", "b" * 16, 1, 3, [0.1], **base, teacher_agreement_ratio=0.125))
    assert value("dinodist_teacher_agreement_ratio", "s") == 0.25
    ex.observe_message(hb(0, "s", "a" * 16, 2, 5, [0.1], **base, teacher_agreement_ratio=0.75,
                          knn_top1_ratio=0.6))
    assert value("dinodist_teacher_agreement_ratio", "s") == 0.75
    assert value("dinodist_knn_top1_ratio", "s") == 0.6
    ex.observe_message(hb(2, "teacher", "c" * 16, 1, 5, [0.1], **base, knn_top1_ratio=0.8))
    assert value("dinodist_knn_top1_ratio", "teacher") == 0.8
    assert value("dinodist_teacher_agreement_ratio", "teacher") is None
    for bad in ({"teacher_agreement_ratio": 1.5}, {"teacher_cosine": -2.0}, {"knn_top1_ratio": float("nan")}):
        with pytest.raises(ValueError):
            hb(0, "g", "a" * 16, 1, 0, [0.1], **base, **bad)
    with ControlClient("tcp://127.0.0.1:1", 0, "g", key=b"k" * 32) as c:
        with pytest.raises(DinodistError, match="stats.teacher_agreement_ratio"):
            c.heartbeat({"teacher_agreement_ratio": 2.0})
        c.heartbeat({"iteration": 0, "teacher_cosine": 0.5, "knn_top1_ratio": 0.25})
        c.heartbeat({"iteration": 1, "teacher_cosine": 0.625})  # k-NN is kept until measured again
        fields = c._totals_fields()
        assert (fields["teacher_cosine"], fields["knn_top1_ratio"]) == (0.625, 0.25)
        # the whole heartbeat stays far below the frame cap with the quality fields
        msg = m.Heartbeat(**m.stamp(), kind="heartbeat", rank=0, group="g", session="a" * 16, seq=1, **fields)
        assert len(m.encode(msg, b"k" * 32, 0, "g")[1]) < m.MAX_FRAME_BYTES
