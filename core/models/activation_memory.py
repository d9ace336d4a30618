"""Activation memory of a backbone's training forward, measured on any device (meta included).

What a training step holds for backward is what autograd saves, plus, under activation
checkpointing, the checkpoint's inputs and the selective policy's kept outputs. `SavedBytes` counts
those as distinct storages (a view and its base count once), leaving out parameters and buffers.
On the meta device nothing is computed or allocated, so even a paper-size student at its paper
batch is measured in seconds on a CPU; the orchestrator's cost model is checked against it
(benchmarks/memory_model.py).

The peak over a step is the forward's saves plus, with checkpointing, one block's recompute in the
backward: everything that block saves when run plainly, less its inputs (already kept) and less
what the selective policy kept (the recompute reuses it). `measure_backbone` returns all three.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode

from dinodist.core.models import checkpointing
from dinodist.core.models.arch import ArchSpec, HeadSpec, checkpointing_mode
from dinodist.core.models.heads import build_head
from dinodist.core.models.vit import build_backbone


def _storage_key(t: Tensor) -> tuple[int, int]:
    try:
        s = t.untyped_storage()
        return s._cdata, s.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without storage (some subclasses)
        return id(t), t.numel() * t.element_size()


class SavedBytes:
    """Context manager counting the bytes saved for backward inside it (distinct storages).

    `exclude`: tensors whose storage is not activation memory (parameters, buffers). Saved tensors are
    kept referenced until the counter is dropped, so a storage's address is never reused meanwhile.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {_storage_key(t)[0] for t in exclude}
        self.storages: dict[int, int] = {}
        self._keep: list[Tensor] = []
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def _record(self, out: object) -> None:
        if isinstance(out, Tensor):
            key, nbytes = _storage_key(out)
            if key not in self._exclude:
                self.storages[key] = nbytes
                self._keep.append(out)
        elif isinstance(out, tuple | list):
            for o in out:
                self._record(o)

    def _pack(self, t: Tensor) -> Tensor:
        self._record(t)
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        checkpointing._saved_output_recorders.append(self._record)
        return self

    def __exit__(self, *exc) -> None:
        checkpointing._saved_output_recorders.remove(self._record)
        self._hooks.__exit__(*exc)


class FlashAttentionOnMeta(TorchFunctionMode):
    """Meta tensors take SDPA's math fallback, which saves the [N, N] attention matrix; a GPU runs a
    fused kernel that saves q, k, v, the output and a per-row logsumexp. This routes meta SDPA to the
    fused CPU kernel, whose meta function and saved tensors are those of the GPU's flash attention."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **kwargs)[0]
        return func(*args, **kwargs)


@dataclass(frozen=True)
class ActivationBytes:
    forward: int  # saved by the forward, kept until the backward reaches them
    recompute: int  # one block's extra while the backward re-runs it (0 without checkpointing)

    @property
    def peak(self) -> int:
        return self.forward + self.recompute


def _module_tensors(model: nn.Module) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


def measure_backbone(
    arch: str | ArchSpec,
    batch: int,
    global_size: int,
    local_size: int,
    n_local: int,
    mode: bool | str = "none",
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "meta",
    overrides: dict | None = None,
) -> ActivationBytes:
    """Activation bytes of one training forward of a backbone on `batch` images per rank.

    The crops are those a student rank feeds it: 2 x batch global crops and n_local x batch local
    crops, as two list elements; `dtype` is the compute dtype (bf16 on GPU under FSDP's mixed
    precision, which also casts the inputs).
    """
    mode = checkpointing_mode(mode)
    model = build_backbone(arch, device=device, **(overrides or {})).to(dtype).train()
    checkpointing.apply_activation_checkpointing(model, mode)
    xs = [torch.empty(2 * batch, 3, global_size, global_size, device=device, dtype=dtype)]
    if n_local:
        xs.append(torch.empty(n_local * batch, 3, local_size, local_size, device=device, dtype=dtype))
    exclude = _module_tensors(model)
    with FlashAttentionOnMeta():
        with SavedBytes(exclude) as fwd:
            out = model.forward_features_list(xs, [None] * len(xs))
        recompute = 0
        if mode != "none":
            recompute = _block_recompute_bytes(model, xs, mode, exclude)
    del out
    return ActivationBytes(fwd.bytes, recompute)


def _block_recompute_bytes(model: nn.Module, xs: list[Tensor], mode: str, exclude: list[Tensor]) -> int:
    """Bytes one block adds while the backward re-runs it (every block has the same shapes)."""
    with torch.no_grad():
        tokens, grids = zip(*(model.prepare_tokens_with_masks(x) for x in xs))
    tokens = [t.detach().requires_grad_() for t in tokens]
    ropes = [model.rope_embed(H, W) for H, W in grids]
    block = model.blocks[0]
    keep = [*exclude, *tokens, *(t for r in ropes for t in r)]
    with SavedBytes(keep) as plain:
        block._forward_list(tokens, ropes)
    if mode == "full":
        return plain.bytes
    with SavedBytes(keep) as kept:
        checkpointing.run_checkpointed(block._forward_list, "selective", tokens, ropes)
    # kept outputs are a subset of what the plain block saves; the recompute reuses them
    return plain.bytes - kept.bytes


def measure_heads(
    in_dim: int,
    heads: list[tuple[HeadSpec, int]],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "meta",
) -> int:
    """Bytes the heads save up to their L2-normalised bottleneck (the prototypes are the losses').

    `heads`: (spec, rows) per head; rows are what a student rank feeds it (DINO: every crop's CLS,
    iBOT: the masked patches). Each head's input is a fresh [rows, in_dim] tensor, as the student's
    concatenation / index_select makes one.
    """
    total = 0
    for spec, rows in heads:
        head = build_head(in_dim, spec, device=device).to(dtype)
        x = torch.empty(rows, in_dim, device=device, dtype=dtype, requires_grad=True)
        with SavedBytes(_module_tensors(head)) as saved:
            head(x, no_last_layer=True)
        total += saved.bytes
    return total
