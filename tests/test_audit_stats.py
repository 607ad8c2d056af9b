"""Calibration quantiles and interval statistics on known distributions."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from medisyn.audit import stats
from medisyn.audit.calibration import View, clean_splits
from medisyn.audit.embedders import PixelEmbedder


def test_conservative_quantile_uniform_and_normal():
    rng = np.random.default_rng(0)
    u = rng.uniform(size=200_000)
    assert abs(stats.conservative_quantile(u, 0.999) - 0.999) < 5e-4
    z = rng.standard_normal(200_000)
    # Φ^-1(0.999) = 3.0902
    assert abs(stats.conservative_quantile(z, 0.999) - 3.0902) < 0.05
    assert abs(stats.conservative_quantile(z, 0.95) - 1.6449) < 0.02


def test_quantile_on_small_sample_is_the_maximum_and_says_so():
    x = np.arange(100) / 100.0
    assert stats.conservative_quantile(x, 0.999) == x.max()
    assert "maximum" in stats.effective_quantile_note(100, 0.999)
    assert "maximum" not in stats.effective_quantile_note(5000, 0.999)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=300),
       st.floats(0.5, 0.9999))
def test_quantile_is_an_observed_value_with_enough_mass_below(xs, q):
    x = np.asarray(xs)
    t = stats.conservative_quantile(x, q)
    assert t in x
    assert np.mean(x <= t) >= q - 1e-12
    assert np.mean(x > t) <= 1 - q + 1e-12
    assert t == np.sort(x)[math.ceil(q * (x.size - 1) - 1e-9)]


def test_wilson_known_values():
    lo, hi = stats.wilson(0, 100)
    assert lo == 0.0 and abs(hi - 0.0370) < 1e-3
    lo, hi = stats.wilson(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert stats.wilson(0, 0) == (0.0, 1.0)


def test_fisher_one_sided():
    assert stats.fisher_greater(0, 100, 0, 100) == 1.0
    assert stats.fisher_greater(20, 100, 1, 100) < 1e-4
    # rate below baseline is never significant
    assert stats.fisher_greater(1, 100, 20, 100) > 0.99
    # exact value: 2x2 table [[3,0],[0,3]] one-sided p = 1/20
    assert math.isclose(stats.fisher_greater(3, 3, 0, 3), 0.05, rel_tol=1e-9)


def test_auc_and_delong_on_known_shift():
    rng = np.random.default_rng(1)
    d = 1.0
    pos = rng.standard_normal(3000) + d
    neg = rng.standard_normal(3000)
    truth = 0.5 * (1 + math.erf(d / 2))  # Φ(d/√2)
    a, lo, hi = stats.delong_ci(pos, neg)
    assert lo < truth < hi
    assert abs(a - truth) < 0.02
    blo, bhi = stats.bootstrap_auc_ci(pos[:300], neg[:300], n_boot=200)
    assert blo < truth < bhi
    assert stats.auc(np.ones(5), np.ones(5)) == 0.5


def test_threshold_is_the_heldout_quantile():
    """A view's threshold is exactly the conservative quantile of held-out best scores."""
    rng = np.random.default_rng(2)
    train = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(300)]
    hold = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(2000)]
    v = View(PixelEmbedder(flip_invariant=False), train)
    s, _ = v.score(hold)
    for q in (0.9, 0.99, 0.999):
        assert v.calibrate(hold, q) == stats.conservative_quantile(s, q)
        assert v.calibration["n_holdout"] == 2000
        assert abs(np.mean(s >= v.threshold) - (1 - q)) <= 1.0 / 2000 + 1e-12


def test_clean_splits_reports_duplicates_and_patient_overlap():
    rng = np.random.default_rng(3)
    train = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(50)]
    train.append(train[0].copy())  # duplicate inside train
    hold = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(30)]
    hold.append(train[5].copy())  # exact cross-split duplicate
    near = train[7].astype(int)
    near[0, 0] = min(255, near[0, 0] + 3)
    hold.append(near.astype(np.uint8))  # near duplicate
    tp = [f"p{i}" for i in range(len(train))]
    hp = [f"q{i}" for i in range(len(hold))]
    hp[2] = "p9"  # held-out image of a training patient
    c = clean_splits(train, hold, train_patients=tp, holdout_patients=hp)
    f = c.findings
    assert f["train_exact_duplicates"] == 1
    assert f["cross_split_exact_duplicates"] == 1
    assert f["cross_split_near_duplicates"] == 1
    assert f["cross_split_patient_overlap"] == 1
    assert f["n_holdout_clean"] == len(hold) - 3
    assert 2 not in c.holdout_idx and len(hold) - 1 not in c.holdout_idx
