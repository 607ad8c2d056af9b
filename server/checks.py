"""Checks on every site reply before it is aggregated (plain numpy; no Flower).

A reply is rejected (and counted as a failure; the round goes on) when its weights
have other keys or shapes than the global model, hold a non-finite value, its
``num-examples`` is not a positive number, it comes from a site not in the expected
list, or its update norm ``||w_site - w_global||`` is more than ``max_norm_ratio`` times
the median update norm of the round's otherwise valid replies.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One site's reply, reduced to what the checks need."""

    site: str
    arrays: Mapping[str, np.ndarray]
    metrics: Mapping[str, float | int]


@dataclass
class Verdict:
    accepted: list[Candidate] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (site, reason)
    update_norms: dict[str, float] = field(default_factory=dict)


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
) -> Verdict:
    """Split replies into accepted and rejected (with a reason per rejected site)."""
    verdict = Verdict()
    survivors: list[Candidate] = []
    seen: set[str] = set()
    for c in candidates:
        reason = None
        if expected_sites and c.site not in expected_sites:
            reason = f"site {c.site!r} is not in the federation's expected sites"
        elif c.site in seen:
            reason = f"site {c.site!r} answered twice in one round (two nodes claim this id)"
        else:
            n = c.metrics.get("num-examples")
            if not isinstance(n, int | float) or not math.isfinite(n) or n <= 0:
                reason = f"num-examples must be a positive number, got {n!r}"
            else:
                reason = structural_problem(c.arrays, reference)
        seen.add(c.site)
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
    median = float(np.median(list(norms.values()))) if norms else 0.0
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
    for site, reason in verdict.rejected:
        logger.warning("rejected reply from site %s: %s", site, reason)
    return verdict
