"""Allocation: how many devices each group gets so that iteration times match.

Model. Group g costs s_g seconds per image (cost model). On d_g devices its ranks split the global
batch G: evenly (`train.even_batches: true`, d_g must divide G) or as evenly as possible (rank r of
d gets rows [floor(r G/d), floor((r+1) G/d)), see `rank_rows`). The group's iteration time is its
largest rank's, t_g = s_g * ceil(G / d_g); its useful work is s_g * G device-seconds whatever d_g.
d_g is at least the smallest count whose per-rank memory fits, equals the user's count when fixed,
and sum d_g <= N. Teacher and students overlap through the target queue, so the job's iteration
time is T = max_g t_g.

Objective. The job's bubble (`Plan.wait_fraction`) is the device-weighted wait over all N devices,
idle ones counted as fully waiting: 1 - sum_g s_g G / (N T). Its numerator is fixed by the
workload, so for a given N the bubble is a decreasing function of T alone: minimising T (maximising
throughput G / T) minimises the bubble, and no hand-out of devices that leaves T unchanged can
change it. Lexicographically: (1) minimise T, which also minimises the bubble; (2) hand the devices
left over to the groups, each spare to the currently slowest group that it (or the fewest spares
that do) speeds up, until no spare can shorten any group's time. (2) changes neither T nor the
bubble; it gives the groups closest to T the most headroom against cost-model error and lowers
their memory per rank, and it never adds a device that leaves its group's time unchanged.

Search for (1). For a target T, the fewest devices group g needs is m_g(T) = the smallest allowed
d with t_g(d) <= T (t_g is non-increasing in d); T is feasible iff sum m_g(T) <= N, and feasibility
is monotone in T. The optimum is one of the finitely many values t_g(d), so a binary search over
those sorted candidates finds the smallest feasible T exactly (no tolerance). Cost: O(K log K) for
K = groups x allowed counts (divisors of G, or every count up to min(N, G)).
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field

from dinodist.core.errors import DinodistError
from dinodist.core.losses.memory import DEFAULT_CHUNK_ROWS
from dinodist.core.rows import rank_rows
from dinodist.orchestrator.cost import (
    GIB,
    DeviceProfile,
    GroupCost,
    device_profile,
    group_costs,
    largest_share,
    memory_per_rank,
)
from dinodist.orchestrator.topology import Topology


@dataclass
class GroupPlan:
    name: str
    role: str  # "teacher" | "student"
    arch: str
    devices: int
    ranks: list[int]
    batch_per_rank: int  # the largest rank's share (all ranks' share with even batches)
    seconds_per_iteration: float  # the largest rank's compute time
    wait_fraction: float  # mean over the group's ranks of the fraction of T spent waiting
    memory_per_rank_bytes: int
    flops_per_image: float
    calibration: float
    min_batch_per_rank: int = 0  # the smallest rank's share
    busy_device_seconds: float = 0.0  # useful work per iteration: seconds/image x G
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
    even_batches: bool = True

    @property
    def used_devices(self) -> int:
        return sum(g.devices for g in self.groups)

    @property
    def idle_devices(self) -> int:
        return self.total_devices - self.used_devices

    @property
    def nodes(self) -> int:
        return -(-self.used_devices // self.devices_per_node)

    @property
    def busy_device_seconds(self) -> float:
        return sum(g.busy_device_seconds for g in self.groups)

    @property
    def wait_fraction(self) -> float:
        """The job's bubble: device-weighted wait over all devices, idle ones fully waiting."""
        return 1 - self.busy_device_seconds / (self.total_devices * self.seconds_per_iteration)

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
            "wait_fraction": self.wait_fraction,
            "busy_device_seconds": self.busy_device_seconds,
            "global_batch_size": self.global_batch_size,
            "even_batches": self.even_batches,
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


def candidate_counts(g_batch: int, total: int, even: bool = True) -> list[int]:
    """Group sizes the batch split allows: divisors of G (even batches) or 1..min(N, G)."""
    if even:
        return [d for d in divisors(g_batch) if d <= total]
    return list(range(1, min(total, g_batch) + 1))


