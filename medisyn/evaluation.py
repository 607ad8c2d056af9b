"""How good is a model? Judged by its images (``medisyn evaluate``; core, never imports Flower).

The model generates ``n_per_label`` images for the prompt of every label of every image
type; small CNNs trained here, at evaluation time, on the *real* images (seeded, CPU,
label-balanced batches, horizontal flips where ``[dataset].hflip`` allows them) then
measure:

- ``type_recognised``: share of images prompted with image type T that a classifier
  trained on the real training images of *all* given datasets (classes: image type x
  label) calls T. Floor: the same share on T's real held-out images.
- ``label_alignment``: balanced accuracy, over T's labels, of T's label classifier
  (trained on T's real training split) on images prompted with each label; next to
  ``real_balanced_accuracy`` (the same classifier on T's real held-out split).
- ``tstr_balanced_accuracy``: one recipe (architecture, seed, steps) trained on the
  synthetic images only, tested on T's real held-out split, next to
  ``real_balanced_accuracy``; ``augmented_balanced_accuracy`` (10% of the real training
  split + the synthetic images) next to ``real10_balanced_accuracy`` (the 10% alone).
- fidelity and coverage of the synthetic images against T's real held-out images in the
  feature space of an encoder trained here on the real data (:data:`ENCODERS`): Fréchet
  distance (FD), kernel distance (KID: unbiased MMD², cubic polynomial kernel),
  precision/recall (k-NN manifolds, k = 5, Kynkäänniemi et al. 2019) and density/coverage
  (Naeem et al. 2020). Floor: the same metric for a real *training* subset with the synthetic
  set's label mix (as many images of each label) against the same held-out images (what
  a perfect generator, prompted alike, would score).
- diversity: near-duplicate rate, the share of synthetic images of a group (image type,
  label) that have another one whose pixels, minus the type's real mean image, correlate
  at >= 0.95 (Pearson, 32 px); floor: the same rate in as many real training images.

:func:`evaluate_model` runs all of it over several datasets (the CLI, the demo, the
study benchmark); :func:`evaluate_site` needs only one site's data and returns the
shareable aggregate the federated ``evaluate`` query sends back (no per-image value, no
real pixel, no embedding, no path). :mod:`medisyn.evaluation_report` writes the files.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medisyn.config import (
    DEFAULT_GUIDANCE,
    DEFAULT_GUIDANCE_INTERVAL,
    DatasetConfig,
    describe_interval,
    interval_ok,
    validate,
)
from medisyn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EVAL_VERSION = "0.2.0"  # 0.2: type-level fidelity floors have the synthetic label mix
Progress = Callable[[str], None]

ENCODERS = {
    "type-label": (
        "penultimate layer (64-d, after global average pooling) of the image-type x label CNN "
        "trained at evaluation time on the real training images of every given dataset"),
    "label": (
        "penultimate layer (64-d, after global average pooling) of the label CNN trained at "
        "evaluation time on this image type's real training split"),
    "rotation": (
        "penultimate layer (64-d, after global average pooling) of a CNN trained at evaluation "
        "time to tell the rotation (0, 90, 180, 270 degrees) of real training images "
        "(used when the real data has a single class)"),
}

DEFINITIONS = {
    "type_recognised": "share of images prompted with this image type that the image-type x label "
                       "classifier (real training images of all datasets) assigns to this type",
    "label_alignment": "balanced accuracy of this type's label classifier (real training split) on "
                       "the synthetic images, the prompted label being the truth",
    "real_balanced_accuracy": "the same label classifier on this type's real held-out split",
    "tstr_balanced_accuracy": "classifier trained on the synthetic images only, tested on the real "
                              "held-out split (same architecture, seed and steps as the real one)",
    "augmented_balanced_accuracy": "classifier trained on 10% of the real training split plus the "
                                   "synthetic images, tested on the real held-out split",
    "real10_balanced_accuracy": "the same 10% of the real training split alone",
    "fd": "Frechet distance between Gaussian fits of the features (lower is better)",
    "kid": "kernel distance: unbiased MMD^2 with the kernel (x.y/d + 1)^3 (lower is better)",
    "kid_se": "standard error of KID: delete-one jackknife over the synthetic and the real set; two "
              "KIDs closer than about twice their combined error (sqrt(se1^2 + se2^2)) are not "
              "told apart by this many images",
    "precision": "share of synthetic images inside the real k-NN manifold (k = 5)",
    "recall": "share of real held-out images inside the synthetic k-NN manifold (k = 5)",
    "density": "mean number of real k-NN balls holding a synthetic image, divided by k",
    "coverage": "share of real held-out images whose k-NN ball holds a synthetic image",
    "near_duplicate_rate": "share of images with another image of the same group at pixel "
                           "correlation >= the threshold (lower is more diverse)",
    "floor": "the same metric for real data: real training images (as many of each label as "
             "the synthetic set has) against the real held-out images; type recognition: real "
             "held-out images",
}

FIDELITY = ("fd", "kid", "kid_se", "precision", "recall", "density", "coverage")


# --------------------------------------------------------------------------- settings


class EvaluationSettings(BaseModel):
    """How an evaluation runs; every field is stated in the report."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_per_label: int = Field(default=64, ge=1, le=100_000)
    seed: int = 0
    steps: int = Field(default=20, ge=1, le=1000)  # sampling steps
    guidance: float = Field(default=DEFAULT_GUIDANCE, ge=0)
    # Guidance only at noise levels sigma in (lo, hi] (medisyn.generate.generate); None: every step.
    guidance_interval: tuple[float, float] | None = DEFAULT_GUIDANCE_INTERVAL
    scheduler: str = "dpm"
    batch_size: int = Field(default=64, ge=1)  # generation batch
    resolution: int = Field(default=32, ge=8, le=256)  # evaluation space (px, RGB, [-1, 1])
    classifier_steps: int = Field(default=300, ge=1)
    encoder_steps: int = Field(default=400, ge=1)  # the image-type x label / rotation CNN
    classifier_batch: int = Field(default=64, ge=2)
    classifier_lr: float = Field(default=3e-3, gt=0)
    classifier_width: int = Field(default=16, ge=4, le=256)
    k: int = Field(default=5, ge=1, le=100)
    near_duplicate_threshold: float = Field(default=0.95, gt=0, le=1)
    real_fraction: float = Field(default=0.1, gt=0, lt=1)  # the "10%" of the augmented arm
    gallery_per_prompt: int = Field(default=8, ge=0, le=256)
    threads: int | None = Field(default=None, ge=1)  # generation (None: torch's default)
    # The small CNNs gain little from a second thread and lose much on a shared machine
    # (measured: 150 steps 4.0 s on 1 thread, 7.6 s on 2, with 2 cores under load).
    classifier_threads: int | None = Field(default=1, ge=1)
    classifier_workers: int = Field(default=2, ge=1, le=64)  # classifiers trained at once

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if not interval_ok(v):
            raise ValueError(f"needs 0 <= lo < hi (noise levels sigma), got {list(v)}")
        return v


