"""Control plane over real loopback zmq sockets: validation, authentication, liveness, stop policy.
Forgeries, replays and per-peer logging have their own file, tests/test_auth.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import zmq

from dinodist.core.control import messages as m
from dinodist.core.control.client import KEY_ENV, ControlClient
from dinodist.core.errors import DinodistError
from dinodist.orchestrator.control import ControlServer, server_from_config, supervise
from dinodist.orchestrator.topology import Control

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent


def pump(server: ControlServer, until, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "condition not reached in time"
        server.poll(0.02)


def raw_dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def signed(key: bytes, rank: int, group: str, payload: dict | bytes) -> list[bytes]:
    """The frames of one message as a peer holding `key` would send them, for any payload."""
    body = payload if isinstance(payload, bytes) else msgpack.packb(payload)
    head = m.header(rank, group)
    return [head, body, m.sign(key, head, body)]


def client(srv: ControlServer, rank: int, group: str, **kwargs) -> ControlClient:
    return ControlClient(srv.address, rank, group, key=srv.rank_key(rank, group), **kwargs)


def register_dict(rank: int = 0, group: str = "g", session: str | None = None) -> dict:
    return m.Register(**m.stamp(), kind="register", rank=rank, group=group,
                      session=session or m.new_session(), seq=1, role="student", pid=os.getpid(),
                      hostname="h").model_dump()


def heartbeat_dict(rank: int, group: str, session: str, seq: int, iteration: int) -> dict:
    return m.Heartbeat(**m.stamp(), kind="heartbeat", rank=rank, group=group, session=session, seq=seq,
                       iteration=iteration, step_seconds=[0.1], step_seconds_total=0.1 * (iteration + 1),
                       wait_seconds_total=0.0, images_total=iteration + 1, teacher_forwards_total=0,
                       target_bytes_sent_total=0, losses={"dino": 1.0}).model_dump()


def test_oversize_frames_are_never_unpacked(monkeypatch):
    calls = []
    real = m.msgpack.unpackb
    monkeypatch.setattr(m.msgpack, "unpackb", lambda *a, **k: calls.append(1) or real(*a, **k))
    key = m.rank_key(b"s" * 32, 0, "g")

    def keys(rank, group):
        return key

    big = signed(key, 0, "g", {**register_dict(), "hostname": "x" * m.MAX_FRAME_BYTES})
    with pytest.raises(m.Rejected) as exc:
        m.decode(big, keys, m.ReplayGuard())
    assert exc.value.reason == "oversize" and calls == []
    # Under the byte cap but over the structural limits: refused by msgpack itself.
    wide = msgpack.packb({str(i): i for i in range(m.MAX_LOSS_TERMS + 100)})
    assert len(wide) < m.MAX_FRAME_BYTES
    with pytest.raises(m.Rejected, match="malformed"):
        m.decode(signed(key, 0, "g", wide), keys, m.ReplayGuard())
    assert len(calls) == 1
    # Nesting deeper than msgpack's stack, inside the byte cap: refused, not a crash.
    with pytest.raises(m.Rejected, match="malformed"):
        m.decode(signed(key, 0, "g", b"\x91" * 60_000 + b"\x00"), keys, m.ReplayGuard())
    ok = m.encode(m.Register.model_validate(register_dict()), key, 0, "g")
    assert m.decode(ok, keys, m.ReplayGuard()).kind == "register"


def test_bad_frames_are_rejected_counted_and_server_keeps_running():
    with ControlServer(expected={0: "g"}) as srv:
        sock = raw_dealer(srv.address)
        key = srv.rank_key(0)
        good = register_dict()
        # correctly signed by rank 0, so every check after the MAC is reached
        cases = {
            "invalid": [{**good, "bogus": 1}, {**good, "rank": "0"}, {**good, "role": "chef"},
                        {**good, "kind": "promote"}],
            "version": [{**good, "v": 1}, {k: v for k, v in good.items() if k != "v"}, {**good, "v": True}],
            "malformed": [b"\xc1 not msgpack", msgpack.packb([1, 2, 3])],
            "oversize": [{**good, "hostname": "x" * (m.MAX_FRAME_BYTES + 10)}],
        }
        for payloads in cases.values():
            for payload in payloads:
                sock.send_multipart(signed(key, 0, "g", payload))
        # rejected before the MAC is even looked at
        outsiders = {
            "unexpected": [signed(m.rank_key(srv.secret, 7, "g"), 7, "g", register_dict(rank=7)),
                           signed(m.rank_key(srv.secret, 0, "other"), 0, "other",
                                  register_dict(group="other"))],
            "version": [[msgpack.packb(good)],  # a protocol-1 peer: a bare msgpack map, no header
                        [msgpack.packb(good), b"x" * 32],
                        [b"dinodist/1 0 g", *signed(key, 0, "g", good)[1:]]],
            "malformed": [[b"GET / HTTP/1.1", b"", b""], [b"dinodist/2 0 g", msgpack.packb(good)],
                          [*signed(key, 0, "g", good), b"extra"], [b"dinodist/2 zero g", b"", b""]],
            "mac": [[*signed(key, 0, "g", good)[:2], b"x" * 32], [*signed(key, 0, "g", good)[:2], b""]],
        }
        for frames in (f for fs in outsiders.values() for f in fs):
            sock.send_multipart(frames)
        expected = Counter({k: len(v) for k, v in cases.items()})
        expected.update({k: len(v) for k, v in outsiders.items()})
        pump(srv, lambda: sum(srv.rejected.values()) >= sum(expected.values()))
        assert srv.rejected == expected
        assert srv.ranks()[0].status == "expected"
        sock.send_multipart(signed(key, 0, "g", good))  # the server is still serving
        pump(srv, lambda: srv.ranks()[0].status == "running")
        assert srv.events.get_nowait().kind == "registered"
        sock.close()


def test_off_loopback_requires_secret_and_bad_macs_are_rejected():
    with pytest.raises(DinodistError, match="control.bind: 0.0.0.0"):
        ControlServer(bind="0.0.0.0")
    with pytest.raises(DinodistError, match="control secret: shorter than 16 bytes"):
        ControlServer(secret=b"short")
    secret = b"k" * 32
    with ControlServer(bind="0.0.0.0", secret=secret, expected={0: "g", 1: "g", 2: "g"}) as srv:
        addr = f"tcp://127.0.0.1:{srv.port}"
        clients = [ControlClient(addr, 0, "g", key=b"\0" * 32), ControlClient(addr, 1, "g", secret=b"w" * 32),
                   ControlClient(addr, 2, "g", secret=secret)]
        for c in clients:
            c.register()
        pump(srv, lambda: srv.rejected["mac"] == 2 and srv.ranks()[2].status == "running")
        assert [srv.ranks()[r].status for r in range(3)] == ["expected", "expected", "running"]
        good = clients[2]
        pump(srv, lambda: good.poll_command() is None and good.registered)
        # Server -> rank commands are authenticated too.
        cid = srv.send(2, "checkpoint")
        assert good.poll_command(timeout_ms=2000) == "checkpoint"
        pump(srv, lambda: srv.acked(2, cid))

        sock = raw_dealer(addr)
        key = m.rank_key(secret, 2, "g")
        hb = signed(key, 2, "g", heartbeat_dict(2, "g", good.session, seq=10, iteration=0))
        tampered = bytearray(hb[1])
        tampered[-1] ^= 1
        stale = signed(key, 2, "g", {**heartbeat_dict(2, "g", good.session, 11, 1), "ts": time.time() - 3600})
        sock.send_multipart([hb[0], bytes(tampered), hb[2]])
        sock.send_multipart(hb)
        sock.send_multipart(hb)  # replayed capture
        sock.send_multipart(stale)
        sock.send_multipart([*hb[:2], b""])  # missing MAC
        pump(srv, lambda: srv.rejected["mac"] == 4 and srv.rejected["replay"] == 1
             and srv.rejected["stale"] == 1)
        assert srv.ranks()[2].last.seq == 10
        sock.close()
        for c in clients:
            c.close()


def drain_events(server: ControlServer) -> list:
    events = []
    while not server.events.empty():
        events.append(server.events.get_nowait())
    return events


def _rank_loop(address: str, rank: int, group: str, key: bytes, received: list,
               silent_after: int | None = None, quit: threading.Event | None = None) -> None:
    """A rank's training loop: heartbeats each iteration (until `silent_after`), obeys commands."""
    with ControlClient(address, rank, group, key=key, heartbeat_interval_s=0) as c:
        c.register()
        it = 0
        while quit is None or not quit.is_set():
            if silent_after is None or it < silent_after:
                c.heartbeat({"iteration": it, "step_seconds": 0.02, "wait_seconds": 0.005, "images": 4,
                             "losses": {"dino": 1.0 / (it + 1)}})
                it += 1
            cmd = c.poll_command(timeout_ms=20)
            if cmd is not None:
                received.append(cmd)
            if cmd == "stop":
                received.append(("done acked", c.done()))
                return


