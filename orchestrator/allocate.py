"""Allocation: how many devices each group gets so that iteration times match.

Problem. Group g with per-image time w_g (cost model) on d_g devices takes t_g = w_g * G / d_g per
iteration. Each d_g must divide the global batch G (every rank takes the same share), be at
least the smallest count at which a rank's memory fits, and equal the user's count when fixed;
sum d_g <= N. Minimise T = max_g t_g (teacher and students overlap through the target queue, so
the iteration time is the slowest group's).

Search. For a target T, the fewest devices group g needs is m_g(T) = the smallest allowed d with
w_g*G/d <= T; T is feasible iff sum m_g(T) <= N, and feasibility is monotone in T. The optimum
is one of the finitely many values w_g*G/d, so a binary search over those sorted candidates
finds the smallest feasible T exactly (no tolerance). Each group then keeps m_g(T*): any extra
device would only lengthen that group's wait, since no group can beat T* (it would otherwise
have been feasible). So the allocation minimises T and, given T, every group's wait; unused
devices are reported as idle. Cost: O(K log K) for K = groups x divisors of G.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field

from core.errors import DinodistError
from orchestrator.cost import (
    GIB,
    DeviceProfile,
    GroupCost,
    device_profile,
    group_costs,
    memory_per_rank,
)
from orchestrator.topology import Topology


@dataclass
class GroupPlan:
    name: str
    role: str  # "teacher" | "student"
    arch: str
    devices: int
    ranks: list[int]
    batch_per_rank: int
    seconds_per_iteration: float
    wait_fraction: float
    memory_per_rank_bytes: int
    flops_per_image: float
    calibration: float
    # (node, first local rank, count) for each node the group's ranks live on
    placement: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class Plan:
    name: str
    device: str
    total_devices: int
    devices_per_node: int
    global_batch_size: int
    seconds_per_iteration: float
    groups: list[GroupPlan]
    memory_per_device_bytes: int

    @property
    def used_devices(self) -> int:
        return sum(g.devices for g in self.groups)

    @property
    def idle_devices(self) -> int:
        return self.total_devices - self.used_devices

    @property
    def nodes(self) -> int:
        return -(-self.used_devices // self.devices_per_node)

    def group(self, name: str) -> GroupPlan:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def ranks_on_node(self, node: int) -> int:
        return max(0, min(self.devices_per_node, self.used_devices - node * self.devices_per_node))

    def to_dict(self) -> dict:
        groups = []
        for g in self.groups:
            d = asdict(g)
            d["placement"] = [{"node": n, "first_local_rank": lr, "ranks": c} for n, lr, c in g.placement]
            groups.append(d)
        return {
            "name": self.name,
            "device": self.device,
            "seconds_per_iteration": self.seconds_per_iteration,
            "images_per_second": self.global_batch_size / self.seconds_per_iteration,
            "global_batch_size": self.global_batch_size,
            "total_devices": self.total_devices,
            "used_devices": self.used_devices,
            "idle_devices": self.idle_devices,
            "devices_per_node": self.devices_per_node,
            "memory_per_device_bytes": self.memory_per_device_bytes,
            "groups": groups,
        }


def divisors(n: int) -> list[int]:
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i != n // i:
                large.append(n // i)
        i += 1
    return small + large[::-1]


def allowed_devices(
    costs: list[GroupCost], min_devices: list[int], g_batch: int, total: int
) -> list[list[int]]:
    """Per group, the ascending device counts it may use (fixed, or divisors of G above its memory floor)."""
    divs = [d for d in divisors(g_batch) if d <= total]
    out = []
    for c, lo in zip(costs, min_devices):
        out.append([c.fixed_devices] if c.fixed_devices is not None else [d for d in divs if d >= lo])
    return out


def solve(work: list[float], options: list[list[int]], total: int) -> list[int] | None:
    """Minimise max_g work[g]/d_g over d_g in options[g] (ascending), sum d_g <= total.

    Returns the fewest devices per group that reach the optimum, or None if even the smallest
    options exceed `total`.
    """
    if any(not o for o in options) or sum(o[0] for o in options) > total:
        return None
    candidates = sorted({w / d for w, opts in zip(work, options) for d in opts})

    def need(t: float) -> list[int] | None:
        # smallest d with w/d <= t, i.e. d >= w/t: options are ascending so bisect on w/d descending
        counts = []
        for w, opts in zip(work, options):
            # first index whose time is <= t; times decrease with index
            lo, hi = 0, len(opts)
            while lo < hi:
                mid = (lo + hi) // 2
                if w / opts[mid] <= t:
                    hi = mid
                else:
                    lo = mid + 1
            if lo == len(opts):
                return None
            counts.append(opts[lo])
        return counts if sum(counts) <= total else None

    i = bisect.bisect_left(range(len(candidates)), True, key=lambda k: need(candidates[k]) is not None)
    if i == len(candidates):  # pragma: no cover - the largest candidate is always feasible
        return None
    return need(candidates[i])


def _memory_floor(topo: Topology, c: GroupCost, profile: DeviceProfile, total: int) -> int:
    """Smallest allowed device count whose per-rank memory fits; explains the refusal otherwise."""
    g = topo.train.global_batch_size
    counts = [c.fixed_devices] if c.fixed_devices is not None else [d for d in divisors(g) if d <= total]
    for d in counts:
        if memory_per_rank(topo, c.name, d) <= profile.usable_bytes:
            return d
    d = counts[-1]
    need = memory_per_rank(topo, c.name, d)
    where = "teacher" if c.role == "teacher" else f"students[{topo.group_names.index(c.name) - 1}]"
    shard = topo.teacher.shard if c.role == "teacher" else topo.student(c.name).shard
    hint = ""
    if c.role == "teacher" and shard == "replicate":
        hint = "; use teacher.shard: fsdp"
    elif c.role == "student" and not topo.student(c.name).activation_checkpointing:
        hint = "; try activation_checkpointing: true"
    raise DinodistError(
        f"{where}: {c.arch} ({shard}) needs {need / GIB:.1f} GiB per rank on {d} devices "
        f"(batch {g // d} per rank) but a {profile.kind} rank has {profile.usable_bytes / GIB:.1f} GiB usable"
        f"{hint}"
    )


def make_plan(topology: Topology, devices: int | None = None,
              calibration: dict[str, float] | None = None) -> Plan:
    """Device counts, rank ranges and predicted times for every group (see module docstring)."""
    topo = topology
    total = devices if devices is not None else topo.total_devices
    if total <= 0:
        raise DinodistError(f"--devices: must be positive, got {total}")
    profile = device_profile(topo)
    costs = group_costs(topo, calibration)
    g_batch = topo.train.global_batch_size
    floors = [_memory_floor(topo, c, profile, total) for c in costs]
    options = allowed_devices(costs, floors, g_batch, total)
    work = [c.seconds_per_image(profile) * g_batch for c in costs]
    counts = solve(work, options, total)
    if counts is None:
        parts = ", ".join(f"{c.name} {o[0] if o else '-'}" for c, o in zip(costs, options))
        raise DinodistError(
            f"cluster: the groups need at least {sum(o[0] for o in options if o)} devices ({parts}) "
            f"but {total} are available"
        )
    times = [w / d for w, d in zip(work, counts)]
    t_max = max(times)
    groups, first = [], 0
    dpn = topo.cluster.devices_per_node
    for c, d, t in zip(costs, counts, times):
        ranks = list(range(first, first + d))
        placement = []
        for r in ranks:
            node, local = divmod(r, dpn)
            if placement and placement[-1][0] == node:
                placement[-1] = (node, placement[-1][1], placement[-1][2] + 1)
            else:
                placement.append((node, local, 1))
        groups.append(GroupPlan(
            name=c.name, role=c.role, arch=c.arch, devices=d, ranks=ranks, batch_per_rank=g_batch // d,
            seconds_per_iteration=t, wait_fraction=1 - t / t_max,
            memory_per_rank_bytes=memory_per_rank(topo, c.name, d),
            flops_per_image=c.flops_per_image, calibration=c.scale, placement=placement,
        ))
        first += d
    return Plan(topo.name, profile.kind, total, dpn, g_batch, t_max, groups, profile.memory_bytes)


def _fmt_seconds(s: float) -> str:
    return f"{s:.3f}" if s >= 0.01 else f"{s * 1e3:.2f}m"


def plan_table(plan: Plan) -> str:
    """The human-readable plan: one row per group, then the totals."""
    head = ("group", "role", "arch", "devices", "ranks", "batch/rank", "s/iter", "wait %", "mem/rank GiB")
    rows = [head]
    for g in plan.groups:
        ranks = f"{g.ranks[0]}..{g.ranks[-1]}" if g.devices > 1 else str(g.ranks[0])
        rows.append((g.name, g.role, g.arch, str(g.devices), ranks, str(g.batch_per_rank),
                     _fmt_seconds(g.seconds_per_iteration), f"{100 * g.wait_fraction:.1f}",
                     f"{g.memory_per_rank_bytes / GIB:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    busy = sum(g.devices * g.seconds_per_iteration for g in plan.groups)
    lines.append("")
    lines.append(
        f"{plan.name}: {plan.used_devices}/{plan.total_devices} {plan.device} devices "
        f"({plan.idle_devices} idle), {_fmt_seconds(plan.seconds_per_iteration)} s/iter, "
        f"{plan.global_batch_size / plan.seconds_per_iteration:.1f} img/s, "
        f"device-time busy {100 * busy / (plan.used_devices * plan.seconds_per_iteration):.1f} %"
    )
    return "\n".join(lines)
