"""Backbone throughput on CPU: single resolution and the multi-crop list forward vs a per-crop baseline.

Measured side by side in one process, fp32, so the ratios are comparable even on a busy machine:
  - 224 px forward (eval, no grad) and forward+backward (train) images/s;
  - a multi-crop batch (2 x 224 + 8 x 96 per sample) run
      naive:        each of the 10 crops as its own forward (batch = samples),
      list:         `forward_features_list([globals, locals])` (per-size groups; drop_path 0),
      list-packed:  same, training with drop_path > 0 but keeping every sample (token-concat path),
      list-dp0.3:   drop_path 0.3 with sample-subset stochastic depth (computes ~70% of each branch).
"vs naive" is the speed-up over the naive per-crop baseline, from wall time and from process CPU time.

Eager vs compiled: the fwd+bwd cases `224 single` and `multi-crop list` run again on a copy of the model
(same weights) whose blocks are compiled as the students compile them (`compile_blocks`: torch.compile per
block, inductor by default; `--compile-backend`), interleaved with the eager cases; "vs eager" is the
compiled speed-up (wall, and CPU time in brackets). The compile itself is timed apart (first call of
each compiled case, untimed in the table). `--no-compile` skips them.

    python benchmarks/backbone.py --quick
    python benchmarks/backbone.py --arch vits16 --arch vitb16 --iters 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinodist.core.models import build_backbone, compile_blocks  # noqa: E402

COMPILED = "fwd+bwd compiled"


def _loss(outs: list[dict]) -> torch.Tensor:
    return sum(o["x_norm_clstoken"].square().mean() + o["x_norm_patchtokens"].square().mean() for o in outs)


def _set_drop_path(model, rate: float) -> None:
    for blk in model.blocks:
        blk.drop_path = rate


def _cases(model, batch: int, mc_batch: int, n_local: int,
           compiled=None) -> list[tuple[str, str, float, int, Callable, torch.nn.Module]]:
    """(case, pass, drop_path, samples, fn, model) for one model; fn runs one timed step. With `compiled`
    (a copy of `model`, blocks compiled): the fwd+bwd cases `224 single` and `multi-crop list` on it too."""
    x = torch.randn(batch, 3, 224, 224)
    g = torch.randn(2 * mc_batch, 3, 224, 224)
    loc = torch.randn(n_local * mc_batch, 3, 96, 96)
    crops = list(g.split(mc_batch)) + list(loc.split(mc_batch))

    def step(m, forward: Callable[[], list[dict]], backward: bool) -> Callable[[], None]:
        def run() -> None:
            if not backward:
                with torch.no_grad():
                    forward()
                return
            m.zero_grad(set_to_none=True)
            _loss(forward()).backward()

        return run

    single = lambda: [model.forward_features(x)]
    naive = lambda: [model.forward_features(c) for c in crops]
    listed = lambda: model.forward_features_list([g, loc], [None, None])
    cases = [
        ("224 single", "fwd", 0.0, batch, step(model, single, False), model),
        ("224 single", "fwd+bwd", 0.0, batch, step(model, single, True), model),
        ("multi-crop naive", "fwd", 0.0, mc_batch, step(model, naive, False), model),
        ("multi-crop list", "fwd", 0.0, mc_batch, step(model, listed, False), model),
        ("multi-crop naive", "fwd+bwd", 0.0, mc_batch, step(model, naive, True), model),
        ("multi-crop list", "fwd+bwd", 0.0, mc_batch, step(model, listed, True), model),
        # 1e-17 rounds 1 - p to 1.0: the packed (token-concatenation) path with every sample kept.
        ("multi-crop list-packed", "fwd+bwd", 1e-17, mc_batch, step(model, listed, True), model),
        ("multi-crop list-dp0.3", "fwd+bwd", 0.3, mc_batch, step(model, listed, True), model),
    ]
    if compiled is not None:
        c_single = lambda: [compiled.forward_features(x)]
        c_listed = lambda: compiled.forward_features_list([g, loc], [None, None])
        cases += [
            ("224 single", COMPILED, 0.0, batch, step(compiled, c_single, True), compiled),
            ("multi-crop list", COMPILED, 0.0, mc_batch, step(compiled, c_listed, True), compiled),
        ]
    return cases


def bench_arch(
    arch: str, batch: int, mc_batch: int, iters: int, n_local: int, compile_backend: str | None = None
) -> tuple[list[tuple[str, str, float, float]], dict[str, float]]:
    """Rows (case, pass, samples/s, CPU s/sample), and the compile seconds of each compiled case."""
    torch.manual_seed(0)
    model = build_backbone(arch)
    with torch.no_grad():  # one small warm-up instead of one per case: first-call costs are per op
        model.eval()(torch.randn(1, 3, 64, 64))
    model.train()
    _loss([model.forward_features(torch.randn(1, 3, 64, 64))]).backward()
    compiled = None
    if compile_backend is not None:
        compiled = compile_blocks(copy.deepcopy(model), backend=compile_backend)

    cases = _cases(model, batch, mc_batch, n_local, compiled)
    compile_s = {}
    for case, mode, drop_path, _, fn, m in cases:
        if mode == COMPILED:  # the first call compiles (every input shape once): timed apart, not below
            _set_drop_path(m, drop_path)
            m.train()
            t0 = time.perf_counter()
            fn()
            compile_s[case] = time.perf_counter() - t0
    wall: list[list[float]] = [[] for _ in cases]
    cpu: list[list[float]] = [[] for _ in cases]
    # Round-robin over the cases so that load from other processes hits every case alike. CPU time
    # (all threads of this process) is reported too: on a shared machine it tracks the work done
    # much more closely than wall time does.
    for _ in range(iters):
        for i, (_, mode, drop_path, _, fn, m) in enumerate(cases):
            m.train(mode != "fwd")
            _set_drop_path(m, drop_path)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    rows = [
        (case, mode, n / statistics.median(w), statistics.median(c) / n)
        for (case, mode, _, n, _, _), w, c in zip(cases, wall, cpu)
    ]
    return rows, compile_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", help="arch name (repeatable); default vits16 and vitb16")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per case (median reported)")
    p.add_argument("--batch", type=int, default=4, help="images per 224 px batch")
    p.add_argument("--mc-batch", type=int, default=2, help="samples per multi-crop batch")
    p.add_argument("--n-local", type=int, default=8, help="local crops per sample")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="vits16 only, 1 iteration, small batches")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled cases (default inductor)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the compiled cases (and their compile time)")
    args = p.parse_args(argv)
    archs = args.arch or (["vits16"] if args.quick else ["vits16", "vitb16"])
    if args.quick:
        args.iters, args.batch, args.mc_batch = 1, 1, 1
    backend = None if args.no_compile else args.compile_backend
    torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, fp32 CPU, {args.threads} threads, iters={args.iters}, "
        f"batch={args.batch}, multi-crop samples={args.mc_batch} (2x224 + {args.n_local}x96 each), "
        f"compiled: {backend or 'no'}"
    )
    print(
        f"{'arch':<10} {'case':<24} {'pass':<17} {'samples/s':>10} {'vs naive':>9} "
        f"{'cpu s/sample':>13} {'vs naive':>9} {'vs eager':>17}",
        flush=True,
    )
    for arch in archs:
        rows, compile_s = bench_arch(arch, args.batch, args.mc_batch, args.iters, args.n_local, backend)
        naive = {mode: (v, c) for case, mode, v, c in rows if case == "multi-crop naive"}
        eager = {case: (v, c) for case, mode, v, c in rows if mode == "fwd+bwd"}
        for case, mode, v, c in rows:
            mc = case.startswith("multi-crop") and mode in naive
            ratio = f"{v / naive[mode][0]:.2f}x" if mc else ""
            cpu_ratio = f"{naive[mode][1] / c:.2f}x" if mc else ""
            vs_eager = f"{v / eager[case][0]:.2f}x ({eager[case][1] / c:.2f}x)" if mode == COMPILED else ""
            line = (f"{arch:<10} {case:<24} {mode:<17} {v:>10.3f} {ratio:>9} {c:>13.2f} {cpu_ratio:>9} "
                    f"{vs_eager:>17}")
            print(line, flush=True)
        for case, secs in compile_s.items():
            print(f"# {arch} {case}: first compiled call (compile + one step) {secs:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