def test_register_heartbeat_command_round_trip():
    received = {0: [], 1: []}
    with ControlServer(expected={0: "vits", 1: "vits"}) as srv:
        threads = [threading.Thread(target=_rank_loop, args=(srv.address, r, "vits", srv.rank_key(r),
                                                             received[r]))
                   for r in (0, 1)]
        for t in threads:
            t.start()
        pump(srv, lambda: all(st.iteration >= 3 for st in srv.ranks().values()))
        cid = srv.send(1, "checkpoint")
        pump(srv, lambda: srv.acked(1, cid))
        ids = srv.broadcast("stop")
        assert sorted(ids) == [0, 1]
        pump(srv, srv.all_done)
        for t in threads:
            t.join(timeout=5)
        assert received[0] == ["stop", ("done acked", True)]
        assert received[1] == ["checkpoint", "stop", ("done acked", True)]
        states = srv.ranks()
        for st in states.values():
            assert st.status == "done" and st.last.kind == "done"
            # Totals travel cumulatively: the final ones cover every iteration the rank ran.
            assert st.last.images_total == 4 * (st.last.iteration + 1)
        kinds = Counter(e.kind for e in drain_events(srv))
        assert kinds == Counter(registered=2, done=2)
        assert srv.failure is None and not srv.rejected
        with pytest.raises(DinodistError, match="control command: 'pause'"):
            srv.send(0, "pause")


