"""Prometheus metrics built from control-plane messages, and the console progress line.

Heartbeats carry each rank's cumulative totals, so counters advance by the difference from the
largest total already seen for that rank's session: a repeated, late or reordered heartbeat adds
nothing, and a dropped one is made up by the next. The iteration histogram observes each
(group, iteration) once, whichever rank reports it first.

Quality gauges (teacher agreement and cosine, k-NN top-1) exist per group once a rank has reported
them, from the newest iteration reported.

Device series (GPU utilisation, memory, power, temperature, throttle reasons, ECC and Xid counts,
torch's peak allocation) exist only once a rank has reported them: on CPU, or without NVML, they
are absent, not zero. They are built at scrape time from each rank's latest report.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dinodist.core.control import messages as m
from dinodist.core.control.telemetry import THROTTLE_REASONS
from dinodist.core.errors import DinodistError

# From tiny CPU runs (~0.05 s/it) to the paper's 7B teacher over many GPUs (tens of seconds).
ITERATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, math.inf)
_MAX_SESSIONS_PER_RANK = 8

# heartbeat field -> counter attribute on MetricsExporter
_COUNTED = {
    "images_total": "images",
    "wait_seconds_total": "wait",
    "step_seconds_total": "step",
    "teacher_forwards_total": "teacher_forwards",
    "target_bytes_sent_total": "target_bytes",
}

# telemetry field (core/control/messages.py:Telemetry) -> gauge name and help; base units throughout
_DEVICE_GAUGES = {
    "gpu_utilization_ratio": ("dinodist_gpu_utilization_ratio",
                              "Fraction of time a kernel ran on the rank's GPU."),
    "gpu_memory_used_bytes": ("dinodist_gpu_memory_used_bytes",
                              "GPU memory in use on the rank's GPU, all processes (NVML)."),
    "gpu_memory_total_bytes": ("dinodist_gpu_memory_total_bytes", "GPU memory of the rank's GPU (NVML)."),
    "gpu_power_watts": ("dinodist_gpu_power_watts", "Power draw of the rank's GPU."),
    "gpu_temperature_celsius": ("dinodist_gpu_temperature_celsius", "Core temperature of the rank's GPU."),
    "gpu_last_xid": ("dinodist_gpu_last_xid", "Code of the last critical Xid event on the rank's GPU."),
    "torch_peak_allocated_bytes": ("dinodist_torch_peak_allocated_bytes",
                                   "Peak memory allocated by torch on the rank's device "
                                   "(torch.cuda.max_memory_allocated)."),
}
GPU_TELEMETRY_KEYS = frozenset(m.TELEMETRY_KEYS)


class _DeviceCollector:
    """Each rank's latest device telemetry, turned into metric families at scrape time; a family with
    no rank reporting it is not emitted at all (no HELP/TYPE lines either)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}

    def update(self, group: str, rank: str, values: Mapping[str, Any], replace: bool) -> None:
        with self._lock:
            current = {} if replace else dict(self._latest.get((group, rank), {}))
            current.update(values)
            current = {k: v for k, v in current.items() if v is not None}
            if current:
                self._latest[(group, rank)] = current
            else:
                self._latest.pop((group, rank), None)

    def describe(self) -> list[Metric]:
        return []  # names are dynamic (absent until reported): nothing to reserve in the registry

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            latest = sorted(self._latest.items())
        for key, (name, help_text) in _DEVICE_GAUGES.items():
            family = GaugeMetricFamily(name, help_text, labels=["group", "rank"])
            for (group, rank), values in latest:
                if key in values:
                    family.add_metric([group, rank], values[key])
            if family.samples:
                yield family
        throttle = GaugeMetricFamily(
            "dinodist_gpu_throttle_reasons",
            "1 while NVML reports this clocks-event (throttle) reason on the rank's GPU, else 0.",
            labels=["group", "rank", "reason"])
        ecc = CounterMetricFamily("dinodist_gpu_ecc_errors", "ECC errors on the rank's GPU since its driver "
                                  "loaded (NVML volatile counts).", labels=["group", "rank", "type"])
        xid = CounterMetricFamily("dinodist_gpu_xid_errors", "Critical Xid events on the rank's GPU since "
                                  "the rank started.", labels=["group", "rank"])
        for (group, rank), values in latest:
            mask = values.get("gpu_throttle_reasons")
            if mask is not None:
                for bit, reason in THROTTLE_REASONS.items():
                    throttle.add_metric([group, rank, reason], 1 if mask & bit else 0)
                unknown = mask & ~sum(THROTTLE_REASONS)
                throttle.add_metric([group, rank, "other"], 1 if unknown else 0)
            for field, kind in (("gpu_ecc_corrected_total", "corrected"),
                                ("gpu_ecc_uncorrected_total", "uncorrected")):
                if field in values:
                    ecc.add_metric([group, rank, kind], values[field])
            if "gpu_xid_errors_total" in values:
                xid.add_metric([group, rank], values["gpu_xid_errors_total"])
        for family in (throttle, ecc, xid):
            if family.samples:
                yield family


