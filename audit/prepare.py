"""The one index-preparation step of a site audit query.

The site audit (:mod:`medisyn.audit.site_audit`) and the detector validation
(:mod:`medisyn.audit.validate`) need the same things, built from the site's real images:
the cleaned splits, the fitted embedders, one view (embedder + index) per embedder over
the clean training images, the held-out images' scores and the thresholds set from
them (plus the K-fold cross-fitted held-out flags: the audit's held-out baseline and the
validation's false positives). :func:`prepare_index` builds them once per query; both
take the result, so one query fits each embedder once.

Nothing here mutates a :class:`PreparedIndex` after it is built (views keep the
thresholds set here; scoring reads them), so a long-lived site worker may keep one warm
between queries, keyed by :func:`prepared_key` (``medisyn.client.site``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from medisyn.audit import stats
from medisyn.audit.calibration import (
    CleanSplits,
    build_views,
    clean_splits,
    crossfit,
    similarity_quantiles,
    view_thresholds,
)
from medisyn.audit.data import SiteImages
from medisyn.audit.settings import AuditConfig, make_embedders, site_channels


@dataclass
class PreparedIndex:
    """The site's real images, indexed and calibrated for one audit configuration."""

    images: SiteImages
    clean: CleanSplits
    train: list[np.ndarray]  # clean training images (indexed)
    hold: list[np.ndarray]  # clean held-out images (calibration)
    embedders: list[Any]  # fitted
    views: list[Any]  # one per embedder (+ registration), thresholds set
    hold_scores: dict[str, np.ndarray]  # view -> best similarity of each held-out image
    calibration: dict[str, Any]  # how the thresholds were set (view_thresholds' info)
    crossfit: dict[str, Any]  # K-fold cross-fitted held-out flags (medisyn.audit.calibration.crossfit)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def has_patients(self) -> bool:
        return self.images.has_patients()

    def train_patient(self, clean_index: int) -> str | None:
        """The patient id of an indexed training image (None without patient ids)."""
        orig = self.clean.train_idx[int(clean_index)]
        return self.images.train_patients[orig] if self.has_patients else None


def prepare_index(images: SiteImages, audit: AuditConfig, *, cache_dir: Path | None,
                  components: Any | None = None, embedders: list[Any] | None = None) -> PreparedIndex:
    """Clean the splits, fit the embedders on the clean training images (once), build the
    views and set each view's threshold from all clean held-out images.

    ``embedders``: unfitted embedders to use instead of the configured ones
    (:func:`medisyn.audit.settings.make_embedders`, whose contrastive encoder is cached in
    ``cache_dir``; ``components`` adds the VAE-latent view).
    """
    t0 = time.perf_counter()
    has_p = images.has_patients()
    clean = clean_splits(images.train, images.holdout,
                         train_patients=images.train_patients if has_p else None,
                         holdout_patients=images.holdout_patients if has_p else None,
                         near_dup=audit.near_duplicate)
    train = [images.train[i] for i in clean.train_idx]
    hold = [images.holdout[j] for j in clean.holdout_idx]
    embs = embedders if embedders is not None else make_embedders(
        audit, channels=site_channels(train), cache_dir=cache_dir, components=components)
    t_fit = time.perf_counter()
    for e in embs:
        e.fit(train)
    views = build_views(embs, train, audit)
    fit_seconds = time.perf_counter() - t_fit
    t_hold = time.perf_counter()
    hold_scores = {v.name: v.score(hold)[0] for v in views}
    hold_seconds = time.perf_counter() - t_hold
    thr, cal_info = view_thresholds(hold_scores, audit.quantile, audit.calibration)
    cf = crossfit(hold_scores, audit.quantile, method=audit.calibration,
                  folds=audit.calibration_folds, seed=audit.seed)
    for v in views:
        v.threshold = thr[v.name]
        v.calibration = {"threshold": v.threshold, "quantile": audit.quantile,
                         "calibration": audit.calibration, "n_holdout": len(hold),
                         "note": stats.effective_quantile_note(len(hold), audit.quantile),
                         "holdout_similarity_quantiles": similarity_quantiles(hold_scores[v.name])}
    return PreparedIndex(images=images, clean=clean, train=train, hold=hold, embedders=embs, views=views,
                         hold_scores=hold_scores, calibration=cal_info, crossfit=cf,
                         timings={"fit_seconds": fit_seconds, "holdout_score_seconds": hold_seconds,
                                  "seconds": time.perf_counter() - t0})


def prepared_key(*, dataset: str, audit: AuditConfig, model: str, cache_dir: Path | None,
                 data_files: str) -> list[Any]:
    """What a :class:`PreparedIndex` is built from, for a content-keyed cache: the dataset
    config (JSON) and the content hash of its files, the audit config, the model's
    fingerprint (its VAE is a view; ``"none"`` without a model) and the encoder cache dir."""
    return ["audit-index", dataset, data_files, audit.model_dump(mode="json"), model,
            None if cache_dir is None else str(cache_dir)]
