"""Rank side of the control plane: one zmq DEALER per rank, owned by the training loop's thread.

Nothing here may stall training: sends never block (a full queue drops the heartbeat and counts
it), and since heartbeats carry cumulative totals, a dropped one loses no counts; the next one
carries them. Only `done` and `error`, sent once at the end, wait briefly for the server's ack
so that closing the socket does not discard them.
"""

from __future__ import annotations

import math
import os
import socket
import time
import weakref
from collections import deque
from collections.abc import Mapping
from typing import Any

import zmq
from pydantic import ValidationError

from dinodist.core.control import messages as m
from dinodist.core.errors import DinodistError

# Per-iteration values added to the running totals, mapped to their wire names.
_ADDITIVE = {
    "step_seconds": "step_seconds_total",
    "wait_seconds": "wait_seconds_total",
    "images": "images_total",
    "teacher_forwards": "teacher_forwards_total",
    "target_bytes_sent": "target_bytes_sent_total",
}
REREGISTER_S = 5.0
CONTROL_ENV = "DINODIST_CONTROL"  # the launcher puts the server address here
# the rank a process reports as, when that is not its rank in its own world: a student group restarted
# as a world of its own takes the places (global ranks) of the processes it replaces
CONTROL_RANK_ENV = "DINODIST_CONTROL_RANK"
# this rank's control-plane key, hex: the supervisor derives it from the job secret for each rank it
# starts, so a rank never holds the secret (docs/control-plane.md, Authentication)
KEY_ENV = "DINODIST_CONTROL_KEY"
STAT_KEYS = frozenset({"iteration", "losses", *m.TELEMETRY_KEYS, *m.QUALITY_KEYS, *_ADDITIVE})


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DinodistError(f"heartbeat stats.{key}: expected a number, got {type(value).__name__}")
    return value


def rank_key_from_env(rank: int, group: str, secret_env: str | None = None) -> bytes:
    """This rank's key: from $DINODIST_CONTROL_KEY (what the supervisor's launcher passes), else
    derived from the job secret in `secret_env` (clusters, where launch files start the ranks and
    the secret is in every rank's environment anyway)."""
    text = os.environ.get(KEY_ENV)
    if text:
        return m.parse_key(text, KEY_ENV)
    if secret_env:
        return m.rank_key(m.secret_from_env(secret_env), rank, group)
    raise DinodistError(f"{KEY_ENV}: environment variable is unset; the supervisor passes each rank its "
                        "control-plane key there (on clusters set control.secret_env instead)")


def _close_socket(sock: zmq.Socket, ctx: zmq.Context) -> None:
    if not sock.closed:
        sock.close(linger=0)
    if not ctx.closed:
        ctx.term()


