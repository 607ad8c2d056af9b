"""Report schemas (pydantic v2) and self-contained HTML.

* :class:`SiteAggregate` — what a site shares: aggregates, thresholds, validation rates,
  ids of flagged *synthetic* images. Never a real image, an embedding of one, a file path
  or a patient id (:func:`assert_shareable` checks a dict for all of these).
* :class:`ReleaseReport` — the server's release report: every site's aggregate, ε/δ per
  site, model/config hashes, released and excluded synthetic ids, the gate verdict.
* :func:`render_release_html` / :func:`render_site_html` — one HTML file each, images
  inlined as base64 PNG (no external resource).
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RateCI(_Model):
    count: int
    n: int
    rate: float
    ci_low: float
    ci_high: float


class Histogram(_Model):
    """Counts of best-similarity values in fixed bins (aggregates only)."""

    edges: list[float]
    synthetic: list[int]
    holdout: list[int]


class ViewSummary(_Model):
    name: str
    kind: str
    threshold: float
    quantile: float
    n_holdout: int
    note: str
    weights_sha256: str | None = None
    index: str = "flat"


class ImageTypeMetrics(_Model):
    """One audit group: the site's own label (or the other prompts), or ``all``.

    Similarity statistics (quantiles, histograms, closer-to-train) are released only for
    at least k images (the site's ``audit_min_group``); otherwise they are empty/None and
    ``withheld`` says why. Flag counts and flagged ids always go.
    """

    image_type: str
    n_synthetic: int
    similarity_quantiles: dict[str, dict[str, float]]  # view -> {p50, p95, max, ...}
    flagged: RateCI
    holdout_baseline: RateCI
    p_value_vs_baseline: float
    significantly_above_baseline: bool
    closer_to_train: RateCI | None  # share closer to train than to held-out (ideal 0.5)
    flagged_ids: list[str]
    histograms: dict[str, Histogram] = Field(default_factory=dict)
    withheld: str | None = None  # why statistics are withheld (in part or in full)


class ValidationSummary(_Model):
    detection_rate: dict[str, float]
    detection: dict[str, RateCI]
    false_positive_rate: float
    false_positive: RateCI
    thresholds: dict[str, float]
    targets_met: dict[str, bool]
    validated: bool
    n_planted_per_family: int


class MembershipSummary(_Model):
    auc: float
    auc_ci_delong: list[float]
    auc_ci_bootstrap: list[float]
    tpr_at_1pct_fpr: float
    n_members: int
    n_non_members: int
    significant_leak: bool


class SitePrivacy(_Model):
    epsilon: float | None = None
    delta: float | None = None
    max_epsilon: float | None = None
    dp: bool | None = None


class SiteAggregate(_Model):
    """The only audit output that may leave a site."""

    schema_version: str = SCHEMA_VERSION
    kind: str = "medisyn-site-audit-aggregate"
    site_id: str
    # the image type of the dataset this aggregate audits (a site with several datasets
    # answers one aggregate per dataset, each calibrated on that dataset's images)
    dataset: str | None = None
    created: str
    audit_version: str
    audit_config_hash: str
    n_synthetic: int
    n_train_indexed: int
    n_holdout_calibration: int
    alpha: float
    views: list[ViewSummary]
    image_types: list[ImageTypeMetrics]
    overall: ImageTypeMetrics
    flagged_ids: list[str]
    patients_at_risk: int  # distinct patients (or images, without ids) matched by a flag
    data_findings: dict[str, int | float | None]
    validation: ValidationSummary | None
    membership: MembershipSummary | None = None
    privacy: SitePrivacy = Field(default_factory=SitePrivacy)
    model_hash: str | None = None


class GalleryItem(_Model):
    id: str
    prompt: str
    png_base64: str


class GateCheck(_Model):
    name: str
    passed: bool
    detail: str


class GateVerdict(_Model):
    passed: bool
    reasons: list[str]
    checks: list[GateCheck]


class ReleaseReport(_Model):
    schema_version: str = SCHEMA_VERSION
    kind: str = "medisyn-release-report"
    created: str
    model_hash: str | None
    config_hash: str | None
    sites: list[SiteAggregate]
    privacy: dict[str, SitePrivacy]
    synthetic_ids: list[str]
    released_ids: list[str]
    excluded_ids: list[str]
    prompts: dict[str, str]  # synthetic id -> prompt
    gallery: list[GalleryItem] = Field(default_factory=list)
    alpha: float = 0.01
    # the sites that were asked to audit (a federated audit) and why any gave no aggregate
    expected_sites: list[str] = Field(default_factory=list)
    site_errors: dict[str, str] = Field(default_factory=dict)
    gate: GateVerdict


# --------------------------------------------------------------------------- shareability

_PATH_RE = re.compile(r"(^/|^[A-Za-z]:\\|\.npz|\.png|\.dcm|\.npy|\.jpg|\.jpeg|\.tif|\\|/[^/\s]+/)",
                      re.IGNORECASE)


def assert_shareable(obj: Any, *, forbidden: Sequence[str] = (), max_list: int = 64,
                     path: str = "$") -> None:
    """Raise ``ValueError`` if ``obj`` (a JSON-like structure) holds something that must not
    leave a site: a string that looks like a file path, one of ``forbidden`` strings (e.g.
    real sources, patient ids), a float list longer than ``max_list`` (an embedding or
    pixels) or any nested numeric array of image shape."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            assert_shareable(k, forbidden=forbidden, max_list=max_list, path=f"{path}.<key>")
            assert_shareable(v, forbidden=forbidden, max_list=max_list, path=f"{path}.{k}")
    elif isinstance(obj, list | tuple):
        nums = [x for x in obj if isinstance(x, int | float) and not isinstance(x, bool)]
        if len(nums) > max_list and any(isinstance(x, float) for x in nums):
            raise ValueError(f"{path}: a list of {len(nums)} floats (embedding or pixels?)")
        if obj and all(isinstance(x, list) for x in obj):
            raise ValueError(f"{path}: a nested numeric array (an image?)")
        for i, x in enumerate(obj):
            assert_shareable(x, forbidden=forbidden, max_list=max_list, path=f"{path}[{i}]")
    elif isinstance(obj, str):
        if _PATH_RE.search(obj):
            raise ValueError(f"{path}: {obj!r} looks like a file path")
        for f in forbidden:
            if f and f in obj:
                raise ValueError(f"{path}: contains a forbidden site-local value")
    elif isinstance(obj, bytes | bytearray | np.ndarray):
        raise ValueError(f"{path}: raw bytes/array in a shareable aggregate")


# --------------------------------------------------------------------------- pictures


def png_base64(img: np.ndarray, scale: int = 3) -> str:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    im = Image.fromarray(a.astype(np.uint8))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def histogram_png(hist: Histogram, *, threshold: float | None = None, title: str = "",
                  width: int = 360, height: int = 160) -> str:
    """A bar chart (synthetic = orange, held-out = blue, densities) as base64 PNG."""
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 30, width - 8, 18, height - 20
    edges = hist.edges
    lo, hi = edges[0], edges[-1]
    nb = len(hist.synthetic)
    s = np.asarray(hist.synthetic, float)
    h = np.asarray(hist.holdout, float)
    s = s / s.sum() if s.sum() else s
    h = h / h.sum() if h.sum() else h
    peak = max(float(s.max(initial=0)), float(h.max(initial=0)), 1e-9)
    bw = (right - left) / nb
    for i in range(nb):
        x0 = left + i * bw
        for val, col, off in ((h[i], (70, 110, 200), 0.0), (s[i], (235, 140, 40), 0.5)):
            y = bottom - (bottom - top) * val / peak
            d.rectangle([x0 + off * bw, y, x0 + (off + 0.5) * bw - 1, bottom], fill=col)
    d.line([left, bottom, right, bottom], fill="black")
    d.text((left, bottom + 4), f"{lo:.2f}", fill="black")
    d.text((right - 28, bottom + 4), f"{hi:.2f}", fill="black")
    d.text((left, 2), title[:56], fill="black")
    if threshold is not None and lo <= threshold <= hi:
        x = left + (threshold - lo) / (hi - lo) * (right - left)
        d.line([x, top, x, bottom], fill=(200, 0, 0), width=2)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_histogram(synthetic: np.ndarray, holdout: np.ndarray, bins: int = 40) -> Histogram:
    allv = np.concatenate([np.asarray(synthetic, float), np.asarray(holdout, float)])
    lo = float(np.floor(allv.min(initial=0.0) * 20) / 20) if allv.size else 0.0
    lo = min(lo, 0.95)
    edges = np.linspace(lo, 1.0, bins + 1)
    hs, _ = np.histogram(np.clip(synthetic, lo, 1.0), edges)
    hh, _ = np.histogram(np.clip(holdout, lo, 1.0), edges)
    return Histogram(edges=[round(float(e), 6) for e in edges], synthetic=hs.tolist(),
                     holdout=hh.tolist())


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:left} .pass{color:#080;font-weight:bold} .fail{color:#b00;font-weight:bold}
.gallery img{margin:2px;image-rendering:pixelated;border:1px solid #ddd}
figure{display:inline-block;margin:4px;text-align:center;font-size:11px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return "∞" if x == float("inf") else f"{x:.4g}"
    return _e(x)


def _eps(p: SitePrivacy) -> str:
    """ε as a reader needs it: ∞ for a site that trained without DP, never "None"."""
    if p.epsilon is not None and p.epsilon == float("inf"):
        return "∞ (trained without DP)"
    if p.epsilon is None:
        return "∞ (trained without DP)" if p.dp is False else "not reported"
    return f"{p.epsilon:.4g}"


# The audit group of prompts that are not the site's own labels (medisyn.audit.site_audit
# OTHER_GROUP): a site judging another site's image type. Its row is not shown (its
# flags still count in the site's "all" row and are excluded from release).
CROSS_TYPE_GROUP = "other prompts"


def _rate(r: RateCI) -> str:
    return f"{r.count}/{r.n} = {r.rate:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}]"


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _site_section(a: SiteAggregate) -> list[str]:
    name = a.site_id if a.dataset is None else f"{a.site_id}-{a.dataset}"
    title = f"Site {_e(a.site_id)}" + (f": {_e(a.dataset)} dataset" if a.dataset else "")
    out = [f'<section class="site" id="site-{_e(name)}"><h2>{title}</h2>']
    out.append("<table><tr><th>synthetic</th><th>train indexed</th><th>held-out (calibration)"
               "</th><th>flagged</th><th>patients at risk</th><th>ε</th><th>δ</th><th>ε cap</th></tr>"
               f"<tr><td>{a.n_synthetic}</td><td>{a.n_train_indexed}</td>"
               f"<td>{a.n_holdout_calibration}</td><td>{len(a.flagged_ids)}</td>"
               f"<td>{a.patients_at_risk}</td><td>{_eps(a.privacy)}</td>"
               f"<td>{_fmt(a.privacy.delta)}</td><td>{_fmt(a.privacy.max_epsilon)}</td></tr></table>")
    out.append("<h3>Views and thresholds</h3><table><tr><th>view</th><th>kind</th><th>threshold"
               "</th><th>quantile</th><th>held-out n</th><th>note</th></tr>")
    for v in a.views:
        out.append(f"<tr><td>{_e(v.name)}</td><td>{_e(v.kind)}</td><td>{v.threshold:.5f}</td>"
                   f"<td>{v.quantile}</td><td>{v.n_holdout}</td><td>{_e(v.note)}</td></tr>")
    out.append("</table>")
    if a.validation is not None:
        val = a.validation
        out.append('<h3>Detector validation</h3><table class="validation"><tr><th>family</th>'
                   "<th>detected [95% CI]</th></tr>")
        for fam, r in val.detection.items():
            out.append(f"<tr><td>{_e(fam)}</td><td>{_rate(r)}</td></tr>")
        out.append(f"<tr><td>false positives</td><td>{_rate(val.false_positive)}</td></tr></table>")
        out.append(f"<p>validated at the site (point estimates): <span class=\"{'pass' if val.validated else 'fail'}\">"
                   f"{val.validated}</span> (targets met: {_e(val.targets_met)}). The release gate "
                   "fails the detector on false positives only when the interval's lower bound is "
                   "above the target.</p>")
    else:
        out.append('<p class="fail">detector not validated</p>')
    out.append('<h3>Per image type</h3><table class="metrics"><tr><th>image type</th><th>n</th>'
               "<th>flagged [95% CI]</th><th>held-out baseline</th><th>p (one-sided Fisher)</th>"
               "<th>closer to train than held-out (ideal 0.5)</th></tr>")
    for m in [*(t for t in a.image_types if t.image_type != CROSS_TYPE_GROUP), a.overall]:
        out.append(f"<tr><td>{_e(m.image_type)}</td><td>{m.n_synthetic}</td><td>{_rate(m.flagged)}"
                   f"</td><td>{_rate(m.holdout_baseline)}</td><td>{m.p_value_vs_baseline:.4g}</td>"
                   f"<td>{_rate(m.closer_to_train) if m.closer_to_train else ''}"
                   f"{'<br>' if m.closer_to_train and m.withheld else ''}{_e(m.withheld or '')}</td></tr>")
    out.append("</table>")
    thr = {v.name: v.threshold for v in a.views}
    out.append('<div class="histograms">')
    for view, hist in a.overall.histograms.items():
        b64 = histogram_png(hist, threshold=thr.get(view),
                            title=f"{view}: synthetic (orange) vs held-out (blue)")
        out.append(f'<figure><img class="histogram" alt="similarity histogram {_e(view)}" '
                   f'src="data:image/png;base64,{b64}"><figcaption>{_e(view)} best similarity '
                   "to train; red line = threshold</figcaption></figure>")
    out.append("</div>")
    if a.membership is not None:
        mm = a.membership
        out.append(f"<h3>Membership inference (loss threshold)</h3><p>AUC {mm.auc:.4f} "
                   f"(DeLong 95% CI {mm.auc_ci_delong[0]:.4f}–{mm.auc_ci_delong[1]:.4f}), "
                   f"TPR@1%FPR {mm.tpr_at_1pct_fpr:.4f}, n = {mm.n_members} + {mm.n_non_members}</p>")
    if a.data_findings:
        out.append("<h3>Data findings</h3><table>" + "".join(
            f"<tr><td>{_e(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in a.data_findings.items())
            + "</table>")
    out.append("</section>")
    return out


def render_release_html(report: ReleaseReport, images: Mapping[str, np.ndarray] | None = None) -> str:
    """The release report as one self-contained HTML page."""
    images = images or {}
    g = report.gate
    body = [f"<h1>MediSyn release report</h1><p>created {_e(report.created)} · model "
            f"<code>{_fmt(report.model_hash)}</code> · config <code>{_fmt(report.config_hash)}</code></p>",
            f'<section id="gate"><h2>Release gate: <span class="{"pass" if g.passed else "fail"}">'
            f'{"PASS" if g.passed else "FAIL"}</span></h2>']
    # the verdict and its few reasons first; every check, and then per-site detail, below
    if g.passed:
        body.append(f'<p class="verdict">All {len(g.checks)} checks passed.</p>')
    else:
        failed = [c for c in g.checks if not c.passed]
        body.append(f'<p class="verdict">{len(failed)} of {len(g.checks)} checks failed:</p>'
                    '<ul class="reasons">')
        for c in failed:
            body.append(f'<li class="fail">{_e(c.name)}: {_e(c.detail)}</li>')
        body.append("</ul>")
    body.append(f'<details class="checks"><summary>All {len(g.checks)} checks</summary><ul>')
    for c in g.checks:
        body.append(f'<li class="{"pass" if c.passed else "fail"}">{_e(c.name)}: {_e(c.detail)}</li>')
    body.append("</ul></details></section>")
    body.append('<section id="privacy"><h2>Privacy budget per site</h2><table><tr><th>site</th>'
                "<th>DP</th><th>ε</th><th>δ</th><th>ε cap</th></tr>")
    for sid, p in report.privacy.items():
        body.append(f"<tr><td>{_e(sid)}</td><td>{_fmt(p.dp)}</td><td>{_eps(p)}</td>"
                    f"<td>{_fmt(p.delta)}</td><td>{_fmt(p.max_epsilon)}</td></tr>")
    body.append("</table></section>")
    missing = [sid for sid in report.expected_sites if sid not in {a.site_id for a in report.sites}]
    if missing:
        body.append('<section id="missing"><h2>Sites without an audit</h2><ul>')
        for sid in missing:
            body.append(f"<li>{_e(sid)}: {_e(report.site_errors.get(sid, 'no aggregate received'))}</li>")
        body.append("</ul></section>")
    for a in report.sites:
        body.extend(_site_section(a))
    body.append(f'<section id="flagged"><h2>Flagged synthetic images ({len(report.excluded_ids)}, '
                'excluded from release)</h2><div class="gallery">')
    for sid in report.excluded_ids:
        if sid in images:
            body.append(f'<figure><img alt="{_e(sid)}" src="data:image/png;base64,'
                        f'{png_base64(images[sid])}"><figcaption>{_e(sid)}</figcaption></figure>')
        else:
            body.append(f"<figure><figcaption>{_e(sid)}</figcaption></figure>")
    body.append("</div></section>")
    body.append('<section id="gallery"><h2>Synthetic samples per prompt (released)</h2>')
    by_prompt: dict[str, list[GalleryItem]] = {}
    for it in report.gallery:
        by_prompt.setdefault(it.prompt, []).append(it)
    for prompt, items in by_prompt.items():
        body.append(f'<h3>{_e(prompt)}</h3><div class="gallery">')
        for it in items:
            body.append(f'<img alt="{_e(it.id)}" title="{_e(it.id)}" '
                        f'src="data:image/png;base64,{it.png_base64}">')
        body.append("</div>")
    body.append("</section>")
    return _page("MediSyn release report", body)


def render_site_html(aggregate: SiteAggregate, flagged: Sequence[Mapping[str, Any]]) -> str:
    """The site-local report: the aggregate plus each flagged synthetic image next to its
    real nearest neighbours. Contains real images: it must stay on the site."""
    body = [f"<h1>Site-local audit report: {_e(aggregate.site_id)}</h1>",
            '<p class="fail">Contains real patient images. Never share this file.</p>']
    body.extend(_site_section(aggregate))
    body.append('<section id="flagged-pairs"><h2>Flagged synthetic images and their real '
                "nearest neighbours</h2>")
    for f in flagged:
        body.append(f'<div class="pair"><figure><img alt="synthetic" src="data:image/png;base64,'
                    f'{png_base64(f["synthetic"])}"><figcaption>synthetic {_e(f["id"])}'
                    f"<br>{_e(f['prompt'])}</figcaption></figure>")
        for nb in f["neighbours"]:
            body.append(f'<figure><img alt="real neighbour" src="data:image/png;base64,'
                        f'{png_base64(nb["image"])}"><figcaption>{_e(nb["view"])} '
                        f'{nb["similarity"]:.4f}<br>{_e(nb["source"])}<br>patient '
                        f'{_e(nb["patient"])}</figcaption></figure>')
        body.append("</div>")
    body.append("</section>")
    return _page(f"Site audit {aggregate.site_id}", body)
