"""Control-plane authentication on the default loopback bind: per-rank keys, forgeries, replays, and
rejections logged once per peer. Real zmq sockets; a forger is a raw DEALER that writes frames by hand."""

from __future__ import annotations

import logging
import random
import threading
import time

import msgpack
import pytest
import zmq
from test_control import pump, raw_dealer

from dinodist.core.control import messages as m
from dinodist.core.control.client import KEY_ENV, ControlClient, rank_key_from_env
from dinodist.core.control.thread import ControlThread
from dinodist.core.errors import DinodistError
from dinodist.orchestrator import control as control_mod
from dinodist.orchestrator.control import ControlServer

pytestmark = pytest.mark.timeout(60)


def signed(key: bytes, rank: int, group: str, payload: dict | bytes, claim: tuple[int, str] | None = None
           ) -> list[bytes]:
    """Frames signed with `key`; the header names `claim` (default: the payload's own rank and group)."""
    body = payload if isinstance(payload, bytes) else msgpack.packb(payload)
    head = m.header(*(claim or (rank, group)))
    return [head, body, m.sign(key, head, body)]


def envelope(kind: str, rank: int, group: str, session: str, seq: int, **fields) -> dict:
    return {**m.stamp(), "kind": kind, "rank": rank, "group": group, "session": session, "seq": seq, **fields}


def register(rank: int, group: str, session: str | None = None, pid: int = 4242) -> dict:
    return envelope("register", rank, group, session or m.new_session(), 1, role="student", pid=pid,
                    hostname="forger")


def heartbeat(rank: int, group: str, session: str, seq: int, iteration: int) -> dict:
    return envelope("heartbeat", rank, group, session, seq, iteration=iteration, step_seconds=[0.1],
                    step_seconds_total=0.1, wait_seconds_total=0.0, images_total=1, teacher_forwards_total=0,
                    target_bytes_sent_total=0, losses={})


@pytest.fixture
def job():
    """A loopback server for ranks 0 (group a), 1 and 2 (group b), with ranks 0 and 2 registered."""
    with ControlServer(expected={0: "a", 1: "b", 2: "b"}, heartbeat_timeout_s=30.0) as srv:
        ranks = {r: ControlClient(srv.address, r, g, key=srv.rank_key(r), heartbeat_interval_s=0)
                 for r, g in ((0, "a"), (2, "b"))}
        for c in ranks.values():
            c.register()
        pump(srv, lambda: all(srv.ranks()[r].status == "running" for r in ranks))
        yield srv, ranks
        for c in ranks.values():
            c.close()


def test_server_makes_a_job_secret_and_every_rank_gets_its_own_key(monkeypatch):
    with ControlServer(expected={0: "a", 1: "a", 2: "b"}) as one, ControlServer(expected={0: "a"}) as two:
        assert len(one.secret) == m.KEY_BYTES and one.secret != two.secret  # generated, per job
        keys = {one.rank_key(r) for r in (0, 1, 2)} | {one.rank_key(0, "b"), two.rank_key(0)}
        assert len(keys) == 5  # per rank, per group, per job
        assert one.rank_key(2) == m.rank_key(one.secret, 2, "b")
        env = one.rank_env(1)
        assert list(env) == [KEY_ENV] and bytes.fromhex(env[KEY_ENV]) == one.rank_key(1)
        assert one.secret.hex() not in env[KEY_ENV]
        with pytest.raises(DinodistError, match="rank 9 is not in the topology"):
            one.rank_key(9)
        # what a launched rank does: its key from the environment, nothing else
        monkeypatch.setenv(KEY_ENV, env[KEY_ENV])
        assert rank_key_from_env(1, "a") == one.rank_key(1)
        c = ControlClient(one.address, 1, "a", heartbeat_interval_s=0)
        c.register()
        pump(one, lambda: one.ranks()[1].status == "running")
        c.close()
    monkeypatch.setenv(KEY_ENV, "zz")
    with pytest.raises(DinodistError, match=f"{KEY_ENV}: not a hex string"):
        rank_key_from_env(0, "a")
    monkeypatch.setenv(KEY_ENV, "ab" * 16)
    with pytest.raises(DinodistError, match=f"{KEY_ENV}: 16 bytes, expected 32"):
        rank_key_from_env(0, "a")
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(DinodistError, match=f"{KEY_ENV}: environment variable is unset"):
        ControlClient("tcp://127.0.0.1:1", 0, "a")
    # a rank thread without a key fails in the rank's own thread, not silently in its control thread
    with pytest.raises(DinodistError, match=KEY_ENV):
        ControlThread("tcp://127.0.0.1:1", 0, "a", "student", None, {}, 0.5)


