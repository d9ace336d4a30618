"""core.checkpoint: saves and loads exactly on a process sub-group; a broken checkpoint is one clear line."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist
from gloo import run_gloo

from dinodist.core.checkpoint import (
    latest_checkpoint,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    valid_iterations,
)
from dinodist.core.errors import DinodistError

WORLD = 3
GROUP = [1, 2]  # the student group leaves out global rank 0: group rank 0 is not global rank 0
TIMEOUT_S = 60


def _batch(it: int, rank: int) -> torch.Tensor:
    # inputs from their own generator: the global RNG is what the checkpoint must restore
    gen = torch.Generator().manual_seed(1000 * it + rank)
    return torch.randn(2, 3, 16, 16, generator=gen)


def _local_copy(t: torch.Tensor) -> torch.Tensor:
    from dinodist.core.train.ema import local_tensor

    return local_tensor(t).detach().clone()


def _snapshot(towers: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    params = {n: _local_copy(p) for n, p in towers.named_parameters()}
    state = {}
    for gi, g in enumerate(optimizer.param_groups):
        for pi, p in enumerate(g["params"]):
            state[(gi, pi)] = {k: _local_copy(v) for k, v in optimizer.state[p].items()}
    return {"params": params, "optim": state, "rng": torch.get_rng_state()}


def _assert_equal(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for n, t in a["params"].items():
        assert torch.equal(t, b["params"][n]), n
    assert a["optim"].keys() == b["optim"].keys()
    for key, st in a["optim"].items():
        assert st.keys() == b["optim"][key].keys() and len(st) == 3  # step, exp_avg, exp_avg_sq
        for k, v in st.items():
            assert torch.equal(v, b["optim"][key][k]), (key, k)
    assert torch.equal(a["rng"], b["rng"])


def _student_group(rank: int, group, root: str) -> None:
    from dinodist.core.distributed import group_mesh
    from dinodist.core.models import HeadSpec
    from dinodist.core.targets import HEADS
    from dinodist.core.train.optim import build_optimizer
    from dinodist.core.train.update import optimizer_step
    from dinodist.students.model import build_student, make_ema, shard_student

    head = HeadSpec(32, 16, 64)
    student = build_student("tiny-vits", {"depth": 2}, HEADS, head, head, 0, seed=0)
    ema = make_ema(student)
    mesh = group_mesh(group, GROUP, "cpu")
    shard_student(student, mesh)
    shard_student(ema, mesh)
    optimizer = build_optimizer(student, 2, layerwise_decay=0.9, patch_embed_lr_mult=0.2, betas=(0.9, 0.999))
    towers = torch.nn.ModuleDict({"student": student, "ema": ema})
    torch.manual_seed(7 + rank)  # RoPE augmentation draws differ per rank, as in training

    def step(it: int) -> None:
        out = student(_batch(it, rank), None, torch.tensor([0, 5]))
        loss = out["dino"].logsumexp(-1).mean() + out["ibot"].pow(2).mean() + out["g_cls"].pow(2).mean()
        optimizer_step(loss, optimizer, student, ema, lr=1e-2, wd=0.04, clip_grad=0.5, momentum=0.9)

    for it in range(3):
        step(it)
        if it >= 1:
            save_checkpoint(root, it + 1, towers, optimizer, meta={"group": "students"}, keep=None,
                            group=group)
    saved = _snapshot(towers, optimizer)
    step(3)  # the continuation the loaded checkpoint must reproduce
    after = _snapshot(towers, optimizer)
    torch.manual_seed(12345)
    for tower in ("student", "ema"):  # not vacuous: the continuation moved both towers
        assert any(not torch.equal(after["params"][n], t) for n, t in saved["params"].items()
                   if n.startswith(tower) and t.numel())

    meta = load_checkpoint(os.path.join(root, "3"), towers, optimizer, group=group)
    assert meta == {"iteration": 3, "world_size": 2, "group": "students"}
    _assert_equal(_snapshot(towers, optimizer), saved)
    step(3)
    _assert_equal(_snapshot(towers, optimizer), after)

    if dist.get_rank(group) == 0:
        assert [i for i, _ in list_checkpoints(root)] == [2, 3]  # keep=None keeps every checkpoint
        names = sorted(os.listdir(os.path.join(root, "3")))
        assert [n for n in names if n.startswith("rng-")] == ["rng-rank0.pt", "rng-rank1.pt"]


def _lone_rank(group, root: str) -> None:
    """Global rank 0, in a group of its own, checkpoints meanwhile with pruning."""
    model = torch.nn.Linear(4, 2)
    for it in (1, 2, 3):
        save_checkpoint(root, it, model, None, keep=2, group=group)
    assert [i for i, _ in list_checkpoints(root)] == [2, 3]
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.zero_()
    assert load_checkpoint(latest_checkpoint(root), model, group=group)["world_size"] == 1
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def _worker(rank: int, tmp: str) -> None:
    from dinodist.core.distributed import make_subgroups

    lone, students = make_subgroups([[0], GROUP])
    if rank in GROUP:
        _student_group(rank, students, os.path.join(tmp, "students"))
    else:
        _lone_rank(lone, os.path.join(tmp, "lone"))


@pytest.mark.multiproc
@pytest.mark.timeout(90)
def test_save_and_load_are_exact_on_a_sub_group(tmp_path):
    run_gloo(_worker, WORLD, tmp_path, str(tmp_path), timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------- broken checkpoints (one process)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "ckpt", 1, model, opt, keep=None)
    return model, opt, path


def _one_line_error(path, model, opt, match: str) -> None:
    with pytest.raises(DinodistError, match=match) as err:
        load_checkpoint(path, model, opt)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_broken_or_partial_checkpoint_is_one_clear_line(saved, tmp_path):
    model, opt, path = saved
    assert load_checkpoint(path, model, opt)["iteration"] == 1

    def copy(name: str):
        return shutil.copytree(path, tmp_path / name)

    shards = copy("no-shard")
    for f in shards.glob("*.distcp"):
        f.unlink()
    _one_line_error(shards, model, opt, r"__0_0\.distcp is missing")

    torn_shard = copy("torn-shard")
    shard = next(torn_shard.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7])
    _one_line_error(torn_shard, model, opt, "distcp has .* bytes, COMPLETE.json says")

    torn = copy("torn-metadata")
    (torn / ".metadata").write_bytes((torn / ".metadata").read_bytes()[:20])
    _one_line_error(torn, model, opt, r"\.metadata has 20 bytes")

    # same size, other bytes: DCP would unpickle it, so the checksum must refuse it first
    swapped = copy("swapped-metadata")
    raw = bytearray((swapped / ".metadata").read_bytes())
    raw[-3] ^= 0xFF
    (swapped / ".metadata").write_bytes(bytes(raw))
    _one_line_error(swapped, model, opt, r"\.metadata does not match the checksum")

    bad_meta = copy("bad-meta")
    (bad_meta / "meta.json").write_text('{"iteration": 1,')
    _one_line_error(bad_meta, model, opt, "meta.json has .* bytes")

    no_marker = copy("no-marker")
    (no_marker / "COMPLETE.json").unlink()
    _one_line_error(no_marker, model, opt, "not a complete dinodist checkpoint")

    # a marker that agrees with what was written, and meta.json that is not JSON: still one line
    from dinodist.core.checkpoint import _seal

    empty_meta = copy("empty-meta")
    (empty_meta / "meta.json").write_text("")
    _seal(empty_meta)
    _one_line_error(empty_meta, model, opt, "unreadable meta.json")

    other = torch.nn.Linear(4, 5)
    _one_line_error(path, other, torch.optim.AdamW(other.parameters()), "cannot load checkpoint")

    # an interrupted save leaves only its .tmp- folder, which is never taken for a checkpoint
    (tmp_path / "ckpt" / ".tmp-2").mkdir()
    assert latest_checkpoint(tmp_path / "ckpt") == path


def test_resume_falls_back_past_a_broken_newest_checkpoint(tmp_path, caplog):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    root = tmp_path / "ckpt"
    for it in (1, 2, 3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        save_checkpoint(root, it, model, opt, keep=2)
    assert [i for i, _ in list_checkpoints(root)] == [2, 3]  # pruned to keep=2
    assert latest_valid_checkpoint(root) == root / "3"
    shard = next((root / "3").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # killed mid-write
    with caplog.at_level("WARNING"):
        assert latest_valid_checkpoint(root) == root / "2"
    assert str(root / "3") in caplog.text
    assert valid_iterations(root) == [2]
    assert latest_valid_checkpoint(root, at_most=1) is None
    assert load_checkpoint(latest_valid_checkpoint(root), model, opt)["iteration"] == 2
