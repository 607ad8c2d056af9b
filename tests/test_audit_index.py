"""faiss search: exact by default, IVF above the size threshold with tuned nprobe."""

from __future__ import annotations

import numpy as np
from medisyn.audit.embedders import l2n
from medisyn.audit.index import NNIndex


def _clustered(n, d, centres, rng):
    c = l2n(rng.standard_normal((centres, d)))
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, d)) / np.sqrt(d)
    return l2n(x)


def test_flat_index_is_exact():
    rng = np.random.default_rng(0)
    x = l2n(rng.standard_normal((500, 32)))
    q = l2n(rng.standard_normal((50, 32)))
    idx = NNIndex(x)
    assert idx.kind == "flat"
    s, i = idx.search(q, 3)
    brute = q @ x.T
    assert np.array_equal(i[:, 0], brute.argmax(1))
    np.testing.assert_allclose(s[:, 0], brute.max(1), rtol=1e-5, atol=1e-6)


def test_ivf_tuned_recall_and_exact_rescoring():
    rng = np.random.default_rng(1)
    x = _clustered(20_000, 32, 200, rng)
    idx = NNIndex(x, exact_max=5_000, nlist=128)
    assert idx.kind == "ivf"
    src = rng.choice(len(x), 1000, replace=False)
    copies = l2n(x[src] + 0.05 * rng.standard_normal((1000, 32)) / np.sqrt(32))
    rec = idx.tune(copies, src, recall_target=0.999)
    assert rec >= 0.999
    assert idx.describe()["planted_copy_recall"] == rec
    fresh = _clustered(500, 32, 200, rng)
    s, i = idx.search_rescored(fresh, 1, threshold=0.0, margin=2.0)  # rescore every query
    es, ei = idx.exact_search(fresh, 1)
    np.testing.assert_allclose(s, es, rtol=1e-5, atol=1e-6)