def test_forged_register_cannot_take_over_a_rank(job):
    srv, ranks = job
    before = srv.ranks()[0]
    sock = raw_dealer(srv.address)
    forged = register(0, "a", pid=1)
    sock.send_multipart(signed(b"\x01" * 32, 0, "a", forged))  # a guessed key
    sock.send_multipart(signed(srv.rank_key(2), 0, "a", forged))  # another rank's key
    sock.send_multipart([msgpack.packb(forged)])  # protocol 1: no authentication at all
    pump(srv, lambda: sum(srv.rejected.values()) == 3)
    assert srv.rejected == {"mac": 2, "version": 1}
    after = srv.ranks()[0]
    assert (after.session, after.pid, after.hostname, after.status, after.identity) == (
        before.session, before.pid, before.hostname, "running", before.identity)
    assert [e.kind for e in _events(srv)] == ["registered", "registered"]  # the two real ranks only
    # the real rank keeps working: its heartbeats are accepted, its commands reach it
    ranks[0].heartbeat({"iteration": 0}, force=True)
    pump(srv, lambda: srv.ranks()[0].iteration == 0)
    cid = srv.send(0, "checkpoint")
    assert ranks[0].poll_command(timeout_ms=2000) == "checkpoint"
    pump(srv, lambda: srv.acked(0, cid))
    sock.close()


def test_forged_error_does_not_stop_the_job(job):
    srv, ranks = job
    session = srv.ranks()[2].session  # even knowing the session (it is not secret) is not enough
    sock = raw_dealer(srv.address)
    error = envelope("error", 2, "b", session, 99, message="forged failure")
    done = {**heartbeat(2, "b", session, 100, 5), "kind": "done"}
    for payload in (error, done):
        sock.send_multipart(signed(b"\x02" * 32, 2, "b", payload))
        sock.send_multipart(signed(srv.rank_key(0), 2, "b", payload))
    pump(srv, lambda: srv.rejected["mac"] == 4)
    srv.poll(0.05)
    assert srv.failure is None and not srv.group_failures
    assert srv.ranks()[2].status == "running" and srv.failed_ranks() == []
    assert all(e.kind == "registered" for e in _events(srv))
    # the genuine error still stops the job
    ranks[2].error("RuntimeError: real failure", timeout_ms=0)
    pump(srv, lambda: srv.failure is not None)
    assert srv.failure == "rank 2 (group b) failed: RuntimeError: real failure"
    sock.close()


def test_replayed_and_stale_messages_are_rejected(job):
    srv, ranks = job
    key, session = srv.rank_key(2), srv.ranks()[2].session
    sock = raw_dealer(srv.address)
    captured = signed(key, 2, "b", heartbeat(2, "b", session, 50, 7))
    sock.send_multipart(captured)
    pump(srv, lambda: srv.ranks()[2].iteration == 7)
    sock.send_multipart(captured)
    old = {**heartbeat(2, "b", session, 51, 8), "ts": time.time() - 3600}
    ahead = {**heartbeat(2, "b", session, 52, 9), "ts": time.time() + 3600}
    sock.send_multipart(signed(key, 2, "b", old))
    sock.send_multipart(signed(key, 2, "b", ahead))
    pump(srv, lambda: srv.rejected["replay"] == 1 and srv.rejected["stale"] == 2)
    assert srv.ranks()[2].iteration == 7 and srv.ranks()[2].last.seq == 50
    sock.close()


