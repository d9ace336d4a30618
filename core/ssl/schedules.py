"""Per-iteration values of the SSL hyper-parameters (lr, wd, EMA momentum, teacher temperature, loss weights).

Every schedule is a pure function of the absolute iteration, so a resumed run needs no schedule state and
all ranks agree without communicating. One shape covers the official recipes:

    value = start                                  before `begin`
          : warmup start -> peak (linear | cosine) over `warmup` iterations
          : then `peak` (decay="constant", optionally a cosine cooldown peak -> end over the last `cooldown`
            iterations of the run) or cosine peak -> end until the end of the run (decay="cosine").

A weight ramp ("1 until 1M, cosine to 0.5 by 1.001M") is `start=1, peak=0.5, begin=1_000_000, warmup=1000,
warmup_shape=cosine`.
"""

from __future__ import annotations

import math

from dinodist.core.ssl.config import Schedule


def _cosine(frac: float, a: float, b: float) -> float:
    """Half-cosine from a (frac=0) to b (frac=1)."""
    frac = min(max(frac, 0.0), 1.0)
    return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * frac))


def schedule_value(s: Schedule, iteration: int, total: int) -> float:
    """Value of schedule `s` at `iteration` of a run that ends at iteration `total` (exclusive)."""
    end = s.peak if s.end is None else s.end
    t = iteration - s.begin
    if t < 0:
        return s.start
    if t < s.warmup:
        frac = t / s.warmup
        if s.warmup_shape == "linear":
            return s.start + (s.peak - s.start) * frac
        return _cosine(frac, s.start, s.peak)
    after = t - s.warmup
    if s.decay == "cosine":
        span = max(total - s.begin - s.warmup, 1)
        return _cosine(after / span, s.peak, end)
    if s.cooldown > 0 and iteration >= total - s.cooldown:
        return _cosine((iteration - (total - s.cooldown)) / s.cooldown, s.peak, end)
    return s.peak


def scaled(s: Schedule, factor: float) -> Schedule:
    """The schedule with start/peak/end multiplied by `factor` (lr scaling rules)."""
    return s.model_copy(
        update={
            "start": s.start * factor,
            "peak": s.peak * factor,
            "end": None if s.end is None else s.end * factor,
        }
    )


def lr_scale_factor(rule: str, global_batch_size: int) -> float:
    """The official "sqrt_wrt_1024" rule multiplies the lr by 4*sqrt(global_batch/1024)."""
    if rule == "none":
        return 1.0
    return 4.0 * math.sqrt(global_batch_size / 1024.0)
