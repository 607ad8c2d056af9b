"""Client-level central DP helpers (Flower fixed clipping + an Opacus-RDP accountant)."""

from __future__ import annotations

import json
import math

import pytest

from medisyn.privacy.central import (
    ClientLevelAccountant,
    client_level_dp_strategy,
    client_level_privacy_config,
)


def _event(sigma: float, m: int = 2, n: int = 3):
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    return GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=m, population_size=n)


def test_gaussian_mechanism_epsilon_and_state_round_trip() -> None:
    cfg = client_level_privacy_config(population_size=3, delta=1e-5, max_epsilon=20.0)
    acc = ClientLevelAccountant(cfg)
    assert acc.get_epsilon(1e-5) == 0.0
    eps = []
    for _ in range(5):
        acc.compose(_event(2.0))
        eps.append(acc.get_epsilon(1e-5))
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    # No amplification: k Gaussian releases at σ have RDP k·α/(2σ²); compare the
    # RDP -> (ε, δ) conversion computed independently over the same orders.
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    k, s, d = 5, 2.0, 1e-5
    best = min(
        k * a / (2 * s * s) + math.log1p(-1 / a) - (math.log(d) + math.log(a)) / (a - 1)
        for a in orders
    )
    assert eps[-1] == pytest.approx(best, rel=1e-9)
    spent = acc.get_privacy_spent()
    assert spent.epsilon == eps[-1] and spent.num_releases == 5
    assert acc.get_epsilon(acc.get_delta(eps[-1])) == pytest.approx(eps[-1], rel=1e-6)
    state = json.loads(json.dumps(acc.state_dict()))
    other = ClientLevelAccountant(cfg)
    other.load_state_dict(state)
    assert other.get_epsilon(1e-5) == eps[-1]
    assert acc.would_exceed(_event(2.0), max_epsilon=eps[-1] + 1e-9)
    assert not acc.would_exceed(_event(2.0), max_epsilon=eps[-1] + 100)


def test_flower_fixed_clipping_strategy_accepts_the_accountant() -> None:
    from flwr.serverapp.strategy import FedAvg

    dp, acc = client_level_dp_strategy(
        FedAvg(),
        noise_multiplier=1.0,
        clipping_norm=5.0,
        num_sampled_clients=2,
        population_size=2,
        delta=1e-4,
        max_epsilon=10.0,
    )
    assert dp.accountant is acc and dp.privacy_spent().epsilon == 0.0


def test_matches_flowers_own_rdp_accountant_when_dp_accounting_is_installed() -> None:
    pytest.importorskip("dp_accounting")
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    cfg = client_level_privacy_config(population_size=3, delta=1e-5)
    ours, theirs = ClientLevelAccountant(cfg), RdpAccountant(cfg)
    for sigma in (1.0, 1.0, 2.0):
        ours.compose(_event(sigma))
        theirs.compose(_event(sigma))
    # different order grids: ours must be a valid bound close to theirs
    assert ours.get_epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=0.05)
