"""The release gate and the release report (schema, JSON, HTML structure)."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from medisyn.audit.cli import app
from medisyn.audit.gate import evaluate
from medisyn.audit.report import (
    ImageTypeMetrics,
    RateCI,
    SiteAggregate,
    SitePrivacy,
    ValidationSummary,
    ViewSummary,
    make_histogram,
)
from medisyn.audit.site_audit import build_release_report
from medisyn.audit.stats import rate
from typer.testing import CliRunner


def _r(k, n):
    return RateCI(**rate(k, n))


def _site(site_id="a", *, flagged_ids=(), n_syn=200, base=(1, 300), validated=True,
          eps=3.0, cap=8.0):
    k = len(flagged_ids)
    m = ImageTypeMetrics(
        image_type="all", n_synthetic=n_syn,
        similarity_quantiles={"contrastive": {"p50": 0.8, "max": 0.99}},
        flagged=_r(k, n_syn), holdout_baseline=_r(*base), p_value_vs_baseline=1.0,
        significantly_above_baseline=False, closer_to_train=_r(n_syn // 2, n_syn),
        flagged_ids=list(flagged_ids),
        histograms={"contrastive": make_histogram(np.linspace(0.5, 0.9, n_syn),
                                                  np.linspace(0.5, 0.95, 300))})
    val = ValidationSummary(
        detection_rate={"exact": 1.0, "mild": 0.995, "hard": 0.93},
        detection={"exact": _r(500, 500), "mild": _r(498, 500), "hard": _r(465, 500)},
        false_positive_rate=0.005, false_positive=_r(1, 200),
        thresholds={"contrastive": 0.95},
        targets_met={"mild": validated, "hard": True, "false_positive_rate": True},
        validated=validated, n_planted_per_family=500)
    return SiteAggregate(
        site_id=site_id, created="2026-01-01T00:00:00+00:00", audit_version="t",
        audit_config_hash="0" * 64, n_synthetic=n_syn, n_train_indexed=500,
        n_holdout_calibration=300, alpha=0.01,
        views=[ViewSummary(name="contrastive", kind="contrastive", threshold=0.95,
                           quantile=0.999, n_holdout=300, note="n")],
        image_types=[m.model_copy(update={"image_type": "breast ultrasound"})], overall=m,
        flagged_ids=list(flagged_ids), patients_at_risk=k, data_findings={"cross_split_near_duplicates": 2},
        validation=val, privacy=SitePrivacy(epsilon=eps, delta=1e-5, max_epsilon=cap, dp=True))


def _synthetic(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"s{i:04d}", rng.integers(0, 256, (28, 28), dtype=np.uint8),
             "radiology, breast ultrasound, benign" if i % 2 else "radiology, breast ultrasound, malignant")
            for i in range(n)]


def test_gate_passes_clean_release(tmp_path):
    syn = _synthetic(200)
    rep = build_release_report([_site(flagged_ids=["s0003"])], syn, out_dir=tmp_path)
    assert rep.gate.passed, rep.gate.reasons
    assert "s0003" in rep.excluded_ids and "s0003" not in rep.released_ids
    res = CliRunner().invoke(app, ["gate", str(tmp_path / "release_report.json")])
    assert res.exit_code == 0, res.output


def test_gate_fails_when_memorised_image_is_released(tmp_path):
    syn = _synthetic(200)
    rep = build_release_report([_site(flagged_ids=["s0003"])], syn, out_dir=tmp_path,
                               released_ids=[s[0] for s in syn])
    assert not rep.gate.passed
    assert any("flagged image(s) in the released set" in r for r in rep.gate.reasons)
    res = CliRunner().invoke(app, ["gate", str(tmp_path / "release_report.json")])
    assert res.exit_code == 1 and "s0003" in res.output


def test_gate_fails_on_flag_rate_above_baseline():
    many = [f"s{i:04d}" for i in range(20)]
    v = evaluate([_site(flagged_ids=many)], {}, released_ids=[])
    assert not v.passed
    assert any("flag rate vs held-out baseline" in r for r in v.reasons)


def test_gate_fails_on_over_budget_site(tmp_path):
    syn = _synthetic(50)
    rep = build_release_report([_site("a"), _site("b", eps=9.5, cap=8.0)], syn, out_dir=tmp_path)
    assert not rep.gate.passed
    assert [r for r in rep.gate.reasons if r.startswith("b: ε within cap")]
    assert not [r for r in rep.gate.reasons if r.startswith("a:")]
    # the server's ledger value overrides the site's claim
    rep2 = build_release_report([_site("a")], syn, out_dir=tmp_path / "x",
                                privacy={"a": {"epsilon": 12.0, "delta": 1e-5}})
    assert not rep2.gate.passed and "12" in " ".join(rep2.gate.reasons)
    # an unknown ε fails too
    v = evaluate([_site("a")], {"a": SitePrivacy(epsilon=None, max_epsilon=8.0)}, [])
    assert not v.passed


def test_gate_fails_on_unvalidated_detector():
    v = evaluate([_site(validated=False)], {}, released_ids=[])
    assert not v.passed and any("detector validated" in r for r in v.reasons)


def test_gate_cli_recomputes_verdict_and_rejects_bad_files(tmp_path):
    syn = _synthetic(20)
    build_release_report([_site(eps=20.0)], syn, out_dir=tmp_path)
    data = json.loads((tmp_path / "release_report.json").read_text())
    data["gate"]["passed"] = True  # tampering with the stored verdict does not help
    data["gate"]["reasons"] = []
    (tmp_path / "t.json").write_text(json.dumps(data))
    assert CliRunner().invoke(app, ["gate", str(tmp_path / "t.json")]).exit_code == 1
    (tmp_path / "bad.json").write_text("{}")
    assert CliRunner().invoke(app, ["gate", str(tmp_path / "bad.json")]).exit_code == 2
    assert CliRunner().invoke(app, ["gate", str(tmp_path / "missing.json")]).exit_code == 2


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.links, self.stack = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag in ("link", "script") or (tag == "a" and a.get("href", "").startswith("http")):
            self.links.append((tag, a))


def test_release_html_structure(tmp_path):
    syn = _synthetic(40)
    build_release_report([_site("a", flagged_ids=["s0001"], n_syn=40), _site("b", n_syn=40)],
                         syn, out_dir=tmp_path, model_hash="abc123", config_hash="def456",
                         gallery_per_prompt=4)
    text = (tmp_path / "release_report.html").read_text()
    p = _Collect()
    p.feed(text)
    assert {"gate", "privacy", "flagged", "gallery", "site-a", "site-b"} <= p.ids
    assert p.links == []  # self-contained: no external scripts, styles or links
    assert all(i["src"].startswith("data:image/png;base64,") for i in p.imgs)
    hist = [i for i in p.imgs if "histogram" in i.get("alt", "")]
    assert len(hist) == 2  # one per site (one view each)
    gallery = [i for i in p.imgs if i.get("alt", "").startswith("s0")]
    assert len(gallery) == 2 * 4 + 1  # 4 per prompt, plus the flagged image
    assert "abc123" in text and "def456" in text
    gate_section = text.split('<section id="gate">')[1].split("</section>")[0]
    assert "PASS" in gate_section and "FAIL" not in gate_section


@pytest.fixture(scope="module")
def chromium():
    from browser_check import ensure_chromium

    return ensure_chromium()  # installs Debian's chromium with apt-get where it is missing


@pytest.mark.browser
def test_release_html_renders_in_chromium(tmp_path, chromium):
    """The release report in real headless Chromium: it renders, every image decodes, no
    console error or failed load; the verdict comes before per-site detail; a site that
    trained without DP shows ε = ∞. The screenshot is kept in test-artifacts/."""
    from browser_check import check_in_chromium, distinct_colours

    syn = _synthetic(40)
    nodp = _site("b", n_syn=40).model_copy(update={"privacy": SitePrivacy(dp=False, max_epsilon=8.0)})
    build_release_report([_site("a", flagged_ids=["s0001"], n_syn=40), nodp], syn, out_dir=tmp_path,
                         model_hash="abc123", gallery_per_prompt=4)
    found = check_in_chromium(chromium, tmp_path / "release_report.html", artifact="release_report")
    assert found["errors"] == [] and found["broken"] == [], found
    assert found["images"] >= 2 * 4 + 1 + 2  # gallery, the flagged image, one histogram per site
    assert found["title"] == "MediSyn release report" and found["height"] > 1000
    dom = found["dom"]
    assert 'id="gate"' in dom and "Release gate" in dom
    assert dom.index('id="gate"') < dom.index('id="privacy"') < dom.index('id="site-a"')
    privacy = dom.split('id="privacy"')[1].split("</section>")[0]
    assert "∞" in privacy and "None" not in privacy
    shot = found["screenshot"]
    assert shot.stat().st_size > 10_000 and distinct_colours(shot) > 16
