"""Do students learn what the teacher knows? Distillation quality on Fashion-MNIST, side by side in one run.

1. Teacher: trains the SSL stage config (default configs/stages/cpu-fashion-teacher.yaml) into
   `--cache/teacher-run` and exports it to `--cache/teacher.pth`, or reuses that export when it exists and
   was made from the same stage config (path and content) and iterations (another one is refused: use another
   `--cache`).
2. Distillation: one `dinodist distill` run of the topology (default configs/topologies/cpu-fashion.yaml,
   two tiny students of different sizes; one teacher forward per global batch serves both), its wall time W
   measured around the command.
3. SSL-alone twins: for each student, the same arch (and `overrides`) trained by SSL alone with the teacher's
   stage recipe (`--twin-stage`, default the teacher's), for the same wall time. "Same wall time" is the
   *whole* distillation wall time W given to *each* twin, which runs alone: the choice fair to SSL (the
   distillation spent W on the teacher's forwards and every student; each twin gets all of it). A short
   calibration run measures the twin's seconds per iteration (startup included), and the twin then runs
   `floor((W - startup) / s_per_it)` iterations, so its lr / EMA / weight-decay schedules complete.
   The measured twin wall times are reported beside W.
4. k-NN (the `dinodist eval knn` protocol: resize to `--image-size`, default the topology's
   `data.global_crop_size`, the resolution every model here trained at; CLS, cosine, k=20, T=0.07) on the
   first `--limit-train` train / `--limit-test` test images of Fashion-MNIST for: the teacher, each student
   after distillation, each student's random init (same arch, overrides and seed as the distillation builds
   it), each SSL twin, and raw pixels (28x28, cosine k-NN, same k and T).
   Transfer to other data: the same k-NN on scikit-learn's handwritten digits (1797 8x8 images shipped
   inside the package, no download; first 1000 as the k-NN memory, the remaining 797 as queries), a domain
   none of the models was trained on. Skipped, with a note, when scikit-learn is not installed.

    python benchmarks/distill_quality.py --cache runs/quality-cache --out runs/quality [--json]
    python benchmarks/distill_quality.py --iterations 100 --limit-train 2000 --limit-test 500   # smoke

Prints one table (and with `--json` one JSON line): per model k-NN on Fashion-MNIST, % of the teacher's,
k-NN on digits, iterations and wall time. Results: benchmarks/RESULTS.md ("Distillation quality").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FM = "fashion-mnist:/usr/share/datasets/fashion-mnist"


def dinodist(*args: str, log: Path) -> float:
    """Run one CLI command (logs to `log`); returns its wall time. A failure exits with the log's tail."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "dinodist.orchestrator.cli", *args], cwd=REPO, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = log.read_text().splitlines()[-15:]
        cmd = " ".join(args)
        sys.exit(f"distill_quality: `dinodist {cmd}` failed ({proc.returncode}):\n" + "\n".join(tail))
    return wall


def teacher(stage: Path, cache: Path, iterations: int | None) -> Path:
    pth = cache / "teacher.pth"
    # the file's content too: a recipe edited in place must not reuse a teacher made by the old one
    made = {"stage": str(stage.resolve()), "stage_sha256": hashlib.sha256(stage.read_bytes()).hexdigest(),
            "iterations": iterations}
    record = cache / "teacher-wall.json"
    if pth.is_file() and Path(str(pth) + ".json").is_file():
        had = json.loads(record.read_text()) if record.is_file() else {}
        if {k: had.get(k) for k in made} != made:
            sys.exit(f"distill_quality: --cache {cache} holds a teacher of "
                     f"{had.get('stage', 'an unknown stage')} (iterations {had.get('iterations')}, "
                     f"sha256 {str(had.get('stage_sha256'))[:12]}), not of {made['stage']} (iterations "
                     f"{iterations}, sha256 {made['stage_sha256'][:12]}); give another --cache")
        print(f"teacher: reusing {pth}", flush=True)
        return pth
    cache.mkdir(parents=True, exist_ok=True)
    run = cache / "teacher-run"
    args = ["train", str(stage), "--out", str(run)]
    args += ["--iterations", str(iterations)] if iterations else []
    print(f"teacher: training {stage} -> {run}", flush=True)
    wall = dinodist(*args, log=cache / "teacher-train.log")
    dinodist("export-teacher", str(run), str(pth), log=cache / "teacher-export.log")
    record.write_text(json.dumps({"wall_s": wall, **made}))
    return pth


def distill(topology: Path, teacher_pth: Path, out: Path, iterations: int | None) -> tuple[dict, float]:
    raw = yaml.safe_load(topology.read_text())
    raw["teacher"]["checkpoint"] = str(teacher_pth.resolve())
    if iterations:
        raw["train"]["iterations"] = iterations
    raw["output"] = str(out / "distill")
    out.mkdir(parents=True, exist_ok=True)
    topo = out / "topology.yaml"
    topo.write_text(yaml.safe_dump(raw, sort_keys=False))
    print(f"distill: {topology} ({raw['train']['iterations']} it, students "
          f"{', '.join(s['name'] for s in raw['students'])})", flush=True)
    wall = dinodist("distill", str(topo), "--out", str(out / "distill"), "--metrics-port", "0",
                    log=out / "distill.log")
    return raw, wall