def make_settings(settings: EvaluationSettings | Mapping[str, Any] | None = None,
                  **overrides: Any) -> EvaluationSettings:
    """Validated settings; a bad value raises :class:`ConfigError` naming the field."""
    if isinstance(settings, EvaluationSettings):
        data = settings.model_dump()
    else:
        data = dict(settings or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    n = data.get("n_per_label", 64)
    if isinstance(n, int) and n < 1:
        raise ConfigError(f"evaluation: n_per_label = {n}; it must be >= 1 (images generated per label)")
    return validate(EvaluationSettings, data, "evaluation settings")


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- metrics


def _f64(x: Any) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a.astype(np.float64).reshape(len(a), -1)


def frechet_distance(a: Any, b: Any) -> float | None:
    """FD between Gaussian fits of two feature sets (rows are samples); None below 2 rows."""
    a, b = _f64(a), _f64(b)
    if len(a) < 2 or len(b) < 2:
        return None
    mu = a.mean(0) - b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    # tr sqrt(S1 S2) = sum of sqrt eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric PSD)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    return float(max(mu @ mu + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, 0.0))


def kernel_distance(a: Any, b: Any) -> float | None:
    """KID: unbiased MMD² with the polynomial kernel ``(x·y/d + 1)^3`` over the whole sets
    (no subsets: the sets here are small); None below 2 rows."""
    return kernel_distance_and_se(a, b)[0]


def kernel_distance_se(a: Any, b: Any) -> float | None:
    """The standard error of :func:`kernel_distance` (see :func:`kernel_distance_and_se`);
    None below 3 rows in either set."""
    return kernel_distance_and_se(a, b)[1]


def kernel_distance_and_se(a: Any, b: Any) -> tuple[float | None, float | None]:
    """KID and its standard error from one set of kernel matrices.

    The error is the delete-one jackknife over both sets (Efron & Stein; for a two-sample
    statistic the two samples' jackknife variances add): how far KID moves when other
    images of the same two distributions are drawn, in closed form (each leave-one-out
    value uses the all-cross-pairs form). KID is None below 2 rows, its error below 3."""
    a, b = _f64(a), _f64(b)
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        return None, None
    d = a.shape[1]
    kaa, kbb, kab = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
    np.fill_diagonal(kaa, 0.0)
    np.fill_diagonal(kbb, 0.0)
    saa, sbb, sab = kaa.sum(), kbb.sum(), kab.sum()
    xx, yy = saa / (n * (n - 1)), sbb / (m * (m - 1))
    # equal sizes: Gretton et al.'s U-statistic (cross pairs i != j; exactly 0 for a set
    # against itself); else the mean over all cross pairs (Binkowski et al.). Both unbiased.
    xy = (sab - np.trace(kab)) / (n * (n - 1)) if n == m else sab / (n * m)
    kid = float(xx + yy - 2 * xy)
    if n < 3 or m < 3:
        return kid, None
    # row i left out of a: its n - 1 within-set pairs (twice) and its m cross pairs go
    theta_a = (saa - 2 * kaa.sum(1)) / ((n - 1) * (n - 2)) + yy - 2 * (sab - kab.sum(1)) / ((n - 1) * m)
    theta_b = xx + (sbb - 2 * kbb.sum(1)) / ((m - 1) * (m - 2)) - 2 * (sab - kab.sum(0)) / (n * (m - 1))
    var = ((n - 1) / n * ((theta_a - theta_a.mean()) ** 2).sum()
           + (m - 1) / m * ((theta_b - theta_b.mean()) ** 2).sum())
    return kid, float(np.sqrt(max(var, 0.0)))


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.clip(d, 0, None)


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of each row to its k-th nearest other row."""
    d = _sqdist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def prdc(real: Any, fake: Any, k: int = 5) -> dict[str, float | None]:
    """Precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem
    et al. 2020) with k-NN balls (k-th nearest neighbour radius, Euclidean)."""
    r, f = _f64(real), _f64(fake)
    none = {"precision": None, "recall": None, "density": None, "coverage": None}
    if len(r) <= k or len(f) <= k:
        return none
    rr = _kth_radius(r, k)  # real balls
    fr = _kth_radius(f, k)  # fake balls
    d = _sqdist(r, f)  # real x fake
    inside_real = d <= rr[:, None]  # fake j in ball of real i
    precision = float(inside_real.any(0).mean())
    recall = float((d <= fr[None, :]).any(1).mean())
    density = float(inside_real.sum(0).mean() / k)
    coverage = float((d.min(1) <= rr).mean())  # nearest fake within the real ball
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def near_duplicate_rate(images: Any, threshold: float = 0.95, centre: Any = None) -> float | None:
    """Share of images that have another image in the set whose pixels correlate with
    its own (Pearson over all pixels and channels) at >= ``threshold``; ``centre`` (an
    image, e.g. the real mean image of the type) is subtracted first, so that the shared
    layout of a modality (a fundus disc on black) does not count as duplication.
    None for fewer than 2 images."""
    x = _f64(images)
    if len(x) < 2:
        return None
    if centre is not None:
        x = x - _f64(np.asarray(centre)[None] if not isinstance(centre, torch.Tensor) else centre[None])
    x = x - x.mean(1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norm > 1e-12, norm, 1.0)
    c = x @ x.T
    np.fill_diagonal(c, -np.inf)
    return float((c.max(1) >= threshold).mean())


def balanced_accuracy(y_true: Any, y_pred: Any, classes: Sequence[int] | None = None) -> float | None:
    """Mean recall over the classes present in ``y_true`` (or ``classes``)."""
    t, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    cls = sorted(set(t.tolist())) if classes is None else [c for c in classes if (t == c).any()]
    if not cls:
        return None
    return float(np.mean([(p[t == c] == c).mean() for c in cls]))


def fidelity(real: Any, fake: Any, k: int = 5) -> dict[str, float | None]:
    """FD, KID, precision, recall, density, coverage of ``fake`` against ``real``."""
    kid, kid_se = kernel_distance_and_se(real, fake)
    out = {"fd": frechet_distance(real, fake), "kid": kid, "kid_se": kid_se}
    out.update(prdc(real, fake, k=k))
    return out


# --------------------------------------------------------------------------- classifiers


_INIT_LOCK = threading.Lock()


class SmallCNN(torch.nn.Module):
    """Three 3x3 convolutions with batch norm (stride-2 stem, max-pool), global average
    pool -> 64-d features -> linear head (~24 k weights at width 16)."""

    def __init__(self, n_classes: int, *, channels: int = 3, width: int = 16, features: int = 64):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, features, 3, padding=1), nn.BatchNorm2d(features), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(features, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, steps: int, seed: int,
                     batch: int = 64, lr: float = 3e-3, width: int = 16,
                     rotations: bool = False, hflip: bool | torch.Tensor = True) -> SmallCNN:
    """The one classifier recipe: seeded init and batches, label-balanced batches (each
    class equally likely), random horizontal flips, Adam with a cosine-decayed rate, ``steps``
    steps.
    ``rotations``: the self-supervised variant (labels are the rotation of the image).
    ``hflip``: whether (per image, or for all) a horizontal flip is allowed — off for
    anatomy a mirror makes invalid (``[dataset].hflip``)."""
    if len(x) == 0:
        raise DataError("no images to train a classifier on")
    y = y.long()
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):  # the global RNG only for the init
        torch.manual_seed(seed)
        model = SmallCNN(4 if rotations else n_classes, channels=x.shape[1], width=width)
    gen = torch.Generator().manual_seed(seed)  # every draw of the loop: thread-safe, seeded
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0))))
    counts = torch.bincount(y, minlength=n_classes).double()
    w = (1.0 / counts.clamp(min=1))[y]
    model.train()
    for _ in range(steps):
        idx = torch.multinomial(w, batch, replacement=True, generator=gen)
        xb = x[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        if isinstance(hflip, torch.Tensor):
            flip &= hflip[idx]
        elif not hflip:
            flip[:] = False
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        yb = y[idx]
        if rotations:
            yb = torch.randint(0, 4, (batch,), generator=gen)
            xb = torch.stack([torch.rot90(im, int(r), dims=(1, 2)) for im, r in zip(xb, yb, strict=True)])
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def train_many(jobs: Mapping[str, Callable[[], SmallCNN]], workers: int = 1) -> dict[str, SmallCNN]:
    """Run independent :func:`train_classifier` calls, ``workers`` at a time (threads:
    torch releases the GIL; each call draws only from its own seeded generator, so the
    result does not depend on ``workers``)."""
    if workers <= 1 or len(jobs) <= 1:
        return {k: fn() for k, fn in jobs.items()}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {k: pool.submit(fn) for k, fn in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


@torch.no_grad()
def _run(model: SmallCNN, x: torch.Tensor, what: str = "logits", batch: int = 512) -> torch.Tensor:
    model.eval()
    fn = model.features if what == "features" else model
    if len(x) == 0:
        return torch.empty(0)
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def predict(model: SmallCNN, x: torch.Tensor) -> np.ndarray:
    return _run(model, x).argmax(1).numpy() if len(x) else np.zeros(0, int)


def embed(model: SmallCNN, x: torch.Tensor) -> np.ndarray:
    return _run(model, x, "features").numpy().astype(np.float64)


# --------------------------------------------------------------------------- data


def to_eval_space(images: Sequence[Any], resolution: int = 32) -> torch.Tensor:
    """PIL images (RGB or L) or uint8 arrays -> float32 N×3×R×R in [-1, 1] (grey repeated)."""
    from medisyn.data import to_model_space

    out = []
    for im in images:
        if hasattr(im, "convert"):  # PIL
            im = im.convert("L" if im.mode in ("L", "I", "I;16", "F", "1") else "RGB")
        a = np.asarray(im)
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.dtype != np.uint8:
            a = np.clip(a, 0, 255).astype(np.uint8)
        out.append(to_model_space(np.ascontiguousarray(a), resolution, 3))
    if not out:
        return torch.zeros(0, 3, resolution, resolution)
    return torch.stack(out)


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    a = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return a


@dataclass
class TypeData:
    """The real images of one image type (one or several datasets), in evaluation space."""

    image_type: str
    specialty: str
    labels: list[str]  # label words (class order); "" for an unlabelled dataset
    prompts: list[str]  # the prompt of each label
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_hold: torch.Tensor
    y_hold: torch.Tensor
    data_hashes: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # site-local only
    raw_train: list[np.ndarray] = field(default_factory=list)  # for the local gallery only
    hflip: bool = True  # may a classifier flip these images ([dataset].hflip of every dataset)


def data_hash(raw: Any) -> str:
    """sha256 over every record's pixels, shape, label and split (the dataset as read)."""
    h = hashlib.sha256()
    for img, lab, sp in zip(raw.images, raw.labels, raw.splits, strict=True):
        a = np.ascontiguousarray(img)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
        h.update(f"|{lab}|{sp}|".encode())
    return h.hexdigest()


