"""iBOT masks for the global crops, a pure function of (sample_id, sample_seed, crop index).

Departure from the official collate, on purpose: the official draws, per local batch, evenly spread
ratios `linspace(0.1, 0.5)` for half of the 2B crops and shuffles them. That couples a sample's mask to
the other samples of the batch, so two groups that split the global batch differently would disagree.
Here each (sample, global crop) is masked with probability `mask_prob` and, if so, with a ratio drawn
uniformly in `ratio`: the marginal distribution of masked ratios is the same, and any group derives the
mask from (id, seed) alone. The block shapes follow the official (BEiT) MaskingGenerator.

Randomness comes from Python's `random.Random` (Mersenne Twister, seeded with an int63): its
`random()`, `uniform()` and `randrange()` streams are stable across platforms and Python 3 versions,
and it is an order of magnitude faster than a torch.Generator for these scalar draws.
"""

from __future__ import annotations

import math
import random

import torch

from dinodist.core.data.sampler import derive_seed
from dinodist.core.errors import DinodistError

_TAG_MASK = 0x6D61736B  # keeps mask streams apart from the crop streams of the same (id, seed, crop)
MIN_BOX_PATCHES = 4
BOX_ASPECT = (0.3, 1 / 0.3)
BOX_TRIES = 10


def _add_box(mask: list[list[bool]], h: int, w: int, max_patches: int, rng: random.Random) -> int:
    """Try up to 10 random boxes; mask the first that adds 1..max_patches new patches. Returns how many."""
    log_lo, log_hi = math.log(BOX_ASPECT[0]), math.log(BOX_ASPECT[1])
    for _ in range(BOX_TRIES):
        area = rng.uniform(MIN_BOX_PATCHES, max_patches)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        bh = int(round(math.sqrt(area * aspect)))
        bw = int(round(math.sqrt(area / aspect)))
        if bw < w and bh < h:
            top = rng.randrange(0, h - bh + 1)
            left = rng.randrange(0, w - bw + 1)
            already = sum(mask[r][c] for r in range(top, top + bh) for c in range(left, left + bw))
            new = bh * bw - already
            if 0 < new <= max_patches:
                for r in range(top, top + bh):
                    row = mask[r]
                    for c in range(left, left + bw):
                        row[c] = True
                return new
    return 0


def block_mask(grid_hw: tuple[int, int], n_masked: int, rng: random.Random) -> torch.Tensor:
    """Exactly `n_masked` masked patches on an h x w grid, row-major bool [h*w].

    Blocks (area U(4, remaining), aspect log-uniform in [0.3, 1/0.3], at most P/2 per block) are placed
    until one fails to fit in 10 tries; the rest are random single patches.
    """
    h, w = grid_hw
    total = h * w
    if not 0 <= n_masked <= total:
        raise DinodistError(f"masking: cannot mask {n_masked} of {total} patches")
    max_block = max(1, int(0.5 * total))
    mask = [[False] * w for _ in range(h)]
    count = 0
    while count < n_masked:
        added = _add_box(mask, h, w, min(n_masked - count, max_block), rng)
        if added == 0:
            break
        count += added
    flat = [v for row in mask for v in row]
    if count < n_masked:
        free = [i for i, v in enumerate(flat) if not v]
        for i in rng.sample(free, n_masked - count):
            flat[i] = True
    return torch.tensor(flat, dtype=torch.bool)


def sample_masks(
    sample_ids,
    seeds,
    grid_hw: tuple[int, int],
    mask_prob: float = 0.5,
    ratio: tuple[float, float] = (0.1, 0.5),
) -> torch.Tensor:
    """Bool masks [B, 2, h*w] for the two global crops of each sample.

    Crop c of sample (id, seed) is masked with probability `mask_prob`; then `int(P * r)` patches
    with r ~ U(ratio) are masked block-wise (see `block_mask`). Unmasked crops are all False.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise DinodistError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if not 0.0 <= ratio[0] <= ratio[1] <= 1.0:
        raise DinodistError(f"mask_ratio must be an increasing pair in [0, 1], got {tuple(ratio)}")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if h <= 0 or w <= 0:
        raise DinodistError(f"masking grid must be positive, got {grid_hw}")
    ids = sample_ids.tolist() if torch.is_tensor(sample_ids) else list(sample_ids)
    sds = seeds.tolist() if torch.is_tensor(seeds) else list(seeds)
    if len(ids) != len(sds):
        raise DinodistError(f"sample_masks: {len(ids)} sample_ids but {len(sds)} seeds")
    total = h * w
    out = torch.zeros(len(ids), 2, total, dtype=torch.bool)
    for b, (sid, sd) in enumerate(zip(ids, sds)):
        for c in range(2):
            rng = random.Random(derive_seed(int(sid), int(sd), c, _TAG_MASK))
            if rng.random() >= mask_prob:
                continue
            n = int(total * rng.uniform(ratio[0], ratio[1]))
            out[b, c] = block_mask((h, w), n, rng)
    return out
