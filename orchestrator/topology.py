"""The distillation topology: one YAML file, validated once, up front, into a pydantic model.

Every problem is a one-line `DinodistError` naming the field path (`students[1].arch: ...`), so
the CLI can print it as is. Relative paths in the file (teacher checkpoint, store path, output)
resolve against the current working directory of the process that loads it, not against the
YAML file's folder: that is how every other CLI path argument behaves, and it keeps a resolved
topology (absolute paths) meaning the same thing when it is copied into a run folder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dinodist.core.config import (
    Overrides,
    apply_overrides,
    read_yaml_mapping,
    validation_error_line,
)
from dinodist.core.errors import DinodistError
from dinodist.core.losses.memory import DEFAULT_CHUNK_ROWS
from dinodist.core.models.arch import (
    PAPER_DINO_HEAD,
    PAPER_IBOT_HEAD,
    PRESETS,
    TINY_DINO_HEAD,
    TINY_IBOT_HEAD,
    ArchSpec,
    HeadSpec,
    get_arch,
)

log = logging.getLogger(__name__)

DeviceKind = Literal["cpu", "h100", "h200", "a100"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_NAMES = {"teacher"}  # the teacher's output folder and metrics label


class _Strict(BaseModel):
    # strict: a quoted "2" is a wrong type, not a number; users are told rather than guessed for
    model_config = ConfigDict(extra="forbid", strict=True)


def _devices_value(v: Any) -> Any:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        return v
    raise ValueError(f"must be a positive integer or 'auto', got {v!r}")


class Cluster(_Strict):
    nodes: int = Field(1, gt=0)
    devices_per_node: int = Field(gt=0)
    device: Literal["cpu", "h100", "h200", "a100", "auto"] = "cpu"
    flops_per_device: float | None = Field(None, gt=0)  # achieved FLOP/s per rank; overrides the table
    memory_per_device_gib: float | None = Field(None, gt=0)  # overrides the table / host memory share
    # achieved all-gather bandwidth per device and direction, GB/s, inside a node and between nodes;
    # override orchestrator/cost.py:LINK_BANDWIDTH x COLLECTIVE_EFFICIENCY (the teacher layout's cost)
    intra_node_gb_s: float | None = Field(None, gt=0)
    inter_node_gb_s: float | None = Field(None, gt=0)

    @property
    def total_devices(self) -> int:
        return self.nodes * self.devices_per_node


class HeadConfig(_Strict):
    # every field optional: a partial mapping is merged over the arch's default head
    hidden_dim: int | None = Field(None, gt=0)
    bottleneck_dim: int | None = Field(None, gt=0)
    n_prototypes: int | None = Field(None, gt=0)
    nlayers: int | None = Field(None, ge=1)

    def resolve(self, default: HeadSpec) -> HeadSpec:
        given = {k: v for k, v in self.model_dump().items() if v is not None}
        return HeadSpec(**{**default.__dict__, **given})


class Teacher(_Strict):
    arch: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    targets: Literal["heads", "features"] = "heads"
    # fsdp: sharded over the whole group; hsdp: sharded inside a node, replicated across nodes; replicate:
    # a full copy per rank; auto: the one the plan's cost model finds fastest (orchestrator/cost.py:
    # TeacherCostModel). The default stays fsdp until the rank runtime reads the planned layout.
    shard: Literal["auto", "fsdp", "hsdp", "replicate"] = "fsdp"
    devices: int | str = "auto"
    dino_head: HeadConfig = Field(default_factory=HeadConfig)
    ibot_head: HeadConfig = Field(default_factory=HeadConfig)

    _check_devices = field_validator("devices", mode="before")(_devices_value)


class StudentOptim(_Strict):
    """Per-student overrides of the `train:` optimisation settings (unset: the `train:` value)."""

    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    ema: float | None = Field(None, ge=0, le=1)
    clip_grad: float | None = Field(None, ge=0)
    warmup_iterations: int | None = Field(None, ge=0)
    lr_schedule: Literal["constant", "cosine"] | None = None
    lr_end: float | None = Field(None, ge=0)
    layerwise_decay: float | None = Field(None, gt=0, le=1)
    student_temp: float | None = Field(None, gt=0)
    koleo_weight: float | None = Field(None, ge=0)
    ibot_weight: float | None = Field(None, ge=0)


class Student(_Strict):
    name: str
    arch: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    devices: int | str = "auto"
    batch_per_rank: int | None = Field(None, gt=0)  # derived (global batch / devices); if given, must agree
    shard: Literal["fsdp", "ddp"] = "fsdp"
    # true (full: each block re-run in the backward), false, or selective (core/models/checkpointing.py)
    activation_checkpointing: bool | Literal["selective"] = False
    # torch.compile each backbone block (after checkpointing, before FSDP); the first steps pay the compile
    compile: bool = False
    dino_head: HeadConfig = Field(default_factory=HeadConfig)
    ibot_head: HeadConfig = Field(default_factory=HeadConfig)
    optim: StudentOptim = Field(default_factory=StudentOptim)

    _check_devices = field_validator("devices", mode="before")(_devices_value)

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_value(cls, v: Any) -> Any:
        if v is True or v is False or v == "selective":
            return v
        raise ValueError(f"must be true, false or selective, got {v!r}")


class Data(_Strict):
    source: str = "skimage"
    global_crop_size: int = Field(256, gt=0)
    local_crop_size: int = Field(112, gt=0)
    local_crops: int = Field(8, ge=0)
    flips: bool = False
    mask_probability: float = Field(0.5, ge=0, le=1)
    mask_ratio: tuple[float, float] = Field((0.1, 0.5), strict=False)  # YAML gives a list
    # the fraction of the image area a crop covers (official: global 0.32-1, local 0.05-0.32); small
    # sources want larger ones (a local crop of 5 % of a 28-px image is 6 px: docs/quality.md)
    global_crop_scale: tuple[float, float] = Field((0.32, 1.0), strict=False)
    local_crop_scale: tuple[float, float] = Field((0.05, 0.32), strict=False)
    # worker processes per rank building the batches (0: a thread of the rank), for teacher and students
    workers: int = Field(0, ge=0)
    # crops cross the host and the host-to-device copy as uint8 (4x fewer bytes) and are normalised on
    # the device; one setting for the teacher and every student, so all see the same pixels
    uint8: bool = False


class Train(_Strict):
    global_batch_size: int = Field(gt=0)
    iterations: int = Field(gt=0)
    seed: int = 0
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.04, ge=0)
    layerwise_decay: float = Field(0.99, gt=0, le=1)
    ema: float = Field(0.994, ge=0, le=1)
    teacher_temp: float = Field(0.07, gt=0)
    student_temp: float = Field(0.1, gt=0)
    koleo_weight: float = Field(0.1, ge=0)
    ibot_weight: float = Field(1.0, ge=0)
    clip_grad: float = Field(3.0, ge=0)
    warmup_iterations: int = Field(0, ge=0)
    # after warmup: constant lr (the official distilled recipe) or a cosine decay to lr_end at the last
    # iteration (as the SSL stages; measured for short CPU runs in docs/quality.md)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_end: float = Field(0.0, ge=0)
    checkpoint_every: int | None = Field(None, gt=0)
    # checkpoints kept per group (older ones are deleted); 2 so that a crash while the newest is being
    # written, or a torn newest one, still leaves one that every group has (resume needs a common one)
    keep_checkpoints: int = Field(2, ge=1)
    # iterations of target sends in flight per teacher rank (and receives posted ahead per student rank).
    # The slack that lets one group fall ~2 x prefetch_depth iterations behind without stalling the others
    # also lets groups drift that far apart, and a whole-job resume needs a checkpoint every group still
    # keeps: 1 keeps that drift below the small checkpoint_every of CPU runs (docs/distill.md §3)
    prefetch_depth: int = Field(1, ge=1)
    # true: every rank of a group takes G / devices rows, so each group size must divide G.
    # false: a group of d ranks splits G as evenly as possible (orchestrator.allocate.rank_rows), so
    # any size is allowed and the allocator can match iteration times at batches like 4096 = 2^12
    even_batches: bool = True
    # rows per chunk of the prototype losses (the [rows, K] logits are never all live); 0: unchunked
    loss_chunk_rows: int = Field(DEFAULT_CHUNK_ROWS, ge=0)
    # the chunked prototype losses' matmuls: auto = fp32 on CPU (exact), TF32 on CUDA; bf16 = bf16 logits
    # with an fp32 log-sum-exp
    loss_precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    # dtype of the targets on the wire (teacher -> students) and of the implicit restart store:
    # auto = bf16 on GPUs (half the bytes; the teacher computes in bf16 there anyway), fp32 on CPU (exact).
    # Resolved once for every rank by orchestrator/runtime/jobs.py:target_dtype
    target_dtype: Literal["auto", "fp32", "bf16"] = "auto"


class Metrics(_Strict):
    port: int = Field(9400, ge=0, le=65535)


class Control(_Strict):
    """The control plane (orchestrator/control.py, docs/control-plane.md): the one schema of its
    settings; the server, the launcher and every rank read them from here."""

    bind: str = "127.0.0.1"  # the server's interface; anything but loopback needs secret_env
    port: int = Field(0, ge=0, le=65535)  # 0: any free port (local runs); deploy uses 29600 then
    secret_env: str | None = None  # environment variable holding the shared HMAC secret
    heartbeat_interval_s: float = Field(0.5, gt=0)  # how often a rank says it is alive
    heartbeat_timeout_s: float = Field(10.0, gt=0)  # silence after which a rank counts as dead
    register_timeout_s: float | None = Field(300.0, gt=0)  # a rank that never registers; null: wait
    # restart_group: a failed student group restarts from its checkpoint and catches up from the target
    # store while the teacher and the other groups go on; stop: the first failure stops the job
    on_failure: Literal["stop", "restart_group"] = "restart_group"
    max_restarts: int = Field(3, ge=0)  # per student group; one more failure stops the job
    # a running rank whose iteration does not advance for this long is hung: a failure like a death
    progress_timeout_s: float | None = Field(600.0, gt=0)
    # torch.distributed's timeout for a group's collectives (FSDP, losses): above progress_timeout_s,
    # so a hang is the supervisor's to report (naming the rank), not a raw collective timeout
    collective_timeout_s: float = Field(900.0, gt=0)
    # joining the world and the students' first receive, which waits for the teacher to load: the
    # largest, so a 7B teacher's start never trips it
    startup_timeout_s: float = Field(1800.0, gt=0)
    grace_s: float = Field(5.0, ge=0)  # after a failure: SIGKILL ranks still alive this long after `stop`

    @model_validator(mode="after")
    def _heartbeat_below_timeout(self) -> Control:
        if self.heartbeat_interval_s >= self.heartbeat_timeout_s:
            raise ValueError(f"heartbeat_interval_s {self.heartbeat_interval_s:g} must be below "
                             f"heartbeat_timeout_s {self.heartbeat_timeout_s:g}")
        # the hierarchy: each level fires before the one that would hide what happened
        chain = [("heartbeat_timeout_s", self.heartbeat_timeout_s),
                 ("progress_timeout_s", self.progress_timeout_s),
                 ("collective_timeout_s", self.collective_timeout_s),
                 ("startup_timeout_s", self.startup_timeout_s)]
        chain = [(k, v) for k, v in chain if v is not None]
        for (a, x), (b, y) in zip(chain, chain[1:]):
            if x >= y:
                raise ValueError(f"{a} {x:g} must be below {b} {y:g} (heartbeat < progress < collective "
                                 "< startup)")
        return self

    def timeouts_line(self) -> str:
        """The timeout hierarchy as `plan` prints it."""
        progress = f"{self.progress_timeout_s:g} s" if self.progress_timeout_s is not None else "off"
        return (f"timeouts: heartbeat {self.heartbeat_timeout_s:g} s < progress {progress} < collective "
                f"{self.collective_timeout_s:g} s < startup {self.startup_timeout_s:g} s")


RESTART_STORE = "targets"  # <out>/targets: the store restarted groups catch up from, when no store: is set


class Store(_Strict):
    path: str
    dtype: Literal["bf16", "int8", "fp32"] = "bf16"
    retain: int | Literal["all"] = "all"

    @field_validator("retain")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be 'all' or a positive number of iterations")
        return v


class KnnEval(_Strict):
    """k-NN of each group's EMA backbone (and, once, of the teacher) on two labelled sources."""

    train: str  # source specs (core/data/sources.py) with labels: folder:PATH in class sub-folders,
    test: str  # or fashion-mnist:DIR:train|test
    # images of each source, spread evenly over it (core/eval/inloop.py:eval_ids); null: all of them
    limit_train: int | None = Field(10000, gt=0)
    limit_test: int | None = Field(2000, gt=0)
    image_size: int | None = Field(None, gt=0)  # null: data.global_crop_size
    k: int = Field(20, gt=0)
    temperature: float = Field(0.07, gt=0)
    batch_size: int = Field(256, gt=0)  # images per forward, per rank