def _label_key(cfg: DatasetConfig, lid: str | None) -> str:
    return cfg.labels.get(lid, lid) if lid is not None and cfg.labels else ""


def load_types(datasets: Sequence[DatasetConfig], resolution: int = 32) -> dict[str, TypeData]:
    """Read every dataset; group by image type (datasets of one type pool, classes keyed by
    label prompt); raise :class:`DataError` when a type lacks a training or held-out split."""
    from medisyn.data import build_prompt, read_raw

    groups: dict[str, dict[str, Any]] = {}
    for cfg in datasets:
        raw = read_raw(cfg)
        g = groups.setdefault(cfg.image_type, {"specialty": cfg.specialty, "prompts": [], "labels": [],
                                               "train": ([], []), "hold": ([], []), "hashes": [],
                                               "paths": [], "raw_train": [], "hflip": True})
        g["hashes"].append(data_hash(raw))
        g["paths"].append(str(cfg.path))
        g["hflip"] = g["hflip"] and bool(getattr(cfg, "hflip", True))
        lids = list(cfg.labels) if cfg.labels else [None]
        for lid in lids:
            p = build_prompt(cfg, lid)
            if p not in g["prompts"]:
                g["prompts"].append(p)
                g["labels"].append(_label_key(cfg, lid))
        train, hold = set(cfg.split.train), set(cfg.split.holdout)
        for i, (img, lid, sp) in enumerate(zip(raw.images, raw.labels, raw.splits, strict=True)):
            if cfg.labels and lid is None:
                continue  # an unlabelled record of a labelled dataset: no class
            cls = g["prompts"].index(build_prompt(cfg, lid if cfg.labels else None))
            which = "train" if sp in train else "hold" if sp in hold else None
            if which is None:
                continue
            g[which][0].append(img)
            g[which][1].append(cls)
            if which == "train":
                g["raw_train"].append((cls, i, img))
    out: dict[str, TypeData] = {}
    for t, g in groups.items():
        for which, name in (("train", "training"), ("hold", "held-out")):
            if not g[which][0]:
                raise DataError(f"image type {t!r}: no {name} images (check [dataset].split)",
                                file=", ".join(g["paths"]))
        labels = g["labels"]
        if len(set(labels)) != len(labels):
            labels = list(g["prompts"])
        out[t] = TypeData(
            image_type=t, specialty=g["specialty"], labels=labels, prompts=list(g["prompts"]),
            x_train=to_eval_space(g["train"][0], resolution), y_train=torch.tensor(g["train"][1]),
            x_hold=to_eval_space(g["hold"][0], resolution), y_hold=torch.tensor(g["hold"][1]),
            data_hashes=g["hashes"], paths=g["paths"], raw_train=g["raw_train"], hflip=g["hflip"],
        )
    return out


