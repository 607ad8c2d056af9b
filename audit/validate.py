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
from medisyn.audit.data import SiteImages
from medisyn.audit.prepare import PreparedIndex, prepare_index
from medisyn.audit.settings import AuditConfig, cpu_threads

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
                   breakdown: bool = True, prepared: PreparedIndex | None = None) -> dict[str, Any]:
    """Validate the site's detector on its own data; returns the ``validation.json`` dict.

    ``prepared``: the query's index (:func:`medisyn.audit.prepare.prepare_index`), used as
    it is (the site audit passes its own, so its embedders are fitted once); without it
    one is prepared here from ``images`` (``cache_dir``, ``components``, ``embedders``).
    """
    with cpu_threads(audit.threads):
        if prepared is None:
            prepared = prepare_index(images, audit, cache_dir=cache_dir, components=components,
                                     embedders=embedders)
        return _run_validation(prepared, audit, breakdown=breakdown)


def _split_check(prep: PreparedIndex, rng: np.random.Generator) -> None:
    """The clean held-out images split in two halves must have 10 images each. The split
    is drawn from ``rng`` (as it always was: the planted copies' sources follow it)."""
    n = len(prep.hold)
    rng.permutation(n)
    if n // 2 < 10 or n - n // 2 < 10:
        from medisyn.errors import DataError

        raise DataError(f"only {n} clean held-out images; validation needs at least 20")


def _planted_detection(prep: PreparedIndex, audit: AuditConfig, rng: np.random.Generator, *,
                       breakdown: bool) -> tuple[dict[str, Any], dict[str, dict[str, float]], dict[str, float], int]:
    """Plant copies of random training images under each family; a plant is detected if
    any view fires at its threshold. Returns (detection, per-view detection, seconds, n)."""
    train, views = prep.train, prep.views
    n_plant = min(audit.n_plant, len(train))
    src = rng.choice(len(train), n_plant, replace=False)
    families = list(augment.FAMILIES) + (list(augment.SINGLE_TRANSFORMS) if breakdown else [])
    detection: dict[str, Any] = {}
    per_view: dict[str, dict[str, float]] = {v.name: {} for v in views}
    seconds: dict[str, float] = {}
    for fi, fam in enumerate(families):
        t_f = time.perf_counter()
        planted = plant(train, fam, src, seed=audit.seed * 1000 + fi + 1)
        hit = np.zeros(n_plant, bool)
        for v in views:
            s, _nn = v.score(planted)
            fired = s >= v.threshold
            per_view[v.name][fam] = float(fired.mean())
            hit |= fired
        detection[fam] = stats.rate(int(hit.sum()), n_plant)
        seconds[fam] = round(time.perf_counter() - t_f, 2)
    return detection, per_view, seconds, n_plant


def _run_validation(prep: PreparedIndex, audit: AuditConfig, *, breakdown: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    rng = np.random.default_rng(audit.seed)
    _split_check(prep, rng)
    views, hold, cf = prep.views, prep.hold, prep.crossfit
    # Thresholds exactly as the site audit sets them (all clean held-out images, set by
    # prepare_index); false positives by K-fold cross-fitting (thresholds from K-1 folds,
    # flags on the last).
    detection, per_view_detection, family_seconds, n_plant = _planted_detection(
        prep, audit, rng, breakdown=breakdown)

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
        "site_image_type": prep.images.image_type,
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
        "calibration": {**prep.calibration, "folds": cf["folds"]},
        "quantile": audit.quantile,
        "views": [{**v.describe(), "fold_thresholds": [float(t[v.name]) for t in cf["fold_thresholds"]]}
                  for v in views],
        "data_findings": prep.clean.findings,
        "fit_seconds": round(prep.timings["fit_seconds"], 2),
        "holdout_score_seconds": round(prep.timings["holdout_score_seconds"], 2),
        "family_seconds": family_seconds,
        "seconds": round(time.perf_counter() - t0 + prep.timings["seconds"], 2),
        "method": (f"thresholds ({audit.calibration}) from all clean held-out images, as the "
                   "site audit sets them; planted copies of random training images flagged by "
                   "any view at those thresholds; false positives by "
                   f"{cf['folds']}-fold cross-fitting (thresholds from the other folds, flags "
                   "by any view counted on each fold; n = all clean held-out)"),
    }
