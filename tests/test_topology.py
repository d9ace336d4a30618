import logging
from pathlib import Path

import pytest
import yaml

from dinodist.core.config import format_loc, validation_error_line
from dinodist.core.errors import DinodistError
from dinodist.core.models.arch import PAPER_DINO_HEAD, PAPER_IBOT_HEAD, TINY_DINO_HEAD
from dinodist.orchestrator.topology import (
    Topology,
    load_topology,
    parse_topology,
    warn_if_random_teacher,
)

# cpu-demo.yaml names the teacher the README command makes first; tests run without it.
NO_TEACHER = {"teacher.checkpoint": None}

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "topologies"
BAD = sorted((Path(__file__).parent / "topologies_bad").glob("*.yaml"))


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ")


def small_raw() -> dict:
    return yaml.safe_load((CONFIGS / "cpu-small.yaml").read_text())


def test_corpus_is_large_enough():
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_broken_topology_rejected_with_one_line(path):
    with pytest.raises(DinodistError) as info:
        load_topology(path)
    msg = str(info.value)
    assert expected(path) in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name", ["cpu-demo", "cpu-small", "dinov3-paper", "cpu-fashion"])
def test_shipped_topologies_load(name):
    # cpu-demo and cpu-fashion name teachers their README/benchmark commands make first
    made_first = name in ("cpu-demo", "cpu-fashion")
    topo = load_topology(CONFIGS / f"{name}.yaml", NO_TEACHER if made_first else None)
    assert isinstance(topo, Topology)
    assert Path(topo.output).is_absolute()
    # the resolved dump is itself a valid topology with the same content
    again = parse_topology(yaml.safe_load(topo.to_yaml()))
    assert again.model_dump() == topo.model_dump()


def test_cpu_demo_shape():
    topo = load_topology(CONFIGS / "cpu-demo.yaml", NO_TEACHER)
    assert topo.total_devices == 5
    assert (topo.teacher.arch, topo.teacher.shard, topo.teacher.devices) == ("tiny-vit7b", "fsdp", 2)
    assert [s.arch for s in topo.students] == ["tiny-vits", "tiny-vitb", "tiny-vitl"]
    assert topo.train.global_batch_size == 8 and topo.train.iterations == 30
    assert topo.resolved_backend() == "gloo"


def test_cpu_fashion_distils_the_teacher_its_stage_config_makes():
    """The topology must name the model cpu-fashion-teacher.yaml trains, at its resolution: the teacher load
    would refuse another arch, but not another crop size. Its students regress the teacher's features, so
    neither head sizes nor temperatures have to match."""
    from dinodist.core.ssl.config import load_stage_config

    topo = load_topology(CONFIGS / "cpu-fashion.yaml", NO_TEACHER)
    stage = load_stage_config(ROOT / "configs" / "stages" / "cpu-fashion-teacher.yaml")
    t = topo.teacher
    assert (t.arch, t.overrides) == (stage.model.arch, stage.model.overrides)
    assert topo.data.global_crop_size == stage.crops.global_size
    assert t.targets == "features"


def test_default_heads_follow_the_teacher_family():
    tiny = load_topology(CONFIGS / "cpu-small.yaml")
    assert tiny.dino_head() == TINY_DINO_HEAD
    paper = load_topology(CONFIGS / "dinov3-paper.yaml")
    assert (paper.dino_head(), paper.ibot_head()) == (PAPER_DINO_HEAD, PAPER_IBOT_HEAD)
    # a partial student head keeps the teacher's other sizes
    raw = small_raw()
    raw["students"][0]["dino_head"] = {"hidden_dim": 128}
    topo = parse_topology(raw)
    dino, _ = topo.student_heads("tiny-vits")
    assert dino.hidden_dim == 128 and dino.n_prototypes == topo.dino_head().n_prototypes


def test_overrides_dict_and_strings(tmp_path):
    path = CONFIGS / "cpu-small.yaml"
    a = load_topology(path, {"train.iterations": 9, "students[1].devices": "auto"})
    b = load_topology(path, ["train.iterations=9", "students.1.devices=auto"])
    assert a.model_dump() == b.model_dump()
    assert a.train.iterations == 9 and a.students[1].devices == "auto"
    with pytest.raises(DinodistError, match=r"override 'students\[5\].devices': index 5 out of range"):
        load_topology(path, {"students[5].devices": 1})
    with pytest.raises(DinodistError, match="expected KEY=VALUE"):
        load_topology(path, ["train.iterations"])
    # an override goes through the same validation as the file
    with pytest.raises(DinodistError, match="train.iterations: Input should be greater than 0"):
        load_topology(path, ["train.iterations=0"])


