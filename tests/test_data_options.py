"""`data.workers` and `data.uint8` in a topology reach the teacher's and every student's loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_wire_dtype import TERMS, _run_inline, _run_live, _topology

from dinodist.orchestrator.runtime.jobs import student_job, teacher_job
from dinodist.orchestrator.topology import parse_topology
from dinodist.teacher.run import store_manifest


def _with_data(path: Path, **data) -> Path:
    raw = yaml.safe_load(path.read_text())
    raw["data"].update(data)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_jobs_carry_the_loader_options_and_the_store_records_uint8(tmp_path):
    raw = yaml.safe_load(_topology(tmp_path / "t.yaml", "fp32").read_text())
    raw["data"].update(workers=3, uint8=True)
    topo = parse_topology(raw)
    tj, sj = teacher_job(topo, tmp_path, None), student_job(topo, "tiny-vits", tmp_path)
    assert (tj.workers, tj.uint8, sj.workers, sj.uint8) == (3, True, 3, True)
    # a store of uint8 crops is not replayed as if from float ones (old stores keep their identity)
    assert store_manifest(tj, "h", "f", 8)["uint8_crops"] is True
    raw["data"]["uint8"] = False
    assert "uint8_crops" not in store_manifest(teacher_job(parse_topology(raw), tmp_path, None), "h", "f", 8)
    raw["data"]["workers"] = -1
    with pytest.raises(Exception, match="data.workers"):
        parse_topology(raw)


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_a_live_run_with_worker_processes_and_uint8_crops_matches_its_inline_twin(tmp_path):
    """Live (teacher and student in their own ranks, loaders with a worker process, uint8 crops) equals
    the inline run of the same topology, and differs from float crops only by the uint8 rounding."""
    opts = _with_data(_topology(tmp_path / "u8.yaml", "fp32"), workers=1, uint8=True)
    live = _run_live(opts, tmp_path / "live", timeout=300)
    inline = _run_inline(opts, tmp_path / "inline")
    floats = _run_inline(_topology(tmp_path / "fp32.yaml", "fp32"), tmp_path / "floats")
    manifest = json.loads((tmp_path / "live" / "targets" / "manifest.json").read_text())
    assert manifest["uint8_crops"] is True  # the teacher's loader made uint8 crops
    assert len(live) == len(inline) == len(floats) > 0
    for a, b in zip(live, inline):
        for term in TERMS:
            assert abs(a[term] - b[term]) <= 1e-5, (a["iteration"], term, a[term], b[term])
    gaps = [abs(a[t] - c[t]) / abs(c[t]) for a, c in zip(live, floats) for t in ("loss", "dino_global")]
    assert 0 < max(gaps) < 1e-2, gaps
