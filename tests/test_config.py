"""core/config.py (shared by topologies and stage recipes), control schema, runtime refusals, lazy exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dinodist.core.config import (
    apply_override,
    apply_overrides,
    parse_overrides,
    read_yaml_mapping,
    validation_error_line,
)
from dinodist.core.errors import DinodistError
from dinodist.orchestrator.cli import main
from dinodist.orchestrator.topology import Control, check_runnable, load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "topologies" / "cpu-small.yaml"


def small_raw() -> dict:
    return yaml.safe_load(SMALL.read_text())


def test_overrides_parse_yaml_scalars_and_reach_into_lists():
    assert parse_overrides(["a.b=1e-5", "c=[1, 2]", "d=null", "e=folder:/x:y", "f=", "g=2E+3", "h=1e"]) == [
        ("a.b", 1e-5), ("c", [1, 2]), ("d", None), ("e", "folder:/x:y"), ("f", None), ("g", 2000.0),
        ("h", "1e")]
    tree = {"students": [{"name": "a"}, {"name": "b"}]}
    apply_overrides(tree, {"students[1].devices": 2, "students.0.name": "z", "train.iterations": 3})
    assert tree == {"students": [{"name": "z"}, {"name": "b", "devices": 2}], "train": {"iterations": 3}}
    with pytest.raises(DinodistError, match="override 'students.name': 'name' is not inside a mapping"):
        apply_override(tree, "students.name", 1)
    with pytest.raises(DinodistError, match="override 'noequals': expected KEY=VALUE"):
        parse_overrides(["noequals"])


def test_exponent_floats_reach_strict_fields_as_numbers(tmp_path):
    # PyYAML alone reads `1e-5` as a string, which the strict topology schema would refuse
    raw = SMALL.read_text().replace("lr: 1.0e-3", "lr: 1e-5")
    path = tmp_path / "t.yaml"
    path.write_text(raw)
    assert load_topology(path).train.lr == 1e-5
    assert load_topology(SMALL, ["train.weight_decay=4e-2"]).train.weight_decay == 0.04


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [\n")
    with pytest.raises(DinodistError, match=r"bad.yaml:3: invalid YAML"):
        read_yaml_mapping(bad, "topology")
    bad.write_text("- 1\n")
    with pytest.raises(DinodistError, match="a stage config must be a YAML mapping, got list"):
        read_yaml_mapping(bad, "stage config")
    bad.write_text("")
    assert read_yaml_mapping(bad, "stage config", allow_empty=True) == {}
    with pytest.raises(DinodistError, match="nope.yaml: topology file not found"):
        read_yaml_mapping(tmp_path / "nope.yaml", "topology")


def test_validation_error_line_forms():
    class Inner(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int

    class Outer(BaseModel):
        model_config = ConfigDict(extra="forbid")
        items: list[Inner]

    def line(raw, **kw) -> str:
        with pytest.raises(ValidationError) as info:
            Outer.model_validate(raw)
        return validation_error_line(info.value, **kw)

    assert line({"items": [{"n": 1}, {"n": "x"}]}) == \
        "items[1].n: Input should be a valid integer, unable to parse string as an integer"
    assert line({"items": [{"n": 1, "m": 2}]}) == "items[0]: unknown key 'm'"
    assert line({"items": [], "zz": 1}) == "topology: unknown key 'zz'"
    assert line({"items": [], "zz": 1}, source="f.yaml", root="config") == "f.yaml: config: unknown key 'zz'"
    assert line({}, source="f.yaml") == "f.yaml: items: required field is missing"


def test_control_is_one_schema_with_checked_fields():
    c = Control()
    assert (c.heartbeat_interval_s, c.heartbeat_timeout_s, c.register_timeout_s, c.grace_s) == \
        (0.5, 10.0, 300.0, 5.0)
    raw = small_raw()
    raw["control"] = {"heartbeat_interval_s": 10, "heartbeat_timeout_s": 5}
    with pytest.raises(DinodistError,
                       match="^control: heartbeat_interval_s 10 must be below heartbeat_timeout_s 5$"):
        parse_topology(raw)
    assert (c.on_failure, c.max_restarts, c.progress_timeout_s) == ("restart_group", 3, 600.0)
    raw["control"] = {"on_failure": "stop", "grace_s": 1, "register_timeout_s": None}
    topo = parse_topology(raw)
    assert topo.control.grace_s == 1 and topo.control.register_timeout_s is None
    check_runnable(topo)  # both policies run
    raw["control"] = {"progress_timeout_s": 1000, "collective_timeout_s": 900}
    with pytest.raises(DinodistError, match=r"^control: progress_timeout_s 1000 must be below collective_t"):
        parse_topology(raw)
    assert "collective 900 s < startup 1800 s" in parse_topology(small_raw()).control.timeouts_line()
    raw["control"] = {"on_failure": "restart"}
    with pytest.raises(DinodistError, match=r"^control.on_failure: Input should be 'stop' or 'restart_gr"):
        parse_topology(raw)


@pytest.mark.parametrize("edit, field", [
    (lambda r: r["students"][0].update(shard="ddp"), "students[0].shard"),
])
def test_settings_the_runtime_does_not_apply_are_refused_before_launch(tmp_path, capsys, edit, field):
    raw = small_raw()
    edit(raw)
    topo = parse_topology(raw)  # plannable ...
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(path)]) == 0
    assert f"note: planned as written, but distill, add-student and deploy refuse it for now: {field}" in \
        capsys.readouterr().out
    with pytest.raises(DinodistError) as info:
        check_runnable(topo)
    assert str(info.value).startswith(f"{field}: ")
    # ... but not runnable: distill stops before it writes or starts anything
    out = tmp_path / "run"
    assert main(["distill", str(path), "--out", str(out), "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dinodist distill: error: {field}: ")
    assert not out.exists()


def test_lazy_exports_resolve_and_list():
    import dinodist.core.losses as losses
    import dinodist.core.models as models

    assert "build_backbone" in dir(models) and "loss_activation_bytes" in dir(losses)
    from dinodist.core.models.vit import build_backbone

    assert models.build_backbone is build_backbone
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        models.nope  # noqa: B018
    assert load_topology(SMALL).train.loss_chunk_rows == __import__(
        "dinodist.core.losses.memory", fromlist=["x"]).DEFAULT_CHUNK_ROWS
