"""Orchestrator side of the control plane: one zmq ROUTER that tracks every rank of the job.

Threading model: all socket work happens in `poll(timeout_s)`. The orchestrator either calls it
from its own loop (see `supervise`) or calls `start()` to run it in a background thread; state
accessors and `send`/`broadcast` are safe from any thread (commands go through an outbox that
the polling thread drains).

Failure policy (`control.on_failure`): `stop` — the first rank that dies (missed heartbeats,
process gone, non-zero exit) or reports an error makes the server send `stop` to every rank;
the launcher kills whatever is still running after a grace period (`stragglers`), and the job
exits non-zero with a message naming the rank and its group. `restart_group` (restart the
failed group from its last checkpoint while the others wait) is designed but not implemented.
The settings (`bind`, `port`, `secret_env`, heartbeat and register timeouts, `on_failure`,
`grace_s`) and their defaults are the topology's `control:` section (orchestrator/topology.py).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import zmq

from dinodist.core.control import messages as m
from dinodist.core.errors import DinodistError
from dinodist.orchestrator.topology import Control, check_failure_policy

log = logging.getLogger("dinodist.control")

Status = Literal["expected", "running", "done", "dead", "error"]
EventKind = Literal["registered", "dead", "error", "done"]


@dataclass
class RankState:
    rank: int
    group: str
    status: Status = "expected"
    role: str | None = None
    pid: int | None = None
    hostname: str | None = None
    session: str | None = None
    registered_at: float | None = None
    last_seen: float | None = None  # time.monotonic() of the last valid message
    iteration: int = -1
    last: m.Heartbeat | m.Done | None = None
    reason: str | None = None
    exit_code: int | None = None
    acked_commands: set[int] = field(default_factory=set)
    identity: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ControlEvent:
    kind: EventKind
    rank: int
    group: str
    reason: str


def _who(rank: int, group: str) -> str:
    return f"rank {rank} (group {group})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An exited child not yet reaped by its parent still answers kill(0): look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class ControlServer:
    """ROUTER socket tracking ranks; `expected` maps rank -> group (None accepts any rank)."""

    def __init__(
        self,
        bind: str = "127.0.0.1",
        port: int = 0,
        secret: bytes | str | None = None,
        heartbeat_timeout_s: float = 10.0,
        expected: Mapping[int, str] | None = None,
        *,
        on_failure: str = "stop",
        register_timeout_s: float | None = None,
        max_clock_skew_s: float = 60.0,
        on_message: Callable[[Any], None] | None = None,
        on_event: Callable[[ControlEvent], None] | None = None,
        heartbeat_timeout: float | None = None,
    ) -> None:
        check_failure_policy(on_failure)
        self.secret = secret.encode() if isinstance(secret, str) else secret
        loopback = m.is_loopback(bind)
        if not loopback and not self.secret:
            raise DinodistError(f"control.bind: {bind} is not a loopback address, so a shared secret is "
                                "required (set control.secret_env)")
        self.bind = bind
        self.heartbeat_timeout_s = heartbeat_timeout if heartbeat_timeout is not None else heartbeat_timeout_s
        self.register_timeout_s = register_timeout_s
        self.on_failure = on_failure
        self.on_message = on_message
        self.on_event = on_event
        self.events: queue.Queue[ControlEvent] = queue.Queue()
        self.rejected: Counter[str] = Counter()
        self.failure: str | None = None
        self._failed_at: float | None = None
        # Pids are only meaningful on this host; with a loopback bind every rank is local.
        self._check_pids = loopback
        self._replay = m.ReplayGuard(max_clock_skew_s) if self.secret else None
        self._states: dict[int, RankState] = {
            int(r): RankState(rank=int(r), group=g) for r, g in (expected or {}).items()
        }
        self._expected_only = expected is not None
        self._lock = threading.RLock()
        self._outbox: deque[tuple[int, str, int]] = deque()
        self._next_command_id = 0
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        self._stop_thread = threading.Event()
        self.thread_error: BaseException | None = None

        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Frames far above the cap make zmq drop the peer instead of buffering them; frames between
        # the cap and this hard limit arrive and are dropped and counted by `decode`.
        self._sock.setsockopt(zmq.MAXMSGSIZE, 4 * m.MAX_FRAME_BYTES)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.SNDHWM, 1000)
        host = bind
        if ":" in bind.strip("[]"):
            self._sock.setsockopt(zmq.IPV6, 1)
            host = f"[{bind.strip('[]')}]"
        try:
            self._sock.bind(f"tcp://{host}:{port if port else '*'}")
        except zmq.ZMQError as exc:
            self._sock.close(0)
            self._ctx.term()
            raise DinodistError(f"control.bind: cannot bind {host}:{port}: {exc}") from None
        self.port = int(self._sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        wildcard = bind in ("*", "0.0.0.0", "::", "[::]")
        self.address = f"tcp://{socket.gethostname() if wildcard else host}:{self.port}"

    # ---- public state ----------------------------------------------------------------------

    def ranks(self) -> dict[int, RankState]:
        """A snapshot copy of every rank's state."""
        with self._lock:
            return {r: replace(st, acked_commands=set(st.acked_commands)) for r, st in self._states.items()}

    def dead_ranks(self) -> list[int]:
        with self._lock:
            return sorted(r for r, st in self._states.items() if st.status == "dead")

    def failed_ranks(self) -> list[int]:
        with self._lock:
            return sorted(r for r, st in self._states.items() if st.status in ("dead", "error"))

    def all_done(self) -> bool:
        with self._lock:
            return bool(self._states) and all(st.status == "done" for st in self._states.values())

    def acked(self, rank: int, command_id: int) -> bool:
        with self._lock:
            return command_id in self._states[rank].acked_commands

    def stragglers(self, grace_s: float) -> list[int]:
        """Ranks still running `grace_s` after the failure: the launcher kills these."""
        with self._lock:
            if self._failed_at is None or time.monotonic() - self._failed_at < grace_s:
                return []
            return sorted(r for r, st in self._states.items() if st.exit_code is None)

    # ---- commands --------------------------------------------------------------------------

    def send(self, rank: int, command: str) -> int:
        """Queue `command` for one rank; returns its command id (see `acked`)."""
        if command not in m.COMMANDS:
            raise DinodistError(f"control command: {command!r} is not one of {', '.join(m.COMMANDS)}")
        with self._lock:
            st = self._states.get(rank)
            if st is None or st.identity is None:
                raise DinodistError(f"control send: rank {rank} has not registered")
            self._next_command_id += 1
            cid = self._next_command_id
            self._outbox.append((rank, command, cid))
        self._flush_if_unthreaded()
        return cid

    def broadcast(self, command: str) -> dict[int, int]:
        """Send `command` to every registered rank still running; returns rank -> command id."""
        with self._lock:
            targets = [r for r, st in self._states.items() if st.status == "running" and st.identity]
            return {r: self.send(r, command) for r in targets}

    def _flush_if_unthreaded(self) -> None:
        if self._thread is None or threading.current_thread() is self._thread:
            with self._lock:
                self._drain_outbox()

    def _drain_outbox(self) -> None:
        while self._outbox:
            rank, command, cid = self._outbox.popleft()
            st = self._states[rank]
            msg = m.CommandMsg(**m.stamp(), kind="command", command=command, command_id=cid)
            self._send_to(st, msg)

    def _send_to(self, st: RankState, msg: Any) -> None:
        if st.identity is None:
            return
        try:
            self._sock.send_multipart([st.identity, *m.encode(msg, self.secret)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone (EHOSTUNREACH) or its queue full (EAGAIN)
            self.rejected["send_failed"] += 1
            log.warning("control: could not send %s to %s: %s", msg.kind, _who(st.rank, st.group), exc)

    # ---- the loop ------------------------------------------------------------------------

    def poll(self, timeout_s: float = 0.0) -> int:
        """Handle what arrives within `timeout_s`, then check liveness; returns messages accepted."""
        accepted = 0
        with self._lock:
            self._drain_outbox()
        if self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            for _ in range(10_000):  # bounded so a flood cannot starve the liveness check
                parts = self._recv()
                if parts is None:
                    break
                with self._lock:
                    accepted += self._handle(parts)
        with self._lock:
            self._check_liveness()
            self._drain_outbox()
        return accepted

    def _recv(self) -> list[bytes] | None:
        try:
            parts = [self._sock.recv(zmq.NOBLOCK)]
        except zmq.Again:
            return None
        while self._sock.getsockopt(zmq.RCVMORE):
            part = self._sock.recv()
            if len(parts) < 4:
                parts.append(part)
            else:
                parts = parts[:1] + [b"", b"", b"", b""]  # too many frames: decode rejects it
        return parts

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        n = self.rejected[reason]
        if n <= 10 or n % 1000 == 0:
            log.warning("control: rejected message (%s, #%d): %s", reason, n, detail)

    def _handle(self, parts: list[bytes]) -> int:
        identity, frames = parts[0], parts[1:]
        try:
            msg = m.decode(frames, self.secret, self._replay)
        except m.Rejected as exc:
            self._reject(exc.reason, exc.detail)
            return 0
        if isinstance(msg, m.CommandMsg):
            self._reject("direction", "a rank sent a command")
            return 0
        if isinstance(msg, m.Register):
            return self._on_register(identity, msg)
        st = self._states.get(msg.rank)
        if st is None or st.session != msg.session or st.group != msg.group:
            self._reject("session", f"{msg.kind} from {_who(msg.rank, msg.group)} "
                                    "without a matching register")
            return 0
        st.identity = identity  # a reconnecting DEALER gets a new identity from the ROUTER
        st.last_seen = time.monotonic()
        if isinstance(msg, m.Ack):
            if msg.acked == "command":
                st.acked_commands.add(msg.ref)
            return 1
        if st.status in ("dead", "error", "done"):
            self._reject("late", f"{msg.kind} from {_who(st.rank, st.group)} after it was {st.status}")
            return 0
        if isinstance(msg, m.Heartbeat | m.Done):
            # Out-of-order heartbeats must not move the rank backwards.
            if st.last is None or msg.seq > st.last.seq:
                st.last = msg
                st.iteration = max(st.iteration, msg.iteration)
        if isinstance(msg, m.Done):
            st.status = "done"
            self._ack(st, "done", msg.seq)
            self._event("done", st, f"{_who(st.rank, st.group)} finished at iteration {msg.iteration}")
        elif isinstance(msg, m.Error):
            st.status = "error"
            first_line = next((ln.strip() for ln in msg.message.splitlines() if ln.strip()), "(no message)")
            st.reason = f"{_who(st.rank, st.group)} failed: {first_line}"
            self._ack(st, "error", msg.seq)
            self._event("error", st, st.reason)
            self._fail(st.reason)
        if self.on_message is not None:
            self.on_message(msg)
        return 1

    def _on_register(self, identity: bytes, msg: m.Register) -> int:
        st = self._states.get(msg.rank)
        if st is None and self._expected_only:
            self._reject("unexpected", f"{_who(msg.rank, msg.group)} is not in the topology")
            return 0
        if st is not None and st.group != msg.group:
            self._reject("unexpected", f"rank {msg.rank} registered as group {msg.group}, "
                                       f"the topology says {st.group}")
            return 0
        if st is None:
            st = self._states[msg.rank] = RankState(rank=msg.rank, group=msg.group)
        if st.status in ("dead", "error", "done") and st.session != msg.session:
            self._reject("late", f"{_who(st.rank, st.group)} registered again after it was {st.status}")
            return 0
        repeat = st.session == msg.session
        st.identity = identity
        st.session, st.role, st.pid, st.hostname = msg.session, msg.role, msg.pid, msg.hostname
        st.last_seen = time.monotonic()
        if not repeat:
            if st.status == "running":
                log.warning("control: %s registered again with a new session (process restarted)",
                            _who(st.rank, st.group))
            st.status, st.registered_at, st.iteration, st.last = "running", st.last_seen, -1, None
            self._event("registered", st, f"{_who(st.rank, st.group)} registered: {msg.role}, pid {msg.pid} "
                                          f"on {msg.hostname}")
            if self.on_message is not None:
                self.on_message(msg)
        self._ack(st, "register", msg.seq)
        if self.failure is not None and self.on_failure == "stop":
            self._outbox.append((st.rank, "stop", self._bump_command_id()))
        return 1

    def _bump_command_id(self) -> int:
        self._next_command_id += 1
        return self._next_command_id

    def _ack(self, st: RankState, acked: str, ref: int) -> None:
        self._send_to(st, m.Ack(**m.stamp(), kind="ack", rank=st.rank, group=st.group,
                                session=st.session, acked=acked, ref=ref))

    def _event(self, kind: EventKind, st: RankState, reason: str) -> None:
        event = ControlEvent(kind=kind, rank=st.rank, group=st.group, reason=reason)
        log.info("control: %s", reason)
        self.events.put(event)
        if self.on_event is not None:
            self.on_event(event)

    def _declare_dead(self, st: RankState, reason: str) -> None:
        st.status = "dead"
        st.reason = reason
        self._event("dead", st, reason)
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._failed_at = time.monotonic()
        log.error("control: %s; stopping every rank", reason)
        for r, st in self._states.items():
            if st.status == "running" and st.identity is not None:
                self._outbox.append((r, "stop", self._bump_command_id()))

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for st in self._states.values():
            if st.status == "running":
                silent = now - (st.last_seen or now)
                if silent > self.heartbeat_timeout_s:
                    self._declare_dead(st, f"{_who(st.rank, st.group)} missed heartbeats for "
                                           f"{self.heartbeat_timeout_s:g} s (silent {silent:.1f} s)")
                elif self._check_pids and st.pid and not _pid_alive(st.pid):
                    self._declare_dead(st, f"{_who(st.rank, st.group)}: process {st.pid} on "
                                           f"{st.hostname} is gone")
            elif (st.status == "expected" and self.register_timeout_s is not None
                  and now - self._started > self.register_timeout_s):
                self._declare_dead(st, f"{_who(st.rank, st.group)} did not register within "
                                       f"{self.register_timeout_s:g} s")

    def mark_exited(self, rank: int, code: int) -> None:
        """Record a rank's process exit code, as seen by the launcher."""
        with self._lock:
            st = self._states.get(rank)
            if st is None:
                raise DinodistError(f"control mark_exited: rank {rank} is unknown")
            st.exit_code = code
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            if code == 0:
                if st.status in ("expected", "running"):
                    # A clean exit whose `done` was lost still counts as done.
                    st.status = "done"
                    self._event("done", st, f"{_who(rank, st.group)} exited cleanly")
            elif st.status in ("expected", "running"):
                self._declare_dead(st, f"{_who(rank, st.group)} {how}")
            elif st.status == "done":
                st.reason = f"{_who(rank, st.group)} {how} after reporting done"
                self._fail(st.reason)
            self._flush_if_unthreaded()

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, interval_s: float = 0.05) -> ControlServer:
        """Run `poll` in a daemon thread until `close()`."""
        if self._thread is not None:
            return self

        def loop() -> None:
            try:
                while not self._stop_thread.is_set():
                    self.poll(interval_s)
            except BaseException as exc:  # surface to the orchestrator instead of dying silently
                self.thread_error = exc
                with self._lock:
                    self._fail(f"control thread crashed: {type(exc).__name__}: {exc}")
                log.exception("control: polling thread crashed")

        self._thread = threading.Thread(target=loop, name="dinodist-control", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._stop_thread.set()
            self._thread.join(timeout=5)
        if not self._sock.closed:
            self._sock.close(linger=0)
            self._ctx.term()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def server_from_config(cfg: Control, expected: Mapping[int, str], **kwargs: Any) -> ControlServer:
    """A server for a topology's `control:` section (orchestrator/topology.py:Control, the one schema
    of these settings and where their defaults are stated)."""
    secret = m.secret_from_env(cfg.secret_env) if cfg.secret_env else None
    return ControlServer(cfg.bind, cfg.port, secret, cfg.heartbeat_timeout_s, expected,
                         on_failure=cfg.on_failure, register_timeout_s=cfg.register_timeout_s, **kwargs)


class Process(Protocol):
    def poll(self) -> int | None: ...
    def kill(self) -> None: ...


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    message: str
    killed: tuple[int, ...] = ()


def supervise(
    server: ControlServer,
    procs: Mapping[int, Process],
    *,
    grace_s: float,
    poll_s: float = 0.2,
    kill: Callable[[list[int]], None] | None = None,
    progress: Callable[[dict[int, RankState]], None] | None = None,
    progress_every_s: float = 10.0,
) -> Outcome:
    """Run the job to its end: exit code 0 when every rank is done, else 1 with the first failure.

    Applies the `stop` policy: on a failure the server has already sent `stop` to every rank;
    ranks whose process is still alive `grace_s` later are passed to `kill` (default: kill each
    process; the launcher may pass its own, e.g. one that signals process groups).
    """
    exited: set[int] = set()
    killed: list[int] = []
    next_progress = time.monotonic() + progress_every_s
    while True:
        server.poll(poll_s)
        for rank, proc in procs.items():
            code = proc.poll()
            if code is not None and rank not in exited:
                exited.add(rank)
                server.mark_exited(rank, code)
        if progress is not None and time.monotonic() >= next_progress:
            progress(server.ranks())
            next_progress = time.monotonic() + progress_every_s
        if server.failure is not None:
            late = [r for r in server.stragglers(grace_s)
                    if r in procs and r not in exited and r not in killed]
            if late:
                log.error("control: killing ranks %s after the %g s grace period", late, grace_s)
                if kill is not None:
                    kill(late)
                else:
                    for rank in late:
                        procs[rank].kill()
                killed.extend(late)
            if len(exited) == len(procs):
                return Outcome(1, server.failure, tuple(killed))
        elif len(exited) == len(procs) and server.all_done():
            return Outcome(0, "every rank finished", ())
        # Local processes all gone but ranks elsewhere still running (or never registered): keep
        # polling; heartbeat and register timeouts turn a silent rank into a failure.