def test_silent_rank_is_declared_dead_and_everyone_is_stopped():
    received = {0: [], 1: []}
    quit = threading.Event()
    with ControlServer(expected={0: "vits", 1: "vitb"}, heartbeat_timeout_s=1.0) as srv:
        addr = srv.address
        threads = [threading.Thread(target=_rank_loop,
                                    args=(addr, 0, "vits", srv.rank_key(0), received[0], None, quit)),
                   threading.Thread(target=_rank_loop,
                                    args=(addr, 1, "vitb", srv.rank_key(1), received[1], 3, quit))]
        for t in threads:
            t.start()
        try:
            _silent_rank_checks(srv, received)
        finally:
            # A thread left running keeps its zmq socket open, and the context's finaliser would then
            # block the whole pytest session at exit.
            quit.set()
            for t in threads:
                t.join(timeout=5)


def _silent_rank_checks(srv: ControlServer, received: dict) -> None:
    pump(srv, lambda: srv.ranks()[1].iteration == 2)
    last_beat = time.monotonic()
    pump(srv, lambda: srv.dead_ranks() == [1], timeout=5)
    elapsed = time.monotonic() - last_beat
    assert 0.9 <= elapsed < 3.5  # timeout 1 s; the upper bound leaves room for a loaded machine
    # The rank thread appends the ack after the server has seen `done`: wait for the ack itself.
    pump(srv, lambda: len(received[0]) == 2)
    assert srv.ranks()[0].status == "done"
    events = drain_events(srv)
    dead = [e for e in events if e.kind == "dead"]
    assert len(dead) == 1 and dead[0].rank == 1 and dead[0].group == "vitb"
    assert "rank 1 (group vitb) missed heartbeats" in dead[0].reason
    assert srv.failure == dead[0].reason
    assert received[0] == ["stop", ("done acked", True)]  # the healthy rank was told to stop
    # The launcher's view: both processes still alive after the grace period.
    assert srv.stragglers(grace_s=60.0) == []
    assert srv.stragglers(grace_s=0.0) == [0, 1]
    srv.mark_exited(0, 0)
    srv.mark_exited(1, -9)
    assert srv.stragglers(grace_s=0.0) == [] and srv.failure == dead[0].reason
    assert received[1] == []  # a dead rank is not sent commands


