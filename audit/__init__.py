"""medisyn.audit — the site-side privacy audit and the release report (issue 5).

Functions the server calls (exact signatures)::

    from medisyn.audit import audit_synthetic_at_site, build_release_report

    audit_synthetic_at_site(
        site_config: SiteConfig | Path | str,          # a site TOML path or a loaded SiteConfig
        synthetic_images: Sequence[tuple[str, np.ndarray, str]],   # (id, uint8 image, prompt)
        components: Components | None = None,          # adds the VAE view + membership probe
        *,
        audit_config: AuditConfig | None = None,       # default: [audit] table / defaults
        out_dir: Path | None = None,                   # site-local report (stays on site)
        privacy: SitePrivacy | Mapping | None = None,  # {"epsilon", "delta", "max_epsilon"}
        model_hash: str | None = None,
        per_sample_loss: Callable | None = None,       # membership probe for a non-medisyn model
        validate: bool = True,                         # run detector validation (cached encoder)
    ) -> dict                                          # SiteAggregate as JSON-safe dict

    build_release_report(
        site_aggregates: Sequence[Mapping | SiteAggregate],
        synthetic_images: Sequence[tuple[str, np.ndarray, str]],
        *,
        out_dir: Path,                                 # writes release_report.json + .html
        privacy: Mapping[str, SitePrivacy | Mapping] | None = None,  # site id -> ε/δ/cap
        model_hash: str | None = None,
        config_hash: str | None = None,
        released_ids: Sequence[str] | None = None,     # default: all ids minus flagged ids
        alpha: float = 0.01,
        gallery_per_prompt: int = 8,
    ) -> ReleaseReport

    gate.evaluate(sites, privacy, released_ids, *, alpha=0.01) -> GateVerdict

    # the site's handler of the server's audit `query` (client/site.py imports it):
    site_query(site: SiteConfig, config: Mapping, components=None, *, audit_config=None) -> dict
    #   config: "audit" ("copy-detection"), "synthetic" (JSON list of
    #   {"id","prompt","png_base64"}, see encode_synthetic_payload) or "synthetic_dir",
    #   optional "model_hash", "epsilon", "delta". Returns the aggregate.
    encode_synthetic_payload(items: Sequence[tuple[str, np.ndarray, str]]) -> str   # server side

Modules (flat): ``augment`` (plant/training augmentations), ``embedders`` (pixel, VAE,
contrastive, local-dir views), ``index`` (faiss flat/IVF), ``calibration`` (split cleaning,
thresholds), ``validate`` (planted copies), ``membership`` (loss-threshold MIA),
``site_audit`` (site audit, release report), ``report`` (schemas + HTML), ``gate``,
``settings`` (``AuditConfig``, the ``[audit]`` table), ``stats``, ``data``, ``cli`` (typer
``app``: ``validate``, ``site``, ``gate``). See ``docs/audit.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["audit_synthetic_at_site", "build_release_report", "site_query",
           "encode_synthetic_payload", "AuditConfig"]


def __getattr__(name: str) -> Any:  # lazy: importing medisyn.audit stays cheap
    if name in ("audit_synthetic_at_site", "build_release_report", "site_query",
                "encode_synthetic_payload"):
        from medisyn.audit import site_audit

        return getattr(site_audit, name)
    if name == "AuditConfig":
        from medisyn.audit.settings import AuditConfig

        return AuditConfig
    raise AttributeError(name)
