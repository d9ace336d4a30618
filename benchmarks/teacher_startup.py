"""Teacher startup, old vs new: wall seconds and peak host RSS to load a full-width ViT-7B teacher.

A reduced-depth `vit7b16` (full width: 4096 wide, 32 heads, SwiGLU 8192; default 4 of its 40 blocks)
with the paper heads (DINO 8192-8192-512 x 262,144, iBOT 4096-4096-384 x 98,304) is exported to a
temporary file with its sidecar, as `dinodist export-teacher` writes it (the sha256 is computed there,
once). Then each variant loads it in a fresh process (peak RSS is per process):

- old: what `teacher/model.py:load_teacher` did before: build the model in fp32 on CPU and initialise
  it, `torch.load` the whole file into memory, copy it in, sha256 the file (on a GPU, then `.to`);
- new: `load_teacher` today: meta build, `torch.load(mmap=True)`, `load_state_dict(assign=True)`,
  identity from the sidecar (on a GPU: bf16, straight to the device);
- new, no record: the same file without the sidecar's `file` record (an official release): hashed.

On CPU every variant then reads each weight once (a sum), as the first forward would: the new load
only maps the file, so its reads happen there. The file was just written, so reads come from the page
cache in every variant (a cold start adds the disk read to all of them alike).

Columns: seconds per phase and in total; peak RSS (ru_maxrss) minus the process's RSS before loading;
and, at the end, the private (RssAnon) and file-backed (RssFile) growth. File-backed pages are the
page cache, shared by every rank on the node that maps the same file; private memory is per rank.
"x40" columns extrapolate linearly to the 40-block model by parameter count (heads included).

    python benchmarks/teacher_startup.py [--depth 4] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinodist.core.models import build_backbone, build_head, load_backbone_state  # noqa: E402
from dinodist.core.models.arch import PAPER_DINO_HEAD, PAPER_IBOT_HEAD, arch_dict, get_arch  # noqa: E402
from dinodist.core.models.io import file_record  # noqa: E402
from dinodist.core.target_store import file_sha256  # noqa: E402
from dinodist.teacher.model import load_teacher  # noqa: E402

ARCH = "vit7b16"
FULL_DEPTH = 40
GIB = 2**30
VARIANTS = ("old", "new", "new, no record")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def param_count(depth: int, heads: bool) -> int:
    spec = get_arch(ARCH, depth=depth)
    n = sum(t.numel() for t in build_backbone(spec, device="meta").state_dict().values())
    if heads:
        for hs in (PAPER_DINO_HEAD, PAPER_IBOT_HEAD):
            n += sum(t.numel() for t in build_head(spec.embed_dim, hs, device="meta").state_dict().values())
    return n


def write_export(path: Path, depth: int, heads: bool) -> dict:
    """The export and its sidecar, plus a hard link to it whose sidecar has no `file` record."""
    spec = get_arch(ARCH, depth=depth)
    torch.manual_seed(0)
    parts = {"backbone": build_backbone(spec, device="meta")}
    if heads:
        parts["dino_head"] = build_head(spec.embed_dim, PAPER_DINO_HEAD, device="meta")
        parts["ibot_head"] = build_head(spec.embed_dim, PAPER_IBOT_HEAD, device="meta")
    t0 = time.perf_counter()
    with torch.no_grad():
        for m in parts.values():
            m.to_empty(device="cpu")
            for p in m.parameters():
                p.normal_(0, 0.02)  # the values do not matter here, and normal_ beats trunc_normal_
        parts["backbone"].rope_embed.reset_parameters()
    sd = {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}
    torch.save({"teacher": sd}, path)
    del sd, parts
    t1 = time.perf_counter()
    side = {"format": "dinodist-teacher-v1", "arch": ARCH, "overrides": {"depth": depth},
            "arch_spec": arch_dict(spec), "layout": "teacher"}
    if heads:
        side["dino_head"] = dataclasses.asdict(PAPER_DINO_HEAD)
        side["ibot_head"] = dataclasses.asdict(PAPER_IBOT_HEAD)
    bare = path.with_name("no-record.pth")
    os.link(path, bare)  # the same inode: the same pages in the page cache
    Path(str(bare) + ".json").write_text(json.dumps(side))
    t2 = time.perf_counter()
    side["file"] = file_record(path)
    Path(str(path) + ".json").write_text(json.dumps(side))
    return {"write_seconds": t1 - t0, "export_hash_seconds": time.perf_counter() - t2,
            "file_bytes": path.stat().st_size}


def _touch(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for t in model.state_dict().values():
            t.sum()


def _old(path: Path, depth: int, heads: bool, device: torch.device, phases: dict) -> torch.nn.Module:
    spec = get_arch(ARCH, depth=depth)
    t = time.perf_counter()
    torch.manual_seed(0)
    backbone = build_backbone(spec)
    hs = []
    if heads:
        hs = [build_head(spec.embed_dim, PAPER_DINO_HEAD), build_head(spec.embed_dim, PAPER_IBOT_HEAD)]
    phases["build + init fp32"] = time.perf_counter() - t
    t = time.perf_counter()
    sd = torch.load(path, map_location="cpu", weights_only=True)["teacher"]
    phases["torch.load"] = time.perf_counter() - t
    t = time.perf_counter()
    load_backbone_state(backbone, {k[9:]: v for k, v in sd.items() if k.startswith("backbone.")}, str(path))
    for name, h in zip(("dino_head", "ibot_head"), hs):
        h.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")})
    del sd
    phases["copy in"] = time.perf_counter() - t
    t = time.perf_counter()
    file_sha256(path)
    phases["sha256"] = time.perf_counter() - t
    model = torch.nn.ModuleList([backbone, *hs]).eval().requires_grad_(False)
    if device.type != "cpu":
        t = time.perf_counter()
        model.to(device)
        torch.cuda.synchronize(device)
        phases["to device"] = time.perf_counter() - t
    return model


def _new(path: Path, heads: bool, device: torch.device, phases: dict) -> torch.nn.Module:
    t = time.perf_counter()
    # the sidecar names the real arch (depth), as an export's does
    loaded = load_teacher(ARCH, {}, str(path), "heads" if heads else "features", PAPER_DINO_HEAD,
                          PAPER_IBOT_HEAD, device=device)
    if device.type != "cpu":
        torch.cuda.synchronize(device)
    phases["load_teacher"] = time.perf_counter() - t
    return loaded.model


def child(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    path = Path(a.path)
    base_kib = _status_kib("VmRSS")
    anon0, file0 = _status_kib("RssAnon"), _status_kib("RssFile")
    phases: dict[str, float] = {}
    if a.variant == "old":
        model = _old(path, a.depth, a.heads, device, phases)
    else:
        model = _new(path if a.variant == "new" else path.with_name("no-record.pth"), a.heads, device, phases)
    if device.type == "cpu":
        t = time.perf_counter()
        _touch(model)
        phases["read every weight"] = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"phases": phases, "seconds": sum(phases.values()), "base_bytes": base_kib * 1024,
           "peak_growth_bytes": (peak_kib - base_kib) * 1024,
           "anon_growth_bytes": (_status_kib("RssAnon") - anon0) * 1024,
           "file_growth_bytes": (_status_kib("RssFile") - file0) * 1024,
           "params": sum(t.numel() for t in model.state_dict().values()),
           "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in model.state_dict().values()})}
    Path(a.out).write_text(json.dumps(out))


def _fits(depth: int, heads: bool) -> bool:
    # the old variant holds the initialised model and the loaded file at once; keep 1 GiB spare
    return 2.3 * 4 * param_count(depth, heads) + GIB < _mem_available()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help="blocks of the full-width 7B to build (of 40)")
    p.add_argument("--no-heads", dest="heads", action="store_false", help="backbone only (features targets)")
    p.add_argument("--device", default="cpu", help="where the teacher goes: cpu, or cuda on a GPU machine")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", help="where to write the temporary checkpoint (default: the temp dir)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        child(a)
        return 0

    asked = a.depth
    while a.depth > 1 and not _fits(a.depth, a.heads):
        a.depth -= 1
    note = None
    if a.depth != asked:
        note = (f"depth {asked} does not fit in {_mem_available() / GIB:.1f} GiB available memory "
                f"(the old variant holds ~2x the file): measured at depth {a.depth}")
    measured = param_count(a.depth, a.heads)
    scale = param_count(FULL_DEPTH, a.heads) / measured
    results = {}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = Path(tmp) / "teacher.pth"
        export = write_export(path, a.depth, a.heads)
        for variant in VARIANTS:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--variant", variant, "--path", str(path), "--out", str(out),
                   "--depth", str(a.depth), "--device", a.device, "--threads", str(a.threads)]
            if not a.heads:
                cmd.append("--no-heads")
            subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
            r = json.loads(out.read_text())
            r["x40_seconds"] = r["seconds"] * scale
            r["x40_peak_growth_bytes"] = r["peak_growth_bytes"] * scale
            r["x40_anon_growth_bytes"] = r["anon_growth_bytes"] * scale
            results[variant] = r
    summary = {"arch": ARCH, "depth": a.depth, "heads": a.heads, "device": a.device, "threads": a.threads,
               "params": measured, "x40_params": int(measured * scale), "scale": scale, **export,
               "note": note, "variants": results}
    if a.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{ARCH} depth {a.depth}/{FULL_DEPTH}{' + paper heads' if a.heads else ''}: {measured / 1e9:.3f}B "
          f"params, file {export['file_bytes'] / GIB:.2f} GiB (x40: {measured * scale / 1e9:.2f}B params); "
          f"device {a.device}, {a.threads} thread(s)")
    if note:
        print(f"note: {note}")
    print(f"export (once): write {export['write_seconds']:.1f} s, sha256 into the sidecar "
          f"{export['export_hash_seconds']:.1f} s (x40: {export['export_hash_seconds'] * scale:.0f} s)")
    print("| variant | phases (s) | total s | peak RSS growth GiB | private growth GiB | file-backed GiB "
          "| x40 total s | x40 peak GiB | x40 private GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, r in results.items():
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
        print(f"| {variant} | {phases} | {r['seconds']:.2f} | {r['peak_growth_bytes'] / GIB:.2f} "
              f"| {r['anon_growth_bytes'] / GIB:.2f} | {r['file_growth_bytes'] / GIB:.2f} "
              f"| {r['x40_seconds']:.1f} | {r['x40_peak_growth_bytes'] / GIB:.1f} "
              f"| {r['x40_anon_growth_bytes'] / GIB:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
