"""Client-level central DP on the server (optional; a different privacy unit: a site).

Flower 1.42's ``DifferentialPrivacyClientSideFixedClipping`` (+ ``fixedclipping_mod`` on
the ClientApp) clips each site's update to ``clipping_norm`` and adds Gaussian noise of
std ``noise_multiplier · clipping_norm / num_sampled_clients`` to the FedAvg mean. It
accepts an optional accountant implementing ``flwr.supercore.privacy_accounting.
PrivacyAccountant``; Flower's own ``RdpAccountant`` needs ``flwr[dp]`` (Google's
``dp-accounting``), which this environment does not install.

:class:`ClientLevelAccountant` implements that protocol with Opacus's RDP analysis for
the one model Flower's fixed-clipping accounting supports: *no amplification* by client
sampling, *add-or-remove-one* neighbouring clients. Each round is then one Gaussian
mechanism with noise multiplier σ, whose RDP is exactly α / (2σ²) (Opacus
``compute_rdp`` with q = 1). Its ε is per *site* (client-level), and must be reported
separately from the sites' sample-level ε in their ledgers.
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

_SCHEMA = 1


def _flwr_types():
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        PrivacySpent,
        SamplingMethod,
    )

    return GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, PrivacySpent, SamplingMethod


def client_level_privacy_config(
    *, population_size: int, delta: float, max_epsilon: float | None = None
):
    """Flower ``PrivacyConfig`` for fixed-clipping accounting (no amplification)."""
    _, relation, config, _, sampling = _flwr_types()
    return config(
        target_delta=delta,
        population_size=population_size,
        neighboring_relation=relation.ADD_OR_REMOVE_ONE,
        sampling_method=sampling.NO_AMPLIFICATION,
        max_epsilon=max_epsilon,
    )


class ClientLevelAccountant:
    """Flower ``PrivacyAccountant`` backed by Opacus RDP (no amplification only)."""

    def __init__(self, config: Any) -> None:
        _, relation, _, _, sampling = _flwr_types()
        if config.sampling_method is not sampling.NO_AMPLIFICATION:
            raise ValueError(
                "ClientLevelAccountant supports sampling_method='no-amplification' only"
            )
        if config.neighboring_relation is not relation.ADD_OR_REMOVE_ONE:
            raise ValueError(
                "ClientLevelAccountant supports neighboring_relation='add-or-remove-one' only"
            )
        self._config = config
        self._history: list[tuple[float, int]] = []  # (noise_multiplier, count)

    @property
    def config(self) -> Any:
        return self._config

    @property
    def num_releases(self) -> int:
        return sum(c for _, c in self._history)

    def history(self) -> list[tuple[float, float, int]]:
        """As an Opacus accountant history: (σ, q = 1, releases)."""
        return [(s, 1.0, c) for s, c in self._history]

    def _check(self, event: Any, count: int) -> None:
        if event.population_size != self._config.population_size:
            raise ValueError(
                f"event population_size {event.population_size} != {self._config.population_size}"
            )
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ValueError("count must be a positive integer")

    def compose(self, event: Any, count: int = 1) -> None:
        self._check(event, count)
        sigma = float(event.noise_multiplier)
        if self._history and self._history[-1][0] == sigma:
            self._history[-1] = (sigma, self._history[-1][1] + count)
        else:
            self._history.append((sigma, count))

    def _eps(self, history: list[tuple[float, float, int]], delta: float) -> tuple[float, float]:
        import numpy as np
        from opacus.accountants.analysis import rdp as rdp_analysis
        from opacus.accountants.rdp import RDPAccountant

        if not history:
            return 0.0, math.nan
        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = sum(
            [
                rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=c, orders=orders)
                for s, q, c in history
            ]
        )
        with np.errstate(all="ignore"):
            eps, order = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        return float(eps), float(order)

    def get_epsilon(self, delta: float) -> float:
        return self._eps(self.history(), delta)[0]

    def get_delta(self, epsilon: float) -> float:
        """Smallest δ with ε(δ) ≤ epsilon: the inverse of Opacus's RDP → (ε, δ)
        conversion ``ε = rdp_α − (log δ + log α)/(α − 1) + log(1 − 1/α)``, minimised over
        the orders α."""
        import numpy as np
        from opacus.accountants.analysis import rdp as rdp_analysis
        from opacus.accountants.rdp import RDPAccountant

        if not self._history:
            return 0.0
        orders = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
        rdp = sum(
            [
                rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=c, orders=list(orders))
                for s, q, c in self.history()
            ]
        )
        log_delta = (orders - 1) * (rdp + np.log1p(-1 / orders) - epsilon) - np.log(orders)
        return float(min(1.0, np.exp(np.min(log_delta))))

    def get_privacy_spent(self, delta: float | None = None) -> Any:
        _, _, _, spent, _ = _flwr_types()
        d = self._config.target_delta if delta is None else delta
        eps, order = self._eps(self.history(), d)
        return spent(
            epsilon=eps,
            delta=d,
            num_releases=self.num_releases,
            accounting_method="rdp-opacus",
            optimal_order=None if math.isnan(order) else order,
        )

    def would_exceed(self, event: Any, max_epsilon: float | None = None, count: int = 1) -> bool:
        self._check(event, count)
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            raise ValueError("max_epsilon must be given in PrivacyConfig or to would_exceed()")
        projected = [*self.history(), (float(event.noise_multiplier), 1.0, count)]
        return self._eps(projected, self._config.target_delta)[0] > limit

    def state_dict(self) -> dict[str, object]:
        c = self._config
        return {
            "schema_version": _SCHEMA,
            "backend": "rdp-opacus",
            "config": {
                "target_delta": c.target_delta,
                "population_size": c.population_size,
                "neighboring_relation": c.neighboring_relation.value,
                "sampling_method": c.sampling_method.value,
                "max_epsilon": c.max_epsilon,
            },
            "history": [[s, n] for s, n in self._history],
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state.get("schema_version") != _SCHEMA or state.get("backend") != "rdp-opacus":
            raise ValueError("accountant state is not a ClientLevelAccountant state (schema 1)")
        if state.get("config") != self.state_dict()["config"]:
            raise ValueError("accountant state privacy configuration does not match")
        hist = state.get("history")
        if not isinstance(hist, list):
            raise ValueError("accountant state history must be a list")
        parsed = []
        for item in hist:
            s, n = float(item[0]), int(item[1])
            if not (math.isfinite(s) and s > 0 and n > 0):
                raise ValueError(f"bad history item {item!r}")
            parsed.append((s, n))
        self._history = parsed


def client_level_dp_strategy(
    strategy: Any,
    *,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_clients: int,
    population_size: int,
    delta: float,
    max_epsilon: float | None = None,
):
    """Wrap a FedAvg ``strategy`` in Flower's client-side fixed clipping with client-level
    accounting. Returns ``(dp_strategy, accountant)``; the ClientApp must add
    ``flwr.clientapp.mod.fixedclipping_mod``. ``dp_strategy.privacy_spent()`` gives the
    client-level (ε, δ), to be reported apart from the sites' sample-level ε."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    accountant = ClientLevelAccountant(
        client_level_privacy_config(
            population_size=population_size, delta=delta, max_epsilon=max_epsilon
        )
    )
    dp = DifferentialPrivacyClientSideFixedClipping(
        strategy,
        noise_multiplier=noise_multiplier,
        clipping_norm=clipping_norm,
        num_sampled_clients=num_sampled_clients,
        accountant=accountant,
    )
    return dp, accountant
