"""Registration re-scorer: a view that undoes a crop-resize + rotation explicitly.

The learned views see an 80 % crop-resize + rotation + blur copy ("hard") only as well as a
small encoder trained for a few minutes allows; on grey X-ray / ultrasound images that is
not enough (``docs/audit.md``). This view aligns instead of embedding: for every query it
takes the top-k candidate training images of another view (the contrastive view by
default) and scores each candidate by the best **normalised cross-correlation** (NCC) over
a small search of inverse transforms:

* the query is resampled at ``scale`` × its size (an 80 % crop resized back to full size
  shrinks back to its footprint in the source), rotated by every angle of ``angles`` (e.g.
  −10°…10° in 2.5° steps), and the central part (``margin`` px dropped each side, where a
  rotation would have filled the corners from the border) is the template;
* the template slides over the candidate at every offset (a crop at any position);
* query and candidate are pre-blurred with the audit's fixed 3×3 Gaussian (σ = 0.8), so a
  blurred copy and its sharp source meet in one form;
* NCC is the Pearson correlation of template and window (mean-centred, unit-normalised,
  all channels together): blind to brightness and contrast scaling.

A query's score is the maximum over candidates, angles, scales and offsets, with the
candidate that reached it as its neighbour. The score is a similarity in [−1, 1] like the
other views' cosines, and its threshold is calibrated the same way: held-out images are
re-scored against *their own* top-k candidates.

Everything is one grouped ``torch.nn.functional.conv2d`` per chunk of queries (cheap on
CPU: ~2 ms per query × 30 candidates × 9 angles at 28 px on one thread).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from medisyn.audit import augment

DEFAULT_ANGLES = tuple(float(a) for a in np.arange(-10.0, 10.01, 2.5))
DEFAULT_SCALES = (0.8,)


def templates(q: torch.Tensor, *, angles: Sequence[float], scales: Sequence[float],
              margin: float = 0.1, flips: bool = False, subpixel: int = 1) -> list[torch.Tensor]:
    """Templates of queries ``q`` (N×C×H×W): for every (flip,) scale and angle, the query
    resampled to ``round(scale·H)`` px, rotated, and its central part; with ``subpixel = p``
    also at template offsets of 1/p px in each direction (p² phases), so that integer
    sliding offsets miss the true alignment by at most 1/(2p) px. Returns one tensor
    N×A×C×t×t per scale (A = angles × flips × phases; t depends on the scale)."""
    n, c, h, w = q.shape
    variants = [q]
    if flips:
        variants += [q.flip(-1), q.flip(-2)]
    out = []
    for s in scales:
        size = max(4, int(round(s * h)))
        m = int(math.ceil(margin * size))
        t = size - 2 * m
        per = []
        phases = [(i / subpixel, j / subpixel) for i in range(subpixel) for j in range(subpixel)]
        for v in variants:
            for a, (py, px) in [(a, ph) for a in angles for ph in phases]:
                r = math.radians(a)
                # a template-pixel offset of p is p/size of the image: 2p/size in [-1, 1] units
                tx, ty = 2 * px / size, 2 * py / size
                theta = torch.tensor([[math.cos(r), -math.sin(r), tx],
                                      [math.sin(r), math.cos(r), ty]], dtype=q.dtype)
                grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
                y = F.grid_sample(v, grid, mode="bilinear", padding_mode="border", align_corners=False)
                per.append(y[:, :, m:m + t, m:m + t])
        out.append(torch.stack(per, 1))
    return out


def ncc_max(tmpl: torch.Tensor, cand: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Best NCC of each query's templates over each of its candidates.

    ``tmpl``: N×A×C×t×t; ``cand``: N×K×C×H×W (H, W ≥ t). Returns N×K: the maximum over
    templates and all offsets of the Pearson correlation of template and window."""
    n, a, c, t, _ = tmpl.shape
    _, k, _, h, w = cand.shape
    tz = tmpl - tmpl.mean(dim=(2, 3, 4), keepdim=True)
    tz = tz / tz.flatten(2).norm(dim=2).clamp_min(eps).view(n, a, 1, 1, 1)
    x = cand.permute(1, 0, 2, 3, 4).reshape(k, n * c, h, w)  # batch = candidates
    num = F.conv2d(x, tz.reshape(n * a, c, t, t), groups=n)  # k × (n·a) × oh × ow
    ones = torch.ones(n, c, t, t, dtype=x.dtype)
    s1 = F.conv2d(x, ones, groups=n)  # k × n × oh × ow
    s2 = F.conv2d(x * x, ones, groups=n)
    var = (s2 - s1 * s1 / (c * t * t)).clamp_min(0)
    oh, ow = num.shape[-2:]
    ncc = num.view(k, n, a, oh, ow) / (var.sqrt().view(k, n, 1, oh, ow) + eps)
    return ncc.amax(dim=(2, 3, 4)).T.contiguous()  # n × k


