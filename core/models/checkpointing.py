"""Activation checkpointing (and optional torch.compile) per transformer block.

Modes, as the topology (`students[].activation_checkpointing`) and the SSL stage configs
(`train.activation_checkpointing`) spell them:
- `none` (false): every block keeps what autograd saves.
- `full` (true): a block keeps only its inputs; the backward re-runs its forward
  (the official `checkpointing_full`; non-reentrant `torch.utils.checkpoint`).
- `selective`: the official DINOv3 policy (fsdp/ac_compile_parallelize.py, after torchtitan): keep the
  outputs of matmuls, attention kernels and reduce-scatters, recompute the cheap elementwise ops and
  norms. The official list names `mm` and `_scaled_mm` because the 7B's fp8 linears dispatch there;
  our bf16 linears carry biases and dispatch to `addmm`, so it is listed too, or no matmul output
  would be kept. The CPU SDPA kernel is listed so the policy acts the same in CPU tests.

Unlike `checkpoint_wrapper`, the block is not wrapped: it checkpoints its own forward, so parameter
names, state-dict keys and the optimizer's per-block groups stay as they are. Apply before
`torch.compile` and FSDP sharding (checkpointing -> compile -> FSDP, the official order): FSDP's
hooks then sit outside the checkpointed region, so the recompute runs on the unsharded weights
that FSDP's pre-backward all-gather brings back.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dinodist.core.models.arch import CHECKPOINTING_MODES, checkpointing_mode

MODES = CHECKPOINTING_MODES  # "none", "full", "selective"

_aten = torch.ops.aten


def _save_ops() -> frozenset:
    ops = [
        _aten.mm.default,
        _aten.addmm.default,
        _aten._scaled_mm.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
    ]
    # the functional collectives register their ops when torch.distributed is built in
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None and hasattr(c10d, "reduce_scatter_tensor"):
        ops.append(c10d.reduce_scatter_tensor.default)
    return frozenset(ops)


SAVE_OPS = _save_ops()

# Set while `core.models.activation_memory` measures: called with each output the selective policy
# keeps, which lives in the checkpoint's cache where no saved-tensors hook sees it.
_saved_output_recorders: list[Callable[[object], None]] = []


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in SAVE_OPS:
        if _saved_output_recorders and not ctx.is_recompute:
            out = getattr(ctx, "op_output", None)
            for record in _saved_output_recorders:
                record(out)
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def run_checkpointed(fn: Callable, mode: str, *args):
    """fn(*args), keeping for backward only what `mode` keeps.

    Tensors nested in `args` (the block's lists of crops and RoPE pairs) are passed to `checkpoint` as
    top-level arguments: it saves only those as inputs (through autograd's saved-tensor machinery, so
    their in-place modification is caught and a saved-tensors hook sees them).
    """
    leaves, spec = tree_flatten(args)
    tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]

    def call(*ts):
        full = list(leaves)
        for i, t in zip(tensors, ts):
            full[i] = t
        return fn(*tree_unflatten(full, spec))

    kwargs = {}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, selective_policy)
    # preserve_rng_state: stochastic depth draws its kept samples inside the block
    return checkpoint(call, *[leaves[i] for i in tensors], use_reentrant=False, preserve_rng_state=True,
                      **kwargs)


def apply_activation_checkpointing(backbone: nn.Module, mode: bool | str) -> nn.Module:
    """Set every block of `backbone` to checkpoint its forward in `mode` (see the module docstring).

    In place; returns the backbone. Call before `compile_blocks` and FSDP sharding.
    """
    mode = checkpointing_mode(mode)
    for block in backbone.blocks:
        block.checkpointing = mode
    return backbone


def compile_blocks(backbone: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile each block in place (names and keys unchanged), after checkpointing, before FSDP."""
    for block in backbone.blocks:
        block.compile(**compile_kwargs)
    return backbone
