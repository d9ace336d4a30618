"""A distillation that stops (kill -9, or preempted by SIGTERM) and resumes gives every group the losses of
the run that never stopped, each iteration logged once, from the newest checkpoint every group holds."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import yaml
from test_distill import REPO, distill_cmd, env, metrics_lines, wait_for, write_topology

from dinodist.core.train.preempt import PREEMPTED_EXIT

STUDENTS = ["tiny-vits", "tiny-vitb"]
ITERATIONS = 8
LOSS_KEYS = ("loss", "dino_global", "dino_local", "ibot", "koleo")
TOLERANCE = 1e-5  # measured: 0.0 (bit-identical) with one thread per rank


def _topology(tmp_path, store: bool = False):
    path = write_topology(tmp_path / "t.yaml", teacher_devices=2, shard="fsdp", students=STUDENTS,
                          iterations=ITERATIONS, devices={"tiny-vits": 2})
    raw = yaml.safe_load(path.read_text())
    raw["train"]["checkpoint_every"] = 2
    if store:
        raw["store"] = {"path": str(tmp_path / "store"), "dtype": "fp32"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run(topo, out, *extra, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(distill_cmd(topo, out, *extra), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def _losses(out) -> dict[str, list[tuple]]:
    return {g: [(r["iteration"], *(r[k] for k in LOSS_KEYS))
                for r in metrics_lines(out / g / "metrics.jsonl")] for g in STUDENTS}


def _assert_same_losses(got: dict, want: dict) -> None:
    for g in STUDENTS:
        assert [r[0] for r in got[g]] == list(range(ITERATIONS)), (g, [r[0] for r in got[g]])
        for a, b in zip(got[g], want[g]):
            assert max(abs(x - y) for x, y in zip(a[1:], b[1:])) <= TOLERANCE, (g, a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    topo = _topology(tmp)
    proc = _run(topo, tmp / "run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return _losses(tmp / "run")


def _start(topo, out, *extra) -> subprocess.Popen:
    return subprocess.Popen(distill_cmd(topo, out, *extra), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_kill_nine_then_resume_continues_every_group_exactly(tmp_path, reference):
    topo = _topology(tmp_path)
    out = tmp_path / "run"
    proc = _start(topo, out)
    try:
        # every group past its first checkpoint, then the whole job dies at once (a node lost)
        ok = wait_for(lambda: all(len(metrics_lines(out / g / "metrics.jsonl")) >= 3 for g in STUDENTS),
                      180, proc)
        assert ok and proc.poll() is None, proc.communicate(timeout=30)
        pids = json.loads((out / "run.json").read_text())["pids"].values()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = _run(topo, out, "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    _assert_same_losses(_losses(out), reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == ITERATIONS
    assert summary["resumed_at"] in (2, 4, 6) and summary["teacher_forwards"] == ITERATIONS
    assert summary["teacher_forwards_this_run"] == ITERATIONS - summary["resumed_at"]
    for g in STUDENTS:
        assert sorted(int(p.name) for p in (out / g / "ckpt").iterdir()) == [6, 8]  # keep_checkpoints: 2
        assert (out / g / "backbone.pth").is_file()


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_sigterm_checkpoints_every_group_at_one_iteration_then_resume_is_exact(tmp_path, reference):
    topo = _topology(tmp_path)
    out = tmp_path / "run"
    proc = _start(topo, out)
    try:
        ok = wait_for(lambda: all(len(metrics_lines(out / g / "metrics.jsonl")) >= 1 for g in STUDENTS),
                      180, proc)
        assert ok and proc.poll() is None, proc.communicate(timeout=30)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED_EXIT, stdout + stderr
    summary = json.loads((out / "summary.json").read_text())
    at = summary["preempted_at"]
    assert 1 <= at < ITERATIONS and f"checkpointed at iteration {at}" in stderr.strip().splitlines()[-1]
    for g in STUDENTS:
        # the same iteration in every group, and nothing trained past it
        assert max(int(p.name) for p in (out / g / "ckpt").iterdir()) == at
        assert [r["iteration"] for r in metrics_lines(out / g / "metrics.jsonl")] == list(range(at))
        assert (out / g / "backbone.pth").is_file()
    done = _run(topo, out, "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    _assert_same_losses(_losses(out), reference)
    assert json.loads((out / "summary.json").read_text())["resumed_at"] == at


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_restart_group_replaces_a_killed_group_while_the_others_go_on(tmp_path, reference):
    topo = _topology(tmp_path)  # control.on_failure: restart_group is the default
    out = tmp_path / "run"
    proc = _start(topo, out)
    try:
        ok = wait_for(lambda: len(metrics_lines(out / "tiny-vits" / "metrics.jsonl")) >= 3, 180, proc)
        assert ok and proc.poll() is None, proc.communicate(timeout=30)
        run = json.loads((out / "run.json").read_text())
        victim = run["groups"]["tiny-vits"][1]  # group rank 1 of the 2-rank FSDP group
        old_pid = run["pids"][str(victim)]
        os.kill(old_pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stdout + stderr
    assert "tiny-vits: restarting its 2 rank(s)" in stdout
    _assert_same_losses(_losses(out), reference)  # the restarted group included, each iteration once
    summary = json.loads((out / "summary.json").read_text())
    # the teacher never recomputed anything: the restarted group caught up from the target store
    assert summary["teacher_forwards"] == ITERATIONS and summary["teacher_forwards_this_run"] == ITERATIONS
    assert summary["restarts"] == {"tiny-vits": 1}
    run = json.loads((out / "run.json").read_text())
    assert run["restarts"] == {"tiny-vits": 1} and run["pids"][str(victim)] != old_pid
    stats = json.loads((out / "teacher" / "stats.json").read_text())
    assert list(stats["detached"]) == ["tiny-vits"]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_restart_group_restarts_a_killed_teacher_while_the_students_wait_on_the_store(tmp_path, reference):
    topo = _topology(tmp_path)
    out = tmp_path / "run"
    proc = _start(topo, out)
    try:
        ok = wait_for(lambda: all(len(metrics_lines(out / g / "metrics.jsonl")) >= 2 for g in STUDENTS),
                      180, proc)
        assert ok and proc.poll() is None, proc.communicate(timeout=30)
        run = json.loads((out / "run.json").read_text())
        victim = run["groups"]["teacher"][1]  # one rank of the 2-rank FSDP teacher
        os.kill(run["pids"][str(victim)], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stdout + stderr
    assert "teacher: restarting its 2 rank(s), continuing the target store" in stdout
    # no student restarted: they switched to the store and waited for the new teacher
    _assert_same_losses(_losses(out), reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == {"teacher": 1} and summary["iterations"] == ITERATIONS
    assert 0 < summary["teacher_restarted_at"] < ITERATIONS  # it picked up the store where it ended
    teacher_its = [r["iteration"] for r in metrics_lines(out / "teacher" / "metrics.jsonl")]
    assert teacher_its == list(range(ITERATIONS))
