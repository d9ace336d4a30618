"""Allocation: how many devices each group gets so that iteration times match.

Model. Group g costs s_g seconds per image (cost model). On d_g devices its ranks split the global
batch G: evenly (`train.even_batches: true`, d_g must divide G) or as evenly as possible (rank r of
d gets rows [floor(r G/d), floor((r+1) G/d)), see `rank_rows`). The group's iteration time is its
largest rank's, t_g = s_g * ceil(G / d_g); its useful work is s_g * G device-seconds whatever d_g.
The teacher's t also holds the all-gathers of its layout (fsdp / hsdp / replicate: the fastest that
fits at d, or the forced one; cost.TeacherCostModel), which are not useful work. d_g is at least the
smallest count whose per-rank memory fits, equals the user's count when fixed, and sum d_g <= N.
Teacher and students overlap through the target queue, so the job's iteration time is T = max_g t_g.

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
d with t_g(d) <= T (non-increasing in T even where t_g rises with d, as an fsdp teacher's does when
it leaves its node); T is feasible iff sum m_g(T) <= N, and feasibility is monotone in T.
The optimum is one of the finitely many values t_g(d), so a binary search over
those sorted candidates finds the smallest feasible T exactly (no tolerance). Cost: O(K log K) for
K = groups x allowed counts (divisors of G, or every count up to min(N, G)).

Placement (`place_groups`). The counts fixed, the teacher takes ranks 0..d-1 and the students follow
in the order that keeps every group of at most a node's ranks inside one node and starts the most
larger groups on a node boundary, without leaving a device idle; the plan's `ranks` lists carry it.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from dinodist.core.errors import DinodistError
from dinodist.core.losses.memory import DEFAULT_CHUNK_ROWS
from dinodist.core.rows import rank_rows
from dinodist.orchestrator.cost import (
    GIB,
    DeviceProfile,
    GroupCost,
    TeacherCostModel,
    TeacherLayout,
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
    # (node, first local rank, count) for each run of consecutive ranks on one node
    placement: list[tuple[int, int, int]] = field(default_factory=list)
    communication_seconds: float = 0.0  # the teacher's all-gathers per iteration, on the wire (students: 0)


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
    teacher_layout: TeacherLayout | None = None  # what teacher/model.py:shard_teacher is to apply
    teacher_requested: str = "fsdp"  # teacher.shard as written (auto: the cost model chose)
    teacher_alternatives: list[TeacherLayout] = field(default_factory=list)  # what it was weighed against

    @property
    def communication_fraction(self) -> float:
        """Share of the job's device time the teacher's exposed all-gathers take (part of the bubble)."""
        t = self.teacher_layout
        if t is None:
            return 0.0
        return t.devices * t.exposed_communication_seconds / (self.total_devices * self.seconds_per_iteration)

    @property
    def split_groups(self) -> list[str]:
        """Groups with no more ranks than a node whose ranks still span two nodes (none if avoidable)."""
        dpn = self.devices_per_node
        return [self.groups[i].name for i in split_groups([g.ranks for g in self.groups], dpn)]

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
            "communication_fraction": self.communication_fraction,
            "teacher_layout": None if self.teacher_layout is None else {
                **self.teacher_layout.to_dict(), "requested": self.teacher_requested,
                "alternatives": [x.to_dict() for x in self.teacher_alternatives]},
            "split_groups": self.split_groups,
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


Seconds = Callable[[int, int], float]  # (group index, devices) -> the group's iteration time


def _seconds_of(work: list[float], g_batch: int | None, seconds: Seconds | None) -> Seconds:
    if seconds is not None:
        return seconds
    return lambda g, d: group_seconds(work[g], d, g_batch)


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
          g_batch: int | None = None, seconds: Seconds | None = None) -> list[int] | None:
    """Minimise max_g t_g(d_g) over d_g in options[g] (ascending), sum d_g <= total.

    t_g(d) = `group_seconds(work[g], d, g_batch)`, or `seconds(g, d)` when given (the teacher's time
    with its all-gathers, which may rise with d: an fsdp group that leaves its node). Returns the
    fewest devices per group that reach the optimum, or None if even the smallest options exceed
    `total`.
    """
    if any(not o for o in options) or sum(o[0] for o in options) > total:
        return None
    time_of = _seconds_of(work, g_batch, seconds)
    times = [[time_of(g, d) for d in opts] for g, opts in enumerate(options)]
    # the first option with t(d) <= T is the first whose running minimum is <= T, and running minima
    # are non-increasing: the bisection below needs nothing more of t
    fastest = [list(itertools.accumulate(ts, min)) for ts in times]
    candidates = sorted({t for ts in times for t in ts})

    def need(t: float) -> list[int] | None:
        counts = []
        for ts, opts in zip(fastest, options):
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
                    g_batch: int | None = None, seconds: Seconds | None = None) -> list[int]:
    """Give devices left over after `solve` to the groups, slowest group first (module docstring, (2)).

    Each step gives the slowest group that can still be sped up the fewest spares that shorten its
    time (ties: the earlier group). Stops when no spare can shorten any group's time, so every
    device handed out lowers its group's time. Times only fall and `solve` already reached the
    smallest feasible T, so T (and with it the bubble) is unchanged.
    """
    time_of = _seconds_of(work, g_batch, seconds)
    counts = list(counts)
    spare = total - sum(counts)
    while spare > 0:
        order = sorted(range(len(counts)), key=lambda g: (-time_of(g, counts[g]), g))
        for g in order:
            now = time_of(g, counts[g])
            step = next((d for d in options[g] if d > counts[g] and d - counts[g] <= spare
                         and time_of(g, d) < now), None)
            if step is not None:
                spare -= step - counts[g]
                counts[g] = step
                break
        else:
            break
    return counts


# ---------------------------------------------------------------------------------------------
# placement: which ranks (hence which nodes) each group gets


def _span(start: int, size: int, per_node: int) -> int:
    return (start + size - 1) // per_node - start // per_node + 1


def _placement_cost(start: int, size: int, per_node: int) -> tuple[int, int, int]:
    """(small group split, large group off a node boundary, nodes touched beyond the fewest) at `start`."""
    span = _span(start, size, per_node)
    if size <= per_node:
        return int(span > 1), 0, 0
    return 0, int(start % per_node != 0), span - -(-size // per_node)


_MAX_ORDERED = 12  # students whose every order is searched (2^k subsets); beyond: listed order


def _best_order(sizes: list[int], base: int, per_node: int) -> list[int]:
    """The order of the groups after rank `base`, laid out back to back, that splits the fewest small
    groups, then starts the fewest large ones off a node boundary, then touches the fewest extra nodes,
    then departs least from the listed order (inversions). A group's cost depends only on where it
    starts, i.e. on the set placed before it: a dynamic program over subsets finds the exact optimum.
    """
    k = len(sizes)
    if k > _MAX_ORDERED:
        return list(range(k))
    full = (1 << k) - 1
    used = [0] * (full + 1)
    for mask in range(1, full + 1):
        low = (mask & -mask).bit_length() - 1
        used[mask] = used[mask & (mask - 1)] + sizes[low]
    best: list[tuple | None] = [None] * (full + 1)
    best[0] = (0, 0, 0, 0)
    came: list[tuple[int, int]] = [(0, 0)] * (full + 1)
    for mask in range(full + 1):
        if best[mask] is None:
            continue
        start = base + used[mask]
        for g in range(k):
            if mask >> g & 1:
                continue
            split, off, extra = _placement_cost(start, sizes[g], per_node)
            inversions = bin(mask >> (g + 1)).count("1")
            b = best[mask]
            cost = (b[0] + split, b[1] + off, b[2] + extra, b[3] + inversions)
            nxt = mask | 1 << g
            if best[nxt] is None or cost < best[nxt]:
                best[nxt], came[nxt] = cost, (mask, g)
    order, mask = [], full
    while mask:
        mask, g = came[mask]
        order.append(g)
    return order[::-1]


def _pack_small(sizes: list[int], small: list[int], free: dict[int, list[int]]) -> dict[int, int] | None:
    """Nodes for the small groups (each inside one node's free ranks), largest first; None if impossible."""
    left = {n: len(r) for n, r in free.items()}
    order = sorted(small, key=lambda g: -sizes[g])
    where: dict[int, int] = {}
    dead: set[tuple] = set()

    def place(i: int) -> bool:
        if i == len(order):
            return True
        key = (i, tuple(sorted(left.values())))
        if key in dead:
            return False
        g = order[i]
        tried = set()
        for n in sorted(left):
            if left[n] < sizes[g] or left[n] in tried:  # nodes with equal room are interchangeable
                continue
            tried.add(left[n])
            left[n] -= sizes[g]
            where[g] = n
            if place(i + 1):
                return True
            left[n] += sizes[g]
        dead.add(key)
        return False

    return where if place(0) else None


def place_groups(sizes: list[int], per_node: int) -> list[list[int]]:
    """Ranks of each group, ranks 0..sum(sizes)-1 each used once, rank r on node r // per_node.

    Group 0 (the teacher) takes ranks 0..sizes[0]-1: a restarted teacher runs in a world of its ranks
    alone, which must keep their numbers. The other groups follow, each contiguous, in the order
    `_best_order` picks: the listed one unless another keeps a small group (no more ranks than a node)
    inside one node or starts a large one on a node boundary. When no order keeps every small group
    inside a node, the small groups are packed into nodes and the large groups take the ranks left, in
    rank order (no longer contiguous); when no packing exists either, the best order is kept and
    `split_groups` names the small groups it splits.
    """
    base = sizes[0]
    rest = sizes[1:]
    order = _best_order(rest, base, per_node)
    ranks: list[list[int]] = [[] for _ in rest]
    first = base
    for g in order:
        ranks[g] = list(range(first, first + rest[g]))
        first += rest[g]
    small = [g for g, n in enumerate(rest) if n <= per_node]
    if any(_span(ranks[g][0], rest[g], per_node) > 1 for g in small):
        free: dict[int, list[int]] = {}
        for r in range(base, first):
            free.setdefault(r // per_node, []).append(r)
        where = _pack_small(rest, small, free)
        if where is not None:
            for g in small:  # listed order inside a node: deterministic, and the lowest ranks first
                node = free[where[g]]
                ranks[g], free[where[g]] = node[:rest[g]], node[rest[g]:]
            left = sorted(r for rs in free.values() for r in rs)
            for g, n in enumerate(rest):
                if n > per_node:
                    ranks[g], left = left[:n], left[n:]
    return [list(range(base))] + ranks


def split_groups(groups: list[list[int]], per_node: int) -> list[int]:
    """Indices of the groups with no more ranks than a node that still span two nodes."""
    return [i for i, rs in enumerate(groups)
            if len(rs) <= per_node and len({r // per_node for r in rs}) > 1]


def node_runs(ranks: list[int], per_node: int) -> list[tuple[int, int, int]]:
    """(node, first local rank, count) for each run of consecutive ranks on one node."""
    out: list[tuple[int, int, int]] = []
    prev = None
    for r in sorted(ranks):
        node, local = divmod(r, per_node)
        if out and prev == r - 1 and out[-1][0] == node:
            out[-1] = (node, out[-1][1], out[-1][2] + 1)
        else:
            out.append((node, local, 1))
        prev = r
    return out


def _memory_floor(topo: Topology, c: GroupCost, profile: DeviceProfile, total: int) -> int:
    """Smallest allowed device count whose per-rank memory fits ; explains a refusal."""
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
    s = topo.student(c.name)
    hint = ""
    if not s.activation_checkpointing:
        hint = "; try activation_checkpointing: true"
    elif topo.train.loss_chunk_rows == 0:
        hint = f"; try train.loss_chunk_rows: {DEFAULT_CHUNK_ROWS}"
    raise DinodistError(_refusal(f"students[{topo.group_names.index(c.name) - 1}]", c.arch, s.shard,
                                 memory_per_rank(topo, c.name, d), g, d, profile, hint))


def _refusal(where: str, arch: str, shard: str, need: int, g_batch: int, d: int, profile: DeviceProfile,
             hint: str) -> str:
    return (f"{where}: {arch} ({shard}) needs {need / GIB:.1f} GiB per rank on {d} devices "
            f"(batch {largest_share(g_batch, d)} per rank) but a {profile.kind} rank has "
            f"{profile.usable_bytes / GIB:.1f} GiB usable{hint}")


def _teacher_options(topo: Topology, c: GroupCost, model: TeacherCostModel, profile: DeviceProfile,
                     total: int) -> dict[int, TeacherLayout]:
    """The teacher's allowed device counts, each with the layout it would run (the fastest that fits).

    Not a floor like the students': whether a count fits can depend on more than its size (hsdp
    shards over gcd(d, devices per node) ranks), so every count is checked.
    """
    g = topo.train.global_batch_size
    counts = [c.fixed_devices] if c.fixed_devices is not None else \
        candidate_counts(g, total, topo.train.even_batches)
    out = {}
    for d in counts:
        best = model.best(d)
        if best is not None:
            out[d] = best
    if out:
        return out
    d = counts[-1]
    shard = topo.teacher.shard
    hint = "; use teacher.shard: fsdp (or auto)" if shard in ("replicate", "hsdp") else ""
    raise DinodistError(_refusal("teacher", c.arch, shard, model.leanest(d).memory_per_rank_bytes, g, d,
                                 profile, hint))


def make_plan(topology: Topology, devices: int | None = None,
              calibration: dict[str, float] | None = None) -> Plan:
    """Device counts, ranks, teacher layout and predicted times for every group (module docstring)."""
    topo = topology
    total = devices if devices is not None else topo.total_devices
    if total <= 0:
        raise DinodistError(f"--devices: must be positive, got {total}")
    profile = device_profile(topo)
    costs = group_costs(topo, calibration)
    g_batch = topo.train.global_batch_size
    even = topo.train.even_batches
    teacher = TeacherCostModel(topo, profile, costs[0].scale)
    layouts = _teacher_options(topo, costs[0], teacher, profile, total)
    floors = [_memory_floor(topo, c, profile, total) for c in costs[1:]]
    options = [sorted(layouts)] + allowed_devices(costs[1:], floors, g_batch, total, even)
    work = [c.seconds_per_image(profile) * g_batch for c in costs]
    split = None if even else g_batch

    def seconds(g: int, d: int) -> float:
        return layouts[d].seconds if g == 0 else group_seconds(work[g], d, split)

    counts = solve(work, options, total, split, seconds)
    if counts is None:
        parts = ", ".join(f"{c.name} {o[0] if o else '-'}" for c, o in zip(costs, options))
        raise DinodistError(
            f"cluster: the groups need at least {sum(o[0] for o in options if o)} devices ({parts}) "
            f"but {total} are available"
        )
    counts = hand_out_spares(work, options, counts, total, split, seconds)
    times = [seconds(g, d) for g, d in enumerate(counts)]
    t_max = max(times)
    dpn = topo.cluster.devices_per_node
    chosen = layouts[counts[0]]
    groups = []
    for c, d, t, w, ranks in zip(costs, counts, times, work, place_groups(counts, dpn)):
        first_rows, last_rows = rank_rows(g_batch, d, 0), rank_rows(g_batch, d, d - 1)
        is_teacher = c.role == "teacher"
        groups.append(GroupPlan(
            name=c.name, role=c.role, arch=c.arch, devices=d, ranks=ranks,
            batch_per_rank=last_rows.stop - last_rows.start, seconds_per_iteration=t,
            wait_fraction=1 - (w / d) / t_max,  # mean rank: w/d busy seconds of t_max
            memory_per_rank_bytes=(chosen.memory_per_rank_bytes if is_teacher
                                   else memory_per_rank(topo, c.name, d)),
            flops_per_image=c.flops_per_image, calibration=c.scale,
            min_batch_per_rank=first_rows.stop - first_rows.start, busy_device_seconds=w,
            placement=node_runs(ranks, dpn),
            communication_seconds=chosen.communication_seconds if is_teacher else 0.0,
        ))
    return Plan(topo.name, profile.kind, total, dpn, g_batch, t_max, groups, profile.memory_bytes, even,
                teacher_layout=chosen, teacher_requested=topo.teacher.shard,
                teacher_alternatives=teacher.candidates(counts[0]))


def _fmt_seconds(s: float) -> str:
    return f"{s:.3f}" if s >= 0.01 else f"{s * 1e3:.2f}m"


def _ranges(values: list[int], sep: str = "..") -> str:
    """1..4+9 for [1, 2, 3, 4, 9]."""
    parts, run = [], []
    for v in sorted(values):
        if run and v == run[-1] + 1:
            run.append(v)
        else:
            if run:
                parts.append(run)
            run = [v]
    parts.append(run)
    return "+".join(f"{r[0]}{sep}{r[-1]}" if len(r) > 1 else str(r[0]) for r in parts)


def placement_line(g: GroupPlan, per_node: int) -> str:
    """Where a group's ranks sit: `nodes 0-11 full, 12: local 0-6`."""
    parts, full = [], []
    for node, local, count in g.placement:
        if count == per_node:
            full.append(node)
            continue
        if full:
            parts.append(("nodes " if len(full) > 1 else "node ") + _ranges(full, "-") + " full")
            full = []
        parts.append(f"node {node}: local {local}" + (f"-{local + count - 1}" if count > 1 else ""))
    if full:
        parts.append(("nodes " if len(full) > 1 else "node ") + _ranges(full, "-") + " full")
    return ", ".join(parts)


def teacher_layout_line(plan: Plan) -> str:
    """The chosen teacher layout, its all-gathers, and the other layouts it was weighed against."""
    t = plan.teacher_layout
    if t is None:
        return ""

    def describe(x: TeacherLayout) -> str:
        shape = {"fsdp": f"over {x.shard_size}", "hsdp": f"{x.replicas} x {x.shard_size}",
                 "replicate": f"{x.devices} copies"}[x.layout]
        fit = "" if x.fits else ", does not fit"
        comm = (f"all-gathers {_fmt_seconds(x.communication_seconds)} s/iter" if x.communication_seconds
                else "no all-gathers")
        return (f"{x.layout} ({shape}): {comm}, {_fmt_seconds(x.seconds)} s/iter, "
                f"{x.memory_per_rank_bytes / GIB:.2f} GiB/rank{fit}")

    how = "chosen by the cost model" if plan.teacher_requested == "auto" else "teacher.shard"
    exposed = t.exposed_communication_seconds
    line = (f"teacher layout: {describe(t)} [{how}]; exposed communication {_fmt_seconds(exposed)} s/iter "
            f"= {100 * plan.communication_fraction:.1f} % of the job's device time")
    others = [x for x in plan.teacher_alternatives if x.layout != t.layout]
    if others:
        line += "\n  also weighed: " + "; ".join(describe(x) for x in others)
    return line


def plan_table(plan: Plan) -> str:
    """The human-readable plan: one row per group, the teacher's layout, where each group sits, totals."""
    head = ("group", "role", "arch", "devices", "ranks", "nodes", "batch/rank", "s/iter", "wait %",
            "mem/rank GiB")
    rows = [head]
    for g in plan.groups:
        batch = str(g.batch_per_rank) if g.min_batch_per_rank == g.batch_per_rank else \
            f"{g.min_batch_per_rank}-{g.batch_per_rank}"
        nodes = _ranges(sorted({n for n, _, _ in g.placement}), "-")
        rows.append((g.name, g.role, g.arch, str(g.devices), _ranges(g.ranks), nodes, batch,
                     _fmt_seconds(g.seconds_per_iteration), f"{100 * g.wait_fraction:.1f}",
                     f"{g.memory_per_rank_bytes / GIB:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    if plan.teacher_layout is not None:
        lines.append(teacher_layout_line(plan))
    lines.append(f"placement ({plan.devices_per_node} devices per node, {plan.nodes} nodes):")
    width = max(len(g.name) for g in plan.groups)
    for g in plan.groups:
        lines.append(f"  {g.name:<{width}}  {placement_line(g, plan.devices_per_node)}")
    split = plan.split_groups
    if split:
        lines.append(f"  split across nodes although they would fit in one (no placement of these sizes "
                     f"avoids it): {', '.join(split)}")
    lines.append("")
    lines.append(
        f"{plan.name}: {plan.used_devices}/{plan.total_devices} {plan.device} devices "
        f"({plan.idle_devices} idle), {_fmt_seconds(plan.seconds_per_iteration)} s/iter, "
        f"{plan.global_batch_size / plan.seconds_per_iteration:.1f} img/s, "
        f"job wait {100 * plan.wait_fraction:.1f} % (device-weighted, idle devices count as waiting)"
    )
    return "\n".join(lines)
