"""Adding a student later: a live run writes the target store, `dinodist add-student` replays it.

One live run (2 teacher ranks, student tiny-vits, fp32 store) is shared by the module. Replays must
reproduce the live student's loss trajectory with zero teacher forwards; damaged or mismatched
stores are refused with one-line errors; a follower of a store that is still being written
catches up, trains in step, and stops at the last complete record when the writer dies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from dinodist.core.target_store import StoreReader, StoreWriter, bytes_per_image, bytes_per_million_iterations

REPO = Path(__file__).resolve().parent.parent
ITERATIONS = 6
STUDENT = "tiny-vits"
TERMS = ("loss", "dino_global", "dino_local", "ibot", "koleo")


def write_topology(path: Path, store: Path, **data) -> Path:
    topo = {
        "name": "replay",
        "backend": "gloo",
        "cluster": {"nodes": 1, "device": "cpu", "devices_per_node": 3},
        "teacher": {"arch": "tiny-vit7b", "overrides": {"depth": 2, "embed_dim": 64, "num_heads": 4},
                    # 2 teacher ranks: rank 1 sends its rows to rank 0, which writes whole batches
                    "checkpoint": None, "targets": "heads", "shard": "replicate", "devices": 2},
        "students": [{"name": STUDENT, "arch": STUDENT, "overrides": {"depth": 2}, "devices": 1}],
        "data": {"source": "skimage", "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2,
                 **data},
        "train": {"global_batch_size": 4, "iterations": ITERATIONS, "seed": 3, "lr": 2e-3},
        "metrics": {"port": 0},
        "control": {"bind": "127.0.0.1", "port": 0, "heartbeat_timeout_s": 20},
        "store": {"path": str(store), "dtype": "fp32"},
        "output": str(path.parent / "unused"),
    }
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1")
    return e


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`dinodist ARGS` in this process (the ranks it launches are subprocesses): (code, stdout, stderr)."""
    from dinodist.orchestrator.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def add_student(capsys, topo: Path, store: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "add-student", str(topo), "--store", str(store), "--student", STUDENT,
               "--out", str(out), "--metrics-port", "0", *extra)


def trajectory(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want[: len(got)]]
    for a, b in zip(got, want):
        for term in TERMS:
            assert abs(a[term] - b[term]) <= 1e-5, (a["iteration"], term, a[term], b[term])


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The live run with a store: (topology, store, the live student's trajectory, out dir)."""
    root = tmp_path_factory.mktemp("live")
    store = root / "store"
    topo = write_topology(root / "t.yaml", store)
    cmd = [sys.executable, "-m", "dinodist.orchestrator.cli", "distill", str(topo),
           "--out", str(root / "run"), "--metrics-port", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return topo, store, trajectory(root / "run" / STUDENT / "metrics.jsonl"), root / "run"


def record_range(store: Path, iteration: int) -> tuple[int, int]:
    """Byte range [start, end) of one iteration's record in its shard's .bin."""
    reader = StoreReader(store)
    reader.refresh()
    for st in reader._scanner.shards.values():
        if iteration in st.its:
            rec = reader._record(st, list(st.its).index(iteration))
            return rec.start, rec.end
    raise AssertionError(f"iteration {iteration} not in {store}")


@pytest.mark.multiproc
@pytest.mark.timeout(200)
def test_replay_reproduces_the_live_student_with_zero_teacher_forwards(live, tmp_path, capsys):
    topo, store, want, run = live
    assert len(want) == ITERATIONS and len({round(r["loss"], 6) for r in want}) == ITERATIONS
    live_summary = json.loads((run / "summary.json").read_text())
    assert live_summary["teacher_forwards"] == ITERATIONS
    # the live run wrote every iteration, the last layers, and closed the store
    reader = StoreReader(store)
    assert reader.iterations() == list(range(ITERATIONS)) and reader.closed()
    m = reader.manifest
    assert m["teacher_hash"] == "random-init:3" and m["dtype"] == "fp32" and m["iterations"] == ITERATIONS
    assert set(reader.last_layers()) == {"dino_last_layer.weight", "ibot_last_layer.weight"}
    tensors, meta = reader.read(2)
    assert tensors["dino"].shape[:2] == (4, 2) and tensors["sample_ids"].shape == (4,)
    assert meta["iteration"] == 2 and meta["global_crop_size"] == 32
    stats = json.loads((run / "teacher" / "stats.json").read_text())
    assert stats["store"]["records"] == ITERATIONS

    out = tmp_path / "replay"
    code, stdout, stderr = add_student(capsys, topo, store, out)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    got = trajectory(out / STUDENT / "metrics.jsonl")
    assert len(got) == ITERATIONS
    assert_same(got, want)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_forwards"] == 0 and summary["iterations"] == ITERATIONS
    assert summary["store_bytes_read"] > 0
    assert (out / STUDENT / "backbone.pth").is_file()
    assert "teacher forwards: 0" in stdout


@pytest.mark.multiproc
def test_mismatched_store_is_refused_naming_the_field(live, tmp_path, capsys):
    from dinodist.orchestrator.add_student import replay_topology
    from dinodist.orchestrator.runtime.replay import check_store
    from dinodist.orchestrator.topology import load_topology

    topo, store, _, _ = live
    raw = yaml.safe_load(topo.read_text())

    def refused(name: str, edit) -> str:
        r = json.loads(json.dumps(raw))
        edit(r)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r))
        code, _, err = cli(capsys, "add-student", str(path), "--store", str(store), "--student", STUDENT,
                           "--out", str(tmp_path / name))
        err = err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert not (tmp_path / name / "logs").exists()  # refused before any rank started
        return err[0]

    ckpt = tmp_path / "other-teacher.pth"
    ckpt.write_bytes(b"not the teacher that wrote the store")
    err = refused("teacher", lambda r: r["teacher"].update(checkpoint=str(ckpt)))
    assert "field 'teacher_hash'" in err and err.startswith(f"dinodist add-student: error: {store}")

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 10, 200)).save(images / f"{i}.png")
    err = refused("data", lambda r: r["data"].update(source=f"folder:{images}"))
    assert "field 'data_fingerprint'" in err
    err = refused("crops", lambda r: r["data"].update(global_crop_size=48))
    assert "field 'crop_config'" in err
    err = refused("masks", lambda r: r["data"].update(mask_probability=0.3))
    assert "field 'mask_probability'" in err
    err = refused("longer", lambda r: r["train"].update(iterations=ITERATIONS + 1))
    assert "train.iterations" in err
    # local crops do not change the teacher's targets: a student with its own local crops may replay
    r = json.loads(json.dumps(raw))
    r["data"].update(local_crops=4, local_crop_size=32)
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(r))
    check_store(StoreReader(store), replay_topology(load_topology(path), STUDENT, None, None), follow=False)


