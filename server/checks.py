"""Checks on every site reply before it is aggregated (plain numpy; no Flower).

A reply is rejected (and counted as a failure; the round goes on) when it does not
echo the round's reply token (it is not bound to this run and round: a replay, or a
reply from an older run), its weights have other keys or shapes than the global model
or hold a non-finite value, its ``num-examples`` is not a positive number, it comes
from a site not in the expected list, two replies claim the same site (both are
rejected: the first one is not trusted more than the second), its update norm
``||w_site - w_global||`` is above the absolute bound ``max_update_norm``, or above
``max_norm_ratio`` times the median update norm of the round's otherwise valid replies.

An accepted reply's FedAvg weight is ``min(num-examples, the site's max_examples)``
(:attr:`Verdict.weights`), so no claim buys more weight than the site is enrolled
with. With every accepted update inside the norm bound ``B``, a FedAvg aggregate is a
convex combination of them: it moves at most ``B`` from the global model, and one
site of capped weight ``w`` moves it at most ``w * (B + ||rest - global||)`` from the
aggregate of the others (``tests/test_aggregation_bounds.py`` checks this).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from medisyn import protocol as P

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One site's reply, reduced to what the checks need."""

    site: str
    arrays: Mapping[str, np.ndarray]
    metrics: Mapping[str, float | int]
    token: str | None = None  # the reply token the site echoed (see federation.reply_token)


@dataclass
class Verdict:
    accepted: list[Candidate] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (site, reason)
    update_norms: dict[str, float] = field(default_factory=dict)
    # FedAvg weight of each accepted site: num-examples capped by its max_examples
    weights: dict[str, float] = field(default_factory=dict)
    capped: dict[str, tuple[float, int]] = field(default_factory=dict)  # site -> (claimed, cap)


def structural_problem(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> str | None:
    """The first problem with keys, shapes, dtypes or values, or None."""
    keys, ref_keys = set(arrays), set(reference)
    if keys != ref_keys:
        missing = sorted(ref_keys - keys)[:3]
        extra = sorted(keys - ref_keys)[:3]
        return f"weight keys differ from the global model (missing {missing}, unexpected {extra})"
    for k in sorted(reference):
        a, ref = arrays[k], reference[k]
        if tuple(a.shape) != tuple(ref.shape):
            return f"weight {k!r} has shape {tuple(a.shape)}, expected {tuple(ref.shape)}"
        if not np.issubdtype(a.dtype, np.floating):
            return f"weight {k!r} has dtype {a.dtype}, expected a floating type"
        if not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            return f"weight {k!r} has {bad} non-finite values (NaN/inf)"
    return None


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    total = 0.0
    for k, ref in reference.items():
        d = arrays[k].astype(np.float64, copy=False) - ref.astype(np.float64, copy=False)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def check_replies(
    candidates: Sequence[Candidate],
    reference: Mapping[str, np.ndarray],
    *,
    expected_sites: Sequence[str] = (),
    max_norm_ratio: float = 10.0,
    max_update_norm: float | None = None,
    max_examples: Callable[[str], int | None] | Mapping[str, int] | None = None,
    expected_token: str | None = None,
) -> Verdict:
    """Split replies into accepted and rejected (with a reason per rejected site).

    ``max_examples``: a site's cap on the weight its ``num-examples`` claim buys (a
    mapping or a function of the site id; None / absent: uncapped). ``expected_token``:
    the round's reply token every reply must echo (None: not checked).
    """
    verdict = Verdict()
    survivors: list[Candidate] = []
    claims: dict[str, int] = {}
    for c in candidates:
        claims[c.site] = claims.get(c.site, 0) + 1
    for c in candidates:
        reason = None
        if expected_token is not None and c.token != expected_token:
            reason = ("reply is not bound to this run and round (reply token missing or "
                      "different: a replayed or stale reply)")
        elif expected_sites and c.site not in expected_sites:
            reason = f"site {c.site!r} is not in the federation's expected sites"
        elif claims[c.site] > 1:
            reason = (f"{claims[c.site]} replies claim site {c.site!r} in one round "
                      "(two nodes claim this id): all of them are rejected")
        else:
            n = c.metrics.get(P.NUM_EXAMPLES)
            if not isinstance(n, int | float) or not math.isfinite(n) or n <= 0:
                reason = f"num-examples must be a positive number, got {n!r}"
            else:
                reason = structural_problem(c.arrays, reference)
        if reason is None:
            bad_metric = next(
                (k for k, v in c.metrics.items() if isinstance(v, float) and not math.isfinite(v)),
                None,
            )
            if bad_metric is not None:
                reason = f"metric {bad_metric!r} is not finite"
        if reason is None:
            survivors.append(c)
        else:
            verdict.rejected.append((c.site, reason))

    norms = {c.site: update_norm(c.arrays, reference) for c in survivors}
    verdict.update_norms = norms
    if max_update_norm is not None:
        bounded = []
        for c in survivors:
            if norms[c.site] > max_update_norm:
                verdict.rejected.append(
                    (c.site, f"update norm {norms[c.site]:.4g} is above max_update_norm {max_update_norm:g}")
                )
            else:
                bounded.append(c)
        survivors = bounded
    median = float(np.median([norms[c.site] for c in survivors])) if survivors else 0.0
    for c in survivors:
        norm = norms[c.site]
        if median > 0 and norm > max_norm_ratio * median:
            verdict.rejected.append(
                (
                    c.site,
                    f"update norm {norm:.4g} is more than {max_norm_ratio:g}x "
                    f"the round's median {median:.4g}",
                )
            )
        else:
            verdict.accepted.append(c)
            claimed = float(c.metrics[P.NUM_EXAMPLES])
            cap = _cap(max_examples, c.site)
            verdict.weights[c.site] = claimed if cap is None else min(claimed, float(cap))
            if cap is not None and claimed > cap:
                verdict.capped[c.site] = (claimed, cap)
                logger.warning("site %s claims num-examples %.6g; weighted as its max_examples %d",
                               c.site, claimed, cap)
    for site, reason in verdict.rejected:
        logger.warning("rejected reply from site %s: %s", site, reason)
    return verdict


def _cap(max_examples: Callable[[str], int | None] | Mapping[str, int] | None, site: str) -> int | None:
    if max_examples is None:
        return None
    if callable(max_examples):
        return max_examples(site)
    return max_examples.get(site)


def non_finite_problem(arrays: Mapping[str, np.ndarray]) -> str | None:
    """Why an aggregate may not become the global model (non-finite values), or None."""
    bad = {k: int(np.size(a) - np.count_nonzero(np.isfinite(a))) for k, a in arrays.items()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        first = sorted(bad)[0]
        return f"the aggregate has {sum(bad.values())} non-finite values (first in {first!r})"
    return None
