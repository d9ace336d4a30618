"""Inline-teacher runner: one student, the teacher computed in the student's own process.

No launch, no second process, no target exchange: the reference the distributed runs are
compared against (tests/test_distill_equivalence.py). It reads the student's settings from a
topology so both runs use the same recipe, and trains through the same `train_student` loop
with an `InlineTargetSource`. The process forms a one-rank gloo world so the student is sharded
(trivially) by FSDP2 exactly as in a topology.

    python -m dinodist.orchestrator.runtime.inline TOPOLOGY --student NAME [--out DIR] [--iterations N]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dinodist.core.data.loader import BatchLoader
from dinodist.core.data.sources import build_source
from dinodist.core.distributed import group_mesh
from dinodist.core.errors import DinodistError
from dinodist.core.net import free_port
from dinodist.core.targets import InlineTargetSource
from dinodist.orchestrator.runtime.jobs import student_job, teacher_job, wire_dtype
from dinodist.orchestrator.topology import check_runnable, load_topology
from dinodist.students.run import GroupContext, train_student
from dinodist.teacher.model import last_layers, load_teacher
from dinodist.teacher.targets import compute_targets


def run_inline(topology: str | Path, student: str, out: str | Path | None = None,
               iterations: int | None = None) -> dict:
    overrides = {"train.iterations": iterations} if iterations else None
    topo = load_topology(topology, overrides)
    check_runnable(topo)
    out_dir = Path(out) if out is not None else Path(topo.output)
    sjob = student_job(topo, student, out_dir)
    tjob = teacher_job(topo, out_dir)
    device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
    group = dist.group.WORLD
    mesh = group_mesh(group, [0], device.type)
    loaded = load_teacher(tjob.arch, tjob.overrides, tjob.checkpoint, tjob.kind, tjob.dino_head,
                          tjob.ibot_head, tjob.seed)
    teacher = loaded.model.to(device)
    g = tjob.global_batch
    tloader = BatchLoader(build_source(tjob.source), dataclasses.replace(tjob.crops, n_local=0), g, tjob.seed,
                          slice(0, g), loaded.spec.patch_size, mask_prob=tjob.mask_prob,
                          mask_ratio=tjob.mask_ratio, workers=tjob.workers, uint8=tjob.uint8)

    def compute(it: int):
        return compute_targets(teacher, tloader.get(it), it, 0, tjob.kind, device)

    last = last_layers(teacher) if tjob.kind == "heads" else None
    ctx = GroupContext(group, mesh, 0, 1, 0, g, device)
    try:
        # rounded to the wire dtype the live run would send (train.target_dtype), so both stay comparable
        totals = train_student(sjob, InlineTargetSource(compute, wire_dtype(topo)), last, ctx)
    finally:
        tloader.close()
    summary = {**totals, "teacher_forwards": totals["iterations"]}
    (sjob.group_dir / "inline.json").write_text(json.dumps(summary))
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinodist.orchestrator.runtime.inline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("topology")
    parser.add_argument("--student", required=True, help="name of the student in the topology")
    parser.add_argument("--out", help="output folder (default: the topology's output)")
    parser.add_argument("--iterations", type=int)
    args = parser.parse_args(argv)
    try:
        run_inline(args.topology, args.student, args.out, args.iterations)
    except DinodistError as exc:
        print(f"dinodist inline: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
