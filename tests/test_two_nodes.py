"""The generated torchrun launch files, run as two "nodes" on this machine: node 0's script starts the
supervisor (`dinodist supervise`) beside its ranks; the job finishes with a summary and /metrics, and a
rank killed on node 1 ends both scripts, node 0 naming the lost rank."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from dinodist.core.net import free_port

REPO = Path(__file__).resolve().parent.parent
ITERATIONS = 6


def _deploy(tmp_path: Path, iterations: int, on_failure: str) -> Path:
    topo = {
        "name": "twonode", "backend": "gloo",
        "cluster": {"nodes": 2, "device": "cpu", "devices_per_node": 3},
        "teacher": {"arch": "tiny-vit7b", "overrides": {"depth": 2, "embed_dim": 64, "num_heads": 4},
                    "checkpoint": None, "targets": "heads", "shard": "fsdp", "devices": 2},
        "students": [{"name": s, "arch": s, "overrides": {"depth": 2}, "devices": 2}
                     for s in ("tiny-vits", "tiny-vitb")],
        "data": {"source": "skimage", "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2,
                 "flips": False},
        "train": {"global_batch_size": 4, "iterations": iterations, "seed": 3, "lr": 1e-3,
                  "checkpoint_every": 2},
        "metrics": {"port": free_port()},
        "control": {"port": free_port(), "secret_env": "DINODIST_TEST_SECRET", "heartbeat_timeout_s": 5,
                    "on_failure": on_failure},
        "output": str(tmp_path / "out"),
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    subprocess.run(["dinodist", "deploy", "torchrun", str(path), "--out", str(tmp_path / "deploy")],
                   check=True, capture_output=True, cwd=tmp_path)
    return path


def _start(tmp_path: Path) -> list[subprocess.Popen]:
    env = dict(os.environ, HEAD_ADDR="127.0.0.1", DINODIST_TEST_SECRET="s" * 32, OMP_NUM_THREADS="1")
    return [subprocess.Popen(["bash", str(tmp_path / "deploy" / f"node-{n}.sh")], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True) for n in (0, 1)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _rank_pid(rank: int) -> int | None:
    """The process of global rank `rank` (torchrun's worker: RANK in its environment)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dinodist.orchestrator.runtime.rank" in cmd and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


def _metrics(url: str) -> str | None:
    try:
        return urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return None


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_two_node_scripts_finish_the_job_with_a_supervisor(tmp_path):
    topo_path = _deploy(tmp_path, ITERATIONS, "stop")
    topo = yaml.safe_load(topo_path.read_text())
    url = f"http://127.0.0.1:{topo['metrics']['port']}/metrics"
    procs = _start(tmp_path)
    scraped = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            text = _metrics(url)
            # while it runs, the head's /metrics shows every group training
            if text and all(f'dinodist_images_total{{group="{g}"}}' in text
                            for g in ("teacher", "tiny-vits", "tiny-vitb")):
                scraped = text
            time.sleep(0.3)
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        _stop(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-2000:]
    assert scraped, "no /metrics scrape showing every group during the run"
    summary = yaml.safe_load((tmp_path / "out" / "summary.json").read_text())
    assert summary["teacher_forwards"] == ITERATIONS and summary["iterations"] == ITERATIONS
    for g in ("teacher", "tiny-vits", "tiny-vitb"):
        lines = (tmp_path / "out" / g / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == ITERATIONS, g
    assert f"teacher forwards: {ITERATIONS} for {ITERATIONS} iterations" in outs[0]


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_a_rank_killed_on_node_1_ends_both_scripts_naming_it(tmp_path):
    _deploy(tmp_path, 400, "stop")
    procs = _start(tmp_path)
    try:
        deadline = time.monotonic() + 180
        victim = None
        while time.monotonic() < deadline and victim is None:
            # rank 5 (tiny-vitb) runs on node 1; wait until it trains
            if (tmp_path / "out" / "tiny-vitb" / "metrics.jsonl").is_file():
                victim = _rank_pid(5)
            time.sleep(0.2)
        assert victim is not None, [p.poll() for p in procs]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        outs = [p.communicate(timeout=90)[0] for p in procs]
        elapsed = time.monotonic() - killed
    finally:
        _stop(procs)
    assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
    assert elapsed < 60, elapsed  # no launcher restart loop under the stop policy
    last = outs[0].strip().splitlines()[-1]
    assert last.startswith("dinodist supervise: error: rank 5 (group tiny-vitb)"), outs[0][-3000:]
