"""Distributed losses on 2 gloo ranks equal the single-process losses on the concatenated batch."""


import pytest
import torch
import torch.distributed as dist
from gloo import run_gloo

from dinodist.core.losses import koleo_loss, koleo_loss_distributed, sinkhorn_knopp

WORLD = 2
TIMEOUT_S = 60


def _check_sinkhorn(rank: int) -> None:
    # DINO: equal local batches; B_total is the all-reduced row count.
    gen = torch.Generator().manual_seed(10)
    full = torch.randn(2 * 6, 9, generator=gen)
    local = full.chunk(WORLD)[rank]
    group = dist.new_group(list(range(WORLD)))
    got = sinkhorn_knopp(local, 0.07, group=group)
    torch.testing.assert_close(got, sinkhorn_knopp(full, 0.07).chunk(WORLD)[rank], rtol=1e-5, atol=1e-7)
    # iBOT: unequal masked-patch counts per rank, B_total passed or inferred.
    sizes = [5, 3]
    full = torch.randn(sum(sizes), 9, generator=gen)
    local = full.split(sizes)[rank]
    ref = sinkhorn_knopp(full, 0.1).split(sizes)[rank]
    torch.testing.assert_close(sinkhorn_knopp(local, 0.1), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sinkhorn_knopp(local, 0.1, n_samples=sum(sizes)), ref, rtol=1e-5, atol=1e-7)


def _check_koleo(rank: int) -> None:
    gen = torch.Generator().manual_seed(11)
    b = 4
    full = torch.randn(WORLD * b, 6, generator=gen)
    # Whole gathered batch as one loss group: the mean over ranks is the single-process loss.
    x = full.chunk(WORLD)[rank].clone().requires_grad_()
    loss = koleo_loss_distributed(x)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    ref_x = full.clone().requires_grad_()
    ref = koleo_loss(ref_x)
    torch.testing.assert_close(mean / WORLD, ref.detach(), rtol=1e-5, atol=1e-6)
    # Gradients: backward of the rank-local loss sums over ranks = grad of WORLD * mean loss.
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, WORLD * ref_x.grad.chunk(WORLD)[rank], rtol=1e-4, atol=1e-6)
    # Loss group = one rank's rows: neighbours never cross ranks.
    x = full.chunk(WORLD)[rank]
    torch.testing.assert_close(koleo_loss_distributed(x, group_size=b), koleo_loss(x), rtol=1e-5, atol=1e-6)


def _check_both(rank: int) -> None:
    _check_sinkhorn(rank)
    _check_koleo(rank)


@pytest.mark.multiproc
def test_distributed_losses_match_single_process(tmp_path):
    run_gloo(_check_both, WORLD, tmp_path, timeout_s=TIMEOUT_S)