def test_one_rank_cannot_speak_for_another(job):
    srv, ranks = job
    key1 = srv.rank_key(1)  # what rank 1's process holds
    session = srv.ranks()[2].session
    sock = raw_dealer(srv.address)
    # signed with rank 1's key, claiming to be rank 2 in the header: wrong key for rank 2
    sock.send_multipart(signed(key1, 2, "b", envelope("error", 2, "b", session, 7, message="x"),
                               claim=(2, "b")))
    # signed honestly as rank 1, with rank 2 in the payload: the identities disagree
    sock.send_multipart(signed(key1, 2, "b", envelope("error", 2, "b", session, 8, message="x"),
                               claim=(1, "b")))
    sock.send_multipart(signed(key1, 2, "b", register(2, "b"), claim=(1, "b")))
    pump(srv, lambda: srv.rejected["mac"] == 1 and srv.rejected["identity"] == 2)
    # a client built with rank 1's key but told it is rank 2 gets nowhere
    impostor = ControlClient(srv.address, 2, "b", key=key1, heartbeat_interval_s=0)
    impostor.register()
    pump(srv, lambda: srv.rejected["mac"] == 2)
    st = srv.ranks()[2]
    assert st.status == "running" and st.session == session and srv.failure is None
    assert srv.ranks()[1].status == "expected"  # nothing registered rank 1 either
    impostor.close()
    sock.close()