def test_exit_codes_and_restarts():
    seen = []
    with ControlServer(expected={0: "g", 1: "g", 2: "g", 3: "g"}, on_message=seen.append) as srv:
        srv.mark_exited(0, 0)
        srv.mark_exited(1, 3)
        srv.mark_exited(2, -9)
        st = srv.ranks()
        assert st[0].status == "done"
        assert st[1].status == "dead" and st[1].reason == "rank 1 (group g) exited with code 3"
        assert st[2].reason == "rank 2 (group g) was killed by signal 9"
        assert srv.failure == st[1].reason and srv.dead_ranks() == [1, 2]
        with pytest.raises(DinodistError, match="rank 9 is unknown"):
            srv.mark_exited(9, 0)

        # A restarted process re-registers with a new session; its old session is ignored, and
        # heartbeats that arrive out of order do not move the rank backwards.
        old = client(srv, 3, "g", heartbeat_interval_s=0)
        old.register()
        pump(srv, lambda: srv.ranks()[3].session == old.session)
        new = client(srv, 3, "g", heartbeat_interval_s=0)
        new.register()
        pump(srv, lambda: srv.ranks()[3].session == new.session)
        # A rank that registers after the failure is told to stop straight away.
        assert new.poll_command(timeout_ms=2000) == "stop"
        sock = raw_dealer(srv.address)
        key = srv.rank_key(3)
        sock.send_multipart(signed(key, 3, "g", heartbeat_dict(3, "g", old.session, seq=500, iteration=50)))
        sock.send_multipart(signed(key, 3, "g", heartbeat_dict(3, "g", new.session, seq=100, iteration=9)))
        sock.send_multipart(signed(key, 3, "g", heartbeat_dict(3, "g", new.session, seq=50, iteration=4)))
        # One socket delivers in order: once seq 50 is seen, the stale-session one was handled.
        pump(srv, lambda: any(getattr(x, "seq", 0) == 50 for x in seen))
        assert srv.rejected["session"] >= 1
        assert srv.ranks()[3].last.seq == 100 and srv.ranks()[3].iteration == 9
        for c in (old, new):
            c.close()
        sock.close()


def test_client_never_blocks_without_a_server():
    with zmq.Context.instance().socket(zmq.ROUTER) as probe:
        port = probe.bind_to_random_port("tcp://127.0.0.1")
    # Nothing listens on `port` now: every send must return at once, dropping beyond the HWM.
    with ControlClient(f"tcp://127.0.0.1:{port}", 0, "g", key=b"k" * 32, heartbeat_interval_s=0,
                       sndhwm=16) as c:
        c.register()
        t0 = time.perf_counter()
        for it in range(2000):
            c.heartbeat({"iteration": it, "step_seconds": 0.01, "images": 1})
        assert time.perf_counter() - t0 < 2.0
        assert c.dropped > 1000
        t0 = time.perf_counter()
        assert c.done(timeout_ms=100) is False
        assert time.perf_counter() - t0 < 1.0
        with pytest.raises(DinodistError, match="stats.bogus"):
            c.heartbeat({"iteration": 1, "bogus": 2})
        with pytest.raises(DinodistError, match="stats.images"):
            c.heartbeat({"images": "4"})
        with pytest.raises(DinodistError, match="stats.gpu_utilization_ratio"):
            c.heartbeat({"images": 7, "gpu_utilization_ratio": 1.5})
        assert c._totals["images_total"] == 2000  # the rejected call folded nothing in
        c.heartbeat({"iteration": 2000, "gpu_utilization_ratio": 0.5}, force=True)  # valid values still pass
    with pytest.raises(DinodistError, match="role"):
        ControlClient("tcp://127.0.0.1:1", 0, "g", role="chef", key=b"k" * 32)