class Eval(_Strict):
    """Quality measured in the loop (docs/distill.md, "Quality in the loop")."""

    every: int = Field(gt=0)  # iterations between evaluations; the last iteration is always evaluated
    knn: KnnEval
    teacher: bool = True  # also evaluate the frozen teacher, once, after it sent its last targets


class Topology(_Strict):
    name: str
    backend: Literal["gloo", "nccl", "auto"] = "auto"
    cluster: Cluster
    teacher: Teacher
    students: list[Student]
    data: Data = Field(default_factory=Data)
    train: Train
    metrics: Metrics = Field(default_factory=Metrics)
    control: Control = Field(default_factory=Control)
    store: Store | None = None
    eval: Eval | None = None
    output: str

    # -- resolved views used by the allocator, the launchers and the group programs --

    @property
    def total_devices(self) -> int:
        return self.cluster.total_devices

    @property
    def group_names(self) -> list[str]:
        return ["teacher"] + [s.name for s in self.students]

    def teacher_spec(self) -> ArchSpec:
        return get_arch(self.teacher.arch, **self.teacher.overrides)

    def student(self, name: str) -> Student:
        for s in self.students:
            if s.name == name:
                return s
        raise DinodistError(f"students: no student named {name!r}; known: {', '.join(self.group_names[1:])}")

    def student_spec(self, name: str) -> ArchSpec:
        s = self.student(name)
        return get_arch(s.arch, **s.overrides)

    def dino_head(self) -> HeadSpec:
        """The teacher's DINO head (students' heads default to the same sizes)."""
        return self.teacher.dino_head.resolve(_default_heads(self.teacher.arch)[0])

    def ibot_head(self) -> HeadSpec:
        return self.teacher.ibot_head.resolve(_default_heads(self.teacher.arch)[1])

    def student_heads(self, name: str) -> tuple[HeadSpec, HeadSpec]:
        s = self.student(name)
        return s.dino_head.resolve(self.dino_head()), s.ibot_head.resolve(self.ibot_head())

    def student_train(self, name: str) -> dict[str, Any]:
        """`train:` settings with the student's `optim:` overrides applied."""
        merged = self.train.model_dump()
        merged.update({k: v for k, v in self.student(name).optim.model_dump().items() if v is not None})
        return merged

    def target_store_path(self, out_dir: str | Path) -> str | None:
        """Where the teacher writes targets: `store.path`, else `<out>/targets` when restarted groups
        need one to catch up from (`control.on_failure: restart_group`), else nowhere."""
        if self.store is not None:
            return self.store.path
        if self.control.on_failure == "restart_group":
            return str(Path(out_dir) / RESTART_STORE)
        return None

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "gloo" if self.cluster.device == "cpu" else "nccl"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _default_heads(arch: str) -> tuple[HeadSpec, HeadSpec]:
    if arch in PRESETS:
        return TINY_DINO_HEAD, TINY_IBOT_HEAD
    return PAPER_DINO_HEAD, PAPER_IBOT_HEAD


