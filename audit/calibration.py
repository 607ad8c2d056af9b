"""Calibrated thresholds: each view's copy threshold is a quantile (default 0.999) of the
best similarity of *held-out* real images to the training split.

Before calibrating, :func:`clean_splits` removes what would break the calibration and
reports it as a data finding (see ``shared/notes/audit-floor.md``):

* exact duplicates inside the training split (kept once),
* held-out images byte-identical to a training image,
* held-out images of a patient who also has training images (patient leak),
* cross-split *near*-duplicates: held-out images whose pixel-view similarity to a training
  image is ≥ ``near_dup`` (default 0.995; several images of one lesion or patient).

The cleaned held-out set is what the quantile rests on; its size is always reported.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from medisyn.audit import stats
from medisyn.audit.embedders import Embedder, PixelEmbedder
from medisyn.audit.index import NNIndex

log = logging.getLogger(__name__)

DEFAULT_QUANTILE = 0.999
DEFAULT_NEAR_DUP = 0.995


def _img_hash(im: np.ndarray) -> str:
    a = np.ascontiguousarray(np.asarray(im))
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


@dataclass
class CleanSplits:
    train_idx: list[int]
    holdout_idx: list[int]
    findings: dict[str, Any] = field(default_factory=dict)


def clean_splits(train: Sequence[np.ndarray], holdout: Sequence[np.ndarray], *,
                 train_patients: Sequence[str | None] | None = None,
                 holdout_patients: Sequence[str | None] | None = None,
                 near_dup: float | None = DEFAULT_NEAR_DUP) -> CleanSplits:
    """Indices of the training images to index and held-out images to calibrate on."""
    th = [_img_hash(im) for im in train]
    seen: dict[str, int] = {}
    train_idx = []
    for i, h in enumerate(th):
        if h not in seen:
            seen[h] = i
            train_idx.append(i)
    hh = [_img_hash(im) for im in holdout]
    exact_cross = [j for j, h in enumerate(hh) if h in seen]
    hseen: set[str] = set()
    dup_hold = []
    keep = []
    for j, h in enumerate(hh):
        if h in seen:
            continue
        if h in hseen:
            dup_hold.append(j)
            continue
        hseen.add(h)
        keep.append(j)
    patient_leak: list[int] = []
    if train_patients is not None and holdout_patients is not None:
        tp = {p for p in train_patients if p is not None}
        patient_leak = [j for j in keep if holdout_patients[j] is not None and holdout_patients[j] in tp]
        keep = [j for j in keep if j not in set(patient_leak)]
    near: list[int] = []
    near_sims: list[float] = []
    if near_dup is not None and keep:
        px = PixelEmbedder(flip_invariant=False)
        idx = NNIndex(px.embed([train[i] for i in train_idx]))
        s, _ = idx.search(px.embed([holdout[j] for j in keep]), 1)
        for j, v in zip(keep, s[:, 0], strict=True):
            if v >= near_dup:
                near.append(j)
                near_sims.append(float(v))
        keep = [j for j in keep if j not in set(near)]
    findings = {
        "train_exact_duplicates": len(train) - len(train_idx),
        "holdout_exact_duplicates": len(dup_hold),
        "cross_split_exact_duplicates": len(exact_cross),
        "cross_split_patient_overlap": len(patient_leak),
        "cross_split_near_duplicates": len(near),
        "near_duplicate_rule": None if near_dup is None else f"pixel cosine (16x16, centred) >= {near_dup}",
        "near_duplicate_max_similarity": max(near_sims) if near_sims else None,
        "n_train_total": len(train),
        "n_train_indexed": len(train_idx),
        "n_holdout_total": len(holdout),
        "n_holdout_clean": len(keep),
    }
    msgs = []
    if exact_cross:
        msgs.append(f"{len(exact_cross)} held-out image(s) are byte-identical to training images")
    if near:
        msgs.append(f"{len(near)} held-out image(s) are near-duplicates of training images")
    if patient_leak:
        msgs.append(f"{len(patient_leak)} held-out image(s) belong to patients with training images")
    if len(train) - len(train_idx):
        msgs.append(f"{len(train) - len(train_idx)} exact duplicate(s) inside the training split")
    findings["messages"] = msgs
    for m in msgs:
        log.warning("data finding: %s (excluded from calibration)", m)
    return CleanSplits(train_idx, keep, findings)


def _geometric_views(images: Sequence[np.ndarray], grid: int) -> list[list[np.ndarray]]:
    """80 % crops of every image at ``grid × grid`` positions (uint8, original size)."""
    from medisyn.audit import augment

    if grid <= 0 or not images:
        return []
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(np.asarray(im).shape, []).append(i)
    views: list[list[np.ndarray | None]] = [[None] * len(images) for _ in range(grid * grid)]
    for shape, idx in groups.items():
        t = augment.to_tensor([images[i] for i in idx])
        for g, c in enumerate(augment.crop_grid(t, grid=grid)):
            u = augment.to_uint8(c)
            for j, i in enumerate(idx):
                views[g][i] = u[j][:, :, 0] if len(shape) == 2 else u[j]
    return [[v for v in vs if v is not None] for vs in views]


def _blurred(images: Sequence[np.ndarray], sigma: float) -> list[np.ndarray]:
    """3×3 Gaussian-blurred copies (uint8), batched per image shape."""
    from medisyn.audit import augment

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(np.asarray(im).shape, []).append(i)
    out: list[np.ndarray | None] = [None] * len(images)
    for shape, idx in groups.items():
        u = augment.to_uint8(augment.blur(augment.to_tensor([images[i] for i in idx]), sigma=sigma))
        for j, i in enumerate(idx):
            out[i] = u[j][:, :, 0] if len(shape) == 2 else u[j]
    return [o for o in out if o is not None]


def _flip(images: Sequence[np.ndarray], axis: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(np.flip(np.asarray(im), axis)) for im in images]


class View:
    """One embedder with its index over the site's training images.

    ``db_crop_grid`` > 0 also indexes 80 % crops of every training image at
    ``grid × grid`` positions (so a crop-resize copy meets a matching crop of its source);
    ``query_flips`` scores every query as itself and its horizontal and vertical mirror.
    A query's score is its best similarity over its variants and all indexed views of a
    training image; scores and neighbours refer to training images (``owner``).
    """

    def __init__(self, embedder: Embedder, train_images: Sequence[np.ndarray], *,
                 exact_max: int | None = None, db_crop_grid: int = 0, query_flips: bool = False,
                 db_blur: float = 0.0):
        self.embedder = embedder
        self.name = embedder.name
        self.query_flips = query_flips
        self.db_crop_grid = db_crop_grid
        self.train_vectors = embedder.embed(train_images)
        self.db_blur = db_blur
        vecs = [self.train_vectors]
        owner = [np.arange(len(train_images))]
        db_views = _geometric_views(train_images, db_crop_grid)
        if db_blur > 0:
            db_views += [_blurred(v, db_blur) for v in [list(train_images), *db_views]]
        for imgs in db_views:
            vecs.append(embedder.embed(imgs))
            owner.append(np.arange(len(train_images)))
        self.owner = np.concatenate(owner)
        kw = {} if exact_max is None else {"exact_max": exact_max}
        self.index = NNIndex(np.concatenate(vecs), **kw)
        self.threshold: float | None = None
        self.calibration: dict[str, Any] = {}

    def _queries(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not self.query_flips:
            return self.embedder.embed_query(images)
        out: list[np.ndarray] = []
        for variant in (images, _flip(images, 1), _flip(images, 0)):
            out.extend(self.embedder.embed_query(variant))
        return out

    def score(self, images: Sequence[np.ndarray], k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Best similarity of each image to the training set (max over query variants and
        indexed views) and that training image's index; with k > 1 the top-k (N×k)."""
        best_s: np.ndarray | None = None
        best_i: np.ndarray | None = None
        n_views = (1 + self.db_crop_grid ** 2) * (2 if self.db_blur > 0 else 1)
        kk = k if (n_views == 1 or k == 1) else min(self.index.n, k * n_views)
        for q in self._queries(images):
            s, i = self.index.search_rescored(q, kk, threshold=self.threshold)
            if best_s is None:
                best_s, best_i = s, i
            else:
                better = s[:, 0] > best_s[:, 0]
                best_s[better], best_i[better] = s[better], i[better]
        assert best_s is not None and best_i is not None
        own = np.where(best_i >= 0, self.owner[np.maximum(best_i, 0)], -1)
        if kk != k:  # keep the first hit of each training image
            ss = np.zeros((own.shape[0], k), np.float32)
            ii = np.full((own.shape[0], k), -1, np.int64)
            for r in range(own.shape[0]):
                seen: list[int] = []
                for c in range(own.shape[1]):
                    if own[r, c] not in seen:
                        ss[r, len(seen)] = best_s[r, c]
                        ii[r, len(seen)] = own[r, c]
                        seen.append(int(own[r, c]))
                        if len(seen) == k:
                            break
            best_s, own = ss, ii
        if k == 1:
            return best_s[:, 0], own[:, 0]
        return best_s, own

    def calibrate(self, holdout_images: Sequence[np.ndarray], q: float = DEFAULT_QUANTILE) -> float:
        s, _ = self.score(holdout_images)
        self.threshold = stats.conservative_quantile(s, q)
        self.calibration = {
            "threshold": self.threshold,
            "quantile": q,
            "n_holdout": int(s.size),
            "note": stats.effective_quantile_note(int(s.size), q),
            "holdout_similarity_quantiles": similarity_quantiles(s),
        }
        return self.threshold

    def describe(self) -> dict[str, Any]:
        return {**self.embedder.describe(), "index": self.index.describe(), **self.calibration}


