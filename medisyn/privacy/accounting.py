"""Privacy accounting: ε of a DP-SGD history, δ defaults, and σ from a target ε.

Everything here is a thin, explicit layer over Opacus's own accountants
(``opacus.accountants.create_accountant``), so that an ε computed from the ledger is by
construction the ε Opacus reports for the same history.

A *history* is a sequence of ``(sigma, q, steps)`` triples: ``steps`` DP-SGD steps with
noise multiplier ``sigma`` and Poisson sampling rate ``q``. ``sigma == 0`` marks steps
taken without noise (non-private training): their ε is infinite.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

AccountantKind = Literal["prv", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")

HistoryItem = tuple[float, float, int]


def default_delta(n_records: int) -> float:
    """The δ used when a site does not set one: ``min(1e-5, 1 / (10 N))``.

    δ must be well below 1/N (a mechanism that publishes one random record in full is
    (0, 1/N)-DP), so we take a tenth of it, and never more than the customary 1e-5.
    """
    if n_records < 1:
        raise ValueError(f"n_records must be positive, got {n_records}")
    return min(1e-5, 1.0 / (10.0 * n_records))


def merge_history(history: Iterable[Sequence[float]]) -> list[HistoryItem]:
    """Merge consecutive entries with equal ``(sigma, q)`` exactly as Opacus's accountants
    do when stepped one step at a time; drops entries with zero steps."""
    out: list[HistoryItem] = []
    for sigma, q, steps in history:
        steps = int(steps)
        if steps <= 0:
            continue
        sigma, q = float(sigma), float(q)
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def make_accountant(kind: str, history: Iterable[Sequence[float]] = ()):
    """An Opacus accountant of ``kind`` (``prv`` or ``rdp``) holding ``history``."""
    from opacus.accountants import create_accountant

    if kind not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {kind!r}; use one of {ACCOUNTANTS}")
    acc = create_accountant(mechanism=kind)
    acc.history = list(merge_history(history))
    return acc


@functools.lru_cache(maxsize=256)
def _epsilon_cached(kind: str, history: tuple[HistoryItem, ...], delta: float) -> float:
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            if kind == "rdp":
                eps = _rdp_epsilon(history, delta)
            else:
                eps = float(make_accountant(kind, history).get_epsilon(delta=delta))
        except (ValueError, OverflowError, FloatingPointError, ZeroDivisionError) as e:
            # The numerical accountant cannot bound this history: fail closed.
            logger.warning("accountant %s could not bound ε (%s); treating ε as infinite", kind, e)
            return math.inf
    if math.isnan(eps):
        return math.inf
    return max(eps, 0.0)


@functools.lru_cache(maxsize=1024)
def _rdp_unit(q: float, sigma: float) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis
    from opacus.accountants.rdp import RDPAccountant

    out = rdp_analysis.compute_rdp(
        q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    out.setflags(write=False)
    return out


def _rdp_epsilon(history: tuple[HistoryItem, ...], delta: float) -> float:
    """Exactly ``RDPAccountant.get_privacy_spent`` (same orders, same sum: Opacus's
    ``compute_rdp`` returns ``rdp_of_one_step * steps``), with the per-(q, σ) RDP curve
    cached, since it is by far the costly part and does not depend on the step count."""
    from opacus.accountants.analysis import rdp as rdp_analysis
    from opacus.accountants.rdp import RDPAccountant

    rdp = sum([_rdp_unit(q, sigma) * steps for (sigma, q, steps) in history])
    eps, _ = rdp_analysis.get_privacy_spent(
        orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
    )
    return float(eps)


def epsilon(history: Iterable[Sequence[float]], delta: float, kind: str = "prv") -> float:
    """ε(δ) of ``history`` under accountant ``kind`` (∞ if unbounded or non-private)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return _epsilon_cached(kind, tuple(merge_history(history)), float(delta))


def derive_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "prv"
) -> float:
    """σ such that ``steps`` steps at rate ``sample_rate`` spend ``target_epsilon`` (Opacus
    ``get_noise_multiplier``, which bisects to within 0.01 of the target from below)."""
    return _derive_cached(float(target_epsilon), float(delta), float(sample_rate), int(steps), kind)


@functools.lru_cache(maxsize=64)
def _derive_cached(target_epsilon: float, delta: float, q: float, steps: int, kind: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant=kind,
            )
        )


def group_epsilon(eps: float, delta: float, k: int) -> tuple[float, float]:
    """Group privacy: an (ε, δ)-DP mechanism is (kε, k·e^{(k-1)ε}·δ)-DP for groups of k
    records (e.g. all images of one patient)."""
    if k < 1:
        raise ValueError("group size must be >= 1")
    if math.isinf(eps):
        return math.inf, 1.0
    try:
        d = k * math.exp((k - 1) * eps) * delta
    except OverflowError:
        d = math.inf
    return k * eps, min(d, 1.0)
