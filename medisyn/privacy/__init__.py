"""Sample-level differential privacy (see docs/privacy.md).

- :mod:`medisyn.privacy.dp`: ``DPSession`` — DP-SGD for one local round (Opacus hooks,
  Poisson sampling, per-sample clipping, noise) writing every step to the ledger.
- :mod:`medisyn.privacy.ledger`: ``PrivacyLedger`` — the site's cumulative accountant
  history on disk (atomic JSON, checksum, fail-closed).
- :mod:`medisyn.privacy.accounting`: ε of a history (Opacus PRV/RDP), default δ, σ from a
  target ε, group privacy.
- :mod:`medisyn.privacy.cli`: ``medisyn privacy show --site site.toml``.
- :mod:`medisyn.privacy.central`: optional client-level DP on the server (Flower fixed
  clipping with an Opacus-RDP accountant).

Submodules are imported explicitly; importing this package loads neither torch nor Opacus.
"""