def similarity_quantiles(s: np.ndarray) -> dict[str, float]:
    s = np.asarray(s, np.float64)
    if s.size == 0:
        return {}
    qs = {"min": 0.0, "p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95,
          "p99": 0.99, "max": 1.0}
    return {k: float(np.quantile(s, v)) for k, v in qs.items()}


def flags(views: Sequence[View], images: Sequence[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Union rule: an image is flagged if any view's score reaches its threshold."""
    per: dict[str, np.ndarray] = {}
    anyf = np.zeros(len(images), dtype=bool)
    for v in views:
        if v.threshold is None:
            raise RuntimeError(f"view {v.name} is not calibrated")
        s, _ = v.score(images)
        per[v.name] = s
        anyf |= s >= v.threshold
    return anyf, per


# --------------------------------------------------------------------------- thresholds


def build_views(embedders: Sequence[Embedder], train: Sequence[np.ndarray], audit: Any) -> list[Any]:
    """The audit's views over ``train`` for fitted ``embedders`` (``audit``: an
    ``AuditConfig``), plus the registration re-scorer when ``audit.registration`` is on
    (candidates from the ``registration_source`` view, else the last learned view, else
    pixel)."""
    from medisyn.audit.settings import crop_grid_for, db_blur_for

    views: list[Any] = []
    for e in embedders:
        views.append(View(e, train, exact_max=audit.exact_max, db_crop_grid=crop_grid_for(e, audit),
                          db_blur=db_blur_for(e, audit), query_flips=audit.query_flips))
    if getattr(audit, "registration", False) and views:
        from medisyn.audit.registration import RegistrationView

        src = next((v for v in views if v.name == audit.registration_source), None)
        if src is None:
            learned = [v for v in views if not isinstance(v.embedder, PixelEmbedder)]
            src = learned[-1] if learned else views[0]
        step = audit.registration_angle_step
        m = audit.registration_max_angle
        angles = np.arange(-m, m + 1e-6, step) if step > 0 and m > 0 else np.zeros(1)
        views.append(RegistrationView(src, train, topk=audit.registration_topk, angles=angles,
                                      scales=audit.registration_scales,
                                      subpixel=audit.registration_subpixel,
                                      blur=audit.registration_blur, query_blur=0.0))
    return views


def log_distance(s: np.ndarray, median: float) -> np.ndarray:
    """Standardised score of a view: log((1 − median) / (1 − s)), how many times closer to
    "identical" (similarity 1) a query is than the view's median held-out image."""
    return np.log(max(1.0 - median, 1e-6) / np.maximum(1.0 - np.asarray(s, np.float64), 1e-6))


def view_thresholds(hold_scores: dict[str, np.ndarray], q: float,
                    method: str = "combined") -> tuple[dict[str, float], dict[str, Any]]:
    """Per-view thresholds from held-out scores (each array: one best similarity per
    held-out image, same images in every view).

    * ``per_view``: each view's ``q`` quantile (the union of V views then flags new images
      at up to V × (1 − q); with n < 1/(1−q) held-out images, at about V/(n+1)).
    * ``combined``: one threshold for the union — each view's score is standardised by
      :func:`log_distance` (the view's held-out median), an image's combined score is the
      maximum over views, and T = the ``q`` quantile of the held-out combined scores; view
      v fires at s ≥ 1 − (1 − median_v)·e^(−T), i.e. exactly when the combined score
      reaches T. The union then flags new images at about 1 − q (1/(n+1) below n = 1/(1−q)).
    """
    names = list(hold_scores)
    if method == "per_view":
        return {v: stats.conservative_quantile(hold_scores[v], q) for v in names}, {"method": method}
    if method != "combined":
        raise ValueError(f"unknown calibration method {method!r}")
    med = {v: float(np.median(hold_scores[v])) for v in names}
    z = np.max(np.stack([log_distance(hold_scores[v], med[v]) for v in names]), axis=0)
    t = stats.conservative_quantile(z, q)
    thr = {v: float(1.0 - max(1.0 - med[v], 1e-6) * np.exp(-t)) for v in names}
    # the held-out image that set T must itself reach the threshold (float round-off)
    for v in names:
        hit = log_distance(hold_scores[v], med[v]) >= t
        if hit.any():
            thr[v] = min(thr[v], float(np.min(np.asarray(hold_scores[v])[hit])))
    return thr, {"method": method, "combined_threshold": float(t), "medians": med}


def crossfit(hold_scores: dict[str, np.ndarray], q: float, *, method: str = "combined",
             folds: int = 10, seed: int = 0) -> dict[str, Any]:
    """K-fold cross-fitted false positives: thresholds from K−1 folds of the held-out
    images, flags counted on the remaining fold, for every fold (each held-out image is a
    genuinely new image once, judged by thresholds from (K−1)/K of the others — close to
    the deployed threshold, which uses all of them). Returns the union's flags, per-view
    flags and each fold's thresholds."""
    names = list(hold_scores)
    n = len(next(iter(hold_scores.values())))
    k = max(2, min(folds, n))
    perm = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(perm, k)
    anyf = np.zeros(n, bool)
    per = {v: np.zeros(n, bool) for v in names}
    fold_thr = []
    for j in range(k):
        test = parts[j]
        fit = np.concatenate([parts[i] for i in range(k) if i != j])
        thr, _ = view_thresholds({v: np.asarray(hold_scores[v])[fit] for v in names}, q, method)
        fold_thr.append(thr)
        for v in names:
            f = np.asarray(hold_scores[v])[test] >= thr[v]
            per[v][test] = f
            anyf[test] |= f
    return {"flags": anyf, "per_view": per, "fold_thresholds": fold_thr, "folds": k,
            "fold_sizes": [len(p) for p in parts]}
