"""The cost model's per-rank activation memory against a measurement, for every student group of a plan.

For each student group of the plan (default: the paper topology), at its largest rank's batch: the
predicted bytes (`orchestrator.cost.student_activation_bytes`: backbone + the heads' saves) next to
the bytes measured on the meta device (`core.models.activation_memory`: the backbone's training
forward on 2 global + n local crops per image, then the heads up to their bottleneck on the rows a
rank feeds them), in the group's checkpointing mode and in the other two. Nothing is computed or
allocated, so the paper sizes take seconds on a CPU. Not measured here (arithmetic in the cost
model, see its docstring): parameters, gradients and optimizer state, the prototype losses and the
loss-side bottleneck copies, and the frozen teacher (inference saves nothing for backward).

    python -m benchmarks.memory_model [TOPOLOGY] [--devices N] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dinodist.core.models.activation_memory import measure_backbone, measure_heads
from dinodist.core.models.arch import CHECKPOINTING_MODES, checkpointing_mode
from dinodist.orchestrator.allocate import make_plan
from dinodist.orchestrator.cost import (
    GIB,
    activation_dtype_bytes,
    backbone_activation_bytes,
    head_rows,
    head_saved_bytes,
    student_crops,
)
from dinodist.orchestrator.topology import Topology, load_topology

PAPER = Path(__file__).resolve().parents[1] / "configs" / "topologies" / "dinov3-paper.yaml"
TOLERANCE = 0.15  # the cost model's target: within 15 % of the measurement


def compare(topo: Topology, name: str, batch: int, mode: str) -> dict:
    """Predicted and measured activation bytes of one rank of student group `name` at `batch` rows."""
    spec = topo.student_spec(name)
    e = activation_dtype_bytes(topo)
    dtype = {2: torch.bfloat16, 4: torch.float32}[e]
    d = topo.data
    predicted = backbone_activation_bytes(spec, batch, student_crops(topo), mode, e)
    measured = measure_backbone(spec, batch, d.global_crop_size, d.local_crop_size, d.local_crops, mode,
                                dtype=dtype).peak
    heads_pred = heads_meas = 0
    if topo.teacher.targets == "heads":
        dino, ibot = topo.student_heads(name)
        rows_dino, rows_ibot = head_rows(topo, name, batch)
        heads_pred = head_saved_bytes(topo, name, batch)
        heads_meas = measure_heads(spec.embed_dim, [(dino, rows_dino), (ibot, rows_ibot)], dtype=dtype)
    return {
        "predicted_bytes": predicted + heads_pred,
        "measured_bytes": measured + heads_meas,
        "backbone_predicted_bytes": predicted,
        "backbone_measured_bytes": measured,
        "heads_predicted_bytes": heads_pred,
        "heads_measured_bytes": heads_meas,
        "ratio": (predicted + heads_pred) / (measured + heads_meas),
    }


def memory_rows(topo: Topology, devices: int | None = None, groups: list[str] | None = None) -> list[dict]:
    """One row per student group of the plan (or of `groups`): its checkpointing mode, and all three."""
    plan = make_plan(topo, devices=devices)
    rows = []
    for g in plan.groups:
        if g.role != "student" or (groups is not None and g.name not in groups):
            continue
        mode = checkpointing_mode(topo.student(g.name).activation_checkpointing)
        start = time.perf_counter()
        modes = {m: compare(topo, g.name, g.batch_per_rank, m) for m in CHECKPOINTING_MODES}
        rows.append({
            "group": g.name, "arch": g.arch, "devices": g.devices, "batch_per_rank": g.batch_per_rank,
            "activation_checkpointing": mode, **modes[mode],
            "memory_per_rank_bytes": g.memory_per_rank_bytes,
            "modes": modes, "measure_seconds": time.perf_counter() - start,
        })
    return rows


def table(rows: list[dict]) -> str:
    head = ("group", "arch", "batch/rank", "AC", "predicted GiB", "measured GiB", "pred/meas",
            "none p/m GiB", "full p/m GiB", "selective p/m GiB")

    def pm(r: dict, m: str) -> str:
        x = r["modes"][m]
        return f"{x['predicted_bytes'] / GIB:.2f}/{x['measured_bytes'] / GIB:.2f}"

    lines = [head]
    for r in rows:
        lines.append((r["group"], r["arch"], str(r["batch_per_rank"]), r["activation_checkpointing"],
                      f"{r['predicted_bytes'] / GIB:.2f}", f"{r['measured_bytes'] / GIB:.2f}",
                      f"{r['ratio']:.3f}", pm(r, "none"), pm(r, "full"), pm(r, "selective")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("topology", nargs="?", default=str(PAPER))
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="one object per group instead of the table")
    args = ap.parse_args(argv)
    rows = memory_rows(load_topology(args.topology), args.devices)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(table(rows))
    worst = max(abs(x["ratio"] - 1) for r in rows for x in r["modes"].values())
    print(f"\nworst |predicted/measured - 1| over groups and modes: {100 * worst:.1f} % "
          f"(target {100 * TOLERANCE:.0f} %); activations only: backbone + heads' saves, per rank")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