# --------------------------------------------------------------------------- model metadata


def trained_types(model_meta: Mapping[str, Any] | None) -> list[str] | None:
    """Image types the model's ``medisyn.json`` says it was trained on (None: not stated)."""
    if not model_meta:
        return None
    v = model_meta.get("image_types")
    if isinstance(v, Mapping):
        v = list(v)
    if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v) and v:
        return list(v)
    return None


def _untrained_reason(t: str, known: list[str] | None) -> str | None:
    if known is None or t.lower() in {k.lower() for k in known}:
        return None
    return (f"the model was not trained on image type {t!r} (its medisyn.json lists image_types "
            f"{sorted(known)}); not evaluated")


# --------------------------------------------------------------------------- evaluation


def _round(v: Any, nd: int = 6) -> Any:
    if isinstance(v, float):
        return None if not math.isfinite(v) else round(v, nd)
    if isinstance(v, dict):
        return {k: _round(x, nd) for k, x in v.items()}
    if isinstance(v, list):
        return [_round(x, nd) for x in v]
    return v


def _subset(n_total: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


def _label_matched_subset(y_train: Any, y_syn: Any, seed: int) -> np.ndarray:
    """Indices of real training images with the synthetic set's label mix: for each label,
    as many images as the synthetic set has of it (all of them where the label has fewer).
    The floor of a label-balanced synthetic set must be a label-balanced real set: against
    held-out images in their natural mix, a random real subset matches the mix and the
    synthetic set does not, and the floor would measure the mix, not the images."""
    rng = np.random.default_rng(seed)
    yt, ysn = np.asarray(y_train), np.asarray(y_syn)
    out = [np.zeros(0, int)]
    for c in sorted(set(ysn.tolist())):
        idx = np.where(yt == c)[0]
        out.append(rng.choice(idx, size=min(int((ysn == c).sum()), len(idx)), replace=False))
    return np.sort(np.concatenate(out))


def _stratified_fraction(y: torch.Tensor, frac: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    yn = y.numpy()
    for c in sorted(set(yn.tolist())):
        idx = np.where(yn == c)[0]
        k = max(1, int(round(frac * len(idx))))
        out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, int)


@dataclass
class _Clock:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _classify_arms(td: TypeData, xs: torch.Tensor, ys: torch.Tensor, s: EvaluationSettings,
                   clock: _Clock) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], SmallCNN | None]:
    """Label alignment, real, TSTR, augmented, real-10% for one type.
    Returns (metrics, per-label metrics, skip reasons, the real label classifier)."""
    n_cls = len(td.labels)
    metrics: dict[str, Any] = {}
    per_label: dict[str, dict[str, Any]] = {lab: {} for lab in td.labels}
    skipped: dict[str, str] = {}
    present = sorted(set(td.y_train.tolist()))
    if n_cls < 2 or len(present) < 2:
        why = (f"needs at least 2 labels; image type {td.image_type!r} has "
               f"{'one label' if n_cls < 2 else f'{len(present)} label(s) with training images'}")
        skipped["label_alignment"] = skipped["tstr"] = why
        return metrics, per_label, skipped, None
    kw = dict(steps=s.classifier_steps, seed=s.seed, batch=s.classifier_batch, lr=s.classifier_lr,
              width=s.classifier_width, hflip=td.hflip)
    idx = _stratified_fraction(td.y_train, s.real_fraction, s.seed)
    x10, y10 = td.x_train[idx], td.y_train[idx]
    jobs: dict[str, Callable[[], SmallCNN]] = {
        "real": lambda: train_classifier(td.x_train, td.y_train, n_cls, **kw),
        "real10": lambda: train_classifier(x10, y10, n_cls, **kw),
    }
    if len(xs):
        jobs["synthetic"] = lambda: train_classifier(xs, ys, n_cls, **kw)
        jobs["augmented"] = lambda: train_classifier(torch.cat([x10, xs]), torch.cat([y10, ys]), n_cls, **kw)
    with clock("classifiers"):
        clf = train_many(jobs, s.classifier_workers)
    with clock("metrics"):
        real = clf["real"]
        metrics["real_balanced_accuracy"] = balanced_accuracy(td.y_hold, predict(real, td.x_hold))
        metrics["n_real10"] = int(len(idx))
        metrics["real10_balanced_accuracy"] = balanced_accuracy(td.y_hold, predict(clf["real10"], td.x_hold))
        if len(xs):
            pred = predict(real, xs)
            metrics["label_alignment"] = balanced_accuracy(ys, pred)
            for c, lab in enumerate(td.labels):
                m = ys.numpy() == c
                if m.any():
                    per_label[lab]["label_recall"] = float((pred[m] == c).mean())
            metrics["tstr_balanced_accuracy"] = balanced_accuracy(td.y_hold, predict(clf["synthetic"], td.x_hold))
            metrics["augmented_balanced_accuracy"] = balanced_accuracy(td.y_hold,
                                                                       predict(clf["augmented"], td.x_hold))
    return metrics, per_label, skipped, real


