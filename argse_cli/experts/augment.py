"""Batched, device-resident data augmentation with PER-SAMPLE randomness.

Images are NCHW tensors [B, 3, H, W], uint8 (0..255) or float (0..1). Every random parameter
(crop offset, flip, op choice, sign, lambda, box) is drawn per sample from ``generator``; there is
no Python loop over samples (loops run over ops or over the n RandAugment rounds only).

- :func:`random_crop_flip`: ZERO padding by ``pad`` then a per-sample crop offset in [0, 2 pad]^2
  and a per-sample horizontal flip with probability ``flip_p`` (one flat ``gather``).
- :func:`rand_augment`: n rounds; each round every sample draws one op uniformly from
  :data:`RANDAUG_OPS` and a random sign; magnitude v = m / 30 (fixed, as in RandAugment).
- :func:`mixup` / :func:`cutmix`: per-sample lambda ~ Beta(alpha, alpha), one random permutation
  gives each sample its partner; cutmix boxes are per sample and lambda is reset to the real
  (clipped) box area: lambda = 1 - box_area / (H W). Soft targets q = lambda y + (1 - lambda) y_partner.
- :data:`AUG_PRESETS` and :func:`apply_augment`; the "plan" preset = crop/flip + RandAugment(2, 10)
  + for EACH SAMPLE independently (p = 1/2) mixup(0.2) or cutmix(0.2), with a shared partner
  permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AUG_PRESETS",
    "RANDAUG_OPS",
    "AugPreset",
    "apply_augment",
    "cutmix",
    "mixup",
    "rand_augment",
    "random_crop_flip",
    "sample_beta",
]


# ----------------------------------------------------------------------------- random helpers
def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(shape, generator, device) -> torch.Tensor:
    """U[0, 1) float32 drawn on the generator's device, then moved to ``device``."""
    return torch.rand(shape, generator=generator, device=_gen_device(generator)).to(device)


def _randn(shape, generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=_gen_device(generator)).to(device)


def _randint(high: int, shape, generator, device) -> torch.Tensor:
    g = _gen_device(generator)
    return torch.randint(0, high, shape, generator=generator, device=g).to(device)


def _randperm(n: int, generator, device) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=_gen_device(generator)).to(device)


def _sample_gamma_ge1(a: float, n: int, generator, device, rounds: int = 16) -> torch.Tensor:
    """Gamma(a, 1) for a >= 1 by Marsaglia-Tsang, vectorised: ``rounds`` proposals per sample,
    the first accepted one is kept (acceptance >= 0.95 per proposal, so all-rejected ~ 1e-20;
    then the mode d is used)."""
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    x = _randn((rounds, n), generator, device)
    u = _rand((rounds, n), generator, device)
    v = (1.0 + c * x) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30)))
    first = torch.argmax(ok.to(torch.uint8), dim=0)  # index of the first accepted proposal
    any_ok = ok.any(dim=0)
    val = (d * v).gather(0, first[None]).squeeze(0)
    return torch.where(any_ok, val, torch.full_like(val, d))


def sample_beta(alpha: float, n: int, generator=None, device="cpu") -> torch.Tensor:
    """n draws of Beta(alpha, alpha) = G1 / (G1 + G2), G ~ Gamma(alpha); Gamma(alpha < 1) uses
    Gamma(alpha + 1) * U^(1 / alpha). Uses only ``generator`` (reproducible), float32 in (0, 1)."""
    if not alpha > 0:
        raise ValueError(f"Beta alpha must be > 0, got {alpha}")
    a = float(alpha)
    g = _sample_gamma_ge1(a + 1.0 if a < 1 else a, 2 * n, generator, device)
    if a < 1:
        u = _rand((2 * n,), generator, device).clamp_min(1e-12)
        g = g * u ** (1.0 / a)
    g = g.clamp_min(1e-30)
    lam = g[:n] / (g[:n] + g[n:])
    return lam.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- crop / flip