# ---------------------------------------------------------------------------------------------
# loading


def load_topology(
    path: str | Path,
    overrides: Overrides = None,
    *,
    check_paths: bool = True,
) -> Topology:
    """Read, override, validate and resolve a topology file.

    `overrides`: `{"train.iterations": 5, "students[1].devices": 2}` or `["train.iterations=5"]`
    (values in the string form are parsed as YAML scalars). `check_paths=False` skips the
    existence check of the teacher checkpoint (used by `deploy`, which writes files for another
    machine).
    """
    raw = apply_overrides(read_yaml_mapping(path, "topology"), overrides)
    return parse_topology(raw, check_paths=check_paths)


def parse_topology(raw: dict[str, Any], *, check_paths: bool = True) -> Topology:
    """Validate, resolve and check a topology mapping (what `load_topology` does after the YAML)."""
    try:
        topo = Topology.model_validate(raw)
    except ValidationError as exc:
        raise DinodistError(validation_error_line(exc)) from None
    _resolve(topo, check_paths)
    check_topology(topo)
    return topo


def discover_device() -> str:
    """`cluster.device: auto`: the GPU kind NVML reports on this machine, `cpu` without NVML or GPUs."""
    from dinodist.orchestrator.gpu import discover  # NVML is only touched when a topology asks for it

    gpus = discover()
    if not gpus:
        return "cpu"
    name = gpus[0].name
    for kind in ("h200", "h100", "a100"):
        if kind in name.lower():
            return kind
    raise DinodistError(
        f"cluster.device: auto found GPU {name!r} with no throughput default; "
        "set cluster.device and cluster.flops_per_device"
    )


