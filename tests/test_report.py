"""`dinodist report`: metrics.jsonl -> series per group and panel (exactly the data), the PNG, torn last
lines of a running job, and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from dinodist.core.errors import DinodistError
from dinodist.core.train.metrics import read_records
from dinodist.orchestrator.cli import main
from dinodist.orchestrator.report import build_figure, collect_series

N = 12
KNN_EVERY = 4


def _student_row(it: int, knn: bool) -> dict:
    row = {"iteration": it, "loss": 5.0 - 0.1 * it, "dino_global": 3.0 - 0.05 * it, "ibot": 1.5,
           "koleo": -0.25, "step_seconds": 0.5 + 0.01 * it, "wait_seconds": 0.02 * it, "images": 16,
           "teacher_agreement": 0.05 * it, "teacher_cosine": 0.5 + 0.01 * it}
    if knn and it % KNN_EVERY == KNN_EVERY - 1:
        row["knn_top1"] = 0.1 * it
    return row


def _write(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


@pytest.fixture
def run(tmp_path) -> Path:
    out = tmp_path / "run"
    _write(out / "alpha" / "metrics.jsonl", [_student_row(i, knn=True) for i in range(N)])
    _write(out / "beta" / "metrics.jsonl", [_student_row(i, knn=False) for i in range(N)])
    _write(out / "teacher" / "metrics.jsonl",
           [{"iteration": i, "step_seconds": 0.3, "forward_seconds": 0.2, "wait_seconds": 0.0, "images": 16,
             "target_bytes_sent": 1000, "store_seconds": 0.01} for i in range(N)])
    (out / "summary.json").write_text(json.dumps({"groups": {"teacher": {}, "beta": {}, "alpha": {}}}))
    (out / "topology.yaml").write_text("name: fake\n")
    return out


def test_series_hold_exactly_the_rows(run):
    series = collect_series(run)
    assert list(series) == ["teacher", "beta", "alpha"]  # summary.json's order
    its = list(range(N))
    rows = [_student_row(i, knn=True) for i in its]
    alpha = series["alpha"]
    assert list(alpha) == ["loss", "seconds", "knn", "teacher"] and next(iter(alpha["loss"])) == "loss"
    assert alpha["loss"] == {k: (its, [r[k] for r in rows]) for k in ("loss", "dino_global", "ibot", "koleo")}
    assert alpha["seconds"] == {k: (its, [r[k] for r in rows]) for k in ("step_seconds", "wait_seconds")}
    knn_its = [i for i in its if i % KNN_EVERY == KNN_EVERY - 1]
    assert alpha["knn"] == {"knn_top1": (knn_its, [0.1 * i for i in knn_its])}
    teacher_keys = ("teacher_agreement", "teacher_cosine")
    assert alpha["teacher"] == {k: (its, [r[k] for r in rows]) for k in teacher_keys}
    assert "knn" not in series["beta"] and series["beta"]["loss"] == alpha["loss"]
    # the teacher has timings only; counters and sizes are not drawn
    assert list(series["teacher"]) == ["seconds"]
    assert set(series["teacher"]["seconds"]) == {"step_seconds", "forward_seconds", "wait_seconds",
                                                 "store_seconds"}


def test_figure_draws_the_series(run):
    series = collect_series(run, ["alpha", "teacher"])
    fig = build_figure(series, "t")
    drawn = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            drawn[(ax.get_title(), line.get_label())] = (list(line.get_xdata()), list(line.get_ydata()))
    assert drawn[("alpha: k-NN top-1", "knn_top1")] == series["alpha"]["knn"]["knn_top1"]
    assert drawn[("teacher: seconds per iteration", "forward_seconds")] == \
        series["teacher"]["seconds"]["forward_seconds"]
    n_series = sum(len(s) for panels in series.values() for s in panels.values())
    assert len(drawn) == n_series
    # 2 groups x 4 panel columns; the teacher's missing panels are blank, not drawn
    assert len(fig.axes) == 8 and sum(ax.axison for ax in fig.axes) == 5


def test_cli_writes_the_png(run, tmp_path, capsys):
    png = tmp_path / "report.png"
    assert main(["report", str(run), "--out", str(png)]) == 0
    assert f"up to iteration {N - 1}" in capsys.readouterr().out
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 1000 and img.height > 700  # 3 rows x 4 panels
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    one = tmp_path / "one.png"
    assert main(["report", str(run), "--group", "beta", "--out", str(one)]) == 0
    with Image.open(one) as img:
        assert img.height < 500  # one row


def test_a_torn_last_line_is_skipped_and_a_torn_middle_line_is_an_error(run):
    path = run / "alpha" / "metrics.jsonl"
    _write(path, [_student_row(i, knn=False) for i in range(3)], tail='{"iteration": 3, "loss": 4.')
    assert [r["iteration"] for r in read_records(path)] == [0, 1, 2]
    assert collect_series(run, ["alpha"])["alpha"]["loss"]["loss"][0] == [0, 1, 2]
    path.write_text(path.read_text() + "\n" + json.dumps(_student_row(4, knn=False)) + "\n")
    with pytest.raises(DinodistError, match=r"metrics.jsonl:4: not a metrics record"):
        read_records(path)


def test_a_running_job_without_summary_and_an_ssl_run(tmp_path):
    out = tmp_path / "live"
    _write(out / "zeta" / "metrics.jsonl", [_student_row(0, knn=False)])
    _write(out / "eta" / "metrics.jsonl", [], tail='{"itera')  # only a torn first line so far
    series = collect_series(out)
    assert list(series) == ["eta", "zeta"] and series["eta"] == {}
    ssl = tmp_path / "ssl"
    rows = [{"iteration": i, "dino_global": 9.0 - i, "gram": 0.5, "koleo": -0.1, "lr": 1e-4, "wd": 0.04,
             "momentum": 0.99, "teacher_temp": 0.07, "grad_norm": 2.0, "resolution": [224, 96, 448],
             "step_seconds": 1.0, "images": 32} for i in range(3)]
    _write(ssl / "metrics.jsonl", rows)
    series = collect_series(ssl)
    assert list(series) == ["train"]
    assert set(series["train"]["loss"]) == {"dino_global", "gram", "koleo"}  # schedules are not losses
    assert series["train"]["seconds"] == {"step_seconds": ([0, 1, 2], [1.0, 1.0, 1.0])}


def _one_line_error(capsys, argv: list[str], *needles: str) -> None:
    assert main(["report", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dinodist report: error: "), err
    for n in needles:
        assert n in err, err


def test_errors_are_one_line(run, tmp_path, capsys):
    png = str(tmp_path / "r.png")
    _one_line_error(capsys, [str(tmp_path / "nope"), "--out", png], "nope", "no such folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, [str(tmp_path / "empty"), "--out", png], "empty", "no metrics.jsonl")
    _one_line_error(capsys, [str(run), "--group", "gamma", "--out", png], "--group gamma", "alpha")
    _one_line_error(capsys, [str(run), "--out", str(tmp_path / "no" / "r.png")], "--out", "does not exist")
    _one_line_error(capsys, [str(run), "--out", str(tmp_path / "r.svg")], "--out", ".png")
    blank = tmp_path / "blank"
    _write(blank / "alpha" / "metrics.jsonl", [])
    _one_line_error(capsys, [str(blank), "--out", png], "no records yet")
    assert not os.path.exists(png)
