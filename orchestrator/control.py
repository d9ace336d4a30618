"""Orchestrator side of the control plane: one zmq ROUTER that tracks every rank of the job.

Threading model: all socket work happens in `poll(timeout_s)`. The orchestrator either calls it
from its own loop (see `supervise`) or calls `start()` to run it in a background thread; state
accessors and `send`/`broadcast` are safe from any thread (commands go through an outbox that
the polling thread drains).

Failure policy (`control.on_failure`): `stop` — the first rank that dies (missed heartbeats,
process gone, non-zero exit, no iteration progress for `progress_timeout_s`) or reports an error
makes the server send `stop` to every rank; the launcher kills whatever is still running after a
grace period (`stragglers`), and the job exits non-zero with a message naming the rank and its
group. `restart_group` — a failure in a group of `restartable` (`distill`: every group, the teacher
included, when the job writes a target store) only queues that group in `group_failures`;
`supervise` kills the group's other ranks, starts them again through its `restart` callback (at most
`max_restarts` times per group), and `reset_group` lets the new processes register in the old ranks'
places. Every other group keeps running. A failure in a group that is not restartable, or one
restart too many, is handled as under `stop`.
The settings (`bind`, `port`, `secret_env`, heartbeat and register timeouts, `on_failure`,
`grace_s`) and their defaults are the topology's `control:` section (orchestrator/topology.py).

Authentication (core/control/messages.py): every message is signed with the key of the rank it
concerns, derived from the job secret this server holds (`rank_key`); the launcher hands each rank
its own key (`rank_env`), never the secret. Bad frames, forgeries and replays are counted in
`rejected` by category and logged once per peer, never more than a few lines a minute.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import zmq

from dinodist.core.control import messages as m
from dinodist.core.control.client import KEY_ENV, owned_socket
from dinodist.core.errors import DinodistError
from dinodist.core.procs import pid_alive
from dinodist.core.train.preempt import PREEMPTED_EXIT
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
    progress_at: float | None = None  # time.monotonic() when `iteration` last advanced (or registration)
    # since when the server waits for this rank to register (the start, or its group's restart)
    expected_since: float = field(default_factory=time.monotonic)
    last: m.Heartbeat | m.Done | None = None
    reason: str | None = None
    exit_code: int | None = None
    preempted: bool = False  # exited with PREEMPTED_EXIT: it checkpointed and stopped on request
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


_MAX_PEERS_REMEMBERED = 4096  # peers whose first rejection was logged; the oldest are forgotten
_PEER_LINES_PER_WINDOW = 20  # first-rejection lines per window, however many new peers turn up
_LOG_WINDOW_S = 60.0  # suppressed rejections are summed up in one line per window


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
        progress_timeout_s: float | None = None,
        restartable: Collection[str] = (),
    ) -> None:
        check_failure_policy(on_failure)
        self.progress_timeout_s = progress_timeout_s
        self.restartable = frozenset(restartable) if on_failure == "restart_group" else frozenset()
        self.group_failures: deque[tuple[str, str]] = deque()
        self._restarting: set[str] = set()
        loopback = m.is_loopback(bind)
        if secret is None and not loopback:
            # ranks on other hosts are started by launch files, which cannot learn a secret made here
            raise DinodistError(f"control.bind: {bind} is not a loopback address, so a shared secret is "
                                "required (set control.secret_env)")
        # The job secret: every rank's key derives from it. Generated when none is given (local runs,
        # where this process's launcher hands each rank its key); it never leaves this process.
        self.secret = m.check_secret(secret) if secret is not None else m.new_job_secret()
        self._keys: dict[int, bytes] = {}
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
        self._replay = m.ReplayGuard(max_clock_skew_s)
        self._peers: OrderedDict[bytes, int] = OrderedDict()  # peer identity -> rejections
        self._peer_lines = 0
        self._suppressed: Counter[str] = Counter()
        self._suppressed_peers: set[bytes] = set()
        self._log_window_at = time.monotonic()
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

        self._sock, self._release = owned_socket(self, zmq.ROUTER)
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
            self._release()
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

    # ---- keys ------------------------------------------------------------------------------

    def rank_key(self, rank: int, group: str | None = None) -> bytes:
        """The key rank `rank` signs with (its group: the topology's, unless given)."""
        with self._lock:
            st = self._states.get(rank)
            if group is None:
                if st is None:
                    raise DinodistError(f"control rank_key: rank {rank} is not in the topology; "
                                        "name its group")
                group = st.group
            return m.rank_key(self.secret, rank, group)

    def rank_env(self, rank: int) -> dict[str, str]:
        """What the launcher adds to rank `rank`'s environment: its key, which the rank's client reads
        (core.control.client.rank_key_from_env). The job secret itself is never passed."""
        return {KEY_ENV: self.rank_key(rank).hex()}

    def _key_for(self, rank: int, group: str) -> bytes | None:
        st = self._states.get(rank)
        if st is None:
            # Not cached: unauthenticated frames choose these identities, and must not grow memory.
            return None if self._expected_only else m.rank_key(self.secret, rank, group)
        if st.group != group:
            return None
        key = self._keys.get(rank)
        if key is None:
            key = self._keys[rank] = m.rank_key(self.secret, rank, group)
        return key

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
            frames = m.encode(msg, self._key_for(st.rank, st.group) or b"", st.rank, st.group)
            self._sock.send_multipart([st.identity, *frames], flags=zmq.NOBLOCK)
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
                received = self._recv()
                if received is None:
                    break
                parts, address = received
                with self._lock:
                    accepted += self._handle(parts[0], parts[1:], address)
        with self._lock:
            self._check_liveness()
            self._drain_outbox()
            self._log_suppressed()
        return accepted

    def _recv(self) -> tuple[list[bytes], str | None] | None:
        try:
            first = self._sock.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        parts, extra = [first.bytes], 0
        while self._sock.getsockopt(zmq.RCVMORE):
            part = self._sock.recv()
            if len(parts) < 4:  # the peer's identity and the three frames of a message
                parts.append(part)
            else:
                extra += 1
        if extra:
            parts = parts[:1] + [b""] * (3 + extra)  # too many frames: decode rejects it
        try:
            address = first.get("Peer-Address")
        except (zmq.ZMQError, AttributeError):  # no address on this transport
            address = None
        return parts, address

    def _reject(self, reason: str, detail: str, peer: bytes = b"", address: str | None = None) -> None:
        """Count a rejected message; log the first one of each peer (a zmq connection), with a cap on
        lines per window so that peers reconnecting in a loop cannot flood the log either."""
        self.rejected[reason] += 1
        seen = self._peers.get(peer)
        if seen is None and self._peer_lines < _PEER_LINES_PER_WINDOW:
            self._peer_lines += 1
            self._peers[peer] = 1
            while len(self._peers) > _MAX_PEERS_REMEMBERED:
                self._peers.popitem(last=False)
            log.warning("control: rejected a message from %s (%s): %s; further rejections from this peer "
                        "are only counted", self._peer_name(peer, address), reason, detail)
            return
        if seen is not None:
            self._peers[peer] = seen + 1
            self._peers.move_to_end(peer)
        self._suppressed[reason] += 1
        if len(self._suppressed_peers) < _MAX_PEERS_REMEMBERED:  # only for the summary's count
            self._suppressed_peers.add(peer)

    @staticmethod
    def _peer_name(peer: bytes, address: str | None) -> str:
        return f"peer {address or '?'} (id {peer.hex() or '-'})"

    def _log_suppressed(self) -> None:
        now = time.monotonic()
        if now - self._log_window_at < _LOG_WINDOW_S:
            return
        if self._suppressed:
            reasons = ", ".join(f"{r} {n}" for r, n in self._suppressed.most_common())
            log.warning("control: %d more rejected messages from %d peers in the last %.0f s (%s)",
                        sum(self._suppressed.values()), len(self._suppressed_peers),
                        now - self._log_window_at, reasons)
        self._suppressed.clear()
        self._suppressed_peers.clear()
        self._peer_lines = 0
        self._log_window_at = now

    def rejected_counts(self) -> dict[str, int]:
        """A copy of `rejected` (reason -> messages), safe from any thread (the metrics exporter)."""
        with self._lock:
            return dict(self.rejected)

    def _handle(self, identity: bytes, frames: list[bytes], address: str | None = None) -> int:
        try:
            msg = m.decode(frames, self._key_for, self._replay)
        except m.Rejected as exc:
            self._reject(exc.reason, exc.detail, identity, address)
            return 0
        except Exception as exc:  # a check that broke on input nobody foresaw: still only this frame
            self._reject("error", f"{type(exc).__name__}: {exc}", identity, address)
            return 0
        if isinstance(msg, m.CommandMsg):
            self._reject("direction", "a rank sent a command", identity, address)
            return 0
        if isinstance(msg, m.Register):
            return self._on_register(identity, msg, address)
        st = self._states.get(msg.rank)
        if st is None or st.session != msg.session or st.group != msg.group:
            self._reject("session", f"{msg.kind} from {_who(msg.rank, msg.group)} "
                                    "without a matching register", identity, address)
            return 0
        st.identity = identity  # a reconnecting DEALER gets a new identity from the ROUTER
        st.last_seen = time.monotonic()
        if isinstance(msg, m.Ack):
            if msg.acked == "command":
                st.acked_commands.add(msg.ref)
            return 1
        if st.status in ("dead", "error", "done"):
            self._reject("late", f"{msg.kind} from {_who(st.rank, st.group)} after it was {st.status}",
                         identity, address)
            return 0
        if isinstance(msg, m.Heartbeat | m.Done):
            # Out-of-order heartbeats must not move the rank backwards.
            if st.last is None or msg.seq > st.last.seq:
                st.last = msg
                if msg.iteration > st.iteration:
                    st.iteration, st.progress_at = msg.iteration, st.last_seen
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
            self._rank_failed(st, st.reason)
        if self.on_message is not None:
            self.on_message(msg)
        return 1

    def _on_register(self, identity: bytes, msg: m.Register, address: str | None = None) -> int:
        # decode() has checked that the message is signed with this rank's key (for a rank in the
        # topology, with its group), so what follows is bookkeeping, not authentication
        st = self._states.get(msg.rank)
        if st is None and self._expected_only:
            self._reject("unexpected", f"{_who(msg.rank, msg.group)} is not in the topology", identity,
                         address)
            return 0
        if st is not None and st.group != msg.group:
            self._reject("unexpected", f"rank {msg.rank} registered as group {msg.group}, "
                                       f"the topology says {st.group}", identity, address)
            return 0
        if st is None:
            st = self._states[msg.rank] = RankState(rank=msg.rank, group=msg.group)
        if st.status in ("dead", "error", "done") and st.session != msg.session:
            self._reject("late", f"{_who(st.rank, st.group)} registered again after it was {st.status}",
                         identity, address)
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
            st.progress_at = st.last_seen
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
        self._rank_failed(st, reason)

    def _rank_failed(self, st: RankState, reason: str) -> None:
        if st.group in self._restarting:
            return  # its group is being restarted already: this is the same failure, seen again
        if st.group in self.restartable and self.failure is None:
            self._restarting.add(st.group)
            self.group_failures.append((st.group, reason))
            log.warning("control: %s; restarting group %s", reason, st.group)
            return
        self._fail(reason)

    def fail(self, reason: str) -> None:
        """Apply the stop policy now (e.g. a group failed more often than it may be restarted)."""
        with self._lock:
            self._fail(reason)
            self._flush_if_unthreaded()

    def reset_group(self, group: str) -> None:
        """The group's ranks were started again: forget the old processes, expect new registrations."""
        with self._lock:
            for r, st in list(self._states.items()):
                if st.group == group:
                    self._states[r] = RankState(rank=r, group=group)
            self._restarting.discard(group)

    def restarting(self) -> set[str]:
        with self._lock:
            return set(self._restarting)

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
                elif self._check_pids and st.pid and not pid_alive(st.pid):
                    self._declare_dead(st, f"{_who(st.rank, st.group)}: process {st.pid} on "
                                           f"{st.hostname} is gone")
                elif (self.progress_timeout_s is not None and st.progress_at is not None
                      and now - st.progress_at > self.progress_timeout_s):
                    # alive (it heartbeats) but stuck: a hang is a failure like a death
                    at = f"iteration {st.iteration}" if st.iteration >= 0 else "its first iteration"
                    self._declare_dead(st, f"{_who(st.rank, st.group)} made no progress for "
                                           f"{self.progress_timeout_s:g} s (at {at})")
            elif (st.status == "expected" and self.register_timeout_s is not None
                  and now - st.expected_since > self.register_timeout_s):
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
            if code == PREEMPTED_EXIT and st.status in ("expected", "running", "done"):
                # asked to stop early, it checkpointed first: the end of this run, not a failure
                st.preempted = True
                if st.status != "done":
                    st.status = "done"
                    self._event("done", st, f"{_who(rank, st.group)} checkpointed and stopped (preempted)")
            elif code == 0:
                if st.status in ("expected", "running"):
                    # A clean exit whose `done` was lost still counts as done.
                    st.status = "done"
                    self._event("done", st, f"{_who(rank, st.group)} exited cleanly")
            elif st.status in ("expected", "running"):
                self._declare_dead(st, f"{_who(rank, st.group)} {how}")
            elif st.status == "done":
                st.reason = f"{_who(rank, st.group)} {how} after reporting done"
                self._rank_failed(st, st.reason)
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
        self._release()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def server_from_config(cfg: Control, expected: Mapping[int, str], **kwargs: Any) -> ControlServer:
    """A server for a topology's `control:` section (orchestrator/topology.py:Control, the one schema
    of these settings and where their defaults are stated). The job secret comes from the variable
    `secret_env` names; without one the server makes its own."""
    secret = m.secret_from_env(cfg.secret_env) if cfg.secret_env else None
    return ControlServer(cfg.bind, cfg.port, secret, cfg.heartbeat_timeout_s, expected,
                         on_failure=cfg.on_failure, register_timeout_s=cfg.register_timeout_s,
                         progress_timeout_s=cfg.progress_timeout_s, **kwargs)


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
    preempt: Callable[[], bool] | None = None,
    restart: Callable[[str], Mapping[int, Process]] | None = None,
    max_restarts: int = 0,
    restarts: dict[str, int] | None = None,
    on_group_failure: Callable[[str], None] | None = None,
) -> Outcome:
    """Run the job to its end: exit code 0 when every rank is done, else 1 with the first failure.

    `preempt()` true (the driver got SIGTERM): `preempt` goes to every rank; when they have all
    checkpointed and exited with PREEMPTED_EXIT the outcome has that exit code.

    `restart(group)` (with `control.on_failure: restart_group`): start a failed group's ranks again;
    it returns their new processes by rank. Before calling it the group's surviving processes are
    killed and reaped; `restarts` (group -> count, updated in place) is checked against `max_restarts`.

    Applies the `stop` policy: on a failure the server has already sent `stop` to every rank;
    ranks whose process is still alive `grace_s` later are passed to `kill` (default: kill each
    process; the launcher may pass its own, e.g. one that signals process groups).
    """
    procs = dict(procs)
    exited: set[int] = set()
    killed: list[int] = []
    next_progress = time.monotonic() + progress_every_s
    preempt_sent = False
    restarts = restarts if restarts is not None else {}
    to_restart: dict[str, list[int]] = {}  # group -> its ranks, killed and awaiting their exit
    while True:
        server.poll(poll_s)
        if preempt is not None and not preempt_sent and preempt():
            # the teacher picks the iteration and tells the students with its targets (teacher/run.py)
            server.broadcast("preempt")
            preempt_sent = True
        for rank, proc in procs.items():
            code = proc.poll()
            if code is not None and rank not in exited:
                exited.add(rank)
                server.mark_exited(rank, code)
        while server.group_failures:
            group, reason = server.group_failures.popleft()
            if restart is None or restarts.get(group, 0) >= max_restarts:
                server.fail(f"{reason} (group {group} restarted {restarts.get(group, 0)} times, "
                            f"control.max_restarts is {max_restarts})")
                continue
            if on_group_failure is not None:
                on_group_failure(group)
            ranks = sorted(r for r, st in server.ranks().items() if st.group == group)
            live = [r for r in ranks if r in procs and r not in exited]
            if live:
                (kill or (lambda rs: [procs[r].kill() for r in rs]))(live)
            to_restart[group] = ranks
        for group, ranks in list(to_restart.items()):
            if server.failure is not None:
                to_restart.clear()
                break
            if any(r in procs and r not in exited for r in ranks):
                continue  # its old processes are still being reaped
            restarts[group] = restarts.get(group, 0) + 1
            log.warning("control: restarting group %s (restart %d of at most %d)", group, restarts[group],
                        max_restarts)
            server.reset_group(group)
            procs.update(restart(group))
            exited.difference_update(ranks)
            del to_restart[group]
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
        elif len(exited) == len(procs) and server.all_done() and not to_restart:
            preempted = sorted(r for r, st in server.ranks().items() if st.preempted)
            if preempted:
                return Outcome(PREEMPTED_EXIT, f"preempted: ranks {preempted} checkpointed and stopped", ())
            return Outcome(0, "every rank finished", ())
        # Local processes all gone but ranks elsewhere still running (or never registered): keep
        # polling; heartbeat and register timeouts turn a silent rank into a failure.