def _fidelity_and_diversity(td: TypeData, xs: torch.Tensor, ys: torch.Tensor, enc: SmallCNN,
                            s: EvaluationSettings, clock: _Clock
                            ) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """(metrics, floors, per-label {metrics, floors}) for FD/KID/P/R/D/C and near-duplicates."""
    with clock("metrics"):
        f_hold = embed(enc, td.x_hold)
        f_syn = embed(enc, xs)
        f_train = embed(enc, td.x_train)
        sub = _label_matched_subset(td.y_train, ys, s.seed)
        if len(sub) < 2:  # no synthetic images (or labels without training images): as many as there are
            sub = _subset(len(td.x_train), max(len(xs), 2), s.seed)
        metrics = fidelity(f_hold, f_syn, s.k)
        floors = fidelity(f_hold, f_train[sub], s.k)
        centre = td.x_train.mean(0)
        thr = s.near_duplicate_threshold
        metrics["near_duplicate_rate"] = near_duplicate_rate(xs, thr, centre)
        floors["near_duplicate_rate"] = near_duplicate_rate(td.x_train[sub], thr, centre)
        per_label: dict[str, dict[str, Any]] = {}
        ysn, yh, yt = ys.numpy(), td.y_hold.numpy(), td.y_train.numpy()
        for c, lab in enumerate(td.labels):
            ms, mh = ysn == c, yh == c
            tr_idx = np.where(yt == c)[0]
            lsub = tr_idx[_subset(len(tr_idx), max(int(ms.sum()), 2), s.seed + 1 + c)] if len(tr_idx) else tr_idx
            m = fidelity(f_hold[mh], f_syn[ms], s.k)
            f = fidelity(f_hold[mh], f_train[lsub], s.k)
            m["near_duplicate_rate"] = near_duplicate_rate(xs[torch.from_numpy(ms)], thr, centre)
            f["near_duplicate_rate"] = near_duplicate_rate(td.x_train[torch.from_numpy(lsub)], thr, centre)
            per_label[lab] = {"metrics": m, "floors": f, "n_holdout": int(mh.sum()),
                              "n_train": int(len(tr_idx)), "n_synthetic": int(ms.sum())}
    return metrics, floors, per_label


def _generate(components: Any, prompts: list[str], s: EvaluationSettings, clock: _Clock,
              progress: Progress) -> list[Any]:
    from medisyn.generate import generate

    if not prompts:
        return []
    progress(f"generating {s.n_per_label} image(s) for each of {len(prompts)} prompt(s) "
             f"({s.steps} steps, guidance {s.guidance:g} {describe_interval(s.guidance_interval)}, seed {s.seed})")
    with clock("generate"):
        items = generate(components, prompts, n_per_prompt=s.n_per_label, seed=s.seed, steps=s.steps,
                         guidance=s.guidance, scheduler=s.scheduler, batch_size=s.batch_size,
                         guidance_interval=s.guidance_interval)
    n = len(items)
    progress(f"generated {n} image(s) in {clock.seconds['generate']:.1f} s "
             f"({n / max(clock.seconds['generate'], 1e-9):.2f} images/s)")
    return items


def _type_entry(td: TypeData) -> dict[str, Any]:
    return {
        "image_type": td.image_type, "specialty": td.specialty, "labels": list(td.labels),
        "prompts": dict(zip(td.labels, td.prompts, strict=True)),
        "n_train": int(len(td.x_train)), "n_holdout": int(len(td.x_hold)), "hflip": td.hflip,
        "metrics": {}, "floors": {},
        "per_label": {lab: {"metrics": {}, "floors": {}, "n_train": int((td.y_train == c).sum()),
                            "n_holdout": int((td.y_hold == c).sum())} for c, lab in enumerate(td.labels)},
        "skipped": {},
    }


def _merge_per_label(entry: dict[str, Any], key: str, values: Mapping[str, Mapping[str, Any]]) -> None:
    for lab, v in values.items():
        entry["per_label"].setdefault(lab, {"metrics": {}, "floors": {}})[key].update(v)


def prompt_collisions(components: Any, types: Mapping[str, TypeData]) -> list[str]:
    """Warnings for labels whose prompts the model's tokenizer truncates to the same tokens
    (the model cannot tell those labels apart, whatever its training)."""
    tok = getattr(components, "tokenizer", None)
    if tok is None:
        return []
    try:
        limit = int(getattr(components.config, "max_tokens", 0) or getattr(tok, "model_max_length", 77))
        limit = min(limit, int(getattr(tok, "model_max_length", limit) or limit))
        out = []
        for t, td in types.items():
            ids = tok(list(td.prompts), max_length=limit, truncation=True, padding="max_length")["input_ids"]
            groups: dict[tuple[int, ...], list[str]] = {}
            for lab, i in zip(td.labels, ids, strict=True):
                groups.setdefault(tuple(int(v) for v in i), []).append(lab)
            for labs in groups.values():
                if len(labs) > 1:
                    out.append(f"{t}: labels {labs} have identical prompts once the model's tokenizer "
                               f"truncates them to {limit} tokens (max_tokens): the model cannot tell them "
                               "apart, so their label alignment can only be at chance")
        return out
    except Exception as e:  # a tokenizer we do not know: no check, no failure
        log.debug("prompt collision check skipped: %s", e)
        return []