def _resolve(topo: Topology, check_paths: bool) -> None:
    # Topology is strict but not frozen: resolution rewrites a few fields in place, once
    if topo.cluster.device == "auto":
        topo.cluster.device = discover_device()
    if topo.teacher.checkpoint is not None:
        ckpt = Path(topo.teacher.checkpoint).expanduser().resolve()
        if check_paths and not ckpt.is_file():
            raise DinodistError(f"teacher.checkpoint: file not found: {ckpt}")
        topo.teacher.checkpoint = str(ckpt)
    if topo.store is not None:
        topo.store.path = str(Path(topo.store.path).expanduser().resolve())
    topo.output = str(Path(topo.output).expanduser().resolve())


def warn_if_random_teacher(topo: Topology) -> None:
    """Loud warning for a teacher without checkpoint (random init): fine for tests, useless for users."""
    if topo.teacher.checkpoint is None:
        log.warning(
            "teacher.checkpoint is not set: the %s teacher is RANDOMLY INITIALISED; "
            "students will distill noise", topo.teacher.arch,
        )


def _arch(path: str, name: str, overrides: dict[str, Any]) -> ArchSpec:
    try:
        get_arch(name)
    except DinodistError as exc:
        raise DinodistError(f"{path}.arch: {exc}") from None
    try:
        return get_arch(name, **overrides)
    except (DinodistError, TypeError, ValueError) as exc:
        raise DinodistError(f"{path}.overrides: {exc}") from None


