"""The release report leads with the verdict and its few reasons, shows ε = ∞ for a site
that trained without DP, drops cross-type rows; the gate judges a detector's false
positives by their interval's lower bound and reports the interval."""

from __future__ import annotations

from medisyn.audit import gate
from medisyn.audit.report import CROSS_TYPE_GROUP, SitePrivacy, render_release_html
from medisyn.audit.site_audit import OTHER_GROUP, build_release_report
from test_audit_gate import _r, _site, _synthetic


def _with_fp(k: int, n: int, **kw):
    s = _site(**kw)
    v = s.validation.model_copy(update={
        "false_positive": _r(k, n), "false_positive_rate": k / n,
        "targets_met": {"mild": True, "hard": True, "false_positive_rate": k / n <= 0.01},
        "validated": k / n <= 0.01})
    return s.model_copy(update={"validation": v})


def _detector(verdict, sid="a"):
    return next(c for c in verdict.checks if c.name == f"{sid}: detector validated")


def test_fp_point_estimate_above_target_but_interval_not_passes_and_reports_interval():
    # the demo's case: ~4 false positives among ~170 held-out images (0.024)
    v = gate.evaluate([_with_fp(4, 170)], {}, released_ids=[])
    c = _detector(v)
    assert c.passed, c.detail
    assert "4/170 = 0.024" in c.detail and "95% CI 0.009" in c.detail and "not shown above" in c.detail


def test_fp_interval_lower_bound_above_target_fails():
    c = _detector(gate.evaluate([_with_fp(40, 400)], {}, released_ids=[]))  # 10 %, CI ~[0.074, 0.13]
    assert not c.passed and "lower bound above the 0.01 target" in c.detail and "false positives" in c.detail


def test_detection_targets_still_fail_the_detector():
    c = _detector(gate.evaluate([_site(validated=False)], {}, released_ids=[]))
    assert not c.passed and "targets missed: mild" in c.detail


def test_fp_target_matches_the_site_validation_target():
    from medisyn.audit.validate import TARGETS

    assert gate.FALSE_POSITIVE_TARGET == TARGETS["false_positive_rate"]
    assert CROSS_TYPE_GROUP == OTHER_GROUP


def test_report_leads_with_verdict_and_only_failed_reasons(tmp_path):
    syn = _synthetic(40)
    rep = build_release_report([_site("a", n_syn=40), _site("b", n_syn=40, eps=9.5, cap=8.0)], syn,
                               out_dir=tmp_path)
    text = (tmp_path / "release_report.html").read_text()
    gate_html = text.split('<section id="gate">')[1].split("</section>")[0]
    head = gate_html.split("<details")[0]
    assert "FAIL" in head and f"1 of {len(rep.gate.checks)} checks failed" in head
    assert "b: ε within cap" in head and "a: ε within cap" not in head  # only the failing one
    assert "a: ε within cap" in gate_html.split("<details")[1]  # every check, folded away
    assert text.index('id="gate"') < text.index('id="site-a"')


def test_epsilon_infinity_for_site_without_dp_never_none(tmp_path):
    nodp = _site("b").model_copy(update={"privacy": SitePrivacy(dp=False, max_epsilon=8.0)})
    rep = build_release_report([_site("a"), nodp], _synthetic(20), out_dir=tmp_path)
    html = render_release_html(rep)
    privacy = html.split('id="privacy"')[1].split("</section>")[0]
    site_b = html.split('id="site-b"')[1].split("</table>")[0]
    for part in (privacy, site_b):
        assert "∞ (trained without DP)" in part and "None" not in part
    unknown = rep.model_copy(update={"privacy": {"a": SitePrivacy(max_epsilon=8.0)}})
    assert "not reported" in render_release_html(unknown).split('id="privacy"')[1].split("</section>")[0]


def test_cross_type_rows_are_dropped(tmp_path):
    s = _site("a")
    other = s.image_types[0].model_copy(update={"image_type": OTHER_GROUP})
    s = s.model_copy(update={"image_types": [*s.image_types, other]})
    rep = build_release_report([s], _synthetic(20), out_dir=tmp_path)
    html = render_release_html(rep)
    assert OTHER_GROUP not in html.split('id="site-a"')[1]
    assert not [c for c in rep.gate.checks if OTHER_GROUP in c.name]
    assert [c for c in rep.gate.checks if c.name == "a/all: flag rate vs held-out baseline"]


def test_browser_probe_catches_broken_images_and_console_errors(tmp_path):
    """The Chromium check is not vacuous: a broken image, a missing file and a console
    error are each reported."""
    from browser_check import check_in_chromium, ensure_chromium

    chromium = ensure_chromium()
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><title>t</title></head><body>'
                    '<img alt="corrupt" src="data:image/png;base64,iVBORw0KGgo=">'
                    '<img alt="missing" src="missing.png">'
                    '<script>console.error("boom")</script></body></html>')
    found = check_in_chromium(chromium, page, artifact="probe-self-test", window=(400, 300))
    assert sorted(found["broken"]) == ["corrupt", "missing"]
    assert any("boom" in e for e in found["errors"])
    assert any("missing.png" in e for e in found["errors"])