def test_failure_policy_and_config(monkeypatch):
    with pytest.raises(DinodistError, match="on_failure: 'restart' is not one of 'stop', 'restart_gr"):
        ControlServer(on_failure="restart")
    monkeypatch.delenv("DINODIST_TEST_SECRET", raising=False)
    cfg = Control(bind="0.0.0.0", port=0, secret_env="DINODIST_TEST_SECRET", heartbeat_timeout_s=3.0)
    with pytest.raises(DinodistError, match="control.secret_env: environment variable DINODIST_TEST_SECRET"):
        server_from_config(cfg, {0: "g"})
    monkeypatch.setenv("DINODIST_TEST_SECRET", "s" * 32)
    with server_from_config(cfg, {0: "g"}) as srv:
        assert srv.secret == b"s" * 32 and srv.heartbeat_timeout_s == 3.0
        assert srv.on_failure == "restart_group"
    monkeypatch.setenv("DINODIST_CONTROL", "tcp://127.0.0.1:1")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("DINODIST_CONTROL_RANK", raising=False)
    c = ControlClient.from_env("vits", "student", secret_env="DINODIST_TEST_SECRET")
    assert (c.rank, c.group, c.key) == (5, "vits", m.rank_key(b"s" * 32, 5, "vits"))
    assert not hasattr(c, "secret")  # the client keeps only its own key
    c.close()
    monkeypatch.delenv("DINODIST_CONTROL")
    assert ControlClient.from_env("vits") is None


# the key comes from $DINODIST_CONTROL_KEY, as the launcher passes it
CHILD = """
import os, sys, time
from dinodist.core.control.client import ControlClient
addr, rank, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = ControlClient(addr, rank, "vits" if rank == 0 else "vitb", heartbeat_interval_s=0.05)
c.register()
while not c.registered:
    c.poll_command(timeout_ms=20)
for it in range(100000):
    c.heartbeat({"iteration": it, "step_seconds": 0.02, "images": 2})
    if mode == "hang" and it == 3:
        time.sleep(600)  # stuck in a collective: no heartbeats, deaf to stop
    if mode == "crash" and it == 3:
        os._exit(3)
    if c.poll_command(timeout_ms=20) == "stop":
        c.done()
        c.close()
        sys.exit(0)
"""


def _spawn(srv: ControlServer, rank: int, mode: str) -> subprocess.Popen:
    env = {**os.environ, **srv.rank_env(rank)}
    return subprocess.Popen([sys.executable, "-c", CHILD, srv.address, str(rank), mode], env=env)


@pytest.mark.multiproc
def test_supervise_stops_the_job_and_kills_a_hung_rank():
    expected = {0: "vits", 1: "vitb"}
    with ControlServer(expected=expected, heartbeat_timeout_s=1.0, register_timeout_s=30) as srv:
        procs = {0: _spawn(srv, 0, "ok"), 1: _spawn(srv, 1, "hang")}
        try:
            t0 = time.monotonic()
            out = supervise(srv, procs, grace_s=1.0, poll_s=0.05)
            assert time.monotonic() - t0 < 20
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert out.exit_code == 1 and out.killed == (1,)
        assert out.message.startswith("rank 1 (group vitb) missed heartbeats for 1 s")
        assert procs[0].returncode == 0 and procs[1].returncode == -9
        st = srv.ranks()
        assert st[0].status == "done" and st[0].exit_code == 0 and st[1].status == "dead"


@pytest.mark.multiproc
def test_crashed_process_is_detected_without_the_launcher():
    with ControlServer(expected={1: "vitb"}, heartbeat_timeout_s=30.0) as srv:
        proc = _spawn(srv, 1, "crash")
        try:
            # Not reaped by anyone: the server sees the registered pid become a zombie.
            pump(srv, lambda: srv.dead_ranks() == [1], timeout=15)
        finally:
            proc.wait(timeout=10)
        assert srv.failure == f"rank 1 (group vitb): process {proc.pid} on {srv.ranks()[1].hostname} is gone"


