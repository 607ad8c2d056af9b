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
from medisyn.audit.calibration import (
    build_views,
    clean_splits,
    crossfit,
    similarity_quantiles,
    view_thresholds,
)
from medisyn.audit.data import SiteImages
from medisyn.audit.settings import AuditConfig, cpu_threads, make_embedders, site_channels

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
    for e in embs:
        e.fit(train)
    views = build_views(embs, train, audit)
    fit_seconds = time.perf_counter() - t_fit
    # Thresholds exactly as the site audit sets them (all clean held-out images); false
    # positives by K-fold cross-fitting (thresholds from K-1 folds, flags on the last).
    t_hold = time.perf_counter()
    hold_scores = {v.name: v.score(hold)[0] for v in views}
    hold_seconds = time.perf_counter() - t_hold
    thr, cal_info = view_thresholds(hold_scores, audit.quantile, audit.calibration)
    cf = crossfit(hold_scores, audit.quantile, method=audit.calibration,
                  folds=audit.calibration_folds, seed=audit.seed)
    for v in views:
        hs = hold_scores[v.name]
        v.threshold = thr[v.name]
        v.calibration = {"threshold": v.threshold, "quantile": audit.quantile,
                         "calibration": audit.calibration,
                         "n_holdout": len(hold),
                         "note": stats.effective_quantile_note(len(hold), audit.quantile),
                         "fold_thresholds": [float(t[v.name]) for t in cf["fold_thresholds"]],
                         "holdout_similarity_quantiles": similarity_quantiles(hs)}

    n_plant = min(audit.n_plant, len(train))
    src = rng.choice(len(train), n_plant, replace=False)
    families = list(augment.FAMILIES) + (list(augment.SINGLE_TRANSFORMS) if breakdown else [])
    detection: dict[str, Any] = {}
    per_view_detection: dict[str, dict[str, float]] = {v.name: {} for v in views}
    family_seconds: dict[str, float] = {}
    for fi, fam in enumerate(families):
        t_f = time.perf_counter()
        planted = plant(train, fam, src, seed=audit.seed * 1000 + fi + 1)
        hit = np.zeros(n_plant, bool)
        for v in views:
            s, nn = v.score(planted)
            fired = s >= v.threshold
            per_view_detection[v.name][fam] = float(fired.mean())
            hit |= fired
        detection[fam] = stats.rate(int(hit.sum()), n_plant)
        family_seconds[fam] = round(time.perf_counter() - t_f, 2)

    fp_any = cf["flags"]
    per_view_fp = {v.name: float(cf["per_view"][v.name].mean()) for v in views}
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
        "n_calibration": len(hold),
        "n_calibration_folds": cf["fold_sizes"],
        "n_fresh": len(hold),
        "calibration": {**cal_info, "folds": cf["folds"]},
        "quantile": audit.quantile,
        "views": [v.describe() for v in views],
        "data_findings": clean.findings,
        "fit_seconds": round(fit_seconds, 2),
        "holdout_score_seconds": round(hold_seconds, 2),
        "family_seconds": family_seconds,
        "seconds": round(time.perf_counter() - t0, 2),
        "method": (f"thresholds ({audit.calibration}) from all clean held-out images, as the "
                   "site audit sets them; planted copies of random training images flagged by "
                   "any view at those thresholds; false positives by "
                   f"{cf['folds']}-fold cross-fitting (thresholds from the other folds, flags "
                   "by any view counted on each fold; n = all clean held-out)"),
    }
