"""Detector validation: can the audit see copies?

Plants exact, mild and hard copies of training images (see :mod:`medisyn.audit.augment`)
and scores them against the training index; genuinely new images are held-out real images
that were *not* used for calibration. The held-out set (after :func:`clean_splits`) is split
in two folds: thresholds from one, false positives counted on the other, both ways, so each
clean held-out image is a genuinely new image once. A plant or a new image is flagged if any view fires (union rule).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medisyn.audit import augment, stats
from medisyn.audit.calibration import View, clean_splits, similarity_quantiles
from medisyn.audit.data import SiteImages
from medisyn.audit.settings import (
    AuditConfig,
    cpu_threads,
    crop_grid_for,
    db_blur_for,
    make_embedders,
    site_channels,
)

log = logging.getLogger(__name__)

TARGETS = {"mild": 0.99, "hard": 0.90, "false_positive_rate": 0.01}


def plant(train: Sequence[np.ndarray], family: str, idx: np.ndarray, seed: int) -> list[np.ndarray]:
    """Planted copies (uint8) of ``train[idx]`` under one family or single transform."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for k, i in enumerate(idx):
        shapes.setdefault(np.asarray(train[i]).shape, []).append(k)
    out: list[np.ndarray | None] = [None] * len(idx)
    for shape, ks in shapes.items():
        x = augment.to_tensor([train[idx[k]] for k in ks])
        y = augment.to_uint8(augment.apply_family(x, family, g))
        for j, k in enumerate(ks):
            im = y[j]
            out[k] = im[:, :, 0] if len(shape) == 2 else im
    return [o for o in out if o is not None]


def run_validation(images: SiteImages, audit: AuditConfig, *, cache_dir: Path | None = None,
                   components: Any | None = None, embedders: list[Any] | None = None,
                   breakdown: bool = True) -> dict[str, Any]:
    """Validate the site's detector on its own data; returns the ``validation.json`` dict."""
    with cpu_threads(audit.threads):
        return _run_validation(images, audit, cache_dir=cache_dir, components=components,
                               embedders=embedders, breakdown=breakdown)


def _run_validation(images: SiteImages, audit: AuditConfig, *, cache_dir: Path | None,
                    components: Any | None, embedders: list[Any] | None,
                    breakdown: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    clean = clean_splits(images.train, images.holdout,
                         train_patients=images.train_patients if images.has_patients() else None,
                         holdout_patients=images.holdout_patients if images.has_patients() else None,
                         near_dup=audit.near_duplicate)
    train = [images.train[i] for i in clean.train_idx]
    hold = [images.holdout[j] for j in clean.holdout_idx]
    rng = np.random.default_rng(audit.seed)
    perm = rng.permutation(len(hold))
    half = len(hold) // 2
    calib = [hold[j] for j in perm[:half]]
    fresh = [hold[j] for j in perm[half:]]
    if len(calib) < 10 or len(fresh) < 10:
        from medisyn.errors import DataError

        raise DataError(f"only {len(hold)} clean held-out images; validation needs at least 20")

    embs = embedders if embedders is not None else make_embedders(
        audit, channels=site_channels(train), cache_dir=cache_dir, components=components)
    t_fit = time.perf_counter()
    views = []
    for e in embs:
        e.fit(train)
        views.append(View(e, train, exact_max=audit.exact_max, db_crop_grid=crop_grid_for(e, audit),
                          db_blur=db_blur_for(e, audit),
                          query_flips=audit.query_flips))
    fit_seconds = time.perf_counter() - t_fit
    # 2-fold: thresholds from one half, false positives counted on the other, both ways
    # (every clean held-out image is a "new image" once). Plants are judged at the higher
    # of the two folds' thresholds (conservative).
    a_idx, b_idx = perm[:half], perm[half:]
    hold_scores = {v.name: v.score(hold)[0] for v in views}
    fold_t: dict[str, tuple[float, float]] = {}
    for v in views:
        hs = hold_scores[v.name]
        ta = stats.conservative_quantile(hs[a_idx], audit.quantile)
        tb = stats.conservative_quantile(hs[b_idx], audit.quantile)
        fold_t[v.name] = (ta, tb)
        v.threshold = max(ta, tb)
        n_fold = len(a_idx) if ta >= tb else len(b_idx)
        v.calibration = {"threshold": v.threshold, "quantile": audit.quantile,
                         "n_holdout": int(n_fold),
                         "note": stats.effective_quantile_note(int(n_fold), audit.quantile),
                         "fold_thresholds": [ta, tb],
                         "holdout_similarity_quantiles": similarity_quantiles(hs)}

    n_plant = min(audit.n_plant, len(train))
    src = rng.choice(len(train), n_plant, replace=False)
    families = list(augment.FAMILIES) + (list(augment.SINGLE_TRANSFORMS) if breakdown else [])
    detection: dict[str, Any] = {}
    per_view_detection: dict[str, dict[str, float]] = {v.name: {} for v in views}
    for fi, fam in enumerate(families):
        planted = plant(train, fam, src, seed=audit.seed * 1000 + fi + 1)
        hit = np.zeros(n_plant, bool)
        for v in views:
            s, nn = v.score(planted)
            fired = s >= v.threshold
            per_view_detection[v.name][fam] = float(fired.mean())
            hit |= fired
        detection[fam] = stats.rate(int(hit.sum()), n_plant)

    fp_any = np.zeros(len(hold), bool)
    per_view_fp = {}
    for v in views:
        hs = hold_scores[v.name]
        ta, tb = fold_t[v.name]
        f = np.zeros(len(hold), bool)
        f[b_idx] = hs[b_idx] >= ta
        f[a_idx] = hs[a_idx] >= tb
        per_view_fp[v.name] = float(f.mean())
        fp_any |= f
    fp = stats.rate(int(fp_any.sum()), len(hold))

    det_rate = {f: detection[f]["rate"] for f in augment.FAMILIES}
    targets_met = {
        "mild": detection["mild"]["rate"] >= TARGETS["mild"],
        "hard": detection["hard"]["rate"] >= TARGETS["hard"],
        "false_positive_rate": fp["rate"] <= TARGETS["false_positive_rate"],
    }
    return {
        "site_image_type": images.image_type,
        "detection_rate": det_rate,
        "false_positive_rate": fp["rate"],
        "thresholds": {v.name: v.threshold for v in views},
        "detection": detection,
        "false_positive": fp,
        "per_view": {v.name: {"detection_rate": per_view_detection[v.name],
                              "false_positive_rate": per_view_fp[v.name]} for v in views},
        "targets": TARGETS,
        "targets_met": targets_met,
        "validated": bool(all(targets_met.values()) and detection["exact"]["rate"] >= 0.99),
        "n_planted_per_family": int(n_plant),
        "n_calibration": len(calib),
        "n_calibration_folds": [len(a_idx), len(b_idx)],
        "n_fresh": len(hold),
        "quantile": audit.quantile,
        "views": [v.describe() for v in views],
        "data_findings": clean.findings,
        "fit_seconds": round(fit_seconds, 2),
        "seconds": round(time.perf_counter() - t0, 2),
        "method": ("clean held-out split in two folds; per view, threshold = quantile of one "
                   "fold's best similarity to train; false positives = images of the other fold "
                   "flagged by any view, both ways (n = all clean held-out); planted copies of "
                   "random training images flagged by any view at the higher fold threshold"),
    }
