"""GPU readiness, tested on CPU: at most one device read per student step and none in the teacher's
targets; the branches chosen by device type (fused AdamW, bf16 RoPE); gpu_smoke without CUDA.

A sync is the host waiting for the accelerator: reading a device tensor into Python (`item`, `float`,
`bool`, `tolist`, `int`, `__index__`, `.cpu()` ...), or an op whose output size depends on device
values (boolean-mask indexing, `nonzero`, `equal` ...). Mid-step, each one idles the GPU until the
host has queued the next kernels; the student loop may read once per iteration, after the
optimizer step (students/run.py).

There is no GPU here, so `SyncCounter` (a TorchFunctionMode) simulates one: the step runs on
`DEVICE`, which is `cpu:0`, and a tensor is a "device tensor" when it was moved or created there
(`.to(DEVICE)`, `device=DEVICE`) or computed from one; within the counted step, `.device` of such a
tensor reads `DEVICE`, so code that allocates "on the same device" stays on it. Everything else is
host memory (the loader's batches, masks, optimizer step counters), which may be read freely.
Conversions of device tensors are counted, with their call sites. Blind spots: tensors made in C++
without a device tensor among their inputs (they count as host, so reading them is missed) and
`copy_` into a host tensor.
"""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from dinodist.core.errors import DinodistError

DEVICE = torch.device("cpu", 0)  # stands for the accelerator (see the module docstring)
ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "configs" / "topologies" / "cpu-small.yaml"
STUDENT_READS_PER_STEP = 1
TEACHER_SYNCS = 0

_MARK = "_dinodist_on_device"
_READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__complex__", "numpy",
          "__array__", "cpu", "__format__", "__repr__", "__str__"}
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal",
                   "allclose", "is_nonzero", "bincount"}
_DEVICE_GET = torch.Tensor.device.__get__


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _on_device(t: torch.Tensor) -> bool:
    return getattr(t, _MARK, False)


def _mark(tree) -> None:
    for t in _tensors(tree):
        try:
            setattr(t, _MARK, True)
        except (AttributeError, RuntimeError):
            pass


def _unmark(t: torch.Tensor) -> None:
    if _on_device(t):
        delattr(t, _MARK)


def _is_device(d) -> bool:
    return isinstance(d, torch.device) and d == DEVICE


def _is_host(d) -> bool:
    return (isinstance(d, str) and d == "cpu") or (isinstance(d, torch.device) and d == torch.device("cpu"))


def _call_site() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = Path(frame.filename)
        if ROOT in path.parents and path.name != Path(__file__).name:
            return f"{path.relative_to(ROOT)}:{frame.lineno} ({frame.line})"
    return "(outside the repository)"


