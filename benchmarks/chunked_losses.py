"""Chunked vs unchunked prototype losses: peak memory and time of one student's DINO + iBOT losses.

One distillation step's loss work on one rank, forward and backward: the teacher's Sinkhorn-Knopp over
its 2 global crops, the student's DINO loss on 2 global (diagonal ignored) + n local crops and the iBOT
loss on the masked patches, gradients w.r.t. the student bottleneck and prototype weights. Variants,
side by side in one run, each in a fresh process (peak RSS is per process):

- unchunked: `core.losses` on full logits (what students/loss.py does today);
- chunked: `core.losses.chunked` with the given chunk_rows;
- checkpoint: the same chunked teacher, but the student cross-entropy as torch.utils.checkpoint
  (use_reentrant=False) per (chunk, student crop), recomputing the teacher target inside; the design
  the custom autograd.Function in chunked.py replaces.

Memory: peak RSS (VmHWM) minus RSS after the inputs exist. Time: median of --repeats after one warm-up.
Loss and gradients of every variant are compared with the unchunked ones in the same run.

    python benchmarks/chunked_losses.py                 # K=65536, 256 images x 8 crops = 2048 rows
    python benchmarks/chunked_losses.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinodist.core.losses import (  # noqa: E402
    dino_loss,
    dino_loss_chunked,
    ibot_loss,
    ibot_loss_chunked,
    loss_activation_bytes,
    sinkhorn_knopp,
    sinkhorn_knopp_chunked,
)

MIB = 2**20


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def make_inputs(a: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    crops = 2 + a.n_local
    masks = torch.rand(2 * a.images, a.patches, generator=g) < a.mask_ratio
    m = int(masks.sum())

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    return {
        "t_dino": unit(2 * a.images, a.dim), "t_dino_w": torch.randn(a.k_dino, a.dim, generator=g) * 0.05,
        "t_ibot": unit(m, a.dim), "t_ibot_w": torch.randn(a.k_ibot, a.dim, generator=g) * 0.05,
        "s_dino": unit(crops, a.images, a.dim), "s_dino_w": torch.randn(a.k_dino, a.dim, generator=g) * 0.05,
        "s_ibot": unit(m, a.dim), "s_ibot_w": torch.randn(a.k_ibot, a.dim, generator=g) * 0.05,
        "masks": masks,
    }


def loss_unchunked(t: dict, a: argparse.Namespace) -> torch.Tensor:
    b = a.images
    with torch.no_grad():
        dino_t = sinkhorn_knopp(t["t_dino"] @ t["t_dino_w"].t(), a.teacher_temp).view(2, b, a.k_dino)
        ibot_t = sinkhorn_knopp(t["t_ibot"] @ t["t_ibot_w"].t(), a.teacher_temp)
    logits = t["s_dino"] @ t["s_dino_w"].t()
    loss = dino_loss(logits[:2], dino_t, ignore_diagonal=True) + dino_loss(logits[2:], dino_t)
    return loss + ibot_loss(t["s_ibot"] @ t["s_ibot_w"].t(), ibot_t, t["masks"])


def loss_chunked(t: dict, a: argparse.Namespace) -> torch.Tensor:
    c = a.chunk_rows
    dino_t = sinkhorn_knopp_chunked(t["t_dino"], t["t_dino_w"], a.teacher_temp, chunk_rows=c)
    ibot_t = sinkhorn_knopp_chunked(t["t_ibot"], t["t_ibot_w"], a.teacher_temp, chunk_rows=c)
    x, w = t["s_dino"], t["s_dino_w"]
    loss = dino_loss_chunked(x[:2], w, dino_t, ignore_diagonal=True, chunk_rows=c)
    loss = loss + dino_loss_chunked(x[2:], w, dino_t, chunk_rows=c)
    return loss + ibot_loss_chunked(t["s_ibot"], t["s_ibot_w"], ibot_t, t["masks"], chunk_rows=c)


def _ce_checkpointed(x, w, teacher, pairs, row_weights, temp, chunk):
    """sum_{s,t,b} pairs[s,t] row_weights[b] CE, one torch.utils.checkpoint per (chunk, student crop)."""
    s_crops, b, _ = x.shape

    def chunk_ce(x_rows, w, s, start, stop):
        with torch.no_grad():  # the target is rebuilt in the recompute: it must not be a saved input
            target = sum(pairs[s][t] * teacher.probs(slice(t * b + start, t * b + stop))
                         for t in range(len(pairs[s])) if pairs[s][t])
        log_p = F.log_softmax((x_rows @ w.t()) / temp, dim=-1)
        ce = (target * log_p).sum(-1)
        if row_weights is not None:
            ce = ce * row_weights[start:stop]
        return -ce.sum()

    total = x.new_zeros(())
    for start in range(0, b, chunk):
        stop = min(start + chunk, b)
        for s in range(s_crops):
            total = total + checkpoint(chunk_ce, x[s, start:stop], w, s, start, stop, use_reentrant=False)
    return total


def loss_checkpoint(t: dict, a: argparse.Namespace) -> torch.Tensor:
    c, b = a.chunk_rows, a.images
    dino_t = sinkhorn_knopp_chunked(t["t_dino"], t["t_dino_w"], a.teacher_temp, chunk_rows=c)
    ibot_t = sinkhorn_knopp_chunked(t["t_ibot"], t["t_ibot_w"], a.teacher_temp, chunk_rows=c)
    x, w = t["s_dino"], t["s_dino_w"]
    glob = _ce_checkpointed(x[:2], w, dino_t, [[0, 1], [1, 0]], None, 0.1, c) / (b * 2)
    local = _ce_checkpointed(x[2:], w, dino_t, [[1, 1]] * a.n_local, None, 0.1, c) / (b * 2 * a.n_local)
    masks = t["masks"]
    weights = (1.0 / masks.sum(-1, keepdim=True).clamp(min=1).float()).expand_as(masks)[masks]
    ibot = _ce_checkpointed(t["s_ibot"].unsqueeze(0), t["s_ibot_w"], ibot_t, [[1]], weights, 0.1, c)
    return glob + local + ibot / masks.shape[0]


VARIANTS = {"unchunked": loss_unchunked, "chunked": loss_chunked, "checkpoint": loss_checkpoint}


def child(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    t = make_inputs(a)
    leaves = ("s_dino", "s_dino_w", "s_ibot", "s_ibot_w")
    for name in leaves:
        t[name].requires_grad_()
    base_kib = _rss_kib("VmRSS")
    times = []
    for _ in range(a.repeats + 1):
        for name in leaves:
            t[name].grad = None
        start = time.perf_counter()
        loss = VARIANTS[a.variant](t, a)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak_kib = _rss_kib("VmHWM")
    torch.save({"loss": loss.detach(), **{n: t[n].grad for n in leaves}}, a.out + ".pt")
    Path(a.out + ".json").write_text(json.dumps({
        "seconds": statistics.median(times[1:]), "peak_mib": (peak_kib - base_kib) / 1024,
        "rows_dino": (2 + a.n_local) * a.images, "rows_ibot": int(t["masks"].sum()),
    }))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="images per rank")
    p.add_argument("--n-local", type=int, default=6)
    p.add_argument("--k-dino", type=int, default=65536)
    p.add_argument("--k-ibot", type=int, default=32768)
    p.add_argument("--dim", type=int, default=256, help="bottleneck dim")
    p.add_argument("--patches", type=int, default=64, help="patches per global crop")
    p.add_argument("--mask-ratio", type=float, default=0.15)
    p.add_argument("--teacher-temp", type=float, default=0.07)
    p.add_argument("--chunk-rows", type=int, nargs="+", default=[256, 64])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.images, a.k_dino, a.k_ibot, a.dim, a.chunk_rows, a.repeats = 32, 4096, 2048, 64, [16], 1
    if a.variant:
        a.chunk_rows = a.chunk_rows[0]
        child(a)
        return 0

    runs = [("unchunked", a.chunk_rows[0])]
    runs += [(v, c) for c in a.chunk_rows for v in ("chunked", "checkpoint")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, chunk in runs:
            out = f"{tmp}/{variant}-{chunk}"
            cmd = [sys.executable, __file__, "--variant", variant, "--out", out, "--chunk-rows", str(chunk)]
            for flag in ("images", "n_local", "k_dino", "k_ibot", "dim", "patches", "mask_ratio",
                         "teacher_temp", "repeats", "threads"):
                cmd += ["--" + flag.replace("_", "-"), str(getattr(a, flag))]
            subprocess.run(cmd, check=True)
            stats = json.loads(Path(out + ".json").read_text())
            results[(variant, chunk)] = (stats, torch.load(out + ".pt", weights_only=True))

    ref_stats, ref = results[runs[0]]
    rows = ref_stats["rows_dino"], ref_stats["rows_ibot"]
    print(f"images={a.images} crops={2 + a.n_local} (DINO rows {rows[0]}, teacher rows {2 * a.images}) "
          f"iBOT rows={rows[1]} K_dino={a.k_dino} K_ibot={a.k_ibot} dim={a.dim} threads={a.threads}")
    print("| variant | chunk_rows | peak RSS growth MiB | estimate MiB | time s | time / unchunked "
          "| loss rel. diff | max grad rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for (variant, chunk), (stats, got) in results.items():
        est = loss_activation_bytes(a.images, rows[1], a.k_dino, a.k_ibot, chunk) / MIB
        est = "-" if variant == "unchunked" else f"{est:.0f}"
        grad = max(_rel(got[n], ref[n]) for n in ("s_dino", "s_dino_w", "s_ibot", "s_ibot_w"))
        print(f"| {variant} | {chunk if variant != 'unchunked' else '-'} | {stats['peak_mib']:.0f} | {est} "
              f"| {stats['seconds']:.2f} | {stats['seconds'] / ref_stats['seconds']:.2f} "
              f"| {abs(float(got['loss'] - ref['loss'])) / abs(float(ref['loss'])):.1e} | {grad:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