def test_the_rank_checks_what_the_server_sends():
    """Server -> rank messages are signed with the addressee's key and replay-checked too."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    secret = m.new_job_secret()
    key0, key1 = m.rank_key(secret, 0, "a"), m.rank_key(secret, 1, "a")
    rank = ControlClient(f"tcp://127.0.0.1:{port}", 0, "a", key=key0, heartbeat_interval_s=0)
    try:
        rank.register()
        assert router.poll(2000)
        peer = router.recv_multipart()[0]

        def command(cid: int) -> m.CommandMsg:
            return m.CommandMsg(**m.stamp(), kind="command", command="stop", command_id=cid)

        genuine = m.encode(command(1), key0, 0, "a")
        router.send_multipart([peer, *genuine])
        router.send_multipart([peer, *genuine])  # replayed
        router.send_multipart([peer, *m.encode(command(2), key1, 1, "a")])  # for rank 1, not us
        router.send_multipart([peer, *m.encode(command(3), key1, 0, "a")])  # rank 1's key, our name
        got = []
        deadline = time.monotonic() + 5
        while rank.rejected < 3 and time.monotonic() < deadline:
            cmd = rank.poll_command(timeout_ms=50)
            if cmd is not None:
                got.append(cmd)
        assert got == ["stop"] and rank.rejected == 3
    finally:
        rank.close()
        router.close()


def _events(srv: ControlServer) -> list:
    out = []
    while not srv.events.empty():
        out.append(srv.events.get_nowait())
    return out


def test_bad_peers_are_logged_once_each_and_never_stop_the_server(job, caplog, monkeypatch):
    srv, ranks = job
    caplog.set_level(logging.WARNING, logger="dinodist.control")
    noisy, quiet = raw_dealer(srv.address), raw_dealer(srv.address)
    for i in range(200):
        noisy.send_multipart([b"junk %d" % i])
    for _ in range(3):
        quiet.send_multipart(signed(b"\x03" * 32, 0, "a", register(0, "a")))
    pump(srv, lambda: sum(srv.rejected.values()) == 203)
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 2, lines  # one per peer, with its address
    assert all("peer 127.0.0.1 (id " in line for line in lines)
    assert any("(malformed)" in line for line in lines) and any("(mac)" in line for line in lines)
    # peers reconnecting in a loop get a new identity each time: a few lines per window, then a summary
    caplog.clear()
    churn = [raw_dealer(srv.address) for _ in range(30)]
    for sock in churn:
        sock.send_multipart([b"x", b"y", b"z"])
    pump(srv, lambda: sum(srv.rejected.values()) == 233)
    logged = control_mod._PEER_LINES_PER_WINDOW - 2  # this window's budget, less the two lines above
    assert len([r for r in caplog.records if "rejected a message from" in r.getMessage()]) == logged
    monkeypatch.setattr(control_mod, "_LOG_WINDOW_S", 0.0)
    srv.poll(0.01)
    summary = [r.getMessage() for r in caplog.records if "more rejected messages" in r.getMessage()]
    left = 30 - logged + 200 - 1 + 3 - 1  # new peers over budget, and the repeats of the first two
    assert len(summary) == 1 and summary[0].startswith(f"control: {left} more rejected messages from "
                                                       f"{30 - logged + 2} peers in the last ")
    assert summary[0].endswith(f"(malformed {left - 2}, mac 2)")
    # fuzz: random frame counts, random bytes, valid frames with flipped bits; the job goes on
    rng = random.Random(3)
    valid = signed(srv.rank_key(0), 0, "a", heartbeat(0, "a", srv.ranks()[0].session, 9, 1))
    before = sum(srv.rejected.values())
    for _ in range(300):
        if rng.random() < 0.5:
            frames = [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 6))]
        else:
            frames = [bytearray(f) for f in valid]
            f = frames[rng.randrange(3)]
            if f:
                f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
            frames = [bytes(f) for f in frames]
        noisy.send_multipart(frames)
    pump(srv, lambda: sum(srv.rejected.values()) == before + 300)
    assert srv.rejected["error"] == 0  # every bad frame failed a named check
    assert srv.failure is None and srv.ranks()[0].status == "running" and srv.ranks()[0].iteration == -1
    ranks[0].heartbeat({"iteration": 3}, force=True)
    pump(srv, lambda: srv.ranks()[0].iteration == 3)
    assert srv.rejected_counts() == dict(srv.rejected)
    for sock in (noisy, quiet, *churn):
        sock.close()


def test_messages_are_versioned():
    key = m.rank_key(b"s" * 32, 0, "a")
    reg = m.Register(**register(0, "a"))
    frames = m.encode(reg, key, 0, "a")
    assert frames[0] == b"dinodist/2 0 a" and msgpack.unpackb(frames[1])["v"] == m.PROTOCOL_VERSION == 2
    for head in (b"dinodist/3 0 a", b"dinodist/10 0 a", b"dinodist/x 0 a"):
        with pytest.raises(m.Rejected, match="version"):
            m.decode([head, *frames[1:]], lambda r, g: key, None)
    # the MAC covers the header: a header changed in transit fails it
    with pytest.raises(m.Rejected, match="mac"):
        m.decode([b"dinodist/2 0 b", *frames[1:]], lambda r, g: key, None)
    assert m.decode(frames, lambda r, g: key if (r, g) == (0, "a") else None, m.ReplayGuard()) == reg


def test_no_unsigned_control_plane_remains(job):
    """What used to be accepted on loopback, a plain msgpack frame, is now refused for every kind."""
    srv, _ = job
    session = srv.ranks()[2].session
    sock = raw_dealer(srv.address)
    payloads = [register(1, "b"), heartbeat(2, "b", session, 70, 40),
                envelope("error", 2, "b", session, 71, message="forged"),
                {**m.stamp(), "kind": "ack", "rank": 2, "group": "b", "session": session, "acked": "command",
                 "ref": 1}]
    for payload in payloads:
        sock.send(msgpack.packb({**payload, "v": 1}))
        sock.send(msgpack.packb(payload))
    pump(srv, lambda: srv.rejected["version"] == 2 * len(payloads))
    assert srv.failure is None and srv.ranks()[1].status == "expected" and srv.ranks()[2].iteration == -1
    sock.close()


def test_control_thread_signs_with_the_key_it_was_given():
    with ControlServer(expected={0: "a"}) as srv:
        thread = ControlThread(srv.address, 0, "a", "student", None, {}, 0.05, key=srv.rank_key(0))
        pump(srv, lambda: srv.ranks()[0].status == "running")
        assert thread.report({"iteration": 0}) is None
        pump(srv, lambda: srv.ranks()[0].iteration == 0)
        done = threading.Thread(target=thread.close)
        done.start()
        pump(srv, srv.all_done)
        done.join(timeout=5)
        assert not srv.rejected


def test_replay_guard_stays_bounded_and_fails_closed():
    guard = m.ReplayGuard(max_skew_s=60.0, capacity=3)
    t0 = 1_000_000.0
    for i in range(5):  # the first two are forgotten to stay within capacity
        guard.check(f"{i:08x}", t0 + i, now=t0 + i)
    assert len(guard._seen) == 3
    # a forgotten nonce re-sent inside the skew window is refused all the same
    with pytest.raises(m.Rejected, match="stale"):
        guard.check("00000000", t0, now=t0 + 5)
    with pytest.raises(m.Rejected, match="replay"):
        guard.check("00000004", t0 + 4, now=t0 + 5)
    guard.check("00000005", t0 + 5, now=t0 + 5)  # fresh messages still pass
    # entries that expired by time go without raising the floor
    guard.check("00000006", t0 + 200, now=t0 + 200)
    assert list(guard._seen) == ["00000006"]
    with pytest.raises(m.Rejected, match="stale"):
        guard.check("00000007", t0 + 100, now=t0 + 200)