def twin_stage(template: Path, student: dict, out: Path) -> Path:
    cfg = yaml.safe_load(template.read_text())
    cfg["model"]["arch"] = student["arch"]
    cfg["model"]["overrides"] = {**cfg["model"].get("overrides", {}), **student.get("overrides", {})}
    path = out / f"twin-{student['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ssl_twin(stage: Path, name: str, out: Path, budget_s: float, calib_iters: int) -> dict:
    """The student's arch trained by SSL alone for `budget_s` of wall time (see the module docstring)."""
    calib = out / f"twin-{name}-calib"
    short = dinodist("train", str(stage), "--out", str(calib), "--iterations", str(calib_iters),
                     log=out / f"twin-{name}-calib.log")
    steps = [json.loads(x)["step_seconds"] for x in (calib / "metrics.jsonl").read_text().splitlines()]
    per_it = sorted(steps)[len(steps) // 2]  # median: the first steps pay warm-up costs
    startup = max(0.0, short - sum(steps))
    iters = max(1, math.floor((budget_s - startup) / per_it))
    print(f"twin {name}: {per_it:.3f} s/it, startup {startup:.1f} s -> {iters} iterations "
          f"for {budget_s:.0f} s", flush=True)
    run = out / f"twin-{name}"
    wall = dinodist("train", str(stage), "--out", str(run), "--iterations", str(iters),
                    log=out / f"twin-{name}.log")
    return {"run": run, "iterations": iters, "wall_s": wall}


class Evaluator:
    """k-NN on Fashion-MNIST (limited) and on scikit-learn's digits, features computed once per model."""

    def __init__(self, limit_train: int, limit_test: int, image_size: int):
        import torch

        from dinodist.core.data.sources import build_source

        self.size = image_size
        self.train = build_source(f"{FM}:train")
        self.test = build_source(f"{FM}:test")
        self.limits = (limit_train, limit_test)
        self.digits = None
        try:
            from sklearn.datasets import load_digits  # ships its 1797 images; nothing is downloaded
        except ImportError:
            print("digits transfer check skipped: scikit-learn is not installed", flush=True)
        else:
            d = load_digits()
            imgs = torch.from_numpy(d.images * (255.0 / 16.0)).round().to(torch.uint8)
            self.digits = (imgs.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d.target))

    def _digits_feats(self, model):
        import torch

        from dinodist.core.eval import preprocess

        imgs, labels = self.digits
        with torch.no_grad():
            feats = torch.cat([model(preprocess(list(imgs[i:i + 256]), self.size)).float()
                               for i in range(0, len(imgs), 256)])
        return feats, labels

    def model(self, model) -> dict:
        from dinodist.core.eval import extract_features, knn_accuracy

        f1, l1 = extract_features(model, self.train, self.size, limit=self.limits[0])
        f2, l2 = extract_features(model, self.test, self.size, limit=self.limits[1])
        res = {"knn": 100 * knn_accuracy(f1, l1, f2, l2)}
        if self.digits is not None:
            f, lab = self._digits_feats(model)
            res["digits"] = 100 * knn_accuracy(f[:1000], lab[:1000], f[1000:], lab[1000:])
        return res

    def pixels(self) -> dict:
        import torch

        from dinodist.core.eval import knn_accuracy

        def raw(src, n):
            n = min(n, len(src))
            x = torch.stack([src.load(i)[0] for i in range(n)]).flatten(1).float()
            return x, torch.tensor([src.label(i) for i in range(n)])

        (f1, l1), (f2, l2) = raw(self.train, self.limits[0]), raw(self.test, self.limits[1])
        res = {"knn": 100 * knn_accuracy(f1, l1, f2, l2)}
        if self.digits is not None:
            imgs, lab = self.digits
            f = imgs[:, 0].flatten(1).float()
            res["digits"] = 100 * knn_accuracy(f[:1000], lab[:1000], f[1000:], lab[1000:])
        return res