def check_topology(topo: Topology) -> None:
    """Cross-field rules pydantic cannot express per field; each error names its field path."""
    t_spec = _arch("teacher", topo.teacher.arch, topo.teacher.overrides)
    g = topo.train.global_batch_size
    if not topo.students:
        raise DinodistError("students: at least one student is required")
    if not _NAME_RE.match(topo.name):
        raise DinodistError(f"name: {topo.name!r} must be letters, digits, '_', '.', '-'")

    if topo.resolved_backend() == "nccl" and topo.cluster.device == "cpu":
        raise DinodistError("backend: nccl needs GPUs but cluster.device is cpu; use gloo")
    if topo.cluster.nodes > 1 and topo.control.secret_env is None:
        raise DinodistError(
            "control.secret_env: required when cluster.nodes > 1 (control messages cross nodes)"
        )

    d = topo.data
    for field, size in (("global_crop_size", d.global_crop_size), ("local_crop_size", d.local_crop_size)):
        if size % t_spec.patch_size:
            raise DinodistError(
                f"data.{field}: {size} is not a multiple of the teacher's patch size {t_spec.patch_size}"
            )
    lo, hi = d.mask_ratio
    if not 0 <= lo <= hi <= 1:
        raise DinodistError(f"data.mask_ratio: need 0 <= low <= high <= 1, got [{lo}, {hi}]")
    for field in ("global_crop_scale", "local_crop_scale"):
        lo, hi = getattr(d, field)
        if not 0 < lo <= hi <= 1:
            raise DinodistError(f"data.{field}: need 0 < low <= high <= 1, got [{lo:g}, {hi:g}]")
    kind, _, rest = d.source.partition(":")
    if kind not in ("skimage", "folder", "fashion-mnist") or (kind != "skimage" and not rest):
        raise DinodistError(
            f"data.source: {d.source!r} is not one of skimage, folder:PATH, fashion-mnist:DIR:train|test"
        )

    if topo.eval is not None:
        _check_eval(topo.eval, t_spec)

    tr = topo.train
    if tr.warmup_iterations > tr.iterations:
        raise DinodistError(
            f"train.warmup_iterations: {tr.warmup_iterations} exceeds train.iterations {tr.iterations}"
        )

    t_dino, t_ibot = topo.dino_head(), topo.ibot_head()
    seen: dict[str, int] = {}
    for i, s in enumerate(topo.students):
        where = f"students[{i}]"
        if not _NAME_RE.match(s.name) or s.name in _RESERVED_NAMES:
            raise DinodistError(
                f"{where}.name: {s.name!r} must be letters, digits, '_', '.', '-' and not 'teacher'"
            )
        if s.name in seen:
            raise DinodistError(
                f"{where}.name: duplicate student name {s.name!r} (also students[{seen[s.name]}])"
            )
        seen[s.name] = i
        spec = _arch(where, s.arch, s.overrides)
        if spec.patch_size != t_spec.patch_size:
            raise DinodistError(
                f"{where}.arch: patch size {spec.patch_size} of {s.arch} differs from the teacher's "
                f"{t_spec.patch_size} ({topo.teacher.arch}); targets are per patch"
            )
        s_dino, s_ibot = topo.student_heads(s.name)
        for head, mine, theirs in (("dino_head", s_dino, t_dino), ("ibot_head", s_ibot, t_ibot)):
            if mine.n_prototypes != theirs.n_prototypes:
                raise DinodistError(
                    f"{where}.{head}.n_prototypes: {mine.n_prototypes} differs from the teacher's "
                    f"{theirs.n_prototypes}"
                )
        merged = topo.student_train(s.name)
        if merged["lr_schedule"] == "cosine" and merged["lr_end"] > merged["lr"]:
            field = f"{where}.optim.lr_end" if s.optim.lr_end is not None else "train.lr_end"
            raise DinodistError(
                f"{field}: {merged['lr_end']:g} exceeds the lr {merged['lr']:g} it decays from ({s.name})"
            )
        if s.batch_per_rank is not None:
            if g % s.batch_per_rank:
                raise DinodistError(
                    f"{where}.batch_per_rank: {s.batch_per_rank} does not divide "
                    f"train.global_batch_size {g}"
                )
            implied = g // s.batch_per_rank
            if s.devices == "auto":
                s.devices = implied  # batch per rank pins the group size
            elif s.devices != implied:
                raise DinodistError(
                    f"{where}.batch_per_rank: {s.batch_per_rank} x devices {s.devices} != "
                    f"train.global_batch_size {g}"
                )

    fixed = [("teacher", topo.teacher.devices)] + [
        (f"students[{i}]", s.devices) for i, s in enumerate(topo.students)
    ]
    for where, n in fixed:
        if n == "auto":
            continue
        if tr.even_batches and g % n:
            raise DinodistError(
                f"{where}.devices: train.global_batch_size {g} is not divisible by {n} devices "
                "(every rank of a group takes the same share of the global batch; "
                "train.even_batches: false allows uneven shares)"
            )
        if n > g:
            raise DinodistError(
                f"{where}.devices: {n} devices exceed train.global_batch_size {g} (a rank would get no rows)"
            )
    n_fixed = sum(n for _, n in fixed if n != "auto")
    n_auto = sum(1 for _, n in fixed if n == "auto")
    total = topo.total_devices
    if n_fixed + n_auto > total:
        detail = f"{n_fixed} fixed" + (f" + at least 1 for each of {n_auto} auto groups" if n_auto else "")
        raise DinodistError(
            f"cluster: the groups need {detail} devices but the cluster has {total} "
            f"(cluster.nodes {topo.cluster.nodes} x cluster.devices_per_node {topo.cluster.devices_per_node})"
        )
    if n_auto == 0 and n_fixed < total:
        log.info("%d of %d devices are not used by any group", total - n_fixed, total)