# what ControlServer.rejected counts; each starts at 0, so rate() and alerts have a first sample
_REJECT_REASONS = ("oversize", "malformed", "version", "unexpected", "mac", "invalid", "identity", "stale",
                   "replay", "session", "late", "direction", "error", "send_failed")


class _RejectedCollector:
    """The control server's rejected-message counts, read at scrape time."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("dinodist_control_rejected_messages", "Control-plane messages rejected "
                                     "(bad frames, forged or replayed messages...), by reason.",
                                     labels=["reason"])
        for reason, n in sorted({**dict.fromkeys(_REJECT_REASONS, 0), **self._counts()}.items()):
            family.add_metric([reason], n)
        yield family


class MetricsExporter:
    """Owns a private registry; serves it over HTTP on `bind:port` (port 0 picks a free one)."""

    def __init__(self, port: int | None = 0, bind: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.iteration_seconds = Histogram(
            "dinodist_iteration_seconds", "Wall time of one training iteration of a group.",
            ["group"], registry=r, buckets=ITERATION_BUCKETS)
        self.images = Counter("dinodist_images_total", "Images trained on, summed over the group's ranks.",
                              ["group"], registry=r)
        self.wait = Counter("dinodist_wait_seconds_total",
                            "Seconds ranks spent waiting for targets or peers, summed over the group's "
                            "ranks.",
                            ["group"], registry=r)
        self.step = Counter("dinodist_step_seconds_total",
                            "Seconds ranks spent in iterations, summed over the group's ranks "
                            "(denominator of the wait fraction).", ["group"], registry=r)
        self.loss = Gauge("dinodist_loss", "Latest loss value per term.", ["group", "term"], registry=r)
        self.teacher_forwards = Counter("dinodist_teacher_forwards_total",
                                        "Teacher forward passes (global batches) run.", ["group"], registry=r)
        self.target_bytes = Counter("dinodist_target_bytes_sent_total",
                                    "Bytes of teacher targets sent to student groups.", ["group"], registry=r)
        self.rank_up = Gauge("dinodist_rank_up", "1 while a rank is registered and alive.",
                             ["group", "rank"], registry=r)
        self.restarts = Counter("dinodist_group_restarts", "Times a failed student group was restarted "
                                "(control.on_failure: restart_group).", ["group"], registry=r)
        self.attached = Gauge("dinodist_group_attached", "1 while a student group is running (live or "
                              "catching up from the target store), 0 between its failure and its restart.",
                              ["group"], registry=r)
        self.quality = {
            "teacher_agreement_ratio": Gauge(
                "dinodist_teacher_agreement_ratio", "Fraction of a student group's global crops whose DINO "
                "prototype argmax equals the teacher's, latest iteration (heads targets).", ["group"],
                registry=r),
            "teacher_cosine": Gauge(
                "dinodist_teacher_cosine", "Mean cosine of a student group's and the teacher's centred DINO "
                "prototype logits (heads) or CLS features (features targets), latest iteration.", ["group"],
                registry=r),
            "knn_top1_ratio": Gauge(
                "dinodist_knn_top1_ratio", "k-NN top-1 accuracy of a group's EMA backbone at its latest "
                "evaluation (eval.knn; the teacher's once, at its end).", ["group"], registry=r),
        }
        self._quality_iteration: dict[tuple[str, str], int] = {}
        self._devices = _DeviceCollector()
        r.register(self._devices)
        # (rank, session) -> largest cumulative value seen per counted field
        self._seen: dict[int, dict[str, dict[str, float]]] = {}
        self._hist_iteration: dict[str, int] = {}
        self._loss_iteration: dict[str, int] = {}
        self._server = None
        self.bind = bind
        self.port: int | None = None
        if port is not None:
            try:
                self._server, _ = start_http_server(port, addr=bind, registry=r)
            except OSError as exc:
                raise DinodistError(f"metrics.port: cannot serve on {bind}:{port}: {exc}") from None
            self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.port}/metrics"

    def update_from_heartbeat(self, msg: m.Heartbeat | m.Done) -> None:
        group, rank = msg.group, str(msg.rank)
        sessions = self._seen.setdefault(msg.rank, {})
        seen = sessions.setdefault(msg.session, dict.fromkeys(_COUNTED, 0))
        while len(sessions) > _MAX_SESSIONS_PER_RANK:
            sessions.pop(next(iter(sessions)))
        for field, attr in _COUNTED.items():
            # labels() creates the child at 0, so every group shows every counter from its first
            # heartbeat and rate() has a starting point.
            counter = getattr(self, attr).labels(group=group)
            value = getattr(msg, field)
            if value > seen[field]:
                counter.inc(value - seen[field])
                seen[field] = value
        first = msg.iteration - len(msg.step_seconds) + 1
        done_up_to = self._hist_iteration.get(group, -1)
        for it, seconds in enumerate(msg.step_seconds, start=first):
            if it > done_up_to:
                self.iteration_seconds.labels(group=group).observe(seconds)
        self._hist_iteration[group] = max(done_up_to, msg.iteration)
        if msg.losses and msg.iteration >= self._loss_iteration.get(group, -1):
            self._loss_iteration[group] = msg.iteration
            for term, value in msg.losses.items():
                self.loss.labels(group=group, term=term).set(value)
        for key, gauge in self.quality.items():
            value = getattr(msg, key)
            # a group's newest iteration wins, whichever rank reports it (the values are group-level)
            if value is not None and msg.iteration >= self._quality_iteration.get((group, key), -1):
                self._quality_iteration[(group, key)] = msg.iteration
                gauge.labels(group=group).set(value)
        telemetry = {k: getattr(msg, k) for k in m.TELEMETRY_KEYS}
        if any(v is not None for v in telemetry.values()):
            # a rank sends its whole telemetry set each time: what it left out became unknown
            self._devices.update(group, rank, telemetry, replace=True)
        self.rank_up.labels(group=group, rank=rank).set(0 if isinstance(msg, m.Done) else 1)

    def record_restart(self, group: str) -> None:
        self.restarts.labels(group=group).inc()

    def set_attached(self, group: str, attached: bool) -> None:
        # every student group shows a restart count from the start, so rate() and alerts see 0 first
        self.restarts.labels(group=group)
        self.attached.labels(group=group).set(1 if attached else 0)

    def update_gpu(self, group: str, rank: int, utilization_ratio: float | None = None,
                   memory_used_bytes: int | None = None, **telemetry: float | None) -> None:
        """Set some of a rank's device gauges (heartbeats do this themselves; the driver may call it with
        `orchestrator.gpu.sample`'s readings, `**s.telemetry()`). Keys are `messages.Telemetry`'s
        fields; None leaves a gauge as it is."""
        values = {"gpu_utilization_ratio": utilization_ratio, "gpu_memory_used_bytes": memory_used_bytes,
                  **telemetry}
        unknown = set(values) - GPU_TELEMETRY_KEYS
        if unknown:
            raise DinodistError(f"update_gpu: unknown telemetry field {sorted(unknown)[0]!r}")
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            self._devices.update(group, str(rank), given, replace=False)

    def track_rejections(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Export `dinodist_control_rejected_messages_total{reason}` from `counts()` (pass
        `ControlServer.rejected_counts`), read at every scrape."""
        self.registry.register(_RejectedCollector(counts))

    def observe_message(self, msg: Any) -> None:
        """Feed every accepted control message here (`ControlServer(on_message=...)`)."""
        if isinstance(msg, m.Register):
            self.rank_up.labels(group=msg.group, rank=str(msg.rank)).set(1)
        elif isinstance(msg, m.Heartbeat | m.Done):
            self.update_from_heartbeat(msg)
        elif isinstance(msg, m.Error):
            self.rank_up.labels(group=msg.group, rank=str(msg.rank)).set(0)

    def observe_event(self, event: Any) -> None:
        """Feed control events here (`ControlServer(on_event=...)`): dead ranks go down."""
        if event.kind in ("dead", "error", "done"):
            self.rank_up.labels(group=event.group, rank=str(event.rank)).set(0)
        elif event.kind == "registered":
            self.rank_up.labels(group=event.group, rank=str(event.rank)).set(1)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _group_line(group: str, states: list[Any]) -> str:
    up = sum(st.status == "running" for st in states)
    failed = [st for st in states if st.status in ("dead", "error")]
    tail = f"ranks {up}/{len(states)} up" + (f", {len(failed)} failed" if failed else "")
    reported = [st.last for st in states if st.last is not None]
    if not reported:
        registered = sum(st.status != "expected" for st in states)
        return f"{group:<14} waiting ({registered}/{len(states)} registered)  {tail}"
    iteration = min(h.iteration for h in reported)  # a group is as far as its slowest rank
    recent = [s for h in reported for s in h.step_seconds]
    if recent:
        spi = sum(recent) / len(recent)
    else:  # no step since the last heartbeat: fall back to the run's average
        spi = sum(h.step_seconds_total for h in reported) / max(1, sum(h.iteration + 1 for h in reported))
    step = sum(h.step_seconds_total for h in reported)
    wait = 100.0 * sum(h.wait_seconds_total for h in reported) / step if step > 0 else 0.0
    newest = max(reported, key=lambda h: h.iteration)
    losses = newest.losses
    loss = losses.get("loss", losses.get("total", sum(losses.values()) if losses else None))
    # The teacher group trains nothing: it has no loss to show.
    shown = "     -" if loss is None else f"{loss:.4f}"
    return f"{group:<14} it {iteration:>7}  {spi:7.3f} s/it  wait {wait:5.1f}%  loss {shown}  {tail}"


def progress_line(state: Mapping[int, Any]) -> str:
    """One line per group (in rank order) from `ControlServer.ranks()`, joined by newlines."""
    groups: dict[str, list[Any]] = {}
    for _, st in sorted(state.items()):
        groups.setdefault(st.group, []).append(st)
    return "\n".join(_group_line(g, sts) for g, sts in groups.items())
