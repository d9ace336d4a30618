"""DINOv3 multi-crop augmentation, deterministic per sample and batched over crops.

Each crop draws its random parameters from its own `torch.Generator`, seeded from
`(sample_id, sample_seed, crop_index)`, so any process recomputes the same pixels and the global crops
do not change when `n_local` does. Parameters are drawn first (cheap scalar work); the pixel work is
then batched: one antialiased bicubic resize per crop box, and every colour/blur/solarize/normalise
step as one tensor op over all crops of the same size.

Official recipe: RandomResizedCrop (bicubic) + horizontal flip; ColorJitter(.4, .4, .2, .1)
with p .8 in a random op order; grayscale p .2; Gaussian blur (kernel 9, sigma U(.1, 2)) with the
*effective* probabilities of the official code (global#1 0, global#2 .9, local .5: the official wraps
blur with an inverted RandomApply); solarize (threshold 128) p .2 on global#2 only; ImageNet normalise.
Gram crops share the global crop's box and flip and, by default, skip the photometric distortions.
Departure: each crop is resized straight from the source box to its output size, where the official
resizes the box to max(global, gram) first and the global crop again from there.

`make_crops(..., uint8=True)` stops before the normalisation and rounds to uint8, so a loader ships a
quarter of the bytes and the training device normalises (core/data/device.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinodist.core.data.sampler import derive_seed
from dinodist.core.errors import DinodistError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
BLUR_KERNEL = 9
_N_UNIFORMS = 10  # fixed number of draws per crop, so one parameter's use never shifts another's stream


@dataclass(frozen=True)
class CropConfig:
    """Multi-crop recipe; defaults are the official DINOv3 ones (224/96, 8 local crops)."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flips: bool = True
    gram_size: int | None = None
    gram_no_distortions: bool = True
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob_global1: float = 0.0
    blur_prob_global2: float = 0.9
    blur_prob_local: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob_global2: float = 0.2
    solarize_threshold: float = 128 / 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def validate(self) -> CropConfig:
        for field in ("global_size", "local_size"):
            if getattr(self, field) <= 0:
                raise DinodistError(f"crops.{field} must be positive, got {getattr(self, field)}")
        if self.n_local < 0:
            raise DinodistError(f"crops.n_local must be >= 0, got {self.n_local}")
        if self.gram_size is not None and self.gram_size <= 0:
            raise DinodistError(f"crops.gram_size must be positive or null, got {self.gram_size}")
        for field in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, field)
            if not 0 < lo <= hi:
                raise DinodistError(f"crops.{field} must be an increasing positive pair, got {(lo, hi)}")
        if self.global_scale[1] > 1 or self.local_scale[1] > 1:
            raise DinodistError("crops.global_scale/local_scale must not exceed 1")
        return self


@dataclass
class CropParams:
    """Every random choice for one crop (drawn before any pixel is touched)."""

    box: tuple[int, int, int, int]  # top, left, height, width in source pixels
    flip: bool
    jitter: bool
    factors: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    order: tuple[int, int, int, int]  # ColorJitter op order (0 b, 1 c, 2 s, 3 h)
    gray: bool
    blur: bool
    sigma: float
    solarize: bool


def _rrc_box(height: int, width: int, scale, ratio, gen: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params: 10 tries at a random area and log-uniform aspect, then a centre crop."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_params(
    height: int, width: int, sample_id: int, seed: int, crop_index: int, cfg: CropConfig
) -> CropParams:
    """Random parameters of crop `crop_index` (0, 1 global; 2.. local) of one sample."""
    gen = torch.Generator().manual_seed(derive_seed(sample_id, seed, crop_index))
    u = torch.rand(_N_UNIFORMS, generator=gen, dtype=torch.float64).tolist()
    order = tuple(torch.randperm(4, generator=gen).tolist())
    is_global = crop_index < 2
    if crop_index == 0:
        p_blur, p_sol = cfg.blur_prob_global1, 0.0
    elif crop_index == 1:
        p_blur, p_sol = cfg.blur_prob_global2, cfg.solarize_prob_global2
    else:
        p_blur, p_sol = cfg.blur_prob_local, 0.0
    scale = cfg.global_scale if is_global else cfg.local_scale
    box = _rrc_box(height, width, scale, cfg.ratio, gen)
    factors = (
        1 + cfg.brightness * (2 * u[2] - 1),
        1 + cfg.contrast * (2 * u[3] - 1),
        1 + cfg.saturation * (2 * u[4] - 1),
        cfg.hue * (2 * u[5] - 1),
    )
    s_lo, s_hi = cfg.blur_sigma
    return CropParams(
        box=box,
        flip=cfg.flips and u[0] < 0.5,
        jitter=u[1] < cfg.jitter_prob,
        factors=factors,
        order=order,
        gray=u[6] < cfg.grayscale_prob,
        blur=u[7] < p_blur,
        sigma=s_lo + (s_hi - s_lo) * u[8],
        solarize=u[9] < p_sol,
    )


