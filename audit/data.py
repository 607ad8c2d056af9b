"""The site's real images, as the audit needs them (train vs held-out, patient ids).

Uses ``medisyn.data.read_raw`` when the core provides it; otherwise reads the ``.npz``
layouts of the shared development data directly (MedMNIST ``<split>_images`` keys, or
``images`` + ``split`` arrays) so the audit works before/without the core data layer.
Everything here stays on the site: ``sources`` (file/row) are for site-local reports only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medisyn.config import DatasetConfig
from medisyn.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class SiteImages:
    """Real images of one site split into training and held-out records."""

    train: list[np.ndarray]
    holdout: list[np.ndarray]
    train_patients: list[str | None] = field(default_factory=list)
    holdout_patients: list[str | None] = field(default_factory=list)
    train_sources: list[str] = field(default_factory=list)
    holdout_sources: list[str] = field(default_factory=list)
    image_type: str = "unknown"
    specialty: str = "unknown"

    def has_patients(self) -> bool:
        return any(p is not None for p in self.train_patients + self.holdout_patients)


def _from_raw(raw: object, cfg: DatasetConfig) -> SiteImages:
    train_names = set(cfg.split.train)
    hold_names = set(cfg.split.holdout)
    out = SiteImages([], [], image_type=cfg.image_type, specialty=cfg.specialty)
    for img, split, pid, src in zip(raw.images, raw.splits, raw.patient_ids, raw.sources,  # type: ignore[attr-defined]
                                    strict=True):
        if split in train_names:
            out.train.append(np.asarray(img))
            out.train_patients.append(pid)
            out.train_sources.append(str(src))
        elif split in hold_names:
            out.holdout.append(np.asarray(img))
            out.holdout_patients.append(pid)
            out.holdout_sources.append(str(src))
    return out


def _from_npz(cfg: DatasetConfig) -> SiteImages:
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError("dataset file not found", file=path)
    if path.suffix != ".npz":
        raise DataError(
            f"the audit reads {path.suffix or 'this'} data only through medisyn.data.read_raw, "
            "which is not available in this installation", file=path)
    try:
        d = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read npz: {e}", file=path) from None
    out = SiteImages([], [], image_type=cfg.image_type, specialty=cfg.specialty)
    pid_key = next((k for k in ("patient_id", "patient_ids") if k in d.files), None)
    if "images" in d.files and "split" in d.files:
        imgs = d["images"]
        splits = d["split"].astype(str)
        pids = d[pid_key].astype(str) if pid_key else None
        for i, s in enumerate(splits):
            rec = (imgs[i], None if pids is None else str(pids[i]), f"{path}#{i}")
            if s in cfg.split.train:
                out.train.append(rec[0])
                out.train_patients.append(rec[1])
                out.train_sources.append(rec[2])
            elif s in cfg.split.holdout:
                out.holdout.append(rec[0])
                out.holdout_patients.append(rec[1])
                out.holdout_sources.append(rec[2])
    else:
        for names, imgs_out, pats, srcs in (
            (cfg.split.train, out.train, out.train_patients, out.train_sources),
            (cfg.split.holdout, out.holdout, out.holdout_patients, out.holdout_sources),
        ):
            for s in names:
                key = f"{s}_images"
                if key not in d.files:
                    raise DataError(f"split {s!r}: key {key!r} not in {sorted(d.files)}", file=path)
                arr = d[key]
                for i in range(arr.shape[0]):
                    imgs_out.append(arr[i])
                    pats.append(None)
                    srcs.append(f"{path}:{key}[{i}]")
    for i, im in enumerate(out.train + out.holdout):
        if im.dtype != np.uint8:
            raise DataError(f"image dtype {im.dtype}, expected uint8", file=path, row=i)
    return out


def load_site_images(cfg: DatasetConfig) -> SiteImages:
    """Every training and held-out image of a site's dataset."""
    try:
        from medisyn.data import read_raw  # type: ignore[attr-defined]
    except ImportError:
        read_raw = None
    if read_raw is not None:
        out = _from_raw(read_raw(cfg), cfg)
    else:
        log.info("medisyn.data.read_raw not available; reading %s directly", cfg.path)
        out = _from_npz(cfg)
    if not out.train:
        raise DataError(f"no training images (splits {cfg.split.train})", file=cfg.path)
    if not out.holdout:
        raise DataError(f"no held-out images (splits {cfg.split.holdout}); the audit needs "
                        "held-out real images to calibrate", file=cfg.path)
    return out
