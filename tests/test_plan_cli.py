import json
import subprocess
import sys
from pathlib import Path

import pytest

from dinodist.orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "topologies"
BAD = sorted((Path(__file__).parent / "topologies_bad").glob("*.yaml"))


def expected(path: Path) -> str:
    return path.read_text().splitlines()[0].removeprefix("# expect: ")


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_cli_rejects_broken_topology(path, capsys):
    code = main(["plan", str(path)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("dinodist plan: error: ")
    assert expected(path) in lines[0]


@pytest.mark.multiproc
def test_cli_subprocess_one_line_no_traceback():
    # the real entry point, once: exit status 2, a single stderr line, no traceback
    path = Path(__file__).parent / "topologies_bad" / "unknown_arch.yaml"
    proc = subprocess.run([sys.executable, "-m", "dinodist.orchestrator.cli", "plan", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert expected(path) in proc.stderr


def test_plan_json_schema(capsys):
    paper = str(CONFIGS / "dinov3-paper.yaml")
    assert main(["plan", paper, "--json", "--devices", "512", "--set", "teacher.shard=auto"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data["seconds_per_iteration"], float)
    names = [g["name"] for g in data["groups"]]
    assert names[0] == "teacher" and len(names) == 6
    nxt = 0
    for g in data["groups"]:
        assert {"name", "role", "arch", "devices", "ranks", "batch_per_rank", "seconds_per_iteration",
                "wait_fraction", "memory_per_rank_bytes", "placement", "communication_seconds"} <= set(g)
        assert g["role"] == ("teacher" if g["name"] == "teacher" else "student")
        # the ranks lists are what every rank reads: groups may be reordered to keep small ones in a node
        assert g["ranks"] == list(range(g["ranks"][0], g["ranks"][0] + g["devices"]))
        assert g["ranks"][0] == 0 if g["role"] == "teacher" else g["ranks"][0] > 0
        assert [r for p in g["placement"] for r in range(8 * p["node"] + p["first_local_rank"],
                                                         8 * p["node"] + p["first_local_rank"] + p["ranks"])
                ] == g["ranks"]
        nxt += g["devices"]
        # uneven shares (the paper topology): sizes ceil and floor of 4096 / devices
        assert g["batch_per_rank"] == -(-4096 // g["devices"])
        assert g["min_batch_per_rank"] == 4096 // g["devices"]
        assert 0.0 <= g["wait_fraction"] < 1.0
        assert g["seconds_per_iteration"] <= data["seconds_per_iteration"]
        assert isinstance(g["memory_per_rank_bytes"], int)
    assert max(g["seconds_per_iteration"] for g in data["groups"]) == data["seconds_per_iteration"]
    assert data["used_devices"] == nxt <= 512 and data["even_batches"] is False
    # the job's bubble: device-weighted group waits, idle devices fully waiting
    weighted = sum(g["devices"] * g["wait_fraction"] for g in data["groups"]) + data["idle_devices"]
    assert data["wait_fraction"] == pytest.approx(weighted / data["total_devices"], rel=1e-9)
    assert data["wait_fraction"] <= 0.03
    assert sorted(r for g in data["groups"] for r in g["ranks"]) == list(range(nxt))
    assert data["split_groups"] == []
    t = data["teacher_layout"]
    assert (t["layout"], t["requested"], t["shard_size"]) == ("replicate", "auto", 1)
    assert t["communication_seconds"] == 0
    assert data["communication_fraction"] == 0
    assert {"fsdp", "replicate"} <= {x["layout"] for x in t["alternatives"]}
    # forced fsdp: its all-gathers in the teacher's time and in the job's bubble
    assert main(["plan", paper, "--json", "--devices", "512", "--set", "teacher.shard=fsdp"]) == 0
    fsdp = json.loads(capsys.readouterr().out)
    t = fsdp["teacher_layout"]
    assert (t["layout"], t["requested"], t["replicas"]) == ("fsdp", "fsdp", 1)
    assert t["shard_size"] == fsdp["groups"][0]["devices"]
    assert fsdp["groups"][0]["communication_seconds"] == t["communication_seconds"] > 0.3
    assert 0 < fsdp["communication_fraction"] < fsdp["wait_fraction"]
    assert t["seconds_per_iteration"] == fsdp["groups"][0]["seconds_per_iteration"]


def test_plan_prints_teacher_layout_and_placement(capsys):
    paper = str(CONFIGS / "dinov3-paper.yaml")
    assert main(["plan", paper, "--devices", "256", "--set", "teacher.shard=auto"]) == 0
    out = capsys.readouterr().out
    assert "teacher layout: replicate (103 copies): no all-gathers" in out
    assert "[chosen by the cost model]" in out and "also weighed: fsdp (over 103): all-gathers" in out
    assert "placement (8 devices per node, 32 nodes):" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ") and "node" in ln}
    assert lines["teacher"].endswith("nodes 0-11 full, node 12: local 0-6")
    assert lines["vits16"].endswith("node 17: local 4-7")  # one node, not 12 and 13
    assert lines["vith16plus"].endswith("nodes 20-31 full")
    assert "note:" not in out  # the ranks apply the plan's layout (plan.json's teacher_layout)
    assert main(["plan", paper, "--devices", "256", "--set", "teacher.shard=fsdp"]) == 0
    out = capsys.readouterr().out
    assert "teacher layout: fsdp (over 103): all-gathers 0.348 s/iter" in out and "note:" not in out


def test_even_batches_rule_stays_the_default(capsys):
    small = str(CONFIGS / "cpu-small.yaml")
    assert main(["plan", small, "--set", "students[0].devices=3", "--devices", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dinodist plan: error: students[0].devices: train.global_batch_size 4 is not divisible "
                   "by 3 devices (every rank of a group takes the same share of the global batch; "
                   "train.even_batches: false allows uneven shares)")
    assert main(["plan", small, "--set", "students[0].devices=3", "--set", "train.even_batches=false",
                 "--set", "cluster.devices_per_node=8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    g = data["groups"][1]
    assert (g["devices"], g["batch_per_rank"], g["min_batch_per_rank"]) == (3, 2, 1)
    assert main(["plan", small, "--set", "students[0].devices=5", "--set", "train.even_batches=false",
                 "--set", "cluster.devices_per_node=8"]) == 2
    assert "students[0].devices: 5 devices exceed train.global_batch_size 4" in capsys.readouterr().err
    assert main(["plan", small, "--set", "train.loss_chunk_rows=-1"]) == 2
    assert "train.loss_chunk_rows: Input should be greater than or equal to 0" in capsys.readouterr().err


def test_plan_table_and_overrides(capsys):
    assert main(["plan", str(CONFIGS / "cpu-demo.yaml"), "--set", "teacher.checkpoint=null"]) == 0
    out = capsys.readouterr().out
    for name in ("teacher", "tiny-vits", "tiny-vitb", "tiny-vitl", "0..1", "wait %"):
        assert name in out
    small = str(CONFIGS / "cpu-small.yaml")
    assert main(["plan", small, "--set", "train.global_batch_size=6", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [g["batch_per_rank"] for g in data["groups"]] == [6, 6, 6]


def test_plan_calibrate_cli(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "teacher").mkdir(parents=True)
    rows = [{"iteration": i, "step_seconds": 1.0, "images": 4} for i in range(5)]
    (run / "teacher" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["plan", str(CONFIGS / "cpu-small.yaml"), "--calibrate", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    teacher = data["groups"][0]
    assert teacher["seconds_per_iteration"] == pytest.approx(1.0)
    assert main(["plan", str(CONFIGS / "cpu-small.yaml"), "--calibrate", str(tmp_path / "none")]) == 2
    assert "--calibrate: run folder not found" in capsys.readouterr().err


def test_plan_too_few_devices(capsys):
    demo = [str(CONFIGS / "cpu-demo.yaml"), "--set", "teacher.checkpoint=null"]
    assert main(["plan", *demo, "--devices", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinodist plan: error: ") and "\n" not in err