def _resize_box_uint8(img: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """Crop `box` of a uint8 [3,H,W] image, resize to size x size (bicubic, antialiased), still uint8.

    The resize runs on uint8 channels-last: torch's kernel for that case follows Pillow's bicubic
    (a = -0.5, rounded to uint8), i.e. what the official torchvision-on-PIL pipeline computes, and it
    is ~3x faster than the float path.
    """
    top, left, h, w = box
    patch = img[:, top : top + h, left : left + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
    out = F.interpolate(patch, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    out = out[0].contiguous()
    return out.flip(-1) if flip else out


def _resize_box(img: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """`_resize_box_uint8` as float in [0, 1]."""
    return _resize_box_uint8(img, box, flip, size).float().div_(255.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = x.new_tensor(_GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _view(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _adjust_brightness(x, f):
    return (x * _view(f)).clamp_(0, 1)


def _adjust_contrast(x, f):
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (x * _view(f) + mean * (1 - _view(f))).clamp_(0, 1)


def _adjust_saturation(x, f):
    return (x * _view(f) + _gray(x) * (1 - _view(f))).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    delta = maxc - minc
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), (h / 6.0) % 1.0)
    return torch.stack((h, s, maxc), 1)


_HSV_OFFSETS = (5.0, 3.0, 1.0)  # r, g, b


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    # Closed form c = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6: all three channels in
    # one broadcast expression, no per-sector gather.
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    k = (x.new_tensor(_HSV_OFFSETS).view(1, 3, 1, 1) + h * 6.0) % 6.0
    return v - (v * s) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _adjust_hue(x, f):
    hsv = _rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + _view(f)[:, 0]) % 1.0
    return _hsv_to_rgb(hsv).clamp_(0, 1)


_JITTER_OPS = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, kernel 9, reflect padding, one sigma per image: one grouped conv per axis."""
    n, c, h, w = x.shape
    half = BLUR_KERNEL // 2
    t = torch.linspace(-half, half, BLUR_KERNEL, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, K]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), k.view(n * c, 1, 1, BLUR_KERNEL), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), k.view(n * c, 1, BLUR_KERNEL, 1), groups=n * c)
    return y.view(n, c, h, w)


def distort(x: torch.Tensor, params: list[CropParams], solarize_threshold: float = 128 / 255) -> torch.Tensor:
    """Photometric augmentations on a batch [N,3,S,S] in [0,1], one `CropParams` per image.

    Each step runs once on the sub-batch of images that apply it, so the cost does not grow with N
    by more than the pixels actually touched.
    """
    x = x.clone()
    jit = torch.tensor([p.jitter for p in params])
    factors = torch.tensor([p.factors for p in params], dtype=x.dtype)
    orders = torch.tensor([p.order for p in params])
    for step in range(4):
        for op in range(4):
            sel = (jit & (orders[:, step] == op)).nonzero().flatten()
            if sel.numel():
                x[sel] = _JITTER_OPS[op](x[sel], factors[sel, op])
    sel = torch.tensor([p.gray for p in params]).nonzero().flatten()
    if sel.numel():
        x[sel] = _gray(x[sel]).expand(-1, 3, -1, -1)
    sel = torch.tensor([p.blur for p in params]).nonzero().flatten()
    if sel.numel() and x.shape[-1] > BLUR_KERNEL // 2 and x.shape[-2] > BLUR_KERNEL // 2:
        sigma = torch.tensor([params[i].sigma for i in sel.tolist()], dtype=x.dtype)
        x[sel] = _gaussian_blur(x[sel], sigma)
    sel = torch.tensor([p.solarize for p in params]).nonzero().flatten()
    if sel.numel():
        xs = x[sel]
        x[sel] = torch.where(xs >= solarize_threshold, 1.0 - xs, xs)
    return x


def normalize(x: torch.Tensor, cfg: CropConfig) -> torch.Tensor:
    """ImageNet normalisation, in place."""
    mean = x.new_tensor(cfg.mean).view(1, 3, 1, 1)
    std = x.new_tensor(cfg.std).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float crops -> uint8: the nearest of the 256 steps (round half to even)."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def make_crops(
    images: list[torch.Tensor], sample_ids, seeds, cfg: CropConfig, uint8: bool = False
) -> dict[str, torch.Tensor]:
    """Multi-crop views of a batch of uint8 [3,H,W] images.

    Returns float32, ImageNet-normalised `global [B,2,3,G,G]`, `local [B,n,3,L,L]` and, when
    `cfg.gram_size` is set, `gram [B,2,3,g,g]` (same box and flip as the matching global crop).
    Pixels depend only on (image, sample_id, seed, cfg).

    `uint8=True`: the same crops before normalisation, rounded to uint8 (`quantize`), for
    `core.data.device.normalize_uint8` to normalise on the training device. Undistorted Gram crops are
    the resize's own uint8 output, so they normalise to exactly the float path's values.
    """
    cfg.validate()
    ids = [int(i) for i in (sample_ids.tolist() if torch.is_tensor(sample_ids) else sample_ids)]
    sds = [int(s) for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
    if not (len(images) == len(ids) == len(sds)):
        raise DinodistError(f"make_crops: {len(images)} images, {len(ids)} sample_ids, {len(sds)} seeds")
    b, n_local = len(images), cfg.n_local
    g_params: list[CropParams] = []
    l_params: list[CropParams] = []
    g_pix, l_pix, gram_pix = [], [], []
    gram_raw = uint8 and cfg.gram_no_distortions  # nothing happens to them between resize and normalise
    for img, sid, sd in zip(images, ids, sds):
        if img.dim() != 3 or img.shape[0] != 3 or img.dtype != torch.uint8:
            raise DinodistError(f"make_crops: sample {sid} is not a uint8 [3,H,W] image ({tuple(img.shape)})")
        h, w = img.shape[1:]
        for c in range(2 + n_local):
            p = draw_params(h, w, sid, sd, c, cfg)
            if c < 2:
                g_params.append(p)
                g_pix.append(_resize_box(img, p.box, p.flip, cfg.global_size))
                if cfg.gram_size is not None:
                    resize = _resize_box_uint8 if gram_raw else _resize_box
                    gram_pix.append(resize(img, p.box, p.flip, cfg.gram_size))
            else:
                l_params.append(p)
                l_pix.append(_resize_box(img, p.box, p.flip, cfg.local_size))
    finish = quantize if uint8 else (lambda x: normalize(x, cfg))
    gs, ls = cfg.global_size, cfg.local_size
    thr = cfg.solarize_threshold
    out = {"global": finish(distort(torch.stack(g_pix), g_params, thr)).view(b, 2, 3, gs, gs)}
    if n_local:
        local = finish(distort(torch.stack(l_pix), l_params, thr))
        out["local"] = local.view(b, n_local, 3, ls, ls)
    else:
        out["local"] = torch.empty(b, 0, 3, ls, ls, dtype=torch.uint8 if uint8 else torch.float32)
    if cfg.gram_size is not None:
        gram = torch.stack(gram_pix)
        if not cfg.gram_no_distortions:
            gram = distort(gram, g_params, cfg.solarize_threshold)
        out["gram"] = (gram if gram_raw else finish(gram)).view(b, 2, 3, cfg.gram_size, cfg.gram_size)
    return out