@pytest.mark.multiproc
def test_flipped_byte_stops_the_replay_at_that_iteration(live, tmp_path, capsys):
    topo, store, want, _ = live
    bad = tmp_path / "store"
    shutil.copytree(store, bad)
    start, end = record_range(bad, 3)
    with open(bad / "shard-00000.bin", "r+b") as f:
        f.seek((start + end) // 2)
        byte = f.read(1)
        f.seek((start + end) // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    out = tmp_path / "out"
    code, stdout, stderr = add_student(capsys, topo, bad, out)
    assert code == 2, stdout[-2000:] + stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("dinodist add-student: error:") and "checksum mismatch for iteration 3" in last
    got = trajectory(out / STUDENT / "metrics.jsonl")
    assert [r["iteration"] for r in got] == [0, 1, 2]  # nothing trained on the damaged record
    assert_same(got, want)
    assert "error" in json.loads((out / "summary.json").read_text())


@pytest.mark.multiproc
def test_truncated_shard_ends_the_store_at_the_last_complete_record(live, tmp_path, capsys):
    topo, store, _, _ = live
    cut = tmp_path / "store"
    shutil.copytree(store, cut)
    start, end = record_range(cut, 4)
    os.truncate(cut / "shard-00000.bin", (start + end) // 2)
    assert StoreReader(cut).iterations() == [0, 1, 2, 3]
    code, _, err = cli(capsys, "add-student", str(topo), "--store", str(cut), "--student", STUDENT, "--out",
                       str(tmp_path / "o"))
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "complete records cover iterations 0..3 but this run needs 0..5" in err[0]
    assert "--iterations 4" in err[0] and "ends early" in err[0]


class PacedWriter(threading.Thread):
    """Re-writes the live store's records into a new store: `first` at once, then one per `every`
    seconds once the follower has caught up; optionally dies (torn record, no CLOSED) after `die_after`."""

    def __init__(self, src: Path, dst: Path, follower_metrics: Path, first: int, every: float,
                 die_after: int | None = None) -> None:
        super().__init__(daemon=True)
        self.src, self.dst, self.metrics = src, dst, follower_metrics
        self.first, self.every, self.die_after = first, every, die_after
        self.error: BaseException | None = None
        self.written: list[float] = []

    def run(self) -> None:
        try:
            reader = StoreReader(self.src)
            manifest = {k: v for k, v in reader.manifest.items() if k not in ("format_version", "dtype")}
            w = StoreWriter(self.dst, manifest, dtype="fp32")
            w.write_last_layers(reader.last_layers())
            last = ITERATIONS - 1 if self.die_after is None else self.die_after
            for it in range(last + 1):
                if it == self.first:
                    w.flush()
                    # hold back until the follower has trained on every record written so far
                    deadline = time.monotonic() + 90
                    while len(trajectory(self.metrics)) < self.first and time.monotonic() < deadline:
                        time.sleep(0.05)
                if it >= self.first:
                    time.sleep(self.every if it > self.first else 1.0)
                tensors, meta = reader.read(it)
                w.append(it, tensors, meta)
                w.flush()
                self.written.append(time.monotonic())
            if self.die_after is None:
                w.close()
                return
            # the writer dies mid-record: data bytes of the next iteration but no index record
            # for it, and half an index frame after them; no CLOSED marker
            w.flush()
            w._abandon()
            with open(self.dst / "shard-00000.bin", "ab") as f:
                f.write(os.urandom(700))
            with open(self.dst / "shard-00000.idx", "ab") as f:
                f.write(b"DDIX" + (500).to_bytes(4, "little") + os.urandom(100))
        except BaseException as e:  # surfaced by the test
            self.error = e


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_follower_catches_up_then_trains_in_step(live, tmp_path, capsys):
    topo, store, want, _ = live
    growing, out = tmp_path / "store", tmp_path / "out"
    writer = PacedWriter(store, growing, out / STUDENT / "metrics.jsonl", first=3, every=0.4)
    writer.start()
    code, stdout, stderr = add_student(capsys, topo, growing, out, "--follow", "--follow-timeout", "30")
    writer.join(10)
    assert writer.error is None, writer.error
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    got = trajectory(out / STUDENT / "metrics.jsonl")
    assert len(got) == ITERATIONS
    assert_same(got, want)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_forwards"] == 0
    # it joined a store that already had records 0..2, trained through them, then waited for
    # each new record: the first record it had to wait for was the first one written after it caught up
    assert summary["store_newest_at_start"] == 2
    assert summary["caught_up_at"] == 3
    assert got[3]["wait_seconds"] >= 0.1  # blocked on the writer (one poll at least)


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_follower_stops_at_the_last_complete_record_when_the_writer_dies(live, tmp_path, capsys):
    topo, store, want, _ = live
    growing, out = tmp_path / "store", tmp_path / "out"
    writer = PacedWriter(store, growing, out / STUDENT / "metrics.jsonl", first=2, every=0.2, die_after=3)
    writer.start()
    code, stdout, stderr = add_student(capsys, topo, growing, out, "--follow", "--follow-timeout", "2")
    writer.join(10)
    assert writer.error is None, writer.error
    assert code == 2, stdout[-3000:] + stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("dinodist add-student: error:"), stderr
    assert "stopped after iteration 3, the last complete record" in last and "writer stopped" in last
    got = trajectory(out / STUDENT / "metrics.jsonl")
    assert [r["iteration"] for r in got] == [0, 1, 2, 3]  # never read past the last complete record
    assert_same(got, want)
    assert StoreReader(growing).iterations() == [0, 1, 2, 3]


def test_plan_prints_store_cost(capsys):
    paper = REPO / "configs" / "topologies" / "dinov3-paper.yaml"
    code, stdout, stderr = cli(capsys, "plan", str(paper), "--json", "--store-cost", "--set",
                               "store={path: /tmp/s, retain: 1000}")
    assert code == 0, stderr
    cost = json.loads(stdout)["store_cost"]
    raw = yaml.safe_load(paper.read_text())
    g, iters = raw["train"]["global_batch_size"], raw["train"]["iterations"]
    # the paper's 7B heads on 256-px crops: the doc's model, re-derived from the topology's fields
    kw = {"dino_dim": 512, "ibot_dim": 384, "patches_per_crop": 256, "masked_fraction": 0.15}
    for dt in ("fp32", "bf16", "int8"):
        c = cost["by_dtype"][dt]
        assert c["bytes_per_image"] == pytest.approx(bytes_per_image(dtype=dt, **kw))
        want = bytes_per_million_iterations(g, dtype=dt, **kw)
        assert c["bytes_per_million_iterations"] == pytest.approx(want)
        assert c["bytes_retained"] == pytest.approx(c["bytes_per_iteration"] * min(1000, iters))
    assert cost["configured"] and cost["dtype"] == "bf16" and cost["retain"] == 1000
    table = cli(capsys, "plan", str(paper), "--store-cost")[1]
    assert "target store: not configured" in table and "per 1e6 iters" in table
    assert "int8" in table and "TB" in table
    # without a store and without --store-cost the plan has no store lines
    assert "store_cost" not in json.loads(cli(capsys, "plan", str(paper), "--json")[1])
