"""Prometheus metrics built from control-plane messages, and the console progress line.

Heartbeats carry each rank's cumulative totals, so counters advance by the difference from the
largest total already seen for that rank's session: a repeated, late or reordered heartbeat adds
nothing, and a dropped one is made up by the next. The iteration histogram observes each
(group, iteration) once, whichever rank reports it first.

GPU gauges exist only once a GPU value has been reported: on CPU they are absent, not zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dinodist.core.control import messages as m
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
        self.gpu_utilization: Gauge | None = None
        self.gpu_memory: Gauge | None = None
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
        if msg.gpu_utilization_ratio is not None or msg.gpu_memory_used_bytes is not None:
            self.update_gpu(group, msg.rank, msg.gpu_utilization_ratio, msg.gpu_memory_used_bytes)
        self.rank_up.labels(group=group, rank=rank).set(0 if isinstance(msg, m.Done) else 1)

    def record_restart(self, group: str) -> None:
        self.restarts.labels(group=group).inc()

    def set_attached(self, group: str, attached: bool) -> None:
        # every student group shows a restart count from the start, so rate() and alerts see 0 first
        self.restarts.labels(group=group)
        self.attached.labels(group=group).set(1 if attached else 0)

    def update_gpu(self, group: str, rank: int, utilization_ratio: float | None,
                   memory_used_bytes: int | None) -> None:
        """Set a rank's GPU gauges (from a heartbeat, or from `orchestrator.gpu.sample` locally)."""
        if utilization_ratio is not None:
            if self.gpu_utilization is None:
                self.gpu_utilization = Gauge("dinodist_gpu_utilization_ratio",
                                             "Fraction of time a kernel ran on the rank's GPU.",
                                             ["group", "rank"], registry=self.registry)
            self.gpu_utilization.labels(group=group, rank=str(rank)).set(utilization_ratio)
        if memory_used_bytes is not None:
            if self.gpu_memory is None:
                self.gpu_memory = Gauge("dinodist_gpu_memory_used_bytes",
                                        "GPU memory in use on the rank's GPU.", ["group", "rank"],
                                        registry=self.registry)
            self.gpu_memory.labels(group=group, rank=str(rank)).set(memory_used_bytes)

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
