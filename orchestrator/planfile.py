"""`plan.json`: the plan the driver wrote, as every rank reads it.

The driver (`dinodist distill`, `add-student`, `deploy`) plans once and writes `Plan.to_dict()`
beside the resolved topology; ranks read it instead of planning again, so a rank never disagrees
with the driver about groups, ranks or rows (and never needs the cost model). `plan --json` prints
the same schema. This module validates the part ranks use and checks it against the topology
they were given: a stale plan.json next to an edited topology is a one-line error, not a hang.
Plain Python: the driver writes it and the runtime reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dinodist.core.config import validation_error_line
from dinodist.core.errors import DinodistError

PLAN_FILE = "plan.json"
# the data source's file list, written by the driver beside the plan when it can read the data
# (core.data.index): ranks build their source from it instead of each walking the image tree
DATA_INDEX_FILE = "data-index.json"
_MAX_BYTES = 16 << 20  # thousands of ranks fit in well under a megabyte


class _Read(BaseModel):
    # the file holds more (predicted times, memory, placement): the runtime reads what it needs
    model_config = ConfigDict(extra="ignore", frozen=True)


class PlannedGroup(_Read):
    name: str
    role: Literal["teacher", "student"]
    arch: str
    devices: int = Field(gt=0)
    ranks: list[int]


class PlannedTeacherLayout(_Read):
    """How the teacher's weights are laid out over its ranks (teacher/model.py:shard_teacher)."""

    layout: Literal["fsdp", "hsdp", "replicate"]
    shard_size: int = Field(gt=0)  # ranks one copy of the weights is spread over


class RunPlan(_Read):
    name: str
    global_batch_size: int = Field(gt=0)
    even_batches: bool
    used_devices: int = Field(gt=0)
    groups: list[PlannedGroup]
    teacher_layout: PlannedTeacherLayout | None = None  # plans written before layouts were chosen

    def group(self, name: str) -> PlannedGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise DinodistError(f"{PLAN_FILE}: no group named {name!r}; planned: "
                            f"{', '.join(g.name for g in self.groups)}")

    def group_of_rank(self, rank: int) -> PlannedGroup:
        for g in self.groups:
            if rank in g.ranks:
                return g
        raise DinodistError(f"{PLAN_FILE}: rank {rank} is in no group (the plan has {self.used_devices} "
                            "ranks)")

    @property
    def teacher(self) -> PlannedGroup:
        return next(g for g in self.groups if g.role == "teacher")


def write_plan(out_dir: str | Path, plan: dict[str, Any]) -> Path:
    """Write `plan` (a `Plan.to_dict()`) to `<out_dir>/plan.json`, atomically."""
    path = Path(out_dir) / PLAN_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, path)
    return path


def parse_plan(raw: Any, where: str = PLAN_FILE) -> RunPlan:
    try:
        plan = RunPlan.model_validate(raw)
    except ValidationError as exc:
        raise DinodistError(validation_error_line(exc, where, root="plan")) from None
    ranks = sorted(r for g in plan.groups for r in g.ranks)
    if ranks != list(range(plan.used_devices)):
        raise DinodistError(f"{where}: the groups' ranks are not 0..{plan.used_devices - 1}, each once")
    for g in plan.groups:
        if len(g.ranks) != g.devices:
            raise DinodistError(f"{where}: group {g.name!r} has {g.devices} devices but {len(g.ranks)} ranks")
    if [g.role for g in plan.groups].count("teacher") != 1:
        raise DinodistError(f"{where}: expected exactly one teacher group")
    return plan


def read_plan(path: str | Path) -> RunPlan:
    path = Path(path)
    if not path.is_file():
        raise DinodistError(f"{path}: plan file not found (`dinodist distill` and `dinodist deploy` write it "
                            "beside the topology; ranks no longer plan on their own)")
    if path.stat().st_size > _MAX_BYTES:
        raise DinodistError(f"{path}: larger than {_MAX_BYTES >> 20} MiB, not a plan")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DinodistError(f"{path}: not valid JSON ({exc})") from None
    return parse_plan(raw, str(path))


def check_plan_matches(plan: RunPlan, topo: Any, where: str = PLAN_FILE) -> None:
    """The plan was made for this topology: same groups in the same order, batch and fixed sizes."""
    names = ["teacher"] + [s.name for s in topo.students]
    planned = [g.name for g in plan.groups]
    if planned != names:
        raise DinodistError(f"{where}: planned groups {planned} are not the topology's {names} "
                            "(re-run the command that wrote the plan)")
    if plan.global_batch_size != topo.train.global_batch_size:
        raise DinodistError(f"{where}: global batch {plan.global_batch_size} differs from the topology's "
                            f"train.global_batch_size {topo.train.global_batch_size}")
    if plan.even_batches != topo.train.even_batches:
        raise DinodistError(f"{where}: even_batches {plan.even_batches} differs from the topology's "
                            f"train.even_batches {topo.train.even_batches}")
    fixed = [("teacher", topo.teacher.devices)] + [(s.name, s.devices) for s in topo.students]
    for name, devices in fixed:
        if devices != "auto" and plan.group(name).devices != devices:
            raise DinodistError(f"{where}: group {name!r} has {plan.group(name).devices} devices in the plan "
                                f"but {devices} in the topology")