def random_init(student: dict, seed: int):
    """The student backbone exactly as the distillation builds it before the first step."""
    import torch

    from dinodist.core.models import build_backbone

    torch.manual_seed(seed)
    return build_backbone(student["arch"], **student.get("overrides", {})).eval()


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--stage", type=Path, default=REPO / "configs/stages/cpu-fashion-teacher.yaml",
                    help="teacher SSL stage config (trained unless --cache holds teacher.pth)")
    ap.add_argument("--teacher-iterations", type=int, help="override the teacher stage's train.iterations")
    ap.add_argument("--cache", type=Path, default=REPO / "runs/quality-cache",
                    help="folder of the teacher run and its export teacher.pth (reused when present)")
    ap.add_argument("--topology", type=Path, default=REPO / "configs/topologies/cpu-fashion.yaml")
    ap.add_argument("--iterations", type=int, help="override the topology's train.iterations")
    ap.add_argument("--twin-stage", type=Path, help="SSL recipe of the twins (default: --stage)")
    ap.add_argument("--no-twins", action="store_true", help="skip the SSL-alone twins")
    ap.add_argument("--calib-iterations", type=int, default=25, help="twin calibration run length")
    ap.add_argument("--out", type=Path, default=REPO / "runs/quality")
    ap.add_argument("--limit-train", type=int, default=10000)
    ap.add_argument("--limit-test", type=int, default=2000)
    ap.add_argument("--image-size", type=int,
                    help="k-NN resolution (default: the topology's data.global_crop_size)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))

    t_pth = teacher(args.stage, args.cache, args.teacher_iterations)
    topo, d_wall = distill(args.topology, t_pth, args.out, args.iterations)
    d_iters = topo["train"]["iterations"]
    size = args.image_size or topo["data"]["global_crop_size"]
    print(f"distill: {d_wall:.0f} s wall for {d_iters} iterations", flush=True)
    twins = {}
    if not args.no_twins:
        for s in topo["students"]:
            stage = twin_stage(args.twin_stage or args.stage, s, args.out)
            twins[s["name"]] = ssl_twin(stage, s["name"], args.out, d_wall, args.calib_iterations)

    import torch

    from dinodist.core.eval.backbone import load_eval_backbone

    torch.set_num_threads(int(os.environ.get("EVAL_THREADS", "2")))
    ev = Evaluator(args.limit_train, args.limit_test, size)
    rows = []

    def add(kind: str, name: str, model, iters=None, wall=None, **extra) -> dict:
        t0 = time.perf_counter()
        res = ev.model(model) if model is not None else ev.pixels()
        row = {"model": kind, "student": name, "params": params(model) if model is not None else None,
               "iterations": iters, "wall_s": round(wall, 1) if wall is not None else None, **res, **extra}
        rows.append(row)
        print(f"eval {kind} {name}: k-NN {res['knn']:.2f} % ({time.perf_counter() - t0:.0f} s)", flush=True)
        return row

    tmodel, _, _ = load_eval_backbone(str(t_pth), None)
    side = json.loads(Path(str(t_pth) + ".json").read_text())
    t_wall = (json.loads((args.cache / "teacher-wall.json").read_text())["wall_s"]
              if (args.cache / "teacher-wall.json").is_file() else None)
    t_row = add("teacher", side["arch"], tmodel, wall=t_wall)
    add("raw pixels", "-", None)
    seed = topo["train"].get("seed", 0)
    for s in topo["students"]:
        name = s["name"]
        bb, _, _ = load_eval_backbone(str(args.out / "distill" / name), None)
        add("distilled", name, bb, d_iters, d_wall)
        add("random init", name, random_init(s, seed))
        if name in twins:
            tw = twins[name]
            tb, _, _ = load_eval_backbone(str(tw["run"]), None)
            add("SSL alone", name, tb, tw["iterations"], tw["wall_s"])
    for r in rows:
        r["pct_teacher"] = 100 * r["knn"] / t_row["knn"]

    summary = {"teacher": str(t_pth), "topology": str(args.topology), "distill_wall_s": round(d_wall, 1),
               "limit_train": args.limit_train, "limit_test": args.limit_test, "image_size": size,
               "rows": rows}
    goals = {}
    for s in topo["students"]:
        by = {r["model"]: r for r in rows if r["student"] == s["name"]}
        dist_row = by["distilled"]
        g = {"pct_teacher": round(dist_row["pct_teacher"], 1), "ge_95pct": dist_row["pct_teacher"] >= 95.0}
        if "SSL alone" in by:
            g["beats_ssl_twin"] = dist_row["knn"] > by["SSL alone"]["knn"]
        goals[s["name"]] = g
    summary["goals"] = goals
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))

    dig = ev.digits is not None
    print(f"\nk-NN k=20 on Fashion-MNIST {args.limit_train} train / {args.limit_test} test at "
          f"{size} px" + ("; digits: sklearn 8x8 digits, 1000 / 797" if dig else ""))
    head = "| model | student | params | iterations | wall s | k-NN % | % of teacher |"
    head += " digits k-NN % |" if dig else ""
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [r["model"], r["student"], f"{r['params']:,}" if r["params"] else "-",
                 str(r["iterations"] or "-"), f"{r['wall_s']:.0f}" if r["wall_s"] else "-",
                 f"{r['knn']:.2f}", f"{r['pct_teacher']:.1f}"] + ([f"{r['digits']:.2f}"] if dig else [])
        print("| " + " | ".join(cells) + " |")
    for name, g in goals.items():
        met = "met" if g["ge_95pct"] else "NOT met"
        line = f"{name}: {g['pct_teacher']} % of the teacher (goal >= 95: {met})"
        if "beats_ssl_twin" in g:
            line += f"; beats its SSL twin: {'yes' if g['beats_ssl_twin'] else 'NO'}"
        print(line)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
