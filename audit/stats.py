"""Small, dependency-free statistics used by the audit (Wilson intervals, quantiles,
one-sided Fisher test, ROC AUC with DeLong and bootstrap intervals)."""

from __future__ import annotations

import math

import numpy as np


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (95 % by default). n = 0 gives (0, 1)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def rate(k: int, n: int) -> dict[str, float | int]:
    lo, hi = wilson(k, n)
    return {"count": int(k), "n": int(n), "rate": (k / n) if n else 0.0, "ci_low": lo, "ci_high": hi}


def conservative_quantile(x: np.ndarray, q: float) -> float:
    """An observed value: ``sorted(x)[ceil(q·(n-1))]`` (numpy's ``higher`` rule), never
    below the empirical q-quantile, so at most a fraction 1-q of the sample lies above it.

    With n < 1/(1-q) samples this is simply the maximum; callers report n so that a
    reader can see how much the quantile rests on."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        raise ValueError("quantile of an empty sample")
    return float(np.quantile(x, q, method="higher"))


def effective_quantile_note(n: int, q: float) -> str:
    need = math.ceil(1.0 / max(1e-12, 1.0 - q))
    if n < need:
        return f"{n} held-out images < {need} needed to resolve q={q}: the threshold is the maximum"
    return f"{n} held-out images; q={q} rests on the top {max(1, int(round(n * (1 - q))))} of them"


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided Fisher exact test p-value for H1: rate1 > rate2 (k1/n1 vs k2/n2)."""
    if n1 <= 0 or n2 <= 0:
        return 1.0
    total_k = k1 + k2
    n = n1 + n2
    lo = max(0, total_k - n2)
    hi = min(total_k, n1)
    denom = _log_comb(n, total_k)
    p = 0.0
    for x in range(max(k1, lo), hi + 1):
        p += math.exp(_log_comb(n1, x) + _log_comb(n2, total_k - x) - denom)
    return float(min(1.0, p))


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC = P(score_pos > score_neg) + ½ P(tie) (Mann–Whitney)."""
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    allv = np.concatenate([pos, neg])
    ranks = _midranks(allv)
    r_pos = ranks[: pos.size].sum()
    return float((r_pos - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def _midranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, np.float64)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return ranks


def delong_ci(pos: np.ndarray, neg: np.ndarray, z: float = 1.959963984540054) -> tuple[float, float, float]:
    """AUC with DeLong's variance: (auc, ci_low, ci_high), clipped to [0, 1]."""
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    m, n = pos.size, neg.size
    a = auc(pos, neg)
    if m < 2 or n < 2:
        return a, 0.0, 1.0
    # structural components
    rx = _midranks(pos)
    ry = _midranks(neg)
    rz = _midranks(np.concatenate([pos, neg]))
    v10 = (rz[:m] - rx) / n
    v01 = 1.0 - (rz[m:] - ry) / m
    s = np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n
    se = math.sqrt(max(s, 0.0))
    return a, max(0.0, a - z * se), min(1.0, a + z * se)


def bootstrap_auc_ci(pos: np.ndarray, neg: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        vals[b] = auc(rng.choice(pos, pos.size), rng.choice(neg, neg.size))
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))
