"""Backbone throughput on CPU: single resolution and the multi-crop list forward vs a per-crop baseline.

Measured side by side in one process, fp32, so the ratios are comparable even on a busy machine:
  - 224 px forward (eval, no grad) and forward+backward (train) images/s;
  - a multi-crop batch (2 x 224 + 8 x 96 per sample) run
      naive:        each of the 10 crops as its own forward (batch = samples),
      list:         `forward_features_list([globals, locals])` (per-size groups; drop_path 0),
      list-packed:  same, training with drop_path > 0 but keeping every sample (token-concat path),
      list-dp0.3:   drop_path 0.3 with sample-subset stochastic depth (computes ~70% of each branch).
"vs naive" is the speed-up over the naive per-crop baseline, from wall time and from process CPU time.

    python benchmarks/backbone.py --quick
    python benchmarks/backbone.py --arch vits16 --arch vitb16 --iters 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinodist.core.models import build_backbone  # noqa: E402


def _loss(outs: list[dict]) -> torch.Tensor:
    return sum(o["x_norm_clstoken"].square().mean() + o["x_norm_patchtokens"].square().mean() for o in outs)


def _set_drop_path(model, rate: float) -> None:
    for blk in model.blocks:
        blk.drop_path = rate


def _cases(model, batch: int, mc_batch: int, n_local: int) -> list[tuple[str, str, float, int, Callable]]:
    """(case, pass, drop_path, samples, fn) for one model; fn runs one timed step."""
    x = torch.randn(batch, 3, 224, 224)
    g = torch.randn(2 * mc_batch, 3, 224, 224)
    loc = torch.randn(n_local * mc_batch, 3, 96, 96)
    crops = list(g.split(mc_batch)) + list(loc.split(mc_batch))

    def step(forward: Callable[[], list[dict]], backward: bool) -> Callable[[], None]:
        def run() -> None:
            if not backward:
                with torch.no_grad():
                    forward()
                return
            model.zero_grad(set_to_none=True)
            _loss(forward()).backward()

        return run

    single = lambda: [model.forward_features(x)]
    naive = lambda: [model.forward_features(c) for c in crops]
    listed = lambda: model.forward_features_list([g, loc], [None, None])
    return [
        ("224 single", "fwd", 0.0, batch, step(single, False)),
        ("224 single", "fwd+bwd", 0.0, batch, step(single, True)),
        ("multi-crop naive", "fwd", 0.0, mc_batch, step(naive, False)),
        ("multi-crop list", "fwd", 0.0, mc_batch, step(listed, False)),
        ("multi-crop naive", "fwd+bwd", 0.0, mc_batch, step(naive, True)),
        ("multi-crop list", "fwd+bwd", 0.0, mc_batch, step(listed, True)),
        # 1e-17 rounds 1 - p to 1.0: the packed (token-concatenation) path with every sample kept.
        ("multi-crop list-packed", "fwd+bwd", 1e-17, mc_batch, step(listed, True)),
        ("multi-crop list-dp0.3", "fwd+bwd", 0.3, mc_batch, step(listed, True)),
    ]


def bench_arch(
    arch: str, batch: int, mc_batch: int, iters: int, n_local: int
) -> list[tuple[str, str, float, float]]:
    torch.manual_seed(0)
    model = build_backbone(arch)
    with torch.no_grad():  # one small warm-up instead of one per case: first-call costs are per op
        model.eval()(torch.randn(1, 3, 64, 64))
    model.train()
    _loss([model.forward_features(torch.randn(1, 3, 64, 64))]).backward()

    cases = _cases(model, batch, mc_batch, n_local)
    wall: list[list[float]] = [[] for _ in cases]
    cpu: list[list[float]] = [[] for _ in cases]
    # Round-robin over the cases so that load from other processes hits every case alike. CPU time
    # (all threads of this process) is reported too: on a shared machine it tracks the work done
    # much more closely than wall time does.
    for _ in range(iters):
        for i, (_, mode, drop_path, _, fn) in enumerate(cases):
            model.train(mode == "fwd+bwd")
            _set_drop_path(model, drop_path)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return [
        (case, mode, n / statistics.median(w), statistics.median(c) / n)
        for (case, mode, _, n, _), w, c in zip(cases, wall, cpu)
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", help="arch name (repeatable); default vits16 and vitb16")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per case (median reported)")
    p.add_argument("--batch", type=int, default=4, help="images per 224 px batch")
    p.add_argument("--mc-batch", type=int, default=2, help="samples per multi-crop batch")
    p.add_argument("--n-local", type=int, default=8, help="local crops per sample")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="vits16 only, 1 iteration, small batches")
    args = p.parse_args(argv)
    archs = args.arch or (["vits16"] if args.quick else ["vits16", "vitb16"])
    if args.quick:
        args.iters, args.batch, args.mc_batch = 1, 1, 1
    torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, fp32 CPU, {args.threads} threads, iters={args.iters}, "
        f"batch={args.batch}, multi-crop samples={args.mc_batch} (2x224 + {args.n_local}x96 each)"
    )
    print(
        f"{'arch':<8} {'case':<24} {'pass':<8} {'samples/s':>10} {'vs naive':>9} "
        f"{'cpu s/sample':>13} {'vs naive':>9}",
        flush=True,
    )
    for arch in archs:
        rows = bench_arch(arch, args.batch, args.mc_batch, args.iters, args.n_local)
        naive = {mode: (v, c) for case, mode, v, c in rows if case == "multi-crop naive"}
        for case, mode, v, c in rows:
            mc = case.startswith("multi-crop")
            ratio = f"{v / naive[mode][0]:.2f}x" if mc else ""
            cpu_ratio = f"{naive[mode][1] / c:.2f}x" if mc else ""
            line = f"{arch:<8} {case:<24} {mode:<8} {v:>10.3f} {ratio:>9} {c:>13.2f} {cpu_ratio:>9}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