def _check_eval(ev: Eval, t_spec: ArchSpec) -> None:
    """What can be checked without reading the data: spec syntax, a source known to be unlabelled, the
    image size. Whether a folder has class sub-folders is checked when the driver lists it
    (`eval_indexes`), at the latest by each rank at startup (core/eval/inloop.py:labelled_source)."""
    from dinodist.core.data.index import parse_spec

    for field in ("train", "test"):
        spec = getattr(ev.knn, field)
        try:
            kind = parse_spec(spec).kind
        except DinodistError as exc:
            raise DinodistError(f"eval.knn.{field}: {exc}") from None
        if kind == "skimage":
            raise DinodistError(f"eval.knn.{field}: skimage has no labels; k-NN needs a labelled "
                                "source (folder:PATH with one sub-folder per class, or "
                                "fashion-mnist:DIR:train|test)")
    size = ev.knn.image_size
    if size is not None and size % t_spec.patch_size:
        raise DinodistError(f"eval.knn.image_size: {size} is not a multiple of the patch size "
                            f"{t_spec.patch_size}")


def eval_image_size(topo: Topology) -> int:
    """`eval.knn.image_size`, or the global crop size the students train on when it is null."""
    if topo.eval is None:
        raise DinodistError("eval: not set")
    return topo.eval.knn.image_size or topo.data.global_crop_size


