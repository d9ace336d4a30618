"""plan.json: the driver writes the plan once; ranks read it and refuse one made for another topology."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dinodist.core.errors import DinodistError
from dinodist.orchestrator.allocate import make_plan
from dinodist.orchestrator.planfile import PLAN_FILE, check_plan_matches, parse_plan, read_plan, write_plan
from dinodist.orchestrator.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "topologies" / "cpu-small.yaml"
PAPER = ROOT / "configs" / "topologies" / "dinov3-paper.yaml"


@pytest.mark.parametrize("path", [SMALL, PAPER], ids=["cpu-small", "paper"])
def test_the_plan_read_back_is_the_plan_written(tmp_path, path):
    topo = load_topology(path)
    plan = make_plan(topo)
    written = write_plan(tmp_path, plan.to_dict())
    assert written == tmp_path / PLAN_FILE and not list(tmp_path.glob("*.tmp"))
    back = read_plan(written)
    check_plan_matches(back, topo)
    assert [(g.name, g.role, g.devices, g.ranks) for g in back.groups] == \
        [(g.name, g.role, g.devices, g.ranks) for g in plan.groups]
    assert (back.global_batch_size, back.even_batches, back.used_devices) == \
        (plan.global_batch_size, plan.even_batches, plan.used_devices)
    for g in plan.groups:
        assert all(back.group_of_rank(r).name == g.name for r in g.ranks)
    assert back.teacher.name == "teacher"


def test_a_plan_for_another_topology_is_refused(tmp_path):
    topo = load_topology(SMALL)
    plan = make_plan(topo).to_dict()
    renamed = load_topology(SMALL, {"students[1].name": "other"})
    with pytest.raises(DinodistError, match=r"planned groups \['teacher', 'tiny-vits', 'tiny-vitb'\] are not "
                       r"the topology's \['teacher', 'tiny-vits', 'other'\]"):
        check_plan_matches(parse_plan(plan), renamed)
    with pytest.raises(DinodistError,
                       match="global batch 4 differs from the topology's train.global_batch_size 8"):
        check_plan_matches(parse_plan(plan), load_topology(SMALL, {"train.global_batch_size": 8}))
    wider = load_topology(SMALL, {"cluster.devices_per_node": 4, "students[0].devices": 2})
    with pytest.raises(DinodistError,
                       match="group 'tiny-vits' has 1 devices in the plan but 2 in the topology"):
        check_plan_matches(parse_plan(plan), wider)


def test_broken_plan_files_are_one_line_errors(tmp_path):
    plan = make_plan(load_topology(SMALL)).to_dict()
    path = tmp_path / PLAN_FILE
    with pytest.raises(DinodistError, match="plan file not found"):
        read_plan(path)
    path.write_text("{not json")
    with pytest.raises(DinodistError, match="plan.json: not valid JSON"):
        read_plan(path)
    cases = [
        (lambda p: p["groups"][1].update(ranks=[0]), "ranks are not 0..2, each once"),
        (lambda p: p["groups"][1].update(devices=2), "group 'tiny-vits' has 2 devices but 1 ranks"),
        (lambda p: p["groups"][0].update(role="student"), "expected exactly one teacher group"),
        (lambda p: p["groups"][2].update(role="judge"),
         "groups[2].role: Input should be 'teacher' or 'student'"),
        (lambda p: p.pop("global_batch_size"), "global_batch_size: required field is missing"),
    ]
    for edit, message in cases:
        bad = json.loads(json.dumps(plan))
        edit(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(DinodistError) as info:
            read_plan(path)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_the_rank_program_refuses_a_stale_plan_before_joining_a_world(tmp_path, capsys, monkeypatch):
    from dinodist.orchestrator.runtime.rank import main as rank_main

    raw = yaml.safe_load(SMALL.read_text())
    topo_path = tmp_path / "topology.yaml"
    topo_path.write_text(yaml.safe_dump(raw))
    write_plan(tmp_path, make_plan(load_topology(topo_path)).to_dict())
    raw["students"][0]["name"] = "renamed"
    topo_path.write_text(yaml.safe_dump(raw))
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # it must fail before it would need a world
    assert rank_main([str(topo_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err and f"{tmp_path / PLAN_FILE}: planned groups" in err
    (tmp_path / PLAN_FILE).unlink()
    assert rank_main([str(topo_path)]) == 2
    assert "plan file not found" in capsys.readouterr().err