def random_crop_flip(
    x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None, flip_p: float = 0.5
) -> torch.Tensor:
    """Per-sample random crop after ZERO padding (offsets in [0, 2 pad]) and per-sample
    horizontal flip with probability ``flip_p``. Same shape and dtype as ``x``."""
    B, C, H, W = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    Hp, Wp = H + 2 * pad, W + 2 * pad
    oy = _randint(2 * pad + 1, (B,), generator, dev)
    ox = _randint(2 * pad + 1, (B,), generator, dev)
    flip = _rand((B,), generator, dev) < flip_p
    rows = oy[:, None] + torch.arange(H, device=dev)[None]  # [B, H]
    cols = ox[:, None] + torch.arange(W, device=dev)[None]  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx = (rows[:, :, None] * Wp + cols[:, None, :]).reshape(B, 1, H * W).expand(B, C, H * W)
    out = xp.reshape(B, C, Hp * Wp).gather(2, idx)
    return out.reshape(B, C, H, W)


# ----------------------------------------------------------------------------- RandAugment ops
# Every op takes float images in [0, 1] of shape [b, 3, H, W] and a per-sample factor f [b]
# (already signed and scaled by the magnitude) and returns images in [0, 1].
def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma [b, 1, H, W]."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """b + f (a - b), clamped: f = 1 keeps a, f = 0 gives b."""
    return (b + f.view(-1, 1, 1, 1) * (a - b)).clamp(0.0, 1.0)


def _op_identity(x, s):
    return x


def _op_brightness(x, s):
    return _blend(x, torch.zeros_like(x), 1.0 + 0.9 * s)


def _op_contrast(x, s):
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    return _blend(x, mean, 1.0 + 0.9 * s)


def _op_color(x, s):
    return _blend(x, _gray(x).expand_as(x), 1.0 + 0.9 * s)


def _op_sharpness(x, s):
    """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13, replicate border)."""
    sum9 = 9.0 * F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return _blend(x, (sum9 + 4.0 * x) / 13.0, 1.0 + 0.9 * s)


def _op_posterize(x, s):
    bits = (8 - torch.round(4 * s.abs())).clamp(4, 8).to(torch.int32)  # keep `bits` high bits
    mask = (255 - (2 ** (8 - bits) - 1)).view(-1, 1, 1, 1)
    q = torch.round(x * 255).to(torch.int32)
    return (q & mask).to(x.dtype) / 255.0


def _op_solarize(x, s):
    thr = (1.0 - s.abs()).view(-1, 1, 1, 1)  # v = 1 inverts every pixel, v = 0 none
    return torch.where(x >= thr, 1.0 - x, x)


def _op_autocontrast(x, s):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x).clamp(0.0, 1.0)


def _op_equalize_lite(x, s):
    """Per-channel histogram equalisation on 256 levels q: q -> (cdf(q) - cdf(q_min)) /
    (HW - cdf(q_min)), cdf(q) = #pixels with level <= q; constant channels are left unchanged."""
    b, c, h, w = x.shape
    q = torch.round(x.reshape(b * c, h * w) * 255.0).clamp(0, 255).long()
    hist = torch.zeros(b * c, 256, device=x.device, dtype=x.dtype)
    hist.scatter_add_(1, q, torch.ones_like(q, dtype=x.dtype))
    cdf = hist.cumsum(dim=1)
    cdf_min = cdf.gather(1, q.amin(dim=1, keepdim=True))
    den = float(h * w) - cdf_min
    eq = torch.where(den > 0, (cdf.gather(1, q) - cdf_min) / den.clamp_min(1.0), q / 255.0)
    return eq.clamp(0.0, 1.0).reshape(b, c, h, w)


# Geometric ops: per-sample 2x3 affine matrices (output -> input, normalised coords).
def _theta_rotate(s):
    a = torch.deg2rad(30.0 * s)
    cos, sin, z = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    return torch.stack([torch.stack([cos, -sin, z], 1), torch.stack([sin, cos, z], 1)], 1)


def _theta_shear(s, axis):
    one, z, sh = torch.ones_like(s), torch.zeros_like(s), 0.3 * s
    if axis == 0:
        return torch.stack([torch.stack([one, sh, z], 1), torch.stack([z, one, z], 1)], 1)
    return torch.stack([torch.stack([one, z, z], 1), torch.stack([sh, one, z], 1)], 1)


