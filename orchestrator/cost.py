"""Cost model: FLOPs and memory per image and per rank for the teacher and each student group.

Time. A group's compute time is `flops_per_image * rows / flops_per_device`, rows being its
largest rank's share of the global batch G: G / devices with even batches, ceil(G / devices) with
`train.even_batches: false`. The teacher adds the all-gathers of its weights (`TeacherCostModel`:
per layout fsdp / hsdp / replicate, from the link bandwidths in `LINK_BANDWIDTH`); the students'
gradient reductions are not modelled. Calibration from measured step times (`plan --calibrate
RUN_DIR`) scales a group's whole predicted time by measured / predicted.

- teacher: backbone forward on the 2 global crops, plus (targets=heads) the DINO head without its
  last layer on the 2 CLS tokens and the iBOT head without its last layer on the masked patches.
- student: 3x (forward + backward; 4x with full activation checkpointing, which re-runs the forward;
  selective checkpointing re-runs only elementwise ops and norms, not counted) the backbone on
  2 global + n local crops and its own heads with last layers (DINO on every crop's CLS, iBOT on the
  masked patches), plus the forward of the teacher heads' last layers it applies
  to the received targets.
  Masked patches per image: 2 crops x mask_probability x mean(mask_ratio) x patches per crop.

Memory per rank (bytes), for the largest rank's rows b, checked against the device memory minus
the runtime's reserve (`DeviceProfile`: CUDA context, NCCL buffers, caching-allocator fragmentation):
- student: 20 B per trainable parameter (fp32 master 4 + fp32 grad 4 + AdamW m, v 8 + fp32 EMA 4),
  divided by the group size under FSDP, plus two all-gathered bf16 blocks (current + prefetch);
  the teacher heads' last layers in bf16 (replicated); backbone activations
  (`backbone_activation_bytes`: what each block saves per token, by checkpointing mode, plus the
  recompute of one block in the backward; checked against a measurement on the meta device by
  benchmarks/memory_model.py and tests/test_activation_checkpointing.py); the heads'
  MLP activations and the [rows, Db] bottlenecks (`head_activation_bytes`); the prototype losses
  (`prototype_loss_bytes`): with `train.loss_chunk_rows` > 0 the peak of the chunked losses
  (`core.losses.memory.loss_activation_bytes`, O(chunk x K)), with 0 the full fp32 logits:
  student DINO (2+n crops) x K x 3 (logits, log-softmax, grad), teacher probabilities 2 x K x 2
  (logits, Sinkhorn-Knopp), iBOT per masked patch K_ibot x 5 (same terms).
- teacher (frozen): backbone + heads without last layers in the inference dtype (bf16 on GPU, fp32
  on CPU) and the heads' fp32 last layers, divided by the ranks one copy is sharded over (the group
  under fsdp, a node's ranks under hsdp, 1 replicated), plus two all-gathered FSDP units when sharded
  (the largest: a block or a head with its last layer); inference activations: one block's working
  set (D residual + 3D qkv + D attention out + H or 2H FFN hidden, bf16) for the 2 global crops.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from dinodist.core.errors import DinodistError
from dinodist.core.losses.memory import loss_activation_bytes
from dinodist.core.models.arch import (
    ArchSpec,
    HeadSpec,
    checkpointing_mode,
    forward_flops,
    head_flops,
    head_parameters,
    num_parameters,
    num_tokens,
)
from dinodist.orchestrator.planfile import PLAN_FILE, read_plan
from dinodist.orchestrator.topology import Topology

GIB = 1024**3


@dataclass(frozen=True)
class DeviceProfile:
    kind: str
    flops: float  # achieved FLOP/s per rank (peak x utilisation)
    memory_bytes: int
    reserve_bytes: int  # CUDA context, NCCL buffers, allocator slack / interpreter + torch on CPU

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserve_bytes


# bf16 dense peak FLOP/s (no sparsity) and the model-FLOPs utilisation we assume before calibration.
PEAK_BF16 = {"h100": 989e12, "h200": 989e12, "a100": 312e12}
MEMORY_GIB = {"h100": 80, "h200": 141, "a100": 80}
DEFAULT_UTILISATION = 0.4
CPU_FLOPS_PER_RANK = 50e9  # one core per rank, fp32 matmul-bound; calibrate for your host
# What a GPU rank's tensors cannot use (estimates; a run's torch.cuda.memory_reserved vs. the device
# total is the check): the CUDA context with cuBLAS / cuDNN workspaces (~1 GiB on H100-class devices),
# NCCL's communicator buffers (NCCL_BUFFSIZE 4 MiB x send/recv x up to 32 channels x peers, per
# communicator: FSDP2 uses the group's, the targets the world's; ~1 GiB), and the caching allocator's
# fragmentation: memory it holds in cached blocks that fit no request, a fraction of what is left.
GPU_CONTEXT_RESERVE = 1 * GIB
NCCL_RESERVE = 1 * GIB
ALLOCATOR_FRAGMENTATION = 0.10
GPU_RESERVE = GPU_CONTEXT_RESERVE + NCCL_RESERVE  # fixed part; fragmentation scales with the device
CPU_RESERVE = GIB // 2


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_profile(topo: Topology) -> DeviceProfile:
    c = topo.cluster
    kind = c.device
    if kind == "cpu":
        flops = CPU_FLOPS_PER_RANK
        # ranks of one node share the host's memory
        memory = host_memory_bytes() // c.devices_per_node
        reserve = CPU_RESERVE
    elif kind in PEAK_BF16:
        flops = PEAK_BF16[kind] * DEFAULT_UTILISATION
        memory = MEMORY_GIB[kind] * GIB
        reserve = None
    else:
        raise DinodistError(f"cluster.device: {kind!r} was not resolved to a device kind")
    if c.flops_per_device is not None:
        flops = c.flops_per_device
    if c.memory_per_device_gib is not None:
        memory = int(c.memory_per_device_gib * GIB)
    if reserve is None:
        reserve = gpu_reserve_bytes(memory)
    return DeviceProfile(kind, flops, memory, reserve)


def gpu_reserve_bytes(memory: int) -> int:
    """Context + NCCL, then the allocator's fragmentation share of the rest (see GPU_RESERVE)."""
    return int(GPU_RESERVE + ALLOCATOR_FRAGMENTATION * max(memory - GPU_RESERVE, 0))