def _evaluate_types(components: Any, types: dict[str, TypeData], s: EvaluationSettings, *,
                    joint: bool, model_meta: Mapping[str, Any] | None, progress: Progress,
                    clock: _Clock, gallery: dict | None) -> tuple[dict[str, Any], list[str], str | None]:
    """The shared body of :func:`evaluate_model` and :func:`evaluate_site` (the thread
    count is restored after the classifiers' own)."""
    old = torch.get_num_threads()
    try:
        return _evaluate_types_body(components, types, s, joint=joint, model_meta=model_meta,
                                    progress=progress, clock=clock, gallery=gallery)
    finally:
        torch.set_num_threads(old)


def _evaluate_types_body(components: Any, types: dict[str, TypeData], s: EvaluationSettings, *,
                         joint: bool, model_meta: Mapping[str, Any] | None, progress: Progress,
                         clock: _Clock, gallery: dict | None) -> tuple[dict[str, Any], list[str], str | None]:
    warnings: list[str] = []
    if model_meta is None and getattr(components, "image_types", None):
        model_meta = {"image_types": components.image_types}
    known = trained_types(model_meta)
    entries = {t: _type_entry(td) for t, td in types.items()}
    for w in prompt_collisions(components, types):
        warnings.append(w)
        progress(f"warning: {w}")
    todo: list[str] = []
    for t in types:
        why = _untrained_reason(t, known)
        if why:
            warnings.append(why)
            progress(f"warning: {why}")
            entries[t]["skipped"]["all"] = why
        else:
            todo.append(t)
    syn = _synthetic_sets(components, types, todo, entries, s, clock, progress, gallery)
    if s.classifier_threads:
        torch.set_num_threads(s.classifier_threads)
    # the encoder (and, with several types, the image-type classifier)
    enc, encoder_name = None, None
    if joint and sum(len(types[t].labels) for t in types) >= 2:
        enc = _type_recognition(types, todo, syn, entries, s, clock, progress)
        encoder_name = "type-label"
    elif joint:
        for t in todo:
            entries[t]["skipped"]["type_recognised"] = "needs at least 2 image types (one given)"
    for t in todo:
        _label_and_fidelity(t, types[t], syn[t], entries[t], enc, encoder_name, s, clock, progress)
    if encoder_name is None:
        names = {e.get("encoder") for e in entries.values() if e.get("encoder")}
        encoder_name = names.pop() if len(names) == 1 else None
    return {t: _round(e) for t, e in entries.items()}, warnings, encoder_name