def _theta_translate(s, axis):
    one, z, t = torch.ones_like(s), torch.zeros_like(s), 2.0 * 0.45 * s  # up to 45% of the side
    if axis == 0:
        return torch.stack([torch.stack([one, z, t], 1), torch.stack([z, one, z], 1)], 1)
    return torch.stack([torch.stack([one, z, z], 1), torch.stack([z, one, t], 1)], 1)


_PIXEL_OPS = {
    "identity": _op_identity,
    "brightness": _op_brightness,
    "contrast": _op_contrast,
    "color": _op_color,
    "sharpness": _op_sharpness,
    "posterize": _op_posterize,
    "solarize": _op_solarize,
    "autocontrast": _op_autocontrast,
    "equalize": _op_equalize_lite,
}
_GEOM_OPS = {
    "rotate": _theta_rotate,
    "shear_x": lambda s: _theta_shear(s, 0),
    "shear_y": lambda s: _theta_shear(s, 1),
    "translate_x": lambda s: _theta_translate(s, 0),
    "translate_y": lambda s: _theta_translate(s, 1),
}
RANDAUG_OPS: tuple[str, ...] = tuple(_PIXEL_OPS) + tuple(_GEOM_OPS)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rand_augment(
    x: torch.Tensor, n: int = 2, m: float = 10, generator: torch.Generator | None = None
) -> torch.Tensor:
    """RandAugment(n, m): n rounds; in each, every sample applies one op drawn uniformly from
    :data:`RANDAUG_OPS` with signed magnitude s = +-m/30 (sign per sample). Ops are computed on
    the subset of samples that drew them. Same shape and dtype as ``x`` (uint8 in -> uint8 out)."""
    B = x.shape[0]
    dev = x.device
    is_int = not x.is_floating_point()
    y = x.float() / 255.0 if is_int else x.float()
    v = float(m) / 30.0
    names = RANDAUG_OPS
    n_geom_start = len(_PIXEL_OPS)
    for _ in range(n):
        op = _randint(len(names), (B,), generator, dev)
        sign = torch.where(_rand((B,), generator, dev) < 0.5, -1.0, 1.0)
        s = sign * v
        out = y.clone()
        for k in range(1, n_geom_start):  # 0 = identity
            sel = (op == k).nonzero().squeeze(1)
            if sel.numel():
                out[sel] = _PIXEL_OPS[names[k]](y[sel], s[sel])
        sel = (op >= n_geom_start).nonzero().squeeze(1)
        if sel.numel():
            ops_sel, s_sel = op[sel], s[sel]
            theta = torch.zeros(sel.numel(), 2, 3, device=dev)
            for k in range(n_geom_start, len(names)):
                mk = ops_sel == k
                theta = torch.where(mk[:, None, None], _GEOM_OPS[names[k]](s_sel), theta)
            out[sel] = _affine(y[sel], theta)
        y = out
    if is_int:
        return (y * 255.0).round().clamp(0, 255).to(x.dtype)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- mixup / cutmix
