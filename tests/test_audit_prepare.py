"""One index preparation per audit query: the site audit and its detector validation
share the fitted embedders and views, and a site worker may keep them warm."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from medisyn.audit import embedders as E
from medisyn.audit.prepare import prepare_index
from medisyn.audit.settings import load_site
from medisyn.audit.site_audit import audit_synthetic_at_site
from medisyn.audit.validate import run_validation
from test_audit_common import FAST_AUDIT, site_toml, small_npz


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepare")
    npz = small_npz("breast", tmp / "breast_small.npz", n_train=150, n_val=60, n_test=40)
    cfg, audit = load_site(site_toml(tmp, npz, audit=FAST_AUDIT))
    data = np.load(npz)
    syn = [(f"mem-{i}", data["train_images"][i * 9].copy(), "x") for i in range(4)]
    syn += [(f"new-{i}", data["test_images"][i].copy(), "x") for i in range(12)]
    return {"cfg": cfg, "audit": audit, "syn": syn, "tmp": tmp}


@pytest.fixture
def fits(monkeypatch):
    """Counts ``fit`` calls per embedder class."""
    counts: collections.Counter = collections.Counter()
    for cls in (E.PixelEmbedder, E.ContrastiveEmbedder):
        orig = cls.fit

        def fit(self, images, _orig=orig, _name=cls.__name__):  # noqa: ANN001, ANN202
            counts[_name] += 1
            return _orig(self, images)

        monkeypatch.setattr(cls, "fit", fit)
    return counts


def test_one_audit_query_fits_each_embedder_once(site, fits):
    # a fresh state dir: no cached encoder and no cached validation, so the validation runs
    cfg = site["cfg"].model_copy(update={"site": site["cfg"].site.model_copy(
        update={"state_dir": site["tmp"] / "fresh-state"})})
    agg = audit_synthetic_at_site(cfg, site["syn"], None, audit_config=site["audit"],
                                  out_dir=site["tmp"] / "r1", privacy={"epsilon": 1.0, "delta": 1e-5})
    assert agg["validation"] is not None  # the validation ran in this query
    assert dict(fits) == {"PixelEmbedder": 1, "ContrastiveEmbedder": 1}
    assert {f"mem-{i}" for i in range(4)} <= set(agg["flagged_ids"])


def test_validation_on_a_prepared_index_is_the_standalone_validation(site, fits):
    """The site audit's validation (on its prepared views) gives what a standalone
    validation of the same data gives."""
    from medisyn.audit.data import load_site_images

    audit = site["audit"]
    images = load_site_images(site["cfg"].dataset)
    cache = site["tmp"] / "enc"
    prep = prepare_index(images, audit, cache_dir=cache)
    assert dict(fits) == {"PixelEmbedder": 1, "ContrastiveEmbedder": 1}
    shared = run_validation(images, audit, prepared=prep, breakdown=False)
    assert dict(fits) == {"PixelEmbedder": 1, "ContrastiveEmbedder": 1}  # nothing refitted
    alone = run_validation(images, audit, cache_dir=cache, breakdown=False)
    for k in ("detection", "false_positive", "thresholds", "validated", "n_planted_per_family"):
        assert shared[k] == alone[k], k
    assert [v["fold_thresholds"] for v in shared["views"]] == [v["fold_thresholds"] for v in alone["views"]]


def test_a_kept_index_serves_the_next_query_without_fitting(site, fits):
    kept: dict[str, object] = {}

    def warm(build):  # noqa: ANN001, ANN202  (a one-entry keeper, as the site worker's cache)
        if "index" not in kept:
            kept["index"] = build()
        return kept["index"]

    kw = dict(audit_config=site["audit"], privacy={"epsilon": 1.0, "delta": 1e-5}, warm=warm)
    first = audit_synthetic_at_site(site["cfg"], site["syn"], None, out_dir=site["tmp"] / "w1", **kw)
    n_first = sum(fits.values())
    second = audit_synthetic_at_site(site["cfg"], site["syn"], None, out_dir=site["tmp"] / "w2", **kw)
    assert n_first == 2 and sum(fits.values()) == n_first  # the second query fitted nothing
    for k in ("flagged_ids", "overall", "image_types", "views", "patients_at_risk"):
        assert first[k] == second[k], k