def _synthetic_sets(components: Any, types: dict[str, TypeData], todo: list[str], entries: dict[str, Any],
                    s: EvaluationSettings, clock: _Clock, progress: Progress, gallery: dict | None,
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Generate every prompt of the types in ``todo``; per type, the images in evaluation
    space and their label indices (counts into ``entries``, first images into ``gallery``)."""
    items = _generate(components, [p for t in todo for p in types[t].prompts], s, clock, progress)
    by_prompt: dict[str, list[Any]] = {}
    for g in items:
        by_prompt.setdefault(g.prompt, []).append(g.image)
    syn: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with clock("convert"):
        for t in todo:
            td = types[t]
            imgs, ys = [], []
            for c, p in enumerate(td.prompts):
                imgs += by_prompt.get(p, [])
                ys += [c] * len(by_prompt.get(p, []))
            syn[t] = (to_eval_space(imgs, s.resolution), torch.tensor(ys, dtype=torch.long))
            entries[t]["n_synthetic"] = len(ys)
            for c, lab in enumerate(td.labels):
                entries[t]["per_label"][lab]["n_synthetic"] = ys.count(c)
    if gallery is not None:
        for t in todo:
            td = types[t]
            g_t = gallery.setdefault(t, {})
            for c, (lab, p) in enumerate(zip(td.labels, td.prompts, strict=True)):
                real = [img for cls, _i, img in td.raw_train if cls == c][: max(s.gallery_per_prompt, 0)]
                g_t[lab] = {"prompt": p,
                            "synthetic": [np.asarray(im) for im in by_prompt.get(p, [])[: s.gallery_per_prompt]],
                            "real": real}
    return syn


def _type_recognition(types: dict[str, TypeData], todo: list[str], syn: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      entries: dict[str, Any], s: EvaluationSettings, clock: _Clock, progress: Progress) -> SmallCNN:
    """Train the type x label classifier on the real training images of every type (it is
    also the encoder of the fidelity metrics); with two or more types, fill in
    ``type_recognised`` (and its floor, on real held-out images) per type and label."""
    all_types = list(types)
    offs, o = {}, 0
    for t in all_types:
        offs[t] = o
        o += len(types[t].labels)
    x = torch.cat([types[t].x_train for t in all_types])
    y = torch.cat([types[t].y_train + offs[t] for t in all_types])
    flips = torch.cat([torch.full((len(types[t].x_train),), types[t].hflip) for t in all_types])
    progress(f"training the image-type x label classifier ({o} classes, {len(x)} real images, "
             f"{s.encoder_steps} steps)")
    with clock("classifiers"):
        enc = train_classifier(x, y, o, steps=s.encoder_steps, seed=s.seed, batch=s.classifier_batch,
                               lr=s.classifier_lr, width=s.classifier_width, hflip=flips)
    if len(all_types) < 2:
        for t in todo:
            entries[t]["skipped"]["type_recognised"] = "needs at least 2 image types (one given)"
        return enc
    type_of = np.concatenate([[k] * len(types[t].labels) for k, t in enumerate(all_types)]).astype(int)
    with clock("metrics"):
        for k, t in enumerate(all_types):
            if t not in todo:
                continue
            td = types[t]
            ph = type_of[predict(enc, td.x_hold)]
            entries[t]["floors"]["type_recognised"] = float((ph == k).mean())
            xs, ys = syn[t]
            if not len(xs):
                continue
            ps = type_of[predict(enc, xs)]
            entries[t]["metrics"]["type_recognised"] = float((ps == k).mean())
            entries[t]["recognised_as"] = {all_types[j]: int((ps == j).sum()) for j in range(len(all_types))}
            for c, lab in enumerate(td.labels):
                m = ys.numpy() == c
                if m.any():
                    entries[t]["per_label"][lab]["metrics"]["type_recognised"] = float((ps[m] == k).mean())
                mh = td.y_hold.numpy() == c
                if mh.any():
                    entries[t]["per_label"][lab]["floors"]["type_recognised"] = float((ph[mh] == k).mean())
    return enc


def _label_and_fidelity(t: str, td: TypeData, syn: tuple[torch.Tensor, torch.Tensor], entry: dict[str, Any],
                        enc: SmallCNN | None, encoder_name: str | None, s: EvaluationSettings, clock: _Clock,
                        progress: Progress) -> None:
    """One type's label classifiers (alignment, TSTR, augmentation) and its fidelity and
    diversity metrics, in the feature space of ``enc`` (else its real label classifier,
    else a rotation encoder for a one-class type), into ``entry``."""
    xs, ys = syn
    progress(f"{t}: label classifiers (real, synthetic, 10% real, 10% real + synthetic; "
             f"{s.classifier_steps} steps each)")
    m, pl, sk, real_clf = _classify_arms(td, xs, ys, s, clock)
    if "n_real10" in m:
        entry["n_real10"] = m.pop("n_real10")
    entry["metrics"].update(m)
    entry["skipped"].update(sk)
    _merge_per_label(entry, "metrics", pl)
    t_enc, t_name = enc, encoder_name
    if t_enc is None:
        if real_clf is not None:
            t_enc, t_name = real_clf, "label"
        else:
            progress(f"{t}: one class only: training the rotation encoder ({s.encoder_steps} steps)")
            with clock("classifiers"):
                t_enc = train_classifier(td.x_train, torch.zeros(len(td.x_train), dtype=torch.long), 1,
                                         steps=s.encoder_steps, seed=s.seed, batch=s.classifier_batch,
                                         lr=s.classifier_lr, width=s.classifier_width, rotations=True,
                                         hflip=td.hflip)
            t_name = "rotation"
    entry["encoder"] = t_name
    if not len(xs):
        entry["skipped"]["fidelity"] = "no synthetic images"
        return
    fm, ff, fpl = _fidelity_and_diversity(td, xs, ys, t_enc, s, clock)
    entry["metrics"].update(fm)
    entry["floors"].update(ff)
    for lab, v in fpl.items():
        e = entry["per_label"].setdefault(lab, {"metrics": {}, "floors": {}})
        e["metrics"].update(v["metrics"])
        e["floors"].update(v["floors"])
        e.update({k: v[k] for k in ("n_holdout", "n_train")})
    for k in FIDELITY:
        if entry["metrics"].get(k) is None:
            entry["skipped"].setdefault(
                "fidelity", f"too few images for the k-NN metrics (k = {s.k}): {len(xs)} synthetic, "
                            f"{len(td.x_hold)} held-out")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _settings_dict(s: EvaluationSettings) -> dict[str, Any]:
    return s.model_dump(mode="json")


def _timings(clock: _Clock, t0: float, n_generated: int) -> dict[str, Any]:
    out = {f"{k}_seconds": round(v, 2) for k, v in clock.seconds.items()}
    out["total_seconds"] = round(time.perf_counter() - t0, 2)
    out["images_generated"] = n_generated
    if clock.seconds.get("generate"):
        out["images_per_second"] = round(n_generated / clock.seconds["generate"], 3)
    out["threads"] = torch.get_num_threads()  # generation
    return out


def evaluate_model(components: Any, datasets: Sequence[DatasetConfig], *,
                   settings: EvaluationSettings | Mapping[str, Any] | None = None,
                   model_hash: str | None = None, model_meta: Mapping[str, Any] | None = None,
                   gallery: dict | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate ``components`` (``medisyn.models.Components``) against the real data of
    ``datasets``; returns the JSON-safe evaluation (``types``: image type -> metrics,
    floors, per-label values and skip reasons). ``gallery``: a dict filled with, per type
    and label, the prompt and a few generated and real images (uint8), for the HTML.
    ``model_meta``: the model's ``medisyn.json`` (its ``image_types``, when present, say
    which types the model was trained on; others are skipped with a warning)."""
    s = make_settings(settings)
    if not datasets:
        raise ConfigError("evaluation needs at least one dataset (--data)")
    say = progress or log.info
    t0 = time.perf_counter()
    clock = _Clock()
    with _threads(s.threads):
        with clock("load"):
            types = load_types(datasets, s.resolution)
        say(f"real data: {', '.join(f'{t} ({len(td.x_train)} train, {len(td.x_hold)} held-out)' for t, td in types.items())}")
        entries, warnings, enc = _evaluate_types(components, types, s, joint=True, model_meta=model_meta,
                                                 progress=say, clock=clock, gallery=gallery)
        n_gen = sum(int(e.get("n_synthetic", 0)) for e in entries.values())
        return {
            "kind": "medisyn-evaluation", "version": EVAL_VERSION, "created": _now(),
            "model_hash": model_hash, "model_image_types": trained_types(model_meta),
            "seed": s.seed, "settings": _settings_dict(s),
            "encoder": enc, "encoder_description": ENCODERS.get(enc or "", "per image type (see each type)"),
            "near_duplicates": _near_dup_text(s), "definitions": DEFINITIONS,
            "datasets": [{"image_type": t, "data_hashes": td.data_hashes, "paths": td.paths,
                          "n_train": len(td.x_train), "n_holdout": len(td.x_hold)} for t, td in types.items()],
            "types": entries, "warnings": warnings, "timings": _timings(clock, t0, n_gen),
        }


def _near_dup_text(s: EvaluationSettings) -> str:
    return (f"pixel space ({s.resolution} px RGB, [-1, 1], minus the type's real mean image): a pair is a "
            f"near-duplicate when the Pearson correlation of its pixels is >= {s.near_duplicate_threshold:g}; "
            "the rate is the share of images with at least one near-duplicate in the same group (image "
            "type or label); the floor is the rate in as many real training images")


SITE_TYPE_NOTE = ("type recognition needs real images of every image type, so one site's data "
                  "cannot give it; see precision instead (share of this type's synthetic images "
                  "inside the k-NN manifold of the site's own real images)")


def suppress_small_groups(entry: dict[str, Any], k: int) -> None:
    """The site's k rule (``[privacy] audit_min_group``): statistics of a group of fewer
    than ``k`` real images do not leave the site. Per label: FD/KID/P/R/D/C and every floor
    are dropped when the label has fewer than ``k`` held-out or training images (values of
    the synthetic images alone stay); per type: everything measured on the held-out split."""
    if k <= 1:
        return
    for pl in entry.get("per_label", {}).values():
        if min(int(pl.get("n_holdout", 0)), int(pl.get("n_train", 0))) < k:
            pl["metrics"] = {m: v for m, v in pl.get("metrics", {}).items() if m not in FIDELITY}
            pl["floors"] = {}
            pl["suppressed"] = (f"fewer than k = {k} real held-out or training images of this label "
                                "(the site's audit_min_group): real-data statistics stay at the site")
    if min(int(entry.get("n_holdout", 0)), int(entry.get("n_train", 0))) < k:
        held = set(FIDELITY) | {"real_balanced_accuracy", "tstr_balanced_accuracy",
                                "augmented_balanced_accuracy", "real10_balanced_accuracy"}
        entry["metrics"] = {m: v for m, v in entry.get("metrics", {}).items() if m not in held}
        entry["floors"] = {}
        entry["skipped"]["real-data statistics"] = (
            f"fewer than k = {k} real held-out or training images (the site's audit_min_group)")


def evaluate_site(components: Any, dataset_cfg: DatasetConfig, *,
                  settings: EvaluationSettings | Mapping[str, Any] | None = None,
                  site_id: str | None = None, model_hash: str | None = None,
                  model_meta: Mapping[str, Any] | None = None, min_group: int = 1,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate with one site's data only; returns the shareable aggregate: scalars,
    label words, prompts and counts (no per-image value, no real pixel, no embedding, no
    path). The encoder is the site's label classifier (the rotation CNN for one label).
    ``min_group``: the site's k rule (:func:`suppress_small_groups`)."""
    s = make_settings(settings)
    say = progress or log.info
    t0 = time.perf_counter()
    clock = _Clock()
    with _threads(s.threads):
        with clock("load"):
            types = load_types([dataset_cfg], s.resolution)
        entries, warnings, enc = _evaluate_types(components, types, s, joint=False, model_meta=model_meta,
                                                 progress=say, clock=clock, gallery=None)
    (t, entry), = entries.items()
    if "all" not in entry["skipped"]:
        entry["skipped"]["type_recognised"] = SITE_TYPE_NOTE
    suppress_small_groups(entry, min_group)
    td = types[t]
    return {
        "kind": "medisyn-site-evaluation", "version": EVAL_VERSION, "created": _now(),
        "site_id": site_id, "model_hash": model_hash, "seed": s.seed, "settings": _settings_dict(s),
        "image_type": t, "encoder": entry.get("encoder"),
        "encoder_description": ENCODERS.get(entry.get("encoder") or "", ""),
        "near_duplicates": _near_dup_text(s), "data_hash": td.data_hashes[0],
        "n_synthetic": int(entry.get("n_synthetic", 0)), "type": entry, "warnings": warnings,
        "timings": _timings(clock, t0, int(entry.get("n_synthetic", 0))),
    }


# --------------------------------------------------------------------------- the coordinator's join


def site_parts(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A site's evaluate answer as one :func:`evaluate_site` result per image type: a site
    with several datasets answers ``{"kind": "medisyn-site-evaluations", "evaluations":
    [...]}``, a site with one answers its result."""
    parts = result.get("evaluations")
    if isinstance(parts, list):
        return [p for p in parts if isinstance(p, Mapping)]
    return [result]


def join_site_evaluations(site_results: Mapping[str, Mapping[str, Any]], *,
                          site_errors: Mapping[str, str] | None = None, model_hash: str | None = None,
                          settings: EvaluationSettings | Mapping[str, Any] | None = None,
                          expected_sites: Sequence[str] = (), config_hash: str | None = None
                          ) -> dict[str, Any]:
    """Join the sites' :func:`evaluate_site` aggregates into one evaluation, per image type
    (a type held by several sites is listed once per site: ``"<type> @ <site>"``). A site
    with several datasets contributes one entry per image type (:func:`site_parts`)."""
    s = make_settings(settings)
    types: dict[str, Any] = {}
    counts: dict[str, int] = {}
    parts = {site: site_parts(r) for site, r in site_results.items()}
    for rs in parts.values():
        for r in rs:
            counts[str(r.get("image_type"))] = counts.get(str(r.get("image_type")), 0) + 1
    encoders = set()
    timings: dict[str, Any] = {}
    warnings: list[str] = []
    for site, rs in sorted(parts.items()):
        for r in rs:
            t = str(r.get("image_type"))
            key = t if counts[t] == 1 else f"{t} @ {site}"
            types[key] = {**dict(r.get("type", {})), "site": site, "data_hash": r.get("data_hash"),
                          "encoder_description": r.get("encoder_description")}
            if r.get("encoder"):
                encoders.add(r["encoder"])
            warnings += [f"site {site}: {w}" for w in r.get("warnings", [])]
            if r.get("model_hash") not in (None, model_hash):
                warnings.append(f"site {site} evaluated model {r.get('model_hash')}, not {model_hash}")
        timings[site] = (rs[0].get("timings", {}) if len(rs) == 1
                         else {str(r.get("image_type")): r.get("timings", {}) for r in rs})
    errors = {str(k): str(v)[:500] for k, v in (site_errors or {}).items()}
    missing = sorted(set(expected_sites) - set(site_results) - set(errors))
    for m in missing:
        errors[m] = "did not answer"
    return {
        "kind": "medisyn-federated-evaluation", "version": EVAL_VERSION, "created": _now(),
        "model_hash": model_hash, "config_hash": config_hash, "seed": s.seed,
        "settings": _settings_dict(s),
        "encoder": encoders.pop() if len(encoders) == 1 else None,
        "encoder_description": "each site's own encoder, trained on its own real data: " + "; ".join(
            f"{k}: {v}" for k, v in ENCODERS.items() if k != "type-label"),
        "near_duplicates": _near_dup_text(s), "definitions": DEFINITIONS,
        "datasets": [{"image_type": str(r.get("image_type")), "site": site, "data_hashes": [r.get("data_hash")]}
                     for site, rs in sorted(parts.items()) for r in rs],
        "types": types, "sites": sorted(site_results), "site_errors": errors,
        "warnings": warnings, "timings": {"sites": timings},
        "note": SITE_TYPE_NOTE,
    }