class SyncCounter(TorchFunctionMode):
    """Counts device-to-host syncs of device tensors while `counting` is set; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = False
        self.syncs: list[str] = []

    def _record(self, what: str) -> None:
        if self.counting:
            self.syncs.append(f"{what} at {_call_site()}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = _tensors((args, kwargs))
        on_device = any(_on_device(t) for t in inputs if t.device.type != "meta")
        if func == _DEVICE_GET:
            # only while counting: setup and checkpoint code (FSDP, DCP) compare devices for real
            return DEVICE if on_device and self.counting else func(*args, **kwargs)
        if on_device and name in _READS:
            self._record(f"Tensor.{name}")
            return func(*args, **kwargs)
        if on_device and name in _DATA_DEPENDENT:
            self._record(f"torch.{name}")
        if name in ("__getitem__", "__setitem__") and any(
            _on_device(t) and t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1:2])
        ):
            self._record(f"boolean-mask Tensor.{name}")
        if name == "repeat_interleave" and on_device and "output_size" not in kwargs:
            self._record("torch.repeat_interleave without output_size")
        out = func(*args, **kwargs)
        if name == "to":
            positional = (a for a in args[1:] if isinstance(a, torch.device | str))
            target = kwargs.get("device", next(positional, None))
            if on_device and _is_host(target):
                self._record("Tensor.to('cpu')")
                if out is not args[0]:  # a copy is host memory; the device tensor itself stays one
                    _unmark(out)
                return out
            if on_device or _is_device(target):
                _mark(out)
            return out
        # results of device tensors (gradients read through `.grad` included) live on the device
        if on_device or _is_device(kwargs.get("device")):
            _mark(out)
        return out


# --------------------------------------------------------------------------------------- fixtures




def _jobs(tmp_path: Path, kind: str, chunk_rows: int | None, iterations: int, extra: dict | None = None):
    from dinodist.orchestrator.runtime.jobs import student_job, teacher_job
    from dinodist.orchestrator.topology import load_topology

    overrides = {"train.iterations": iterations, "teacher.targets": kind, **(extra or {})}
    if chunk_rows is not None:
        overrides["train.loss_chunk_rows"] = chunk_rows
    topo = load_topology(TOPOLOGY, overrides)
    return student_job(topo, "tiny-vits", tmp_path), teacher_job(topo, tmp_path)


def _teacher(tjob):
    from dinodist.teacher.model import last_layers, load_teacher

    loaded = load_teacher(tjob.arch, tjob.overrides, None, tjob.kind, tjob.dino_head, tjob.ibot_head,
                          tjob.seed)
    last = last_layers(loaded.model) if tjob.kind == "heads" else None
    return loaded, last


def _teacher_loader(tjob, loaded):
    import dataclasses

    from dinodist.core.data.loader import BatchLoader
    from dinodist.core.data.sources import build_source

    g = tjob.global_batch
    return BatchLoader(build_source(tjob.source), dataclasses.replace(tjob.crops, n_local=0), g, tjob.seed,
                       slice(0, g), loaded.spec.patch_size, mask_prob=tjob.mask_prob,
                       mask_ratio=tjob.mask_ratio)


def _host_targets(tjob, loaded, iterations: int) -> list:
    """Each iteration's targets, computed beforehand on the host (as a store replay receives them)."""
    from dinodist.teacher.targets import compute_targets

    loader = _teacher_loader(tjob, loaded)
    try:
        return [compute_targets(loaded.model, loader.get(it), it, 0, tjob.kind, torch.device("cpu"))
                for it in range(iterations)]
    finally:
        loader.close()


class _Source:
    """Hands out precomputed targets; each `get(it)` opens iteration it's count (up to its metrics line)."""

    def __init__(self, targets: list, counter: SyncCounter, per_iteration: dict[int, list[str]]) -> None:
        self.targets, self.counter, self.per_iteration = targets, counter, per_iteration

    def get(self, iteration: int):
        self.counter.syncs = self.per_iteration.setdefault(iteration, [])
        self.counter.counting = True
        return self.targets[iteration]


def _train(tmp_path: Path, world, kind: str, chunk_rows: int | None, targets_edit=None,
           iterations: int = 2, extra: dict | None = None) -> tuple[dict[int, list[str]], Exception | None]:
    """train_student on DEVICE under a SyncCounter; returns the syncs of each iteration and any error."""
    import dinodist.students.run as run
    from dinodist.core.distributed import group_mesh
    from dinodist.students.run import GroupContext, train_student

    sjob, tjob = _jobs(tmp_path, kind, chunk_rows, iterations, extra)
    loaded, last = _teacher(tjob)
    targets = _host_targets(tjob, loaded, iterations)
    if targets_edit is not None:
        targets_edit(targets)
    counter = SyncCounter()
    per_iteration: dict[int, list[str]] = {}
    ctx = GroupContext(world, group_mesh(world, [0], "cpu"), 0, 1, 0, sjob.global_batch, DEVICE)
    write_record = run.write_record

    def close_iteration(f, record):
        counter.counting = False  # the metrics line ends the step: what follows is I/O
        write_record(f, record)

    error = None
    mp = pytest.MonkeyPatch()
    mp.setattr(run, "write_record", close_iteration)
    try:
        with counter:
            train_student(sjob, _Source(targets, counter, per_iteration), last, ctx)
    except DinodistError as exc:
        error = exc
    finally:
        mp.undo()
    return per_iteration, error


# ----------------------------------------------------------------------------------------- tests