def test_restart_group_policy_queues_the_group_and_lets_new_processes_take_its_places():
    expected = {0: "teacher", 1: "vits", 2: "vits", 3: "vitb"}
    with ControlServer(expected=expected, on_failure="restart_group", restartable=["vits", "vitb"],
                       progress_timeout_s=0.5) as srv:
        srv.mark_exited(2, -9)
        srv.mark_exited(1, 2)  # its peer then fails too: the same group failure, not a second one
        assert srv.failure is None and list(srv.group_failures) == [
            ("vits", "rank 2 (group vits) was killed by signal 9")]
        assert srv.restarting() == {"vits"}
        # until reset, the group's old identities are refused; after it, new processes register
        late = client(srv, 2, "vits", heartbeat_interval_s=0)
        late.register()
        pump(srv, lambda: srv.rejected["late"] >= 1)
        srv.reset_group("vits")
        assert srv.restarting() == set() and srv.ranks()[2].status == "expected"
        fresh = client(srv, 2, "vits", heartbeat_interval_s=0)
        fresh.register()
        pump(srv, lambda: srv.ranks()[2].status == "running")
        # alive but stuck: heartbeats without progress are a failure once progress_timeout_s passes
        for it in (0, 1):
            fresh.heartbeat({"iteration": it}, force=True)
        pump(srv, lambda: srv.ranks()[2].iteration == 1)
        stuck_at = time.monotonic()
        while srv.ranks()[2].status == "running":
            fresh.heartbeat({"iteration": 1}, force=True)
            srv.poll(0.05)
            assert time.monotonic() - stuck_at < 5
        assert srv.ranks()[2].reason == "rank 2 (group vits) made no progress for 0.5 s (at iteration 1)"
        assert list(srv.group_failures)[-1][0] == "vits" and srv.failure is None
        # the teacher is not restartable: its failure stops the job
        srv.mark_exited(0, 1)
        assert srv.failure == "rank 0 (group teacher) exited with code 1"
        for c in (late, fresh):
            c.close()


class _Proc:
    def __init__(self, code: int | None = None) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code

    def kill(self) -> None:
        self.code = -9


def test_supervise_restarts_a_group_at_most_max_restarts_times():
    expected = {0: "teacher", 1: "vits"}
    with ControlServer(expected=expected, on_failure="restart_group", restartable=["vits"]) as srv:
        procs = {0: _Proc(0), 1: _Proc(3)}  # the teacher finished; the student keeps failing
        started = []

        def restart(group: str) -> dict:
            started.append(group)
            return {1: _Proc(3)}

        restarts: dict[str, int] = {}
        out = supervise(srv, procs, grace_s=0, poll_s=0.01, restart=restart, max_restarts=2,
                        restarts=restarts)
        assert started == ["vits", "vits"] and restarts == {"vits": 2}
        assert out.exit_code == 1
        assert out.message == ("rank 1 (group vits) exited with code 3 (group vits restarted 2 times, "
                               "control.max_restarts is 2)")


@pytest.mark.multiproc
def test_dropped_unclosed_endpoints_are_collected_without_hanging():
    # A client or server dropped without close() in a reference cycle: pyzmq's own finalizers clear the
    # context's weak set of sockets before destroying it and then wait forever in zmq_ctx_term.
    code = (
        "import gc\n"
        "from dinodist.core.control.client import ControlClient\n"
        "from dinodist.orchestrator.control import ControlServer\n"
        "for _ in range(3):\n"
        "    srv = ControlServer(bind='127.0.0.1', port=0)\n"
        "    c = ControlClient(srv.address, 0, 'g', key=srv.rank_key(0, 'g'))\n"
        "    c.register()\n"
        "    srv.poll(0.05)\n"
        "    srv.cycle, c.cycle = srv, c\n"
        "    del srv, c\n"
        "    gc.collect()\n"
        "print('collected')\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("collecting an unclosed control endpoint hung")
    assert out.returncode == 0, out.stderr
    assert "collected" in out.stdout
