"""The stage recipe: one pydantic model for pretrain / gram / highres, loaded from YAML with overrides.

A stage is a recipe over shared pieces; the three stages differ only in which loss terms are on, where the
student and the Gram teacher come from, and which crop resolutions are drawn. Unknown keys and wrong types
are one-line `DinodistError`s naming the dotted field and the file.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from dinodist.core.config import Overrides, apply_overrides, read_yaml_mapping, validation_error_line
from dinodist.core.errors import DinodistError
from dinodist.core.models.arch import ArchSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Schedule(_Strict):
    """See core.ssl.schedules for the shape. A bare number in YAML means a constant."""

    start: float = 0.0
    peak: float
    end: float | None = None
    warmup: int = Field(0, ge=0)
    warmup_shape: Literal["linear", "cosine"] = "linear"
    begin: int = Field(0, ge=0)
    decay: Literal["constant", "cosine"] = "constant"
    cooldown: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_number(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return {"start": float(v), "peak": float(v)}
        return v


class HeadConfig(_Strict):
    hidden_dim: int = Field(2048, gt=0)
    bottleneck_dim: int = Field(256, gt=0)
    n_prototypes: int = Field(65536, gt=0)
    nlayers: int = Field(3, ge=1)


class ModelConfig(_Strict):
    arch: str = "tiny-vits"
    overrides: dict[str, Any] = Field(default_factory=dict)  # ArchSpec fields, e.g. drop_path_rate
    dino_head: HeadConfig = HeadConfig(hidden_dim=256, bottleneck_dim=64, n_prototypes=1024)
    ibot_head: HeadConfig = HeadConfig(hidden_dim=256, bottleneck_dim=64, n_prototypes=1024)

    @field_validator("overrides")
    @classmethod
    def _typed_overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        # PyYAML reads `1e-5` (no dot) as a string; left as is it would reach torch as str and fail far from
        # the config, so every override is checked and coerced against the ArchSpec field's type here.
        hints = typing.get_type_hints(ArchSpec)
        allowed = sorted(f.name for f in dataclasses.fields(ArchSpec) if f.name != "name")
        out = {}
        for key, value in v.items():
            if key not in allowed:
                raise ValueError(f"unknown arch field {key!r}; allowed: {', '.join(allowed)}")
            try:
                out[key] = TypeAdapter(hints[key]).validate_python(value)
            except ValidationError:
                raise ValueError(f"{key}: {value!r} is not a valid {hints[key]}") from None
        return out


class Resolution(_Strict):
    global_size: int = Field(gt=0)
    local_size: int = Field(gt=0)
    gram_size: int | None = Field(None, gt=0)
    prob: float = Field(1.0, gt=0)


class CropsConfig(_Strict):
    global_size: int = Field(224, gt=0)
    local_size: int = Field(96, gt=0)
    n_local: int = Field(8, ge=0)
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    flips: bool = True
    gram_size: int | None = Field(None, gt=0)
    gram_no_distortions: bool = True
    # highres: one (global, local, gram) tuple drawn per iteration, the same on every rank
    resolutions: list[Resolution] = Field(default_factory=list)
    resolution_seed: int = 65537


class DataConfig(_Strict):
    source: str = "skimage"
    global_batch_size: int = Field(64, gt=0)
    # worker processes per rank building batches (0: a thread of the rank); see docs/data.md
    workers: int = Field(0, ge=0)
    prefetch: int = Field(2, ge=0)
    # crops travel as uint8 and are normalised on the device: 4x fewer host bytes and copy bandwidth
    uint8: bool = False
    mask_prob: float = Field(0.5, ge=0, le=1)
    mask_ratio: tuple[float, float] = (0.1, 0.5)


class OptimConfig(_Strict):
    lr: Schedule = Schedule(peak=1e-3)
    lr_scaling: Literal["none", "sqrt_wrt_1024"] = "none"
    weight_decay: Schedule = Schedule(start=0.04, peak=0.04)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layerwise_decay: float = Field(0.9, gt=0, le=1)
    patch_embed_lr_mult: float = Field(0.2, ge=0)
    clip_grad: float | None = Field(3.0, gt=0)
    freeze_last_layer_iters: int = Field(0, ge=0)


class LossConfig(_Strict):
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    koleo_distributed: bool = False
    koleo_group_size: int | None = Field(None, gt=0)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: Schedule = Schedule(start=0.04, peak=0.07, warmup=30)
    local_weight: Schedule = Schedule(start=1.0, peak=1.0)
    gram_weight: Schedule = Schedule(start=0.0, peak=0.0)
    ema_momentum: Schedule = Schedule(start=0.992, peak=0.992, end=1.0, decay="cosine")


class GramConfig(_Strict):
    checkpoint: str | None = None  # a run dir (its EMA teacher) or a teacher export .pth
    refresh_every: int | None = Field(None, gt=0)  # copy EMA teacher -> Gram teacher every N iterations...
    refresh_from: int = Field(0, ge=0)  # ...once (it+1) >= refresh_from...
    max_refreshes: int = Field(3, ge=0)  # ...at most this many times
    img_level: bool = True
    remove_neg: bool = False


class InitConfig(_Strict):
    # "continue": full training state of another run's latest checkpoint, iteration continues (gram stage);
    # "teacher": student backbone+heads = that run's EMA teacher (or an export), EMA = copy, iteration 0
    # (highres).
    checkpoint: str | None = None
    mode: Literal["continue", "teacher"] = "teacher"


class TrainConfig(_Strict):
    iterations: int = Field(100, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, gt=0)
    # The student backbone's blocks only, spelled as a topology's students[].activation_checkpointing:
    # true (full), false or selective (core/models/checkpointing.py). The EMA and Gram teachers run
    # without grad, so there is nothing of theirs to drop. The official 7B recipe: pretrain selective,
    # gram and highres full.
    activation_checkpointing: bool | Literal["selective"] = False
    # torch.compile each student block (after checkpointing, before FSDP); the first steps pay the compile
    compile: bool = False

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_value(cls, v: Any) -> Any:
        # pydantic alone would also take "yes", "on" or 1 for true: only the three spellings the
        # topology accepts, so one recipe reads the same in both files
        if v is True or v is False or v == "selective":
            return v
        raise ValueError(f"must be true, false or selective, got {v!r}")


class StageConfig(_Strict):
    stage: Literal["pretrain", "gram", "highres"] = "pretrain"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    crops: CropsConfig = CropsConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    gram: GramConfig = GramConfig()
    init: InitConfig = InitConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _consistent(self) -> StageConfig:
        if self.stage in ("gram", "highres") and not self.gram.checkpoint:
            raise ValueError(f"gram.checkpoint: required for stage {self.stage!r}")
        if self.loss.koleo_distributed and self.loss.koleo_group_size is None:
            raise ValueError("loss.koleo_group_size: required when loss.koleo_distributed is true")
        if self.stage == "highres" and not self.crops.resolutions:
            raise ValueError("crops.resolutions: stage 'highres' needs at least one resolution")
        return self


def config_from_dict(data: dict, source: str = "config", overrides: Overrides = None) -> StageConfig:
    """Validate a (possibly overridden) config tree; errors name the source and the dotted field."""
    if not isinstance(data, dict):
        raise DinodistError(f"{source}: expected a mapping at the top level")
    try:
        if overrides:
            # Overrides apply on top of the resolved tree, so `--set loss.teacher_temp.peak=x` keeps the rest
            # of that schedule instead of replacing it with defaults.
            base = StageConfig.model_validate(data).model_dump(mode="json")
            return StageConfig.model_validate(apply_overrides(base, overrides))
        return StageConfig.model_validate(data)
    except ValidationError as exc:
        raise DinodistError(validation_error_line(exc, source)) from None


def load_stage_config(path: str | Path, overrides: Overrides = None) -> StageConfig:
    return config_from_dict(read_yaml_mapping(path, "stage config", allow_empty=True), str(path), overrides)


def dump_config(cfg: StageConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