def owned_socket(owner: object, kind: int) -> tuple[zmq.Socket, weakref.finalize]:
    """A socket of `kind` on a context of its own, both closed (linger 0) and terminated when `owner` is
    collected or the returned finalizer is called, whichever comes first.

    Left to pyzmq's own finalizers, an owner dropped without `close()` can hang the process for good: in a
    cyclic collection the context's weak set of sockets is cleared before its `__del__` runs, so that
    `destroy()` closes nothing and `zmq_ctx_term` waits forever on the still-open socket. The finalizer
    holds both strongly, so the socket is always closed first."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    release = weakref.finalize(owner, _close_socket, sock, ctx)
    # not at exit: a daemon thread may still be polling the socket, and the OS reclaims both anyway
    release.atexit = False
    return sock, release


class ControlClient:
    """Connects one rank to the orchestrator's ControlServer at `address` (tcp://host:port).

    Call `register()` once, then `heartbeat(stats)` every iteration with that iteration's stats
    (keys: iteration, step_seconds, wait_seconds, images, losses, teacher_forwards,
    target_bytes_sent, optionally the device gauges of `messages.Telemetry`, e.g.
    torch_peak_allocated_bytes, and the quality measures of `messages.Quality`; all but iteration
    optional). The client keeps the totals and
    sends at most one heartbeat every `heartbeat_interval_s`. Poll `poll_command()` for
    `checkpoint` / `stop`. It signs with `key`, else with the key derived from the job `secret`,
    else with the key in $DINODIST_CONTROL_KEY.
    """

    def __init__(
        self,
        address: str,
        rank: int,
        group: str,
        role: str = "student",
        secret: bytes | str | None = None,
        *,
        key: bytes | None = None,
        heartbeat_interval_s: float = 1.0,
        sndhwm: int = 64,
    ) -> None:
        if role not in ("teacher", "student"):
            raise DinodistError(f"control client role: {role!r} is not 'teacher' or 'student'")
        self.address = address
        self.rank = int(rank)
        self.group = group
        self.role = role
        # Only the derived key is kept: what this object holds can sign for this rank and no other.
        if key is not None:
            self.key = key
        elif secret is not None:
            self.key = m.rank_key(m.check_secret(secret), self.rank, group)
        else:
            self.key = rank_key_from_env(self.rank, group)
        if len(self.key) != m.KEY_BYTES:
            raise DinodistError(f"control client key: {len(self.key)} bytes, expected {m.KEY_BYTES}")
        self.heartbeat_interval_s = heartbeat_interval_s
        self.session = m.new_session()
        self.dropped = 0  # messages not sent because the queue to the server was full
        self.rejected = 0  # frames from the server that failed validation
        self.registered = False
        self._seq = 0
        self._last_sent = -math.inf
        self._totals: dict[str, Any] = {wire: 0 for wire in _ADDITIVE.values()}
        self._totals["step_seconds_total"] = 0.0
        self._totals["wait_seconds_total"] = 0.0
        self._iteration = -1
        self._recent: deque[float] = deque(maxlen=m.MAX_RECENT_STEPS)
        self._losses: dict[str, float] = {}
        self._gauges: dict[str, Any] = {}
        self._quality: dict[str, float] = {}
        self._commands: deque[str] = deque()
        self._acks: set[tuple[str, int]] = set()
        self._register_kw: dict[str, Any] | None = None
        self._register_msg_at = -math.inf
        self._replay = m.ReplayGuard()
        self._sock, self._release = owned_socket(self, zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.RCVHWM, 1024)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 4 * m.MAX_FRAME_BYTES)
        if address.startswith("tcp://["):
            self._sock.setsockopt(zmq.IPV6, 1)
        self._sock.connect(address)

    def _envelope(self, kind: str) -> dict[str, Any]:
        self._seq += 1
        return {**m.stamp(), "kind": kind, "rank": self.rank, "group": self.group,
                "session": self.session, "seq": self._seq}

    def _send(self, msg: Any) -> bool:
        try:
            self._sock.send_multipart(m.encode(msg, self.key, self.rank, self.group), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped += 1
            return False

    def register(self, *, world_size: int | None = None, group_rank: int | None = None,
                 group_size: int | None = None) -> bool:
        """Announce this rank; world size defaults to $WORLD_SIZE when set."""
        if world_size is None and os.environ.get("WORLD_SIZE", "").isdigit():
            world_size = int(os.environ["WORLD_SIZE"])
        msg = m.Register(**self._envelope("register"), role=self.role, pid=os.getpid(),
                         hostname=socket.gethostname()[:255], world_size=world_size,
                         group_rank=group_rank, group_size=group_size)
        self._register_msg_at = time.monotonic()
        self._register_kw = {"world_size": world_size, "group_rank": group_rank, "group_size": group_size}
        return self._send(msg)

    def _accumulate(self, stats: Mapping[str, Any]) -> None:
        # Everything is checked before anything is folded in, so a bad call changes nothing.
        unknown = set(stats) - STAT_KEYS
        if unknown:
            raise DinodistError(f"heartbeat stats.{sorted(unknown)[0]}: unknown key "
                                f"(known: {', '.join(sorted(STAT_KEYS))})")
        added = {}
        for key, wire in _ADDITIVE.items():
            if key in stats:
                value = _number(key, stats[key])
                if not math.isfinite(value) or value < 0:
                    raise DinodistError(f"heartbeat stats.{key}: {value} is not a finite non-negative number")
                added[wire] = value
        losses = stats.get("losses")
        if losses is not None:
            if not isinstance(losses, Mapping):
                raise DinodistError("heartbeat stats.losses: expected a mapping of term -> value")
            losses = {str(k): float(_number(f"losses.{k}", v)) for k, v in losses.items()}
        gauges = self._telemetry(stats)
        quality = self._quality_of(stats)
        iteration = int(_number("iteration", stats["iteration"])) if "iteration" in stats else self._iteration
        if iteration < -1:
            raise DinodistError(f"heartbeat stats.iteration: {iteration} is negative")
        self._iteration = iteration
        for wire, value in added.items():
            self._totals[wire] += value
        if "step_seconds" in stats:
            self._recent.append(float(stats["step_seconds"]))
        if losses is not None:
            self._losses = losses
        self._gauges.update(gauges)
        self._quality.update(quality)

    @staticmethod
    def _quality_of(stats: Mapping[str, Any]) -> dict[str, float]:
        # the latest value of each measure is kept: a measure taken every N iterations stays reported
        given = {k: float(_number(k, stats[k])) for k in m.QUALITY_KEYS if stats.get(k) is not None}
        try:
            m.Quality.model_validate(given)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise DinodistError(f"heartbeat stats.{where}: {first['msg']}") from None
        return given

    @staticmethod
    def _telemetry(stats: Mapping[str, Any]) -> dict[str, Any]:
        # None clears a gauge (the quantity became unknown); a key left out keeps its last value
        gauges: dict[str, Any] = {}
        for key in m.TELEMETRY_KEYS:
            if key not in stats:
                continue
            value = stats[key]
            if value is not None:
                value = _number(key, value)
                if key in m.INTEGER_TELEMETRY and isinstance(value, float) and value.is_integer():
                    value = int(value)
                elif key not in m.INTEGER_TELEMETRY:
                    value = float(value)
            gauges[key] = value
        try:
            m.Telemetry.model_validate({k: v for k, v in gauges.items() if v is not None})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise DinodistError(f"heartbeat stats.{where}: {first['msg']}") from None
        return gauges

    def _totals_fields(self) -> dict[str, Any]:
        return {"iteration": self._iteration, "step_seconds": list(self._recent),
                "step_seconds_total": float(self._totals["step_seconds_total"]),
                "wait_seconds_total": float(self._totals["wait_seconds_total"]),
                "images_total": int(self._totals["images_total"]),
                "teacher_forwards_total": int(self._totals["teacher_forwards_total"]),
                "target_bytes_sent_total": int(self._totals["target_bytes_sent_total"]),
                "losses": dict(self._losses), **{k: v for k, v in self._gauges.items() if v is not None},
                **self._quality}

    def _build(self, model: type, kind: str) -> Any:
        try:
            return model(**self._envelope(kind), **self._totals_fields())
        except ValidationError as exc:  # e.g. a GPU ratio outside [0, 1]: a caller bug, named
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise DinodistError(f"heartbeat stats.{where}: {first['msg']}") from None

    def heartbeat(self, stats: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Fold in this iteration's stats and send a heartbeat if one is due; never blocks.

        Returns whether a heartbeat went out. Call it with no stats during long setup phases
        (checkpoint loading) to stay alive without reporting progress.
        """
        if stats:
            self._accumulate(stats)
        now = time.monotonic()
        if not force and now - self._last_sent < self.heartbeat_interval_s:
            return False
        if self._register_kw is not None and not self.registered:
            self._receive(0)
            # A register sent before the server was listening may have been dropped: repeat it
            # (the server treats a repeat from the same session as a no-op).
            if not self.registered and now - self._register_msg_at > REREGISTER_S:
                self.register(**self._register_kw)
        sent = self._send(self._build(m.Heartbeat, "heartbeat"))
        if sent:
            self._last_sent = now
            # Step times already sent need not travel again; the server deduplicates by
            # iteration anyway, so keeping them after a drop is safe.
            self._recent.clear()
        return sent

    def _receive(self, timeout_ms: int) -> None:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(left, zmq.POLLIN):
                return
            frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            try:
                msg = m.decode(frames, self._key_for, self._replay)
            except m.Rejected:
                self.rejected += 1
                continue
            # Something arrived that a caller may be waiting for: drain what is queued, then return.
            deadline = time.monotonic()
            if isinstance(msg, m.CommandMsg):
                self._commands.append(msg.command)
                self._send(m.Ack(**m.stamp(), kind="ack", rank=self.rank, group=self.group,
                                 session=self.session, acked="command", ref=msg.command_id))
            elif isinstance(msg, m.Ack) and msg.session == self.session:
                if msg.acked == "register":
                    self.registered = True
                self._acks.add((msg.acked, msg.ref))
            else:
                self.rejected += 1

    def _key_for(self, rank: int, group: str) -> bytes | None:
        # the server signs what it sends a rank with that rank's key: anything else is not for us
        return self.key if (rank, group) == (self.rank, self.group) else None

    def poll_command(self, timeout_ms: int = 0) -> str | None:
        """The next command from the server ('checkpoint' or 'stop'), or None; waits at most timeout_ms."""
        if not self._commands:
            self._receive(timeout_ms)
        return self._commands.popleft() if self._commands else None

    def _final(self, msg: Any, kind: str, timeout_ms: int) -> bool:
        # The ack is what tells us the message left the socket; without waiting for it, the
        # linger-0 close right after would silently discard a still-queued final message.
        if not self._send(msg):
            return False
        deadline = time.monotonic() + timeout_ms / 1000
        while (kind, msg.seq) not in self._acks:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                return False
            self._receive(min(left, 50))
        return True

    def done(self, stats: Mapping[str, Any] | None = None, timeout_ms: int = 2000) -> bool:
        """Report a clean finish with final totals; returns whether the server acknowledged it."""
        if stats:
            self._accumulate(stats)
        return self._final(self._build(m.Done, "done"), "done", timeout_ms)

    def error(self, message: str, timeout_ms: int = 2000) -> bool:
        """Report a failure (first line of the message, truncated); returns whether it was acknowledged."""
        text = (message.strip().splitlines() or ["(no message)"])[0][: m.MAX_TEXT]
        return self._final(m.Error(**self._envelope("error"), message=text), "error", timeout_ms)

    def close(self) -> None:
        self._release()

    @classmethod
    def from_env(cls, group: str, role: str = "student", secret_env: str | None = None,
                 **kwargs: Any) -> ControlClient | None:
        """A client for the address in $DINODIST_CONTROL, as rank $DINODIST_CONTROL_RANK (else $RANK),
        with its key from `rank_key_from_env`; None when no orchestrator launched this process
        (plain torchrun), so ranks run the same without a control plane."""
        address = os.environ.get(CONTROL_ENV)
        if not address:
            return None
        var = CONTROL_RANK_ENV if os.environ.get(CONTROL_RANK_ENV) else "RANK"
        rank = os.environ.get(var, "")
        if not rank.isdigit():
            raise DinodistError(f"{var}: environment variable is {rank!r}, expected the rank number")
        key = rank_key_from_env(int(rank), group, secret_env)
        return cls(address, int(rank), group, role, key=key, **kwargs)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