def _as_float01(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if not x.is_floating_point() else x


def _mix_targets(y: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    y = y.float()
    return lam[:, None] * y + (1.0 - lam[:, None]) * y[perm]


def _cutmix_mask(B, H, W, lam, generator, dev):
    """Per-sample boxes of side ratio sqrt(1 - lam), uniform centre, clipped to the image;
    returns (mask [B, 1, H, W] bool, lam_adjusted = 1 - area / (H W))."""
    r = torch.sqrt(1.0 - lam)
    ch, cw = (H * r).floor(), (W * r).floor()
    cy = (_rand((B,), generator, dev) * H).floor()
    cx = (_rand((B,), generator, dev) * W).floor()
    y1, y2 = (cy - ch / 2).floor().clamp(0, H), (cy + ch / 2).floor().clamp(0, H)
    x1, x2 = (cx - cw / 2).floor().clamp(0, W), (cx + cw / 2).floor().clamp(0, W)
    hh = torch.arange(H, device=dev, dtype=torch.float32)[None, :, None]
    ww = torch.arange(W, device=dev, dtype=torch.float32)[None, None, :]
    inside = (
        (hh >= y1[:, None, None])
        & (hh < y2[:, None, None])
        & (ww >= x1[:, None, None])
        & (ww < x2[:, None, None])
    )
    lam_adj = 1.0 - (y2 - y1) * (x2 - x1) / float(H * W)
    return inside[:, None], lam_adj


def mixup(x, y_onehot, alpha: float = 0.2, generator=None, perm=None):
    """x_i <- lam_i x_i + (1 - lam_i) x_perm(i), lam_i ~ Beta(alpha, alpha) per sample.
    Returns (float32 images in [0, 1] for uint8 input / input scale for float, soft targets)."""
    B, dev = x.shape[0], x.device
    xf = _as_float01(x)
    perm = _randperm(B, generator, dev) if perm is None else perm
    lam = sample_beta(alpha, B, generator, dev)
    l4 = lam.view(-1, 1, 1, 1).to(xf.dtype)
    return l4 * xf + (1.0 - l4) * xf[perm], _mix_targets(y_onehot, perm, lam)


def cutmix(x, y_onehot, alpha: float = 0.2, generator=None, perm=None):
    """Paste a per-sample box of x_perm(i) into x_i; box area ratio ~ 1 - lam_i with
    lam_i ~ Beta(alpha, alpha); lam_i is then set to the real clipped box: 1 - area / (H W)."""
    B, _, H, W = x.shape
    dev = x.device
    xf = _as_float01(x)
    perm = _randperm(B, generator, dev) if perm is None else perm
    lam = sample_beta(alpha, B, generator, dev)
    inside, lam_adj = _cutmix_mask(B, H, W, lam, generator, dev)
    return torch.where(inside, xf[perm], xf), _mix_targets(y_onehot, perm, lam_adj)


# ----------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class AugPreset:
    """crop_flip: pad-4 zero-pad crop + flip; randaug: (n, m) or None; mixup/cutmix alpha (0 = off).
    With both alphas > 0 each SAMPLE independently uses mixup or cutmix with probability 1/2."""

    crop_flip: bool = True
    randaug: tuple[int, int] | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


AUG_PRESETS: dict[str, AugPreset] = {
    "cropflip": AugPreset(crop_flip=True),
    "plan": AugPreset(crop_flip=True, randaug=(2, 10), mixup_alpha=0.2, cutmix_alpha=0.2),
    "none": AugPreset(crop_flip=False),
}


def apply_augment(x_uint8, y, preset: str | AugPreset, num_classes: int, gen=None):
    """Augment a uint8 NCHW batch on its device.

    Returns (x float32 in [0, 1], targets): targets are the int labels ``y`` when the preset does
    no mixing, else float32 soft targets [B, num_classes] whose rows sum to 1."""
    if isinstance(preset, str) and preset not in AUG_PRESETS:
        raise ValueError(
            f"unknown augmentation preset {preset!r}; expected one of {list(AUG_PRESETS)}"
        )
    p = AUG_PRESETS[preset] if isinstance(preset, str) else preset
    x = x_uint8
    if p.crop_flip:
        x = random_crop_flip(x, 4, gen)
    if p.randaug is not None:
        x = rand_augment(x, p.randaug[0], p.randaug[1], gen)
    if p.mixup_alpha <= 0 and p.cutmix_alpha <= 0:
        return _as_float01(x).float(), y
    B, dev = x.shape[0], x.device
    y1 = F.one_hot(y.long(), num_classes).float()
    perm = _randperm(B, gen, dev)
    if p.cutmix_alpha <= 0:
        return mixup(x, y1, p.mixup_alpha, gen, perm)
    if p.mixup_alpha <= 0:
        return cutmix(x, y1, p.cutmix_alpha, gen, perm)
    xm, ym = mixup(x, y1, p.mixup_alpha, gen, perm)
    xc, yc = cutmix(x, y1, p.cutmix_alpha, gen, perm)
    use_cut = _rand((B,), gen, dev) < 0.5
    return torch.where(use_cut[:, None, None, None], xc, xm), torch.where(use_cut[:, None], yc, ym)
