"""The registration re-scorer (audit/registration.py) and union/cross-fitted calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from medisyn.audit import augment, stats
from medisyn.audit.calibration import build_views, crossfit, view_thresholds
from medisyn.audit.embedders import PixelEmbedder
from medisyn.audit.registration import RegistrationScorer, ncc_max, templates
from medisyn.audit.settings import AuditConfig

from tests.test_audit_common import require


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _real(n_train=80, n_hold=40):
    d = np.load(require("pneumonia"))
    return list(d["train_images"][:n_train]), list(d["val_images"][:n_hold])


def _hard_copy(img: np.ndarray, *, deg: float, tx: float, ty: float) -> np.ndarray:
    """80 % crop at (tx, ty) (normalised offsets), resized back, rotated by ``deg``, blurred."""
    x = augment.to_tensor([img])
    theta = torch.tensor([[[0.8, 0.0, tx], [0.0, 0.8, ty]]])
    x = augment._affine(x, theta)
    r = math.radians(deg)
    rot = torch.tensor([[[math.cos(r), -math.sin(r), 0.0], [math.sin(r), math.cos(r), 0.0]]])
    x = augment.blur(augment._affine(x, rot), sigma=0.8)
    return augment.to_uint8(x)[0, :, :, 0]


def test_ncc_is_one_for_aligned_identical_and_blind_to_brightness():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 20, 20, generator=g)
    tm = x[:, None, :, 5:15, 5:15]  # N×A×C×t×t (A = 1)
    cand = torch.stack([x, 0.5 * x + 0.2], 1)  # N×K×C×H×W: itself, brightness/contrast change
    s = ncc_max(tm, cand)
    assert s.shape == (2, 2)
    assert torch.allclose(s, torch.ones(2, 2), atol=1e-4)
    other = torch.rand(2, 1, 1, 20, 20, generator=g)
    assert (ncc_max(tm, other) < 0.9).all()


def test_templates_shapes():
    q = torch.rand(3, 1, 28, 28)
    out = templates(q, angles=[-5.0, 0.0, 5.0], scales=[0.8, 1.0], subpixel=2)
    assert [t.shape for t in out] == [(3, 12, 1, 16, 16), (3, 12, 1, 22, 22)]  # margin ceil(0.1·size)


def test_registration_finds_a_crop_rotate_blur_copy_and_not_an_unrelated_image():
    train, hold = _real()
    reg = RegistrationScorer(train, topk=len(train))
    cand = np.tile(np.arange(len(train)), (3, 1))
    copies = [_hard_copy(train[7], deg=8.0, tx=0.15, ty=-0.2),
              _hard_copy(train[30], deg=-8.0, tx=-0.2, ty=0.2)]
    s, i = reg.score(copies + [hold[0]], cand)
    assert list(i[:2]) == [7, 30]
    assert s[0] > 0.99 and s[1] > 0.99
    # unrelated real images (held-out chest X-rays) stay clearly below the copies
    s_hold, _ = reg.score(hold, np.tile(np.arange(len(train)), (len(hold), 1)))
    assert s_hold.max() < min(s[0], s[1]) - 0.005
    # without the rotation search the rotated copy is not registered as well
    s0, _ = RegistrationScorer(train, topk=len(train), angles=[0.0]).score(copies[:1], cand[:1])
    assert s0[0] < s[0] - 0.005


def test_registration_view_from_config_uses_source_candidates():
    train, hold = _real(60, 30)
    audit = AuditConfig(registration_source="pixel", registration_topk=60)
    pe = PixelEmbedder(channels=1, flip_invariant=False, shifts=2)
    views = build_views([pe], train, audit)
    assert [v.name for v in views] == ["pixel", "registration"]
    reg = views[-1]
    copy = _hard_copy(train[3], deg=6.0, tx=0.1, ty=0.1)
    s, i = reg.score([copy], k=3)
    assert s.shape == (1, 3) and i.shape == (1, 3)
    assert i[0, 0] == 3 and s[0, 0] >= s[0, 1] >= s[0, 2]
    s1, i1 = reg.score([copy])
    assert s1.shape == (1,) and i1[0] == 3 and s1[0] == pytest.approx(s[0, 0])
    assert reg.describe()["kind"] == "registration"
    thr = reg.calibrate(hold)
    assert s1[0] > thr  # the copy is flagged at the held-out calibrated threshold
    assert build_views([pe], train, AuditConfig(registration=False))[-1].name == "pixel"
    # an RGB query (a generator's output) against a grey site is converted, not an error
    rgb = np.repeat(copy[:, :, None], 3, axis=2)
    s2, i2 = reg.score([rgb, copy])
    assert i2[0] == 3 and s2[0] == pytest.approx(s1[0], abs=1e-3)


def _scores(n, seed, views=("a", "b", "c")):
    rng = np.random.default_rng(seed)
    return {v: 1 - rng.gamma(2.0, 0.02 * (k + 1), n) for k, v in enumerate(views)}


def test_per_view_thresholds_are_view_quantiles():
    hs = _scores(300, 0)
    thr, info = view_thresholds(hs, 0.99, "per_view")
    assert info["method"] == "per_view"
    for v, s in hs.items():
        assert thr[v] == stats.conservative_quantile(s, 0.99)


def test_combined_threshold_flags_the_union_at_the_quantile():
    hs = _scores(200, 1)
    thr, info = view_thresholds(hs, 0.999, "combined")  # n < 1000: the combined maximum
    union = np.zeros(200, bool)
    for v, s in hs.items():
        union |= s >= thr[v]
    assert union.sum() == 1  # one image (the combined maximum), not one per view
    thr_pv, _ = view_thresholds(hs, 0.999, "per_view")
    for v in hs:  # one threshold for the union is never below a view's own maximum...
        assert thr[v] >= thr_pv[v] - 1e-12 or np.isclose(thr[v], thr_pv[v])


def test_crossfit_counts_each_image_once_and_bounds_per_view_max_flags():
    hs = _scores(150, 2)
    out = crossfit(hs, 0.999, method="per_view", folds=10, seed=0)
    assert out["folds"] == 10 and sum(out["fold_sizes"]) == 150
    assert len(out["fold_thresholds"]) == 10
    # with the maximum as threshold only a view's overall top image can be flagged
    assert out["flags"].sum() <= len(hs)
    for v, f in out["per_view"].items():
        assert f.sum() <= 1 and (not f.any() or np.argmax(hs[v]) == np.flatnonzero(f)[0])
    # each fold's thresholds come from the other folds only
    perm = np.random.default_rng(0).permutation(150)
    parts = np.array_split(perm, 10)
    for j, thr in enumerate(out["fold_thresholds"]):
        fit = np.concatenate([p for i, p in enumerate(parts) if i != j])
        assert thr["a"] == hs["a"][fit].max()
    comb = crossfit(hs, 0.999, method="combined", folds=10, seed=0)
    assert comb["flags"].sum() <= 3  # medians move a little between folds
