"""The teacher's layouts at runtime (teacher/model.py:shard_teacher): hsdp on a 2-D (replicate, shard)
mesh gives the unsharded teacher's targets, and the layouts the planner may choose are all accepted."""

import pytest
import torch
from test_teacher_startup import assert_targets_match

from dinodist.core.errors import DinodistError
from dinodist.core.models.arch import TINY_DINO_HEAD, TINY_IBOT_HEAD
from dinodist.teacher.model import TEACHER_LAYOUTS, last_layers, load_teacher, shard_teacher

SEED = 3


def _teacher():
    # a random init is built on CPU from the seed: every rank gets the same weights
    return load_teacher("tiny-vit7b", {"depth": 2}, None, "heads", TINY_DINO_HEAD, TINY_IBOT_HEAD, SEED)


def _hsdp_rank(rank: int, ref_path: str, teacher_ranks: list[int], shard_size: int) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from dinodist.core.distributed import group_mesh, make_subgroups

    world = dist.get_world_size()
    others = [r for r in range(world) if r not in teacher_ranks]
    # every rank makes every group, as the rank runtime does; only the teacher's ranks shard
    groups = make_subgroups([teacher_ranks] + ([others] if others else []))
    if rank not in teacher_ranks:
        return  # hsdp's own groups need no collective from ranks outside the teacher
    model = shard_teacher(_teacher().model, group_mesh(groups[0], teacher_ranks, "cpu"), "hsdp",
                          shard_size=shard_size)
    w = model.backbone.blocks[0].attn.qkv.weight
    assert isinstance(w, DTensor) and w.placements == (Replicate(), Shard(0))
    assert tuple(w.device_mesh.shape) == (len(teacher_ranks) // shard_size, shard_size)
    assert w.device_mesh.mesh_dim_names == ("replicate", "shard")
    # the shard dimension is one "node": consecutive ranks
    shard_ranks = w.device_mesh["shard"].mesh.tolist()
    assert shard_ranks == sorted(shard_ranks) and shard_ranks[-1] - shard_ranks[0] == shard_size - 1
    assert w.to_local().shape[0] == -(-w.shape[0] // shard_size)
    assert_targets_match(model, ref_path)


@pytest.mark.multiproc
def test_hsdp_two_nodes_of_two_gives_the_unsharded_targets(tmp_path):
    # 4 teacher ranks as 2 "nodes" x 2, plus a student rank that never joins hsdp's groups
    from tests.gloo import run_gloo

    loaded = _teacher()
    crops, masks = torch.randn(4, 3, 32, 32), torch.rand(2, 2, 16) < 0.4
    with torch.no_grad():
        ref = {**loaded.model(crops, masks), **last_layers(loaded.model), "crops": crops, "masks": masks}
    torch.save(ref, tmp_path / "ref.pt")
    run_gloo(_hsdp_rank, 5, tmp_path, str(tmp_path / "ref.pt"), [0, 1, 2, 3], 2, timeout_s=180)


def test_layouts_the_planner_may_choose_are_accepted():
    from dinodist.orchestrator.cost import TEACHER_LAYOUTS as PLANNED

    assert set(PLANNED) == set(TEACHER_LAYOUTS)
    model = _teacher().model
    for layout in TEACHER_LAYOUTS:  # one rank (no mesh): nothing to shard, whatever the layout
        assert shard_teacher(model, None, layout) is model
    with pytest.raises(DinodistError, match=r"^teacher.shard: 'auto': the plan resolves it"):
        shard_teacher(model, None, "auto")
    with pytest.raises(DinodistError, match=r"^teacher.shard: 'zero3': not one of fsdp, hsdp, replicate$"):
        shard_teacher(model, None, "zero3")


class _Mesh1D:
    ndim = 1
    device_type = "cpu"

    def size(self) -> int:
        return 4


def test_hsdp_without_its_shard_size_is_one_line():
    model = _teacher().model
    with pytest.raises(DinodistError) as e:
        shard_teacher(model, _Mesh1D(), "hsdp")
    assert str(e.value) == ("teacher.shard: hsdp needs the ranks per copy (plan.json "
                            "teacher_layout.shard_size) or a 2-D (replicate, shard) mesh")
    assert shard_teacher(model, _Mesh1D(), "hsdp", shard_size=1) is model  # one rank per copy
