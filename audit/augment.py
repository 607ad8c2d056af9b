"""Image tensors and the augmentation families the audit plants and trains on.

All functions work on float32 tensors ``N×C×H×W`` in ``[0, 1]`` (``to_tensor`` makes them
from uint8 arrays) and take a ``torch.Generator`` so that every plant is reproducible. The
generator is a CPU one: random draws are made on the CPU and moved to the images' device, so
a plant is the same on a GPU as on the CPU.

Families (the contract of issue 5):

* ``exact``: the training image itself.
* ``mild``: a horizontal or vertical flip, an integer shift of up to 2 px, brightness
  ×0.9–1.1 and Gaussian noise σ = 0.02 (all four, composed).
* ``hard``: an 80 % crop at a random position resized back, a rotation of up to ±10° and a
  3×3 Gaussian blur (σ = 0.8) (all three, composed).

Single transforms (``flip``, ``shift``, ``noise``, ``brightness``, ``crop``, ``rotate``,
``blur``) are available for per-transform breakdowns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

FAMILIES = ("exact", "mild", "hard")
SINGLE_TRANSFORMS = ("flip", "shift", "noise", "brightness", "crop", "rotate", "blur")


# --------------------------------------------------------------------------- conversion


def as_hwc(img: np.ndarray) -> np.ndarray:
    """One uint8 image as H×W×C (grey gets C = 1)."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an H×W or H×W×C image, got shape {a.shape}")
    if a.shape[2] == 4:
        a = a[:, :, :3]
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    return a


def to_tensor(images: Sequence[np.ndarray] | np.ndarray, *, size: int | None = None,
              channels: int | None = None) -> torch.Tensor:
    """uint8 images (a list, or an N×H×W[×C] array) -> float32 N×C×S×S in [0, 1].

    Images are resized (bilinear, antialiased) to ``size`` (default: the first image's
    height) and converted to ``channels`` (grey -> RGB by repetition, RGB -> grey by the
    ITU-R 601 luma) so that images of any source can be compared.
    """
    if isinstance(images, np.ndarray) and images.ndim in (3, 4) and images.dtype == np.uint8 \
            and (images.ndim == 3 or images.shape[-1] in (1, 3)):
        arr = images if images.ndim == 4 else images[..., None]
        items: list[np.ndarray] = list(arr)
    else:
        items = [as_hwc(im) for im in images]
    if not items:
        c = channels or 1
        s = size or 1
        return torch.zeros((0, c, s, s), dtype=torch.float32)
    size = size or items[0].shape[0]
    out = []
    # group by shape so each group is one tensor op
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(items):
        shapes.setdefault(im.shape, []).append(i)
    result: list[torch.Tensor | None] = [None] * len(items)
    for _shape, idx in shapes.items():
        t = torch.from_numpy(np.stack([items[i] for i in idx])).permute(0, 3, 1, 2).float() / 255.0
        t = convert_channels(t, channels or t.shape[1])
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0, 1)
        for j, i in enumerate(idx):
            result[i] = t[j]
    out = torch.stack([r for r in result if r is not None])
    return out.contiguous()