def allowed_devices(
    costs: list[GroupCost], min_devices: list[int], g_batch: int, total: int, even: bool = True
) -> list[list[int]]:
    """Per group, the ascending device counts it may use (fixed, or allowed sizes above its memory floor)."""
    counts = candidate_counts(g_batch, total, even)
    out = []
    for c, lo in zip(costs, min_devices):
        out.append([c.fixed_devices] if c.fixed_devices is not None else [d for d in counts if d >= lo])
    return out


def group_seconds(work: float, devices: int, g_batch: int | None = None) -> float:
    """Iteration time of a group with `work` seconds per global batch on `devices` ranks.

    Without `g_batch` the work divides evenly (the caller guarantees d | G); with it, the largest
    rank's share ceil(G/d) sets the time.
    """
    if g_batch is None:
        return work / devices
    return work * largest_share(g_batch, devices) / g_batch


def _first_within(times: list[float], t: float) -> int:
    """Index of the first (fewest-device) option whose time is <= t; times are non-increasing."""
    lo, hi = 0, len(times)
    while lo < hi:
        mid = (lo + hi) // 2
        if times[mid] <= t:
            hi = mid
        else:
            lo = mid + 1
    return lo


def solve(work: list[float], options: list[list[int]], total: int,
          g_batch: int | None = None) -> list[int] | None:
    """Minimise max_g t_g(d_g) over d_g in options[g] (ascending), sum d_g <= total.

    t_g(d) = `group_seconds(work[g], d, g_batch)`. Returns the fewest devices per group that reach
    the optimum, or None if even the smallest options exceed `total`.
    """
    if any(not o for o in options) or sum(o[0] for o in options) > total:
        return None
    times = [[group_seconds(w, d, g_batch) for d in opts] for w, opts in zip(work, options)]
    candidates = sorted({t for ts in times for t in ts})

    def need(t: float) -> list[int] | None:
        counts = []
        for ts, opts in zip(times, options):
            i = _first_within(ts, t)
            if i == len(opts):
                return None
            counts.append(opts[i])
        return counts if sum(counts) <= total else None

    i = bisect.bisect_left(range(len(candidates)), True, key=lambda k: need(candidates[k]) is not None)
    if i == len(candidates):  # pragma: no cover - the largest candidate is always feasible
        return None
    return need(candidates[i])


def hand_out_spares(work: list[float], options: list[list[int]], counts: list[int], total: int,
                    g_batch: int | None = None) -> list[int]:
    """Give devices left over after `solve` to the groups, slowest group first (module docstring, (2)).

    Each step gives the slowest group that can still be sped up the fewest spares that shorten its
    time (ties: the earlier group). Stops when no spare can shorten any group's time, so every
    device handed out lowers its group's time. Times only fall and `solve` already reached the
    smallest feasible T, so T (and with it the bubble) is unchanged.
    """
    counts = list(counts)
    spare = total - sum(counts)
    while spare > 0:
        order = sorted(range(len(counts)), key=lambda g: (-group_seconds(work[g], counts[g], g_batch), g))
        for g in order:
            now = group_seconds(work[g], counts[g], g_batch)
            step = next((d for d in options[g] if d > counts[g] and d - counts[g] <= spare
                         and group_seconds(work[g], d, g_batch) < now), None)
            if step is not None:
                spare -= step - counts[g]
                counts[g] = step
                break
        else:
            break
    return counts


