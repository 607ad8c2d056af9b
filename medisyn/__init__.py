"""MediSyn: federated, privacy-audited text-guided latent diffusion for medical images.

The core library (this package) never imports Flower; ``medisyn.server``,
``medisyn.client`` and ``medisyn.audit`` build on it.
"""

__version__ = "0.1.0"