def test_counter_sees_reads_of_device_tensors_only():
    host = torch.ones(3)
    with SyncCounter() as c:
        c.counting = True
        dev = host.to(DEVICE)
        float(host.sum()), host.tolist(), bool(host[0] > 0)  # host memory: free
        z = torch.zeros(2, device=dev.device) + 1  # allocated "on the same device": a device tensor
        y = (dev * 2).sum()
        float(y), y.item(), bool(dev[0] > 0), int(z[0]), dev[dev > 0], z.tolist(), dev.cpu()
        dev[host > 0]  # a host mask picks rows without reading the device
    assert len(c.syncs) == 7, c.syncs


@pytest.mark.parametrize("kind,chunk_rows", [("heads", None), ("heads", 0), ("features", None)])
def test_student_step_reads_the_device_once(tmp_path, world, kind, chunk_rows):
    per_iteration, error = _train(tmp_path, world, kind, chunk_rows)
    assert error is None, error
    assert sorted(per_iteration) == [0, 1]
    for it, syncs in per_iteration.items():
        assert len(syncs) <= STUDENT_READS_PER_STEP, (
            f"iteration {it}: {len(syncs)} device-to-host syncs (at most {STUDENT_READS_PER_STEP}):\n"
            + "\n".join(syncs))
    lines = [json.loads(x) for x in (tmp_path / "tiny-vits" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1] and all(math.isfinite(x["loss"]) for x in lines)


def test_in_loop_eval_adds_no_read_to_the_iterations_it_skips(tmp_path, world):
    # the agreement measures ride in the step's one read; a k-NN evaluation (every 2nd and the last
    # iteration here) reads its result once more, in its own iterations only
    from tests.test_eval_loop import labelled_folder

    folder = labelled_folder(tmp_path / "labelled", 2)
    ev = {"every": 2, "knn": {"train": f"folder:{folder}", "test": f"folder:{folder}", "k": 3,
                              "image_size": 16}}
    per_iteration, error = _train(tmp_path, world, "heads", None, iterations=4, extra={"eval": ev})
    assert error is None, error
    for it in (0, 2):
        assert len(per_iteration[it]) <= STUDENT_READS_PER_STEP, "\n".join(per_iteration[it])
    lines = [json.loads(x) for x in (tmp_path / "tiny-vits" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines if "knn_top1" in x] == [1, 3]
    assert all("teacher_agreement" in x for x in lines)


def test_nan_loss_stops_before_the_metrics_and_checkpoint_of_its_iteration(tmp_path, world):
    def poison(targets):
        t = targets[1].tensors
        t["dino"] = torch.full_like(t["dino"], float("nan"))

    per_iteration, error = _train(tmp_path, world, "heads", None, poison, iterations=3)
    assert isinstance(error, DinodistError)
    assert str(error) == "group tiny-vits: loss is nan at iteration 1"
    group_dir = tmp_path / "tiny-vits"
    assert len((group_dir / "metrics.jsonl").read_text().splitlines()) == 1  # iteration 0 only
    # cpu-small checkpoints every 2 iterations: iteration 1 would have written ckpt/2
    assert not (group_dir / "ckpt" / "2").exists()
    assert len(per_iteration[1]) <= STUDENT_READS_PER_STEP, per_iteration[1]


def test_teacher_targets_do_not_sync(tmp_path):
    from dinodist.teacher.targets import compute_targets

    _, tjob = _jobs(tmp_path, "heads", None, 1)
    loaded, _ = _teacher(tjob)
    loader = _teacher_loader(tjob, loaded)
    try:
        batch = loader.get(0)
    finally:
        loader.close()
    want = compute_targets(loaded.model, batch, 0, 0, "heads", torch.device("cpu"))
    with SyncCounter() as counter:
        model = loaded.model.to(DEVICE)
        counter.counting = True
        got = compute_targets(model, batch, 0, 0, "heads", DEVICE)
        counter.counting = False
    assert len(counter.syncs) <= TEACHER_SYNCS, "\n".join(counter.syncs)
    assert got.tensors.keys() == want.tensors.keys()
    for k, v in want.tensors.items():
        assert torch.equal(got.tensors[k], v), k
    assert got.tensors["ibot"].shape[0] == int(want.tensors["ibot_counts"].sum()) > 0


# ------------------------------------------------------------- GPU branches chosen by device type
# (beside the syncs: the other half of the GPU-readiness work, testable without a GPU)


def test_optimizer_is_fused_on_cuda_and_foreach_elsewhere(monkeypatch):
    from dinodist.core.train import optim

    assert optim.adamw_kwargs("cuda") == {"fused": True}
    assert optim.adamw_kwargs("cpu") == optim.adamw_kwargs("meta") == {"foreach": True}
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    kw = {"layerwise_decay": 1.0, "patch_embed_lr_mult": 1.0, "betas": (0.9, 0.999)}
    cpu = optim.build_optimizer(model, 0, **kw)
    assert cpu.defaults["foreach"] is True and not cpu.defaults["fused"]
    # the device is read from the parameters (CUDA ones here); fused AdamW also runs on CPU tensors
    monkeypatch.setattr(optim, "_device_type", lambda groups: "cuda")
    fused = optim.build_optimizer(model, 0, **kw)
    assert fused.defaults["fused"] is True and not fused.defaults["foreach"]
    model(torch.ones(2, 4)).sum().backward()
    fused.step()
    assert fused.state[model[0].weight]["step"].device == model[0].weight.device  # counters by the params


def test_rope_dtype_bf16_for_students_on_cuda_fp32_elsewhere():
    from dinodist.core.models import build_backbone
    from dinodist.core.models.rope import (
        RopePositionEmbedding,
        apply_rope_qk,
        rope_apply,
        set_rope_dtype,
        student_rope_dtype,
    )

    assert student_rope_dtype(torch.device("cuda")) == student_rope_dtype("cuda:1") == torch.bfloat16
    assert student_rope_dtype("cpu") is None
    rope = RopePositionEmbedding(16).eval()
    sin, cos = rope(3, 4)
    assert sin.dtype == cos.dtype == torch.float32
    q, k = torch.randn(2, 2, 5 + 12, 16), torch.randn(2, 2, 5 + 12, 16)
    q32, k32 = apply_rope_qk(q, k, (sin, cos))
    assert torch.equal(q32[:, :, 5:], rope_apply(q[:, :, 5:], sin, cos))  # fp32: the formula, exactly
    rope.rope_dtype = torch.bfloat16
    sin16, cos16 = rope(3, 4)
    assert sin16.dtype == torch.bfloat16 and torch.equal(sin16, sin.bfloat16())
    q16, k16 = apply_rope_qk(q, k, (sin16, cos16))
    assert q16.dtype == torch.float32 and torch.equal(q16[:, :, :5], q[:, :, :5])
    torch.testing.assert_close(q16, q32, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(k16, k32, rtol=2e-2, atol=2e-2)
    # a whole backbone: set_rope_dtype reaches its embedding, the CPU default leaves it fp32
    torch.manual_seed(0)
    backbone = build_backbone("tiny-vits").eval()
    x = torch.randn(2, 3, 32, 32)
    ref = backbone.forward_features(x)["x_norm_patchtokens"]
    set_rope_dtype(backbone, student_rope_dtype("cpu"))
    assert torch.equal(backbone.forward_features(x)["x_norm_patchtokens"], ref)
    set_rope_dtype(backbone, torch.bfloat16)
    assert backbone.rope_embed.rope_dtype == torch.bfloat16
    torch.testing.assert_close(backbone.forward_features(x)["x_norm_patchtokens"], ref, rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------- benchmarks/gpu_smoke


def test_gpu_smoke_without_cuda_says_so_in_one_line_and_exits_0(monkeypatch, capsys):
    from benchmarks import gpu_smoke

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.main([]) == gpu_smoke.SKIPPED_EXIT == 0
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1
    assert out.err.startswith("gpu_smoke: skipped: CUDA is not available")


def test_gpu_smoke_sections_run_on_cpu_with_tiny_models(world, tmp_path, capsys):
    """--cpu-check: every section's code against today's APIs (tiny models; the numbers mean nothing)."""
    from benchmarks import gpu_smoke

    rc = gpu_smoke.main(["--cpu-check", "--out-dir", str(tmp_path), "--budget-s", "240"])
    results = json.loads(capsys.readouterr().out)
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert rc == 0 and not errors, errors
    assert set(gpu_smoke.SECTIONS) <= set(results)
    assert results["losses"]["tf32"]["dino_global_rel_change"] == 0.0  # no TF32 on CPU: fp32 exactly
    assert dist.is_initialized()  # the smoke test leaves a process group it did not make alone