class RegistrationScorer:
    """Scores queries against candidate training images by registration NCC (see module).

    ``train_images``: the site's training images (uint8). ``size``: working resolution
    (default: the training images' own). ``channels``: 1 compares luma, 3 colour."""

    name = "registration"

    def __init__(self, train_images: Sequence[np.ndarray], *, topk: int = 30,
                 angles: Sequence[float] = DEFAULT_ANGLES, scales: Sequence[float] = DEFAULT_SCALES,
                 margin: float = 0.1, blur: float = 0.8, flips: bool = False,
                 channels: int | None = None, size: int | None = None, chunk: int = 64,
                 subpixel: int = 1, query_blur: float | None = None):
        self.topk = topk
        self.angles = tuple(float(a) for a in angles)
        self.scales = tuple(float(s) for s in scales)
        self.margin = margin
        self.blur = blur
        self.query_blur = blur if query_blur is None else query_blur
        self.subpixel = subpixel
        self.flips = flips
        self.chunk = chunk
        self.channels = channels
        self.size = size or int(np.asarray(train_images[0]).shape[0])
        if self.channels is None:  # the site's own channels; queries are converted to them
            a = np.asarray(train_images[0])
            self.channels = 1 if a.ndim == 2 or a.shape[-1] == 1 else 3
        self.train = self._prep(train_images)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "registration", "topk": self.topk,
                "angles_deg": list(self.angles), "scales": list(self.scales),
                "margin": self.margin, "preblur": self.blur, "query_preblur": self.query_blur,
                "subpixel": self.subpixel, "flips": self.flips,
                "size": self.size, "channels": self.channels}

    def _prep(self, images: Sequence[np.ndarray], blur: float | None = None) -> torch.Tensor:
        t = augment.to_tensor(images, size=self.size, channels=self.channels)
        b = self.blur if blur is None else blur
        return augment.blur(t, sigma=b) if b > 0 else t

    def score_all(self, images: Sequence[np.ndarray], candidates: np.ndarray) -> np.ndarray:
        """NCC of each image with each of its candidates (``candidates``: N×k indices into
        the training images, −1 = none, scored −1). Returns N×min(k, topk)."""
        cand = np.asarray(candidates, np.int64)
        if cand.ndim == 1:
            cand = cand[:, None]
        cand = cand[:, : self.topk]
        n = len(images)
        out = np.full(cand.shape, -1.0, np.float32)
        if n == 0:
            return out
        q = self._prep(images, self.query_blur)
        for lo in range(0, n, self.chunk):
            hi = min(n, lo + self.chunk)
            ci = cand[lo:hi]
            x = self.train[np.maximum(ci, 0).reshape(-1)].view(hi - lo, ci.shape[1], *self.train.shape[1:])
            s = torch.full((hi - lo, ci.shape[1]), -1.0)
            with torch.no_grad():
                for tm in templates(q[lo:hi], angles=self.angles, scales=self.scales,
                                    margin=self.margin, flips=self.flips, subpixel=self.subpixel):
                    s = torch.maximum(s, ncc_max(tm, x))
            out[lo:hi] = np.where(ci >= 0, s.numpy(), -1.0)
        return out

    def score(self, images: Sequence[np.ndarray], candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best NCC of each image over its candidates and the training image reaching it."""
        cand = np.asarray(candidates, np.int64)
        if cand.ndim == 1:
            cand = cand[:, None]
        cand = cand[:, : self.topk]
        s = self.score_all(images, cand)
        if s.shape[0] == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        j = s.argmax(1)
        r = np.arange(s.shape[0])
        return s[r, j], np.where(s[r, j] > -1.0, cand[r, j], -1)


class _RegIndexInfo:
    kind = "registration"

    def __init__(self, source: Any):
        self.source = source

    def describe(self) -> dict[str, Any]:
        return {"kind": "registration", "candidates_from": self.source.name,
                "candidate_index": self.source.index.describe()}


class RegistrationView:
    """The registration re-scorer as an audit view (the interface of
    :class:`medisyn.audit.calibration.View`: ``name``, ``score``, ``threshold``,
    ``calibration``, ``describe``). Candidates: the top-``topk`` training images of the
    ``source`` view (query flips and indexed crops included)."""

    def __init__(self, source: Any, train_images: Sequence[np.ndarray], **kw: Any):
        self.source = source
        self.scorer = RegistrationScorer(train_images, **kw)
        self.embedder = self.scorer  # for reports: describe() / kind
        self.name = self.scorer.name
        self.index = _RegIndexInfo(source)
        self.threshold: float | None = None
        self.calibration: dict[str, Any] = {}

    def score(self, images: Sequence[np.ndarray], k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        kk = self.scorer.topk
        _, cand = self.source.score(images, k=kk)
        cand = np.asarray(cand).reshape(len(images), -1)
        s = self.scorer.score_all(images, cand)
        if k == 1:
            j = s.argmax(1) if s.shape[0] else np.zeros(0, np.int64)
            r = np.arange(s.shape[0])
            return s[r, j], np.where(s[r, j] > -1.0, cand[r, j], -1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        ss = np.take_along_axis(s, order, 1)
        ii = np.where(ss > -1.0, np.take_along_axis(cand, order, 1), -1)
        if ss.shape[1] < k:  # fewer candidates than k
            pad = k - ss.shape[1]
            ss = np.pad(ss, ((0, 0), (0, pad)), constant_values=-1.0)
            ii = np.pad(ii, ((0, 0), (0, pad)), constant_values=-1)
        return ss, ii

    def calibrate(self, holdout_images: Sequence[np.ndarray], q: float = 0.999) -> float:
        from medisyn.audit import stats
        from medisyn.audit.calibration import similarity_quantiles

        s, _ = self.score(holdout_images)
        self.threshold = stats.conservative_quantile(s, q)
        self.calibration = {"threshold": self.threshold, "quantile": q, "n_holdout": int(s.size),
                            "note": stats.effective_quantile_note(int(s.size), q),
                            "holdout_similarity_quantiles": similarity_quantiles(s)}
        return self.threshold

    def describe(self) -> dict[str, Any]:
        return {**self.scorer.describe(), "index": self.index.describe(), **self.calibration}