def _memory_floor(topo: Topology, c: GroupCost, profile: DeviceProfile, total: int) -> int:
    """Smallest allowed device count whose per-rank memory fits; explains the refusal otherwise."""
    g = topo.train.global_batch_size
    even = topo.train.even_batches
    counts = [c.fixed_devices] if c.fixed_devices is not None else candidate_counts(g, total, even)
    # memory per rank is non-increasing in d (state / d, activations x ceil(G/d)): bisect
    lo, hi = 0, len(counts)
    while lo < hi:
        mid = (lo + hi) // 2
        if memory_per_rank(topo, c.name, counts[mid]) <= profile.usable_bytes:
            hi = mid
        else:
            lo = mid + 1
    if lo < len(counts):
        return counts[lo]
    d = counts[-1]
    need = memory_per_rank(topo, c.name, d)
    where = "teacher" if c.role == "teacher" else f"students[{topo.group_names.index(c.name) - 1}]"
    shard = topo.teacher.shard if c.role == "teacher" else topo.student(c.name).shard
    hint = ""
    if c.role == "teacher" and shard == "replicate":
        hint = "; use teacher.shard: fsdp"
    elif c.role == "student" and not topo.student(c.name).activation_checkpointing:
        hint = "; try activation_checkpointing: true"
    elif c.role == "student" and topo.train.loss_chunk_rows == 0:
        hint = f"; try train.loss_chunk_rows: {DEFAULT_CHUNK_ROWS}"
    raise DinodistError(
        f"{where}: {c.arch} ({shard}) needs {need / GIB:.1f} GiB per rank on {d} devices "
        f"(batch {largest_share(g, d)} per rank) but a {profile.kind} rank has "
        f"{profile.usable_bytes / GIB:.1f} GiB usable{hint}"
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
    even = topo.train.even_batches
    floors = [_memory_floor(topo, c, profile, total) for c in costs]
    options = allowed_devices(costs, floors, g_batch, total, even)
    work = [c.seconds_per_image(profile) * g_batch for c in costs]
    split = None if even else g_batch
    counts = solve(work, options, total, split)
    if counts is None:
        parts = ", ".join(f"{c.name} {o[0] if o else '-'}" for c, o in zip(costs, options))
        raise DinodistError(
            f"cluster: the groups need at least {sum(o[0] for o in options if o)} devices ({parts}) "
            f"but {total} are available"
        )
    counts = hand_out_spares(work, options, counts, total, split)
    times = [group_seconds(w, d, split) for w, d in zip(work, counts)]
    t_max = max(times)
    groups, first = [], 0
    dpn = topo.cluster.devices_per_node
    for c, d, t, w in zip(costs, counts, times, work):
        ranks = list(range(first, first + d))
        placement: list[tuple[int, int, int]] = []
        for r in ranks:
            node, local = divmod(r, dpn)
            if placement and placement[-1][0] == node:
                placement[-1] = (node, placement[-1][1], placement[-1][2] + 1)
            else:
                placement.append((node, local, 1))
        first_rows, last_rows = rank_rows(g_batch, d, 0), rank_rows(g_batch, d, d - 1)
        groups.append(GroupPlan(
            name=c.name, role=c.role, arch=c.arch, devices=d, ranks=ranks,
            batch_per_rank=last_rows.stop - last_rows.start, seconds_per_iteration=t,
            wait_fraction=1 - (w / d) / t_max,  # mean rank: w/d busy seconds of t_max
            memory_per_rank_bytes=memory_per_rank(topo, c.name, d),
            flops_per_image=c.flops_per_image, calibration=c.scale,
            min_batch_per_rank=first_rows.stop - first_rows.start, busy_device_seconds=w, placement=placement,
        ))
        first += d
    return Plan(topo.name, profile.kind, total, dpn, g_batch, t_max, groups, profile.memory_bytes, even)


def _fmt_seconds(s: float) -> str:
    return f"{s:.3f}" if s >= 0.01 else f"{s * 1e3:.2f}m"


def plan_table(plan: Plan) -> str:
    """The human-readable plan: one row per group, then the totals."""
    head = ("group", "role", "arch", "devices", "ranks", "batch/rank", "s/iter", "wait %", "mem/rank GiB")
    rows = [head]
    for g in plan.groups:
        ranks = f"{g.ranks[0]}..{g.ranks[-1]}" if g.devices > 1 else str(g.ranks[0])
        batch = str(g.batch_per_rank) if g.min_batch_per_rank == g.batch_per_rank else \
            f"{g.min_batch_per_rank}-{g.batch_per_rank}"
        rows.append((g.name, g.role, g.arch, str(g.devices), ranks, batch,
                     _fmt_seconds(g.seconds_per_iteration), f"{100 * g.wait_fraction:.1f}",
                     f"{g.memory_per_rank_bytes / GIB:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"{plan.name}: {plan.used_devices}/{plan.total_devices} {plan.device} devices "
        f"({plan.idle_devices} idle), {_fmt_seconds(plan.seconds_per_iteration)} s/iter, "
        f"{plan.global_batch_size / plan.seconds_per_iteration:.1f} img/s, "
        f"job wait {100 * plan.wait_fraction:.1f} % (device-weighted, idle devices count as waiting)"
    )
    return "\n".join(lines)