# ---------------------------------------------------------------------------------------------
# per-image work


def masked_patches_per_image(topo: Topology, patch_size: int) -> float:
    d = topo.data
    patches = (d.global_crop_size // patch_size) ** 2
    return 2 * d.mask_probability * (sum(d.mask_ratio) / 2) * patches


def teacher_flops_per_image(topo: Topology) -> float:
    spec = topo.teacher_spec()
    flops = 2 * forward_flops(spec, topo.data.global_crop_size)
    if topo.teacher.targets == "heads":
        m = masked_patches_per_image(topo, spec.patch_size)
        flops += 2 * head_flops(topo.dino_head(), spec.embed_dim, with_last_layer=False)
        flops += m * head_flops(topo.ibot_head(), spec.embed_dim, with_last_layer=False)
    return flops


def student_flops_per_image(topo: Topology, name: str) -> float:
    spec = topo.student_spec(name)
    d = topo.data
    s = topo.student(name)
    fwd = 2 * forward_flops(spec, d.global_crop_size) + d.local_crops * forward_flops(spec, d.local_crop_size)
    extra = 0.0
    if topo.teacher.targets == "heads":
        dino, ibot = topo.student_heads(name)
        m = masked_patches_per_image(topo, spec.patch_size)
        fwd += (2 + d.local_crops) * head_flops(dino, spec.embed_dim)
        fwd += m * head_flops(ibot, spec.embed_dim)
        # teacher heads' last layers on the received targets: forward only, no gradient
        t_dino, t_ibot = topo.dino_head(), topo.ibot_head()
        extra = 2 * 2 * t_dino.bottleneck_dim * t_dino.n_prototypes
        extra += m * 2 * t_ibot.bottleneck_dim * t_ibot.n_prototypes
    factor = 4 if checkpointing_mode(s.activation_checkpointing) == "full" else 3
    return factor * fwd + extra


# ---------------------------------------------------------------------------------------------
# memory per rank


def _block_parameters(spec: ArchSpec) -> int:
    return num_parameters(replace(spec, depth=2)) - num_parameters(replace(spec, depth=1))


def activation_dtype_bytes(topo: Topology) -> int:
    """Bytes per activation element: bf16 on GPU (FSDP's mixed precision), fp32 on CPU."""
    return 4 if topo.cluster.device == "cpu" else 2


def _block_saves(spec: ArchSpec, e: int) -> tuple[int, int]:
    """(plain, kept): bytes per token one block saves for backward besides its input, when run plainly
    and what the selective policy keeps of it; e bytes per element, statistics in fp32.

    Measured op by op (core/models/activation_memory.py). Plain, in D-wide tensors: norm1 out (the qkv
    input), qkv out (3; v is a view of it), q and k after RoPE (copies), the attention output, the proj
    input (heads merged, a copy), proj out (LayerScale's input), the residual (norm2 input), norm2 out,
    the FFN out (LayerScale's input): 12 D; the FFN's hidden: MLP fc1 and GELU outs (2 H), SwiGLU w1,
    silu, w2 and product outs (4 H); fp32: the attention's logsumexp per head and two LayerNorms' mean
    and rstd. RoPE saves only its [P, head_dim] sin / cos (per crop size, not per token: see
    `backbone_activation_bytes`). Kept (outputs of matmuls and attention): qkv out, attention out,
    proj out, FFN out (6 D), fc1 out (H) or w1, w2 outs (2 H), and the logsumexp.
    """
    d, h = spec.embed_dim, spec.ffn_hidden
    lse = 4 * spec.num_heads
    stats = 2 * 2 * 4
    ffn_plain, ffn_kept = (2 * h, h) if spec.ffn_layer == "mlp" else (4 * h, 2 * h)
    plain = e * (12 * d + ffn_plain) + lse + stats
    kept = e * (6 * d + ffn_kept) + lse
    return plain, kept


def backbone_activation_bytes(spec: ArchSpec, images: int, crops: list[tuple[int, int]], mode: str,
                              e: int = 2) -> int:
    """Peak bytes a backbone holds for backward on `images` images; `crops`: (crops per image, size).

    Per token per block: its input (e D), kept until the backward reaches the block in every mode, and
    (`_block_saves`) everything else it saves (none), or nothing else (full), or the kept outputs
    (selective). With checkpointing the backward re-runs one block at a time, adding that block's
    saves (full) or those it did not keep (selective) over all tokens of the rank. Outside the blocks:
    the pixels (the patch embedding's input), the final norm's input, mean and rstd, and per block and
    crop size RoPE's fp32 sin and cos [P, head_dim]. Stochastic depth (`drop_path_rate` > 0) packs the
    crops and saves more; the distilled students train without it.
    """
    d, depth = spec.embed_dim, spec.depth
    tokens = images * sum(n * num_tokens(spec, size) for n, size in crops if n)
    pixels = images * sum(n * 3 * size * size for n, size in crops if n) * e
    rope = depth * sum(2 * 4 * spec.head_dim * (num_tokens(spec, size) - 1 - spec.n_storage_tokens)
                       for n, size in crops if n)
    plain, kept = _block_saves(spec, e)
    per_block = {"none": plain, "full": 0, "selective": kept}[mode]
    recompute = {"none": 0, "full": plain, "selective": plain - kept}[mode]
    saved = tokens * (depth * (e * d + per_block) + e * d + 8) + pixels + rope
    return saved + tokens * recompute


def largest_share(global_batch: int, devices: int) -> int:
    """Rows of a group's largest rank: G / d with even batches, ceil(G / d) with uneven ones."""
    return -(-global_batch // devices)


def prototype_loss_bytes(topo: Topology, name: str, rows_per_rank: int) -> int:
    """Peak fp32 memory of one student rank's DINO and iBOT losses over the prototypes.

    Unchunked (`train.loss_chunk_rows: 0`): the full [rows, K] matrices are live: student DINO
    logits for the 2 + n crops x 3 (logits, log-softmax, grad), teacher probabilities for the 2
    global crops x 2 (logits, Sinkhorn-Knopp), iBOT per masked patch x 5 (the same terms).
    Chunked: `core.losses.chunked.loss_activation_bytes`, the peak of the chunked losses, plus
    what that function leaves to us: the fp32 copies of the student's and the teacher's prototype
    weights [K, Db] the chunked losses compute with (the teacher's stay alive in the Sinkhorn-Knopp
    factors through the loss) and the fp32 gradient of the student's.
    """
    d = topo.data
    dino, ibot = topo.student_heads(name)
    spec = topo.student_spec(name)
    rows_dino = rows_per_rank * (2 + d.local_crops)
    rows_ibot = math.ceil(rows_per_rank * masked_patches_per_image(topo, spec.patch_size))
    chunk = topo.train.loss_chunk_rows
    if chunk == 0:
        t_dino = topo.dino_head()
        return 4 * (rows_dino * 3 * dino.n_prototypes + rows_per_rank * 2 * 2 * t_dino.n_prototypes
                    + rows_ibot * 5 * ibot.n_prototypes)
    t_dino, t_ibot = topo.dino_head(), topo.ibot_head()
    student_w = dino.n_prototypes * dino.bottleneck_dim + ibot.n_prototypes * ibot.bottleneck_dim
    teacher_w = t_dino.n_prototypes * t_dino.bottleneck_dim + t_ibot.n_prototypes * t_ibot.bottleneck_dim
    weights = 4 * (2 * student_w + teacher_w)
    return weights + loss_activation_bytes(rows_dino, rows_ibot, dino.n_prototypes, ibot.n_prototypes, chunk)


def head_rows(topo: Topology, name: str, rows_per_rank: int) -> tuple[int, int]:
    """Rows through the DINO head (every crop's CLS) and the iBOT head (the expected masked patches)."""
    spec = topo.student_spec(name)
    rows_ibot = math.ceil(rows_per_rank * masked_patches_per_image(topo, spec.patch_size))
    return rows_per_rank * (2 + topo.data.local_crops), rows_ibot


def head_saved_bytes(topo: Topology, name: str, rows_per_rank: int) -> int:
    """What the heads' modules save up to the normalised bottleneck (measured like the backbone).

    Per row: its input D, each hidden layer's linear and GELU outputs (2 H per hidden layer), the
    bottleneck Db, in e bytes, and the L2 norm and its clamp (one element each).
    """
    spec = topo.student_spec(name)
    e = activation_dtype_bytes(topo)
    dino, ibot = topo.student_heads(name)
    rows_dino, rows_ibot = head_rows(topo, name, rows_per_rank)

    def per_row(h: HeadSpec) -> int:
        return e * (spec.embed_dim + (h.nlayers - 1) * 2 * h.hidden_dim + h.bottleneck_dim + 2)

    return rows_dino * per_row(dino) + rows_ibot * per_row(ibot)


def head_activation_bytes(topo: Topology, name: str, rows_per_rank: int) -> int:
    """Activations of one student rank's DINO and iBOT heads and of the [rows, Db] bottlenecks.

    `head_saved_bytes`, then per row the normalised bottleneck (Db, bf16) the prototype layer saves,
    that bottleneck and its gradient in fp32 for the prototype loss (2 Db), and the received teacher
    bottleneck rows in fp32 (Db; 2 global crops for DINO, the masked patches for iBOT).
    """
    dino, ibot = topo.student_heads(name)
    t_dino, t_ibot = topo.dino_head(), topo.ibot_head()
    rows_dino, rows_ibot = head_rows(topo, name, rows_per_rank)

    def per_row(h: HeadSpec) -> int:
        return 2 * h.bottleneck_dim + 4 * 2 * h.bottleneck_dim

    return (head_saved_bytes(topo, name, rows_per_rank)
            + rows_dino * per_row(dino) + rows_ibot * per_row(ibot)
            + 4 * (2 * rows_per_rank * t_dino.bottleneck_dim + rows_ibot * t_ibot.bottleneck_dim))


def student_crops(topo: Topology) -> list[tuple[int, int]]:
    """(crops per image, size) a student's backbone runs on: 2 global, n local."""
    d = topo.data
    return [(2, d.global_crop_size), (d.local_crops, d.local_crop_size)]


def student_activation_bytes(topo: Topology, name: str, rows_per_rank: int) -> int:
    """The part of a student rank's memory benchmarks/memory_model.py measures: backbone + heads' saves."""
    spec = topo.student_spec(name)
    mode = checkpointing_mode(topo.student(name).activation_checkpointing)
    e = activation_dtype_bytes(topo)
    act = backbone_activation_bytes(spec, rows_per_rank, student_crops(topo), mode, e)
    if topo.teacher.targets == "heads":
        act += head_saved_bytes(topo, name, rows_per_rank)
    return act


def student_memory_per_rank(topo: Topology, name: str, devices: int) -> int:
    spec = topo.student_spec(name)
    s = topo.student(name)
    b = largest_share(topo.train.global_batch_size, devices)
    params = num_parameters(spec)
    heads = topo.teacher.targets == "heads"
    if heads:
        dino, ibot = topo.student_heads(name)
        params += head_parameters(dino, spec.embed_dim) + head_parameters(ibot, spec.embed_dim)
    shard = devices if s.shard == "fsdp" else 1
    state = 20 * params / shard
    if s.shard == "fsdp":
        state += 2 * 2 * _block_parameters(spec)
    mode = checkpointing_mode(s.activation_checkpointing)
    act = backbone_activation_bytes(spec, b, student_crops(topo), mode, activation_dtype_bytes(topo))
    if heads:
        t_dino, t_ibot = topo.dino_head(), topo.ibot_head()
        last_layers = t_dino.bottleneck_dim * t_dino.n_prototypes
        last_layers += t_ibot.bottleneck_dim * t_ibot.n_prototypes
        state += 2 * last_layers
        act += prototype_loss_bytes(topo, name, b) + head_activation_bytes(topo, name, b)
    return int(state + act)


# ---------------------------------------------------------------------------------------------
# the teacher's layout: memory per rank and the all-gathers of its weights

TEACHER_LAYOUTS = ("fsdp", "hsdp", "replicate")
# equal time and memory (e.g. one rank): the layout with the least machinery
_LAYOUT_PREFERENCE = ("replicate", "hsdp", "fsdp")

# Link rate per device and direction, bytes/s: (inside a node, between nodes). Datasheet figures:
# - h100, h200 (SXM, HGX/DGX nodes of 8): NVLink 4, 900 GB/s bidirectional per GPU = 450 GB/s each way
#   (NVIDIA H100 and H200 Tensor Core GPU datasheets); one 400 Gb/s NDR InfiniBand port (ConnectX-7)
#   per GPU = 50 GB/s (DGX H100/H200 user guide: 8 x 400 Gb/s compute fabric ports per node).
# - a100 (SXM4): NVLink 3, 600 GB/s bidirectional = 300 GB/s each way (A100 datasheet); DGX A100: one
#   200 Gb/s HDR port per GPU = 25 GB/s.
# - cpu: gloo over TCP. Loopback between the ranks of one host ~5 GB/s and 10 GbE between hosts
#   (1.25 GB/s): rough guesses, calibrate or set cluster.intra_node_gb_s / inter_node_gb_s.
LINK_BANDWIDTH = {
    "h100": (450e9, 50e9),
    "h200": (450e9, 50e9),
    "a100": (300e9, 25e9),
    "cpu": (5e9, 1.25e9),
}
# What an all-gather of GB-sized buffers achieves of the link rate (NCCL's bus bandwidth): assumed,
# not measured here; cluster.*_gb_s give the achieved figure directly.
COLLECTIVE_EFFICIENCY = 0.8


def link_bandwidth(topo: Topology) -> tuple[float, float]:
    """Achieved all-gather bandwidth per rank and direction, bytes/s: (inside a node, across nodes)."""
    c = topo.cluster
    intra, inter = (COLLECTIVE_EFFICIENCY * b for b in LINK_BANDWIDTH[c.device])
    if c.intra_node_gb_s is not None:
        intra = c.intra_node_gb_s * 1e9
    if c.inter_node_gb_s is not None:
        inter = c.inter_node_gb_s * 1e9
    return intra, inter


@dataclass(frozen=True)
class TeacherLayout:
    """The teacher group on `devices` ranks with one layout: what it costs per iteration and per rank."""

    layout: str  # fsdp | hsdp | replicate
    devices: int
    shard_size: int  # ranks one copy of the weights is sharded over: devices (fsdp), a node's (hsdp), 1
    compute_seconds: float  # the largest rank's forward
    communication_seconds: float  # the forward's all-gathers, on the wire
    seconds: float  # iteration time: all-gathers overlapped with compute, the first block's exposed
    memory_per_rank_bytes: int
    fits: bool

    @property
    def replicas(self) -> int:
        return self.devices // self.shard_size

    @property
    def exposed_communication_seconds(self) -> float:
        """What the all-gathers add to the teacher's iteration time."""
        return self.seconds - self.compute_seconds

    def to_dict(self) -> dict:
        return {"layout": self.layout, "devices": self.devices, "shard_size": self.shard_size,
                "replicas": self.replicas, "compute_seconds": self.compute_seconds,
                "communication_seconds": self.communication_seconds,
                "exposed_communication_seconds": self.exposed_communication_seconds,
                "seconds_per_iteration": self.seconds, "memory_per_rank_bytes": self.memory_per_rank_bytes,
                "fits": self.fits}


class TeacherCostModel:
    """Time and memory of the teacher group per device count and layout (teacher/model.py:shard_teacher).

    The teacher's ranks come first in the plan (ranks 0..d-1, from a node boundary), so an hsdp shard
    group of gcd(d, devices_per_node) consecutive ranks lies inside one node. The frozen teacher runs one
    forward per iteration and no backward: a sharded copy all-gathers its weights once per forward (each
    rank receives (s-1)/s of them over a ring of its s shard ranks), a replicated one communicates none.
    Bandwidth: the intra-node link when the shard group is inside one node, else the inter-node link.
    FSDP2 issues the next block's all-gather while the current block computes, so the iteration takes
    max(compute, all-gathers) plus the first block's all-gather, which nothing hides (1/depth of them).
    `scale` (calibration) multiplies the whole time.
    """

    def __init__(self, topo: Topology, profile: DeviceProfile, scale: float = 1.0,
                 global_batch: int | None = None) -> None:
        spec = topo.teacher_spec()
        e = activation_dtype_bytes(topo)  # also the teacher's parameter dtype (model.py:inference_dtype)
        forward = num_parameters(spec)
        last = 0
        unit = _block_parameters(spec)
        if topo.teacher.targets == "heads":
            for h in (topo.dino_head(), topo.ibot_head()):
                without = head_parameters(h, spec.embed_dim, with_last_layer=False)
                whole = head_parameters(h, spec.embed_dim)
                forward += without
                last += whole - without
                unit = max(unit, whole)
        self.resident_bytes = e * forward + 4 * last  # the last layers stay fp32 (sent to the students)
        # the last layers are sharded with their head and all-gathered with it (in bf16 on GPU: FSDP's
        # param dtype), although the forward stops before them
        self.gather_bytes = e * (forward + last)
        self.unit_bytes = e * unit
        self.units = spec.depth
        ffn = spec.ffn_hidden * (1 if spec.ffn_layer == "mlp" else 2)
        self.activation_bytes_per_row = 2 * num_tokens(spec, topo.data.global_crop_size) * (
            5 * spec.embed_dim + ffn) * 2
        self.seconds_per_row = teacher_flops_per_image(topo) / profile.flops
        self.global_batch = global_batch or topo.train.global_batch_size
        self.per_node = topo.cluster.devices_per_node
        self.intra, self.inter = link_bandwidth(topo)
        self.usable = profile.usable_bytes
        self.requested = topo.teacher.shard
        self.scale = scale

    def shard_size(self, layout: str, devices: int) -> int:
        if layout == "fsdp":
            return devices
        if layout == "hsdp":
            return math.gcd(devices, self.per_node)
        return 1

    def layout(self, layout: str, devices: int) -> TeacherLayout:
        s = self.shard_size(layout, devices)
        rows = largest_share(self.global_batch, devices)
        compute = self.seconds_per_row * rows
        comm = 0.0
        state = float(self.resident_bytes)
        if s > 1:
            bandwidth = self.intra if s <= self.per_node else self.inter
            comm = (s - 1) / s * self.gather_bytes / bandwidth
            state = self.resident_bytes / s + 2 * self.unit_bytes  # current + prefetched unit
        memory = int(state + rows * self.activation_bytes_per_row)
        seconds = self.scale * (max(compute, comm) + comm / self.units)
        return TeacherLayout(layout, devices, s, self.scale * compute, self.scale * comm, seconds, memory,
                             memory <= self.usable)

    def candidates(self, devices: int) -> list[TeacherLayout]:
        """The layouts `teacher.shard` allows on `devices` ranks: the forced one, or every distinct one."""
        if self.requested != "auto":
            return [self.layout(self.requested, devices)]
        out = [self.layout("replicate", devices)]
        if 1 < self.shard_size("hsdp", devices) < devices:
            out.append(self.layout("hsdp", devices))
        if devices > 1:
            out.append(self.layout("fsdp", devices))
        return out

    def best(self, devices: int) -> TeacherLayout | None:
        """The fastest layout that fits (then the least memory), None if none fits."""
        fitting = [c for c in self.candidates(devices) if c.fits]
        return min(fitting, key=_layout_rank, default=None)

    def leanest(self, devices: int) -> TeacherLayout:
        """The candidate with the least memory per rank (what a refusal quotes)."""
        return min(self.candidates(devices), key=lambda c: (c.memory_per_rank_bytes, _layout_rank(c)))


def _layout_rank(c: TeacherLayout) -> tuple[float, int, int]:
    return c.seconds, c.memory_per_rank_bytes, _LAYOUT_PREFERENCE.index(c.layout)


def teacher_memory_per_rank(topo: Topology, devices: int, layout: str | None = None) -> int:
    """Memory per teacher rank with `layout` (default: `teacher.shard`; for auto the layout it picks)."""
    model = TeacherCostModel(topo, device_profile(topo))
    if layout is not None:
        return model.layout(layout, devices).memory_per_rank_bytes
    chosen = model.best(devices) or model.leanest(devices)
    return chosen.memory_per_rank_bytes


# ---------------------------------------------------------------------------------------------
# groups as the allocator sees them


@dataclass(frozen=True)
class GroupCost:
    name: str
    role: str  # "teacher" | "student"
    arch: str
    fixed_devices: int | None
    flops_per_image: float
    scale: float = 1.0  # calibration: measured / predicted

    def seconds_per_image(self, profile: DeviceProfile) -> float:
        return self.flops_per_image * self.scale / profile.flops


def group_costs(topo: Topology, calibration: dict[str, float] | None = None) -> list[GroupCost]:
    cal = calibration or {}
    t = topo.teacher
    out = [GroupCost("teacher", "teacher", t.arch, None if t.devices == "auto" else int(t.devices),
                     teacher_flops_per_image(topo), cal.get("teacher", 1.0))]
    for s in topo.students:
        out.append(GroupCost(s.name, "student", s.arch, None if s.devices == "auto" else int(s.devices),
                             student_flops_per_image(topo, s.name), cal.get(s.name, 1.0)))
    return out


def memory_per_rank(topo: Topology, group: str, devices: int) -> int:
    if group == "teacher":
        return teacher_memory_per_rank(topo, devices)
    return student_memory_per_rank(topo, group, devices)


# ---------------------------------------------------------------------------------------------
# calibration from a previous run


def read_step_seconds(metrics_file: Path, skip_fraction: float = 0.2) -> tuple[float, float] | None:
    """(median step_seconds, median images) of a group's metrics.jsonl after warm-up, None if empty."""
    rows = []
    with metrics_file.open() as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DinodistError(f"{metrics_file}:{n}: not a JSON line") from None
            if "step_seconds" in rec:
                rows.append(rec)
    rows = rows[int(len(rows) * skip_fraction):]
    if not rows:
        return None
    step = statistics.median(float(r["step_seconds"]) for r in rows)
    images = statistics.median(float(r.get("images", 0) or 0) for r in rows)
    return step, images


def calibrate(topo: Topology, run_dir: str | Path, devices: dict[str, int]) -> dict[str, float]:
    """Per-group factor measured/predicted from `<run_dir>/<group>/metrics.jsonl`.

    `step_seconds` is the group's compute time per iteration (its wait is the separate
    `wait_seconds`). The run's group sizes come from `<run_dir>/plan.json` when the run saved one,
    otherwise from `devices` (the plan being calibrated); `images` (global batch of that run)
    falls back to this topology's global batch.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DinodistError(f"--calibrate: run folder not found: {run_dir}")
    run_devices = dict(devices)
    run_layout = None
    plan_file = run_dir / PLAN_FILE
    if plan_file.is_file():
        run_devices.update({g.name: g.devices for g in read_plan(plan_file).groups})
        run_layout = (json.loads(plan_file.read_text()).get("teacher_layout") or {}).get("layout")
    profile = device_profile(topo)
    factors: dict[str, float] = {}
    for g in group_costs(topo):
        f = run_dir / g.name / "metrics.jsonl"
        if not f.is_file():
            continue
        measured = read_step_seconds(f)
        if measured is None:
            continue
        step, images = measured
        images = images or topo.train.global_batch_size
        # the group's step is its largest rank's: ceil(images / ranks) rows (= images / ranks when even)
        predicted = g.seconds_per_image(profile) * largest_share(round(images), run_devices[g.name])
        if g.role == "teacher":  # plus its all-gathers, with the layout that run used
            model = TeacherCostModel(topo, profile, global_batch=round(images))
            d = run_devices[g.name]
            used = model.layout(run_layout, d) if run_layout in TEACHER_LAYOUTS else model.best(d)
            predicted = (used or model.leanest(d)).seconds
        if step > 0 and predicted > 0:
            factors[g.name] = step / predicted
    if not factors:
        raise DinodistError(f"--calibrate: no <group>/metrics.jsonl with step_seconds under {run_dir}")
    return factors
