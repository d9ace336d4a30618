"""`dinodist report`: the metrics.jsonl of a run as series per group and panel, and their figure.

Reading (`core.train.metrics.read_records`, `find_groups`, `collect_series`) is plain Python that tests
check value by value; `build_figure` draws those series with matplotlib's Agg canvas (no pyplot, no
global backend state).

A run folder is either a `dinodist distill` OUT (OUT/<group>/metrics.jsonl, the teacher included) or a
`dinodist train` OUT (OUT/metrics.jsonl, shown as the group "train"). Each key of a row goes to a panel:
`*_seconds` to "seconds", `knn_*` to "knn", teacher_agreement / teacher_cosine to "teacher", the
schedule and counters in NOT_PLOTTED nowhere, and every other number to "loss", so a new loss term
shows up without a change here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dinodist.core.errors import DinodistError
from dinodist.core.train.metrics import read_records

PANELS = ("loss", "seconds", "knn", "teacher")
PANEL_TITLES = {"loss": "loss and terms", "seconds": "seconds per iteration", "knn": "k-NN top-1",
                "teacher": "agreement with the teacher"}
TEACHER_KEYS = ("teacher_agreement", "teacher_cosine")
# schedules, counters and sizes: not losses, and on scales that would flatten the loss curves
NOT_PLOTTED = frozenset({
    "iteration", "images", "lr", "wd", "momentum", "teacher_temp", "local_weight", "gram_weight",
    "gram_refreshes", "grad_norm", "target_bytes_sent", "resolution", "last_layer_lr",
})
TRAIN_GROUP = "train"

# group -> panel -> series name -> (iterations, values)
Series = dict[str, dict[str, dict[str, tuple[list[int], list[float]]]]]


def panel_of(key: str) -> str | None:
    """The panel a metrics key is drawn in, None for keys not drawn."""
    if key in NOT_PLOTTED:
        return None
    if key.endswith("_seconds"):
        return "seconds"
    if key.startswith("knn_"):
        return "knn"
    if key in TEACHER_KEYS:
        return "teacher"
    return "loss"


def find_groups(out: Path) -> dict[str, Path]:
    """group -> its metrics.jsonl, in the run's order (summary.json's when readable, then by name)."""
    if not out.exists():
        raise DinodistError(f"OUT {out}: no such folder")
    if not out.is_dir():
        raise DinodistError(f"OUT {out}: not a folder")
    if (out / "metrics.jsonl").is_file():
        return {TRAIN_GROUP: out / "metrics.jsonl"}
    found = {d.name: d / "metrics.jsonl" for d in sorted(out.iterdir()) if (d / "metrics.jsonl").is_file()}
    if not found:
        raise DinodistError(f"OUT {out}: no metrics.jsonl (neither OUT/metrics.jsonl of `dinodist train` nor "
                            f"OUT/<group>/metrics.jsonl of `dinodist distill`)")
    order: list[str] = []
    try:
        order = list(json.loads((out / "summary.json").read_text()).get("groups", {}))
    except (OSError, ValueError, AttributeError):
        pass  # a running job has no summary yet: name order
    ranked = [g for g in order if g in found] + [g for g in found if g not in order]
    return {g: found[g] for g in ranked}


def series_of(rows: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """panel -> name -> (iterations, values) of one group's rows; a key absent from a row (knn rows
    come every few iterations) leaves no point there."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for i, row in enumerate(rows):
        it = row.get("iteration", i)
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            panel = panel_of(key)
            if panel is None:
                continue
            xs, ys = out.setdefault(panel, {}).setdefault(key, ([], []))
            xs.append(it)
            ys.append(float(value))
    if "loss" in out.get("loss", {}):  # the total first, its terms after it
        out["loss"] = {"loss": out["loss"].pop("loss"), **out["loss"]}
    return {p: out[p] for p in PANELS if p in out}


def collect_series(out: str | Path, groups: list[str] | None = None) -> Series:
    """Series per group (all of the run's groups, or those named, in that order)."""
    out = Path(out)
    found = find_groups(out)
    if groups:
        missing = [g for g in groups if g not in found]
        if missing:
            raise DinodistError(f"--group {missing[0]}: no {missing[0]}/metrics.jsonl under {out} "
                                f"(groups: {', '.join(found)})")
        found = {g: found[g] for g in dict.fromkeys(groups)}
    series = {g: series_of(read_records(path)) for g, path in found.items()}
    if not any(series.values()):
        raise DinodistError(f"OUT {out}: the metrics.jsonl files hold no records yet")
    return series


def _clip_top(ax, values: list[float]) -> None:
    """Keep slow first iterations (start-up, compilation) from flattening the steady state."""
    finite = sorted(v for v in values if math.isfinite(v))
    if len(finite) < 10:
        return
    p95 = finite[int(0.95 * (len(finite) - 1))]
    if p95 > 0 and finite[-1] > 5 * p95:
        ax.set_ylim(bottom=0, top=2 * p95)
        ax.text(0.99, 0.97, "slowest iterations off scale", transform=ax.transAxes, ha="right",
                va="top", fontsize=7, color="grey")


def build_figure(series: Series, title: str):
    """A matplotlib Figure: one row per group, one column per panel any group has."""
    from matplotlib.figure import Figure

    columns = [p for p in PANELS if any(p in panels for panels in series.values())]
    nrows, ncols = len(series), max(len(columns), 1)
    fig = Figure(figsize=(4.6 * ncols, 3.0 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.suptitle(title)
    for r, (group, panels) in enumerate(series.items()):
        for c, panel in enumerate(columns):
            ax = axes[r][c]
            if panel not in panels:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{group}: no {panel} records" if panels else f"{group}: no records yet",
                        ha="center", va="center", color="grey", transform=ax.transAxes)
                continue
            for name, (xs, ys) in panels[panel].items():
                # sparse series (k-NN every few iterations) need markers to be seen
                ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1)
            if panel == "seconds":
                _clip_top(ax, [v for _, ys in panels[panel].values() for v in ys])
            if panel == "knn":
                ax.set_ylim(0, 1)
            ax.set_title(f"{group}: {PANEL_TITLES[panel]}", fontsize=10)
            ax.set_xlabel("iteration", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    return fig


def save_figure(fig, path: Path) -> None:
    """Write the figure as PNG atomically (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from dinodist.orchestrator.viz import write_atomic

    FigureCanvasAgg(fig)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
