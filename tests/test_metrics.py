"""Prometheus exporter: scraped over HTTP, counters exact under repeats and reordering, GPU metrics only
with GPUs, the console progress line."""

from __future__ import annotations

import json
import random
import re
import socket
import sys
import urllib.request
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dinodist.core.control import messages as m
from dinodist.core.control.client import ControlClient
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
    name = "NVIDIA H100 80GB HBM3"
    devices = [("GPU-aa11", name, 37, 5 << 30), ("GPU-bb22", name, 80, 1), ("GPU-cc33", name, 0, 0)]

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
    return SimpleNamespace(
        NVMLError=_FakeNVMLError, nvmlInit=init, nvmlDeviceGetCount=lambda: len(devices),
        nvmlDeviceGetHandleByIndex=handle, nvmlDeviceGetUUID=lambda h: devices[h][0].encode(),
        nvmlDeviceGetName=lambda h: devices[h][1],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=80 << 30, used=devices[h][3]),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=devices[h][2], memory=0))


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
        clients = [ControlClient(srv.address, r, g, heartbeat_interval_s=0)
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
                          losses={"dino": 1.0}, gpu_utilization_ratio=0.5, gpu_memory_used_bytes=1))
    ex.set_attached("g", True)
    exported = {s.name for fam in ex.registry.collect() for s in fam.samples}
    used = {name for e in exprs for name in re.findall(r"dinodist_[a-z_]+", e)}
    assert used <= exported, used - exported
    for needed in ("dinodist_images_total", "dinodist_iteration_seconds_bucket",
                   "dinodist_wait_seconds_total", "dinodist_loss", "dinodist_teacher_forwards_total",
                   "dinodist_gpu_utilization_ratio", "dinodist_gpu_memory_used_bytes"):
        assert needed in used


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