EVAL_INDEX_FILES = {"train": "eval-index-train.json", "test": "eval-index-test.json"}


def eval_indexes(topo: Topology, out_dir: str | Path) -> None:
    """The driver, before any rank starts: list each `eval.knn` source once into `<out>/eval-index-*.json`
    (the ranks read those instead of walking the tree) and refuse one without labels, in one line."""
    if topo.eval is None:
        return
    from dinodist.core.data.index import write_index

    for field, name in EVAL_INDEX_FILES.items():
        spec = getattr(topo.eval.knn, field)
        try:
            index = write_index(spec, Path(out_dir) / name)
        except DinodistError as exc:
            raise DinodistError(f"eval.knn.{field}: {exc}") from None
        if index["kind"] == "folder" and not index.get("classes"):
            raise DinodistError(f"eval.knn.{field}: {spec} has no labels: its images must sit in one "
                                "sub-folder per class (folder:PATH/CLASS/IMAGE)")


def check_runnable(topo: Topology) -> None:
    """Refuse settings that `plan` models but the runtime does not apply yet (one line each).

    `dinodist plan` accepts them. Everything that starts ranks (distill, add-student, deploy, the rank
    program itself) calls this first, so a plan never silently assumes what the run will not do.
    """
    for i, s in enumerate(topo.students):
        if s.shard != "fsdp":
            raise DinodistError(
                f"students[{i}].shard: {s.shard!r} is not applied by the runtime yet (every student group "
                "runs FSDP2); use fsdp"
            )
    check_failure_policy(topo.control.on_failure)


def check_failure_policy(policy: str) -> None:
    """The failure policies the supervisor implements (orchestrator/control.py)."""
    if policy not in ("stop", "restart_group"):
        raise DinodistError(f"control.on_failure: {policy!r} is not one of 'stop', 'restart_group'")