def test_relative_paths_resolve_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "t.pth").write_bytes(b"x")
    raw = small_raw()
    raw["teacher"]["checkpoint"] = "ckpt/t.pth"
    raw["store"] = {"path": "store", "dtype": "int8", "retain": 3}
    cfg = tmp_path / "elsewhere" / "topo.yaml"
    cfg.parent.mkdir()
    cfg.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    topo = load_topology(cfg)
    assert topo.teacher.checkpoint == str(tmp_path / "ckpt" / "t.pth")
    assert topo.store.path == str(tmp_path / "store")
    assert topo.output == str(tmp_path / "runs" / "cpu-small")
    # the same relative name from another directory is a missing file
    monkeypatch.chdir(cfg.parent)
    with pytest.raises(DinodistError, match="teacher.checkpoint: file not found"):
        load_topology(cfg)
    assert load_topology(cfg, check_paths=False).teacher.checkpoint.endswith("elsewhere/ckpt/t.pth")


def test_missing_file_and_batch_per_rank_pins_devices(tmp_path):
    with pytest.raises(DinodistError, match=r"nope.yaml: topology file not found"):
        load_topology(tmp_path / "nope.yaml")
    raw = small_raw()
    raw["cluster"]["devices_per_node"] = 8
    raw["students"][1].update(devices="auto", batch_per_rank=2)
    assert parse_topology(raw).students[1].devices == 2
    raw["students"][1].update(devices=4, batch_per_rank=2)
    with pytest.raises(DinodistError, match=r"students\[1\].batch_per_rank: 2 x devices 4 != "):
        parse_topology(raw)


def test_student_optim_overrides_train():
    raw = small_raw()
    raw["students"][0]["optim"] = {"lr": 0.5, "ema": 0.9}
    topo = parse_topology(raw)
    mine, other = topo.student_train("tiny-vits"), topo.student_train("tiny-vitb")
    assert (mine["lr"], mine["ema"]) == (0.5, 0.9)
    assert other["lr"] == topo.train.lr and mine["weight_decay"] == topo.train.weight_decay


def test_error_line_formatting():
    assert format_loc(("students", 1, "dino_head", "n_prototypes")) == "students[1].dino_head.n_prototypes"
    raw = small_raw()
    raw["students"][1]["dino_head"] = {"n_prototypes": -3}
    try:
        Topology.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError
        line = validation_error_line(exc)
    assert line == "students[1].dino_head.n_prototypes: Input should be greater than 0"


def test_random_teacher_warns(caplog):
    topo = load_topology(CONFIGS / "cpu-small.yaml")
    with caplog.at_level(logging.WARNING):
        warn_if_random_teacher(topo)
    assert "RANDOMLY INITIALISED" in caplog.text


def test_target_dtype_is_auto_by_default_and_names_its_field_when_wrong():
    raw = small_raw()
    assert parse_topology(raw).train.target_dtype == "auto"
    for value in ("fp32", "bf16"):
        raw["train"]["target_dtype"] = value
        assert parse_topology(raw).train.target_dtype == value
    raw["train"]["target_dtype"] = "fp16"
    with pytest.raises(DinodistError) as info:
        parse_topology(raw)
    assert str(info.value).startswith("train.target_dtype: ") and "\n" not in str(info.value)


def test_crop_scales_reach_every_loader_and_the_store_manifest(tmp_path):
    """data.global_crop_scale / local_crop_scale: the crops of the teacher and of every student, and the
    global one in the target store's identity (a store of other crops is not replayed as if the same)."""
    from dinodist.orchestrator.runtime.jobs import student_job, teacher_job
    from dinodist.teacher.run import target_crop_config

    raw = small_raw()
    default = teacher_job(parse_topology(raw), tmp_path)
    assert (default.crops.global_scale, default.crops.local_scale) == ((0.32, 1.0), (0.05, 0.32))
    raw["data"].update(global_crop_scale=[0.5, 1.0], local_crop_scale=[0.2, 0.5])
    topo = parse_topology(raw)
    tj = teacher_job(topo, tmp_path)
    for job in [tj] + [student_job(topo, s.name, tmp_path) for s in topo.students]:
        assert (job.crops.global_scale, job.crops.local_scale) == ((0.5, 1.0), (0.2, 0.5))
    assert target_crop_config(tj.crops)["global_scale"] == [0.5, 1.0]
    assert target_crop_config(tj.crops) != target_crop_config(default.crops)