def convert_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    c = t.shape[1]
    if c == channels:
        return t
    if c == 1 and channels == 3:
        return t.repeat(1, 3, 1, 1)
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).to(t)
        return (t * w).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """float N×C×H×W in [0, 1] -> uint8 N×H×W×C (quantised like a real image file)."""
    return (t.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------- primitives


def _affine(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


def flip(x: torch.Tensor, g: torch.Generator, *, vertical_p: float = 0.5) -> torch.Tensor:
    """Flip every image horizontally, or vertically with probability ``vertical_p``."""
    vert = (torch.rand(x.shape[0], generator=g) < vertical_p).to(x.device)
    out = x.flip(-1)
    if vert.any():
        out[vert] = x[vert].flip(-2)
    return out


def shift(x: torch.Tensor, g: torch.Generator, *, max_px: int = 2) -> torch.Tensor:
    """Integer shift by up to ``max_px`` in each direction (border pixels repeated); never 0,0."""
    n, _, h, w = x.shape
    d = torch.randint(-max_px, max_px + 1, (n, 2), generator=g)
    zero = (d == 0).all(1)
    d[zero, 0] = 1
    pad = F.pad(x, (max_px, max_px, max_px, max_px), mode="replicate")
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(d[i, 0]), int(d[i, 1])
        out[i] = pad[i, :, max_px - dy:max_px - dy + h, max_px - dx:max_px - dx + w]
    return out


def noise(x: torch.Tensor, g: torch.Generator, *, sigma: float | torch.Tensor = 0.02) -> torch.Tensor:
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.view(-1, 1, 1, 1).to(x)
    return (x + torch.randn(x.shape, generator=g).to(x) * sigma).clamp(0, 1)


def brightness(x: torch.Tensor, g: torch.Generator, *, lo: float = 0.9, hi: float = 1.1) -> torch.Tensor:
    f = lo + (hi - lo) * torch.rand(x.shape[0], 1, 1, 1, generator=g)
    return (x * f.to(x)).clamp(0, 1)


def contrast(x: torch.Tensor, g: torch.Generator, *, lo: float = 0.9, hi: float = 1.1) -> torch.Tensor:
    f = lo + (hi - lo) * torch.rand(x.shape[0], 1, 1, 1, generator=g).to(x)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * f + m).clamp(0, 1)


def crop_resize(x: torch.Tensor, g: torch.Generator, *, scale: float | torch.Tensor = 0.8) -> torch.Tensor:
    """Crop a square of side ``scale`` (fraction of the image) at a random position and
    resize it back to the full size."""
    n = x.shape[0]
    s = scale if isinstance(scale, torch.Tensor) else torch.full((n,), float(scale))
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * (1 - s).unsqueeze(1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = s
    theta[:, 1, 1] = s
    theta[:, :, 2] = t
    return _affine(x, theta)


def rotate(x: torch.Tensor, g: torch.Generator, *, max_deg: float = 10.0,
           min_deg: float = 0.0) -> torch.Tensor:
    """Rotate by an angle with ``min_deg ≤ |angle| ≤ max_deg`` about the centre."""
    n = x.shape[0]
    mag = min_deg + (max_deg - min_deg) * torch.rand(n, generator=g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    a = mag * sign * math.pi / 180.0
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(a)
    theta[:, 0, 1] = -torch.sin(a)
    theta[:, 1, 0] = torch.sin(a)
    theta[:, 1, 1] = torch.cos(a)
    return _affine(x, theta)


def _gauss_kernel(sigma: torch.Tensor) -> torch.Tensor:
    r = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-(r.view(1, 3) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    return k1[:, :, None] * k1[:, None, :]  # n×3×3


def blur(x: torch.Tensor, g: torch.Generator | None = None, *,
         sigma: float | torch.Tensor = 0.8) -> torch.Tensor:
    """3×3 Gaussian blur (per-image σ allowed)."""
    n, c, h, w = x.shape
    s = sigma if isinstance(sigma, torch.Tensor) else torch.full((n,), float(sigma))
    k = _gauss_kernel(s.cpu()).repeat_interleave(c, 0).unsqueeze(1).to(x)  # (n*c)×1×3×3
    xp = F.pad(x.reshape(1, n * c, h, w), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(xp, k, groups=n * c).reshape(n, c, h, w)


# --------------------------------------------------------------------------- families


def apply_family(x: torch.Tensor, family: str, g: torch.Generator) -> torch.Tensor:
    """Apply one planting family (``exact``/``mild``/``hard``) or a single transform."""
    if family == "exact":
        return x.clone()
    if family == "mild":
        y = flip(x, g)
        y = shift(y, g, max_px=2)
        y = brightness(y, g, lo=0.9, hi=1.1)
        return noise(y, g, sigma=0.02)
    if family == "hard":
        y = crop_resize(x, g, scale=0.8)
        y = rotate(y, g, max_deg=10.0)
        return blur(y, g, sigma=0.8)
    single = {
        "flip": lambda t: flip(t, g),
        "shift": lambda t: shift(t, g, max_px=2),
        "noise": lambda t: noise(t, g, sigma=0.02),
        "brightness": lambda t: brightness(t, g),
        "crop": lambda t: crop_resize(t, g, scale=0.8),
        "rotate": lambda t: rotate(t, g, max_deg=10.0, min_deg=5.0),
        "blur": lambda t: blur(t, g, sigma=0.8),
    }
    if family not in single:
        raise ValueError(f"unknown augmentation family {family!r}; use {FAMILIES + SINGLE_TRANSFORMS}")
    return single[family](x)


def random_view(x: torch.Tensor, g: torch.Generator, *, strength: float = 1.0) -> torch.Tensor:
    """A random training view for the contrastive encoder: every family the audit plants
    (flips, ≤2 px shifts, 80–100 % crops, ≤10° rotation, blur, noise, brightness/contrast),
    each applied with some probability, with ranges slightly wider than the plants."""
    n = x.shape[0]
    y = x
    hf = torch.rand(n, generator=g) < 0.5
    y = torch.where(hf.view(-1, 1, 1, 1).to(x.device), y.flip(-1), y)
    vf = torch.rand(n, generator=g) < 0.5
    y = torch.where(vf.view(-1, 1, 1, 1).to(x.device), y.flip(-2), y)
    # one affine: scale (crop), rotation, translation
    h = x.shape[-1]
    s = 1.0 - strength * 0.25 * torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.6)
    a = (torch.rand(n, generator=g) * 2 - 1) * strength * 12.0 * math.pi / 180.0
    a = a * (torch.rand(n, generator=g) < 0.6)
    room = (1 - s) + (2.5 * 2 / h) * strength
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * room.unsqueeze(1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = s * torch.cos(a)
    theta[:, 0, 1] = -s * torch.sin(a)
    theta[:, 1, 0] = s * torch.sin(a)
    theta[:, 1, 1] = s * torch.cos(a)
    theta[:, :, 2] = t
    y = _affine(y, theta)
    bl = torch.rand(n, generator=g) < 0.4
    if bl.any():
        sig = 0.5 + 0.6 * torch.rand(int(bl.sum()), generator=g)
        bl = bl.to(x.device)
        y[bl] = blur(y[bl], sigma=sig)
    y = brightness(y, g, lo=1 - 0.15 * strength, hi=1 + 0.15 * strength)
    y = contrast(y, g, lo=1 - 0.15 * strength, hi=1 + 0.15 * strength)
    ns = torch.rand(n, generator=g) * 0.04 * strength * (torch.rand(n, generator=g) < 0.6)
    y = noise(y, g, sigma=ns)
    return y


def crop_grid(x: torch.Tensor, *, grid: int, scale: float = 0.8) -> list[torch.Tensor]:
    """Deterministic ``scale`` crops resized back, at ``grid × grid`` positions spanning the
    image (database-side views that let an 80 % crop-resize copy meet its source)."""
    n = x.shape[0]
    pos = torch.linspace(-(1 - scale), 1 - scale, grid) if grid > 1 else torch.zeros(1)
    out = []
    for ty in pos:
        for tx in pos:
            theta = torch.zeros(n, 2, 3)
            theta[:, 0, 0] = scale
            theta[:, 1, 1] = scale
            theta[:, 0, 2] = tx
            theta[:, 1, 2] = ty
            out.append(_affine(x, theta))
    return out
