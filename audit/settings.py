"""The audit's own settings (``[audit]`` table of a site TOML) and the views it builds.

``SiteConfig.audit`` holds the ``[audit]`` table as parsed (the core does not import the
audit package); :func:`audit_config` is the one place that types and validates it, and
:func:`load_site` reads a site TOML once into both.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medisyn.config import SiteConfig, load_site_config, validate
from medisyn.errors import ConfigError

log = logging.getLogger(__name__)


class AuditConfig(BaseModel):
    """Site-side audit settings; every field has a working default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quantile: float = Field(default=0.999, gt=0.5, lt=1.0)
    embedders: list[Literal["pixel", "contrastive", "vae"]] = Field(
        default_factory=lambda: ["pixel", "contrastive", "vae"])
    local_embedders: list[Path] = Field(default_factory=list)
    near_duplicate: float | None = Field(default=0.995, gt=0, le=1)
    contrastive_steps: int = Field(default=300, ge=1)
    contrastive_batch: int = Field(default=128, ge=8)
    contrastive_size: int = Field(default=32, ge=8, le=256)
    contrastive_width: int = Field(default=32, ge=4)
    contrastive_max_seconds: float | None = Field(default=900.0, gt=0)
    n_plant: int = Field(default=500, ge=10)
    seed: int = 0
    exact_max: int = Field(default=200_000, ge=1)
    recall_target: float = Field(default=0.999, gt=0, le=1)
    alpha: float = Field(default=0.01, gt=0, lt=0.5)
    threads: int | None = Field(default=2, ge=1)
    # where the contrastive encoder trains and embeds: "cpu", "cuda" (or "cuda:N"), or
    # "auto" (the first GPU if torch sees one). Measured on an H200: a training step
    # 2.8x faster than 16 CPU threads (bench/results/gpu_check.md).
    device: str = Field(default="cpu", pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$")
    neighbours: int = Field(default=5, ge=1, le=100)
    db_crop_grid: int = Field(default=3, ge=0, le=7)  # index 80% crops at grid×grid positions
    db_blur: float = Field(default=0.8, ge=0, le=3)  # also index 3x3-blurred training views
    query_flips: bool = True  # score queries and their horizontal/vertical mirrors
    pixel_shifts: int = Field(default=2, ge=0, le=4)  # pixel view: query shifts up to ±N px
    pixel_blur: float = Field(default=0.8, ge=0, le=3)  # pixel view: 3x3 Gaussian pre-blur (denoise)
    contrastive_proxy_weight: float = Field(default=0.0, ge=0)
    contrastive_preblur: float = Field(default=0.8, ge=0, le=3)
    # registration re-scorer (audit/registration.py): NCC over inverse crop/rotation search
    registration: bool = True
    registration_source: str = "contrastive"  # view whose top-k are the candidates
    registration_topk: int = Field(default=20, ge=1, le=200)
    registration_max_angle: float = Field(default=10.0, ge=0, le=45)
    registration_angle_step: float = Field(default=2.5, ge=0)
    registration_scales: list[float] = Field(default_factory=lambda: [0.8])
    registration_subpixel: int = Field(default=2, ge=1, le=4)
    registration_blur: float = Field(default=0.8, ge=0, le=3)
    # thresholds: "per_view" (each view's quantile) or "combined" (one for the union)
    calibration: Literal["per_view", "combined"] = "per_view"
    calibration_folds: int = Field(default=10, ge=2, le=100)  # cross-fitted false positives


def audit_device(name: str) -> str:
    """``[audit] device`` as a torch device name; a GPU that is asked for and absent is a
    config error (not a silent fall-back to the CPU)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"[audit] device = {name!r}, but torch sees no CUDA device on this machine "
                              f"(use \"cpu\" or \"auto\")")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"[audit] device = {name!r}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
        return name
    raise ConfigError(f"[audit] device = {name!r}: use \"cpu\", \"cuda\", \"cuda:N\" or \"auto\"")  # pragma: no cover


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Limit torch and faiss to ``n`` threads for the duration (None: leave as is). On a
    shared CPU, small ops with more threads than free cores mostly wait on each other."""
    if not n:
        yield
        return
    import faiss
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
        faiss.omp_set_num_threads(old)


def audit_config(site: SiteConfig, base: Path | None = None, *, source: str = "[audit]") -> AuditConfig:
    """The site's ``[audit]`` table as :class:`AuditConfig` (defaults where absent): the one
    reader. ``base``: the site TOML's directory, for relative ``local_embedders``."""
    audit = validate(AuditConfig, site.audit or {}, source)
    return _resolve_audit(audit, Path(base)) if base is not None else audit


def load_site(path: Path) -> tuple[SiteConfig, AuditConfig]:
    """A site TOML -> (SiteConfig, AuditConfig), parsed once; ``[audit]`` is optional."""
    path = Path(path)
    site = load_site_config(path)
    return site, audit_config(site, path.parent.resolve(), source=f"{path} [audit]")


def _resolve_audit(a: AuditConfig, base: Path) -> AuditConfig:
    dirs = [p if p.is_absolute() else (base / p).resolve() for p in a.local_embedders]
    return a.model_copy(update={"local_embedders": dirs})


def site_channels(images: Sequence[np.ndarray]) -> int:
    a = np.asarray(images[0])
    return 1 if a.ndim == 2 or a.shape[-1] == 1 else 3


def crop_grid_for(embedder: Any, audit: AuditConfig) -> int:
    """Database-side crops help learned views; the pixel view cannot use them."""
    from medisyn.audit.embedders import PixelEmbedder

    return 0 if isinstance(embedder, PixelEmbedder) else audit.db_crop_grid


def db_blur_for(embedder: Any, audit: AuditConfig) -> float:
    from medisyn.audit.embedders import PixelEmbedder

    return 0.0 if isinstance(embedder, PixelEmbedder) else audit.db_blur


def make_embedders(audit: AuditConfig, *, channels: int, cache_dir: Path | None,
                   components: Any | None = None) -> list[Any]:
    """The views configured for a site. ``vae`` needs ``components`` (skipped otherwise)."""
    from medisyn.audit.embedders import (
        ContrastiveEmbedder,
        LocalModelEmbedder,
        PixelEmbedder,
        VAEEmbedder,
    )

    out: list[Any] = []
    for name in audit.embedders:
        if name == "pixel":
            out.append(PixelEmbedder(channels=channels, flip_invariant=not audit.query_flips,
                                     shifts=audit.pixel_shifts, blur=audit.pixel_blur))
        elif name == "contrastive":
            out.append(ContrastiveEmbedder(
                channels=channels, size=audit.contrastive_size, width=audit.contrastive_width,
                steps=audit.contrastive_steps, batch_size=audit.contrastive_batch,
                seed=audit.seed, cache_dir=cache_dir, threads=audit.threads,
                max_seconds=audit.contrastive_max_seconds,
                proxy_weight=audit.contrastive_proxy_weight,
                preblur=audit.contrastive_preblur, device=audit_device(audit.device)))
        elif name == "vae":
            if components is None:
                log.info("no model given: the VAE-latent view is skipped")
                continue
            mc = getattr(components, "config", None)
            res = int(getattr(mc, "resolution", 32))
            ch = int(getattr(mc, "channels", channels))
            out.append(VAEEmbedder(components.vae, resolution=res, channels=ch))
    for d in audit.local_embedders:
        out.append(LocalModelEmbedder(d))
    if not out:
        raise ConfigError("[audit] embedders: no view left to audit with")
    return out
