"""The site-side audit of synthetic images and the server-side release report.

Server-facing entry points (exact signatures in ``medisyn.audit.__doc__``):

* :func:`audit_synthetic_at_site` — runs at a site on its own data, returns the shareable
  aggregate (a JSON-safe dict, :class:`~medisyn.audit.report.SiteAggregate`), and writes the
  site-local report (JSON + HTML with real nearest neighbours) when ``out_dir`` is given.
* :func:`build_release_report` — runs on the server over the sites' aggregates.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from medisyn.audit import stats
from medisyn.audit.calibration import View, similarity_quantiles
from medisyn.audit.data import load_site_images
from medisyn.audit.membership import components_loss_fn, membership_probe
from medisyn.audit.prepare import PreparedIndex, prepare_index
from medisyn.audit.report import (
    GalleryItem,
    ImageTypeMetrics,
    MembershipSummary,
    RateCI,
    ReleaseReport,
    SiteAggregate,
    SitePrivacy,
    ValidationSummary,
    ViewSummary,
    assert_shareable,
    make_histogram,
    png_base64,
    render_release_html,
    render_site_html,
)
from medisyn.audit.settings import AuditConfig, cpu_threads, load_site
from medisyn.audit.validate import run_validation
from PIL import Image

from medisyn.config import SiteConfig, config_hash, interval_ok
from medisyn.errors import DataError, MediSynError

log = logging.getLogger(__name__)

AUDIT_VERSION = "0.1.0"
_RUN_INFO = {"train_seconds", "final_loss", "n_train", "steps_done"}
Synthetic = tuple[str, np.ndarray, str]
# a keeper of prepared indexes: called with the build function, returns a kept index
WarmIndex = Callable[[Callable[[], PreparedIndex]], PreparedIndex]


class AuditRefused(MediSynError):
    """The site's policy does not allow the requested audit."""

    exit_code = 6
    code = "policy-refused"  # the wire code of a site's refusal (medisyn.protocol)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


OTHER_GROUP = "other prompts"


def site_groups(prompts: Sequence[str], dataset: Any) -> list[str]:
    """The audit group of each synthetic image, from the site's own vocabulary only.

    A group is one of the site's labels (``"<image type>: <label>"``; the image type alone
    for a dataset without labels) when the image's prompt is exactly that label's prompt
    (:func:`medisyn.data.label_prompts`), else :data:`OTHER_GROUP`. The groups partition
    the images, and the coordinator's prompt text never names a group, so it cannot make a
    group of its choosing (e.g. one probe image per group).
    """
    from medisyn.data import label_prompts

    by_prompt: dict[str, str] = {}
    for lid, prompt in sorted(label_prompts(dataset).items()):
        words = dataset.labels.get(lid) if lid else None
        by_prompt.setdefault(prompt, f"{dataset.image_type}: {words}" if words else dataset.image_type)
    return [by_prompt.get(p, OTHER_GROUP) for p in prompts]


def load_synthetic_dir(path: Path) -> list[Synthetic]:
    """PNGs + one JSON sidecar each (``<stem>.json`` with ``"prompt"``; optional ``"id"``)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError("synthetic image directory not found", file=path)
    out: list[Synthetic] = []
    for png in sorted(path.glob("*.png")):
        if png.stem == "grid":
            continue
        side = png.with_suffix(".json")
        if not side.is_file():
            raise DataError("no JSON sidecar for this image (need <stem>.json with 'prompt')", file=png)
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"sidecar is not valid JSON: {e}", file=side) from None
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
            raise DataError("sidecar field 'prompt' missing or not a string", file=side)
        with Image.open(png) as im:
            arr = np.asarray(im.convert("L" if im.mode in ("L", "I;16", "I") else "RGB"))
        out.append((str(meta.get("id", png.stem)), arr.astype(np.uint8), meta["prompt"]))
    if not out:
        raise DataError("no synthetic PNG images found", file=path)
    return out


def _rateci(k: int, n: int) -> RateCI:
    r = stats.rate(k, n)
    return RateCI(count=int(r["count"]), n=int(r["n"]), rate=float(r["rate"]),
                  ci_low=float(r["ci_low"]), ci_high=float(r["ci_high"]))


def _validation_summary(v: Mapping[str, Any]) -> ValidationSummary:
    return ValidationSummary(
        detection_rate={k: float(x) for k, x in v["detection_rate"].items()},
        detection={k: RateCI(**r) for k, r in v["detection"].items() if k in v["detection_rate"]},
        false_positive_rate=float(v["false_positive_rate"]),
        false_positive=RateCI(**v["false_positive"]),
        thresholds={k: float(x) for k, x in v["thresholds"].items()},
        targets_met={k: bool(x) for k, x in v["targets_met"].items()},
        validated=bool(v["validated"]),
        n_planted_per_family=int(v["n_planted_per_family"]),
    )


def _primary(views: Sequence[Any]) -> View:
    for pref in ("contrastive", "vae"):
        for v in views:
            if v.name == pref and isinstance(v, View):
                return v
    return [v for v in views if isinstance(v, View)][-1]


def audit_synthetic_at_site(
    site_config: SiteConfig | Path | str,
    synthetic_images: Sequence[Synthetic],
    components: Any | None = None,
    *,
    audit_config: AuditConfig | None = None,
    out_dir: Path | None = None,
    privacy: SitePrivacy | Mapping[str, Any] | None = None,
    model_hash: str | None = None,
    per_sample_loss: Callable[..., np.ndarray] | None = None,
    validate: bool = True,
    warm: WarmIndex | None = None,
) -> dict[str, Any]:
    """Audit synthetic images against this site's training data; return the aggregate.

    ``synthetic_images``: ``(id, uint8 H×W[×C] image, prompt)`` triples. ``components``:
    the model (``medisyn.models.Components``) or ``None``; with it the VAE-latent view and
    (if the site allows ``membership``) the membership probe run. ``out_dir``: where the
    site-local report goes (default ``<state_dir>/audit/reports/<timestamp>``). The return
    value is JSON-safe and checked by :func:`assert_shareable` before it is returned.
    ``warm``: where a long-lived site worker keeps the query's prepared index between
    queries (called with the build function; it returns a kept one built from the same
    data, audit settings and model, or builds one).
    """
    if isinstance(site_config, str | Path):
        site_config, file_audit = load_site(Path(site_config))
        audit_config = audit_config or file_audit
    audit = audit_config or AuditConfig()
    cfg = site_config

    def build() -> PreparedIndex:
        return prepare_index(load_site_images(cfg.only_dataset), audit, components=components,
                             cache_dir=Path(cfg.site.state_dir) / "audit" / "encoders")

    with cpu_threads(audit.threads):
        return _audit(cfg, synthetic_images, components, audit=audit, out_dir=out_dir,
                      privacy=privacy, model_hash=model_hash, per_sample_loss=per_sample_loss,
                      validate=validate, prepare=build if warm is None else (lambda: warm(build)))


def _audit(cfg: SiteConfig, synthetic_images: Sequence[Synthetic], components: Any | None, *,
           audit: AuditConfig, out_dir: Path | None, privacy: SitePrivacy | Mapping[str, Any] | None,
           model_hash: str | None, per_sample_loss: Callable[..., np.ndarray] | None,
           validate: bool, prepare: Callable[[], PreparedIndex]) -> dict[str, Any]:
    ids, syn_imgs, prompts = _check_query(cfg, synthetic_images)
    state = Path(cfg.site.state_dir) / "audit"
    out_dir = Path(out_dir) if out_dir is not None else (
        state / "reports" / _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ"))
    # the site's real images indexed and calibrated once for the whole query (the
    # validation below uses the same views)
    prep = prepare()
    validation = _detector_validation(prep, audit, state) if validate else None
    scored = _score_synthetic(prep, syn_imgs, audit)
    # held-out baseline: the K-fold cross-fitted flags of the clean held-out images
    baseline = _rateci(int(prep.crossfit["flags"].sum()), len(prep.hold))
    closer = _closer_to_train(prep, syn_imgs, audit)
    types = site_groups(prompts, cfg.only_dataset)
    per_type, overall = _group_metrics(prep, scored, types, ids, closer, baseline, audit,
                                       k_min=int(cfg.privacy.audit_min_group))
    membership = _membership(cfg, prep, audit, components, per_sample_loss)
    agg = SiteAggregate(
        site_id=cfg.site.id, dataset=cfg.only_dataset.image_type, created=_now(), audit_version=AUDIT_VERSION,
        audit_config_hash=config_hash(audit.model_dump(mode="json", exclude={"local_embedders"})),
        n_synthetic=len(ids), n_train_indexed=len(prep.train), n_holdout_calibration=len(prep.hold),
        alpha=audit.alpha,
        views=[ViewSummary(name=v.name, kind=str(v.embedder.describe().get("kind")),
                           threshold=float(v.threshold), quantile=audit.quantile,
                           n_holdout=int(v.calibration["n_holdout"]), note=v.calibration["note"],
                           weights_sha256=v.embedder.describe().get("weights_sha256"),
                           index=v.index.kind) for v in prep.views],
        image_types=per_type, overall=overall,
        flagged_ids=[ids[i] for i in np.where(scored.flagged)[0]],
        patients_at_risk=len(_patients_at_risk(prep, scored)),
        data_findings={k: v for k, v in prep.clean.findings.items() if isinstance(v, int | float) or v is None},
        validation=_validation_summary(validation) if validation else None,
        membership=membership, privacy=_privacy(cfg, privacy), model_hash=model_hash,
    )
    out = agg.model_dump(mode="json")
    images = prep.images
    forbidden = [*cfg.data_paths(), str(cfg.site.state_dir),
                 *[p for p in images.train_patients + images.holdout_patients if p]]
    assert_shareable(out, forbidden=forbidden)
    _write_site_report(out_dir, out, agg, prep, scored, ids, prompts, syn_imgs, types, validation)
    log.info("site %s: %d/%d synthetic images flagged; reports in %s", cfg.site.id,
             int(scored.flagged.sum()), len(ids), out_dir)
    return out


def _check_query(cfg: SiteConfig, synthetic_images: Sequence[Synthetic]
                 ) -> tuple[list[str], list[np.ndarray], list[str]]:
    """(ids, images, prompts) of the query; refused unless the site allows copy detection."""
    allowed = set(cfg.privacy.allowed_audits)
    if "copy-detection" not in allowed:
        raise AuditRefused(f"site {cfg.site.id}: privacy.allowed_audits = {sorted(allowed)} "
                           "does not include 'copy-detection'")
    if not synthetic_images:
        raise DataError("no synthetic images to audit")
    ids = [str(s[0]) for s in synthetic_images]
    if len(set(ids)) != len(ids):
        raise DataError("synthetic image ids are not unique")
    return ids, [np.asarray(s[1]) for s in synthetic_images], [str(s[2]) for s in synthetic_images]


def _detector_validation(prep: PreparedIndex, audit: AuditConfig, state: Path) -> dict[str, Any]:
    """The detector validation on the prepared views; the site's last one is reused when
    its data, settings and views are unchanged (``<state>/validation.json``)."""
    from medisyn.audit.embedders import images_hash

    key = config_hash({"train": images_hash(prep.train), "holdout": images_hash(prep.images.holdout),
                       "audit": audit.model_dump(mode="json", exclude={"local_embedders"}),
                       "views": [{k2: v2 for k2, v2 in e.describe().items()
                                  if k2 not in _RUN_INFO} for e in prep.embedders]})
    cached = state / "validation.json"
    if cached.is_file():
        try:
            old = json.loads(cached.read_text())
            if old.get("cache_key") == key:
                log.info("reusing detector validation from %s", cached)
                return old
        except json.JSONDecodeError:
            pass
    validation = run_validation(prep.images, audit, prepared=prep, breakdown=False)
    validation["cache_key"] = key
    _write_json(cached, validation)
    return validation


@dataclass
class _Scored:
    """The synthetic images' top-k similarities and neighbours (clean training indices)
    per view, and which fired."""

    scores: dict[str, np.ndarray]
    neighbours: dict[str, np.ndarray]
    flagged: np.ndarray


def _score_synthetic(prep: PreparedIndex, syn_imgs: list[np.ndarray], audit: AuditConfig) -> _Scored:
    k = min(audit.neighbours, len(prep.train))
    scores: dict[str, np.ndarray] = {}
    nn: dict[str, np.ndarray] = {}
    flagged = np.zeros(len(syn_imgs), bool)
    for v in prep.views:
        if k > 1:
            s, i = v.score(syn_imgs, k=k)
        else:
            s1, i1 = v.score(syn_imgs)
            s, i = s1[:, None], i1[:, None]
        scores[v.name], nn[v.name] = s, i
        flagged |= s[:, 0] >= v.threshold
    return _Scored(scores, nn, flagged)


def _closer_to_train(prep: PreparedIndex, syn_imgs: list[np.ndarray], audit: AuditConfig) -> np.ndarray:
    """Per synthetic image: closer to a training image than to any held-out image
    (equal-size sets, primary view)."""
    from medisyn.audit.index import NNIndex

    rng = np.random.default_rng(audit.seed)
    pv = _primary(prep.views)
    n_eq = min(len(prep.train), len(prep.hold))
    sub = rng.choice(len(prep.train), n_eq, replace=False)
    q = pv.embedder.embed(syn_imgs)
    s_tr = NNIndex(pv.train_vectors[sub]).search(q, 1)[0][:, 0]
    s_ho = NNIndex(pv.embedder.embed(prep.hold)).search(q, 1)[0][:, 0]
    return s_tr > s_ho


def _patients_at_risk(prep: PreparedIndex, scored: _Scored) -> set[str]:
    """Patients (or images, where no ids exist) matched by a flag."""
    at_risk: set[str] = set()
    for n_i in np.where(scored.flagged)[0]:
        for v in prep.views:
            for s_val, t_i in zip(scored.scores[v.name][n_i], scored.neighbours[v.name][n_i], strict=True):
                if s_val >= v.threshold and t_i >= 0:
                    pid = prep.train_patient(int(t_i))
                    at_risk.add(f"p:{pid}" if pid is not None else f"i:{prep.clean.train_idx[int(t_i)]}")
    return at_risk


def _group_metrics(prep: PreparedIndex, scored: _Scored, types: list[str], ids: list[str],
                   closer: np.ndarray, baseline: RateCI, audit: AuditConfig, *, k_min: int
                   ) -> tuple[list[ImageTypeMetrics], ImageTypeMetrics]:
    """Per site group and overall. A group's similarity statistics leave the site only for
    >= ``k_min`` images (site policy); the images of smaller groups are left out of every
    released statistic ("all" included), so no difference of two statistics isolates
    them. Flags always count."""
    views, flagged = prep.views, scored.flagged
    sizes = {t: types.count(t) for t in set(types)}
    in_stats = np.array([sizes[t] >= k_min for t in types], bool)

    def metrics(name: str, mask: np.ndarray) -> ImageTypeMetrics:
        fl = flagged[mask]
        p = stats.fisher_greater(int(fl.sum()), int(mask.sum()), baseline.count, baseline.n)
        sm = mask & in_stats
        n, n_s = int(mask.sum()), int(sm.sum())
        withheld = None
        if n_s < k_min:
            sm = np.zeros_like(mask)
            withheld = (f"similarity statistics withheld: {n_s if name == 'all' else n} image(s) "
                        f"< k = {k_min} (site policy audit_min_group); flag counts only")
        elif n_s < n:
            withheld = (f"similarity statistics over {n_s} of {n} images: groups of fewer than "
                        f"k = {k_min} images left out")
        released = bool(sm.any())
        return ImageTypeMetrics(
            image_type=name, n_synthetic=n,
            similarity_quantiles=({v.name: similarity_quantiles(scored.scores[v.name][sm, 0]) for v in views}
                                  if released else {}),
            flagged=_rateci(int(fl.sum()), n), holdout_baseline=baseline,
            p_value_vs_baseline=p, significantly_above_baseline=p < audit.alpha,
            closer_to_train=_rateci(int(closer[sm].sum()), n_s) if released else None,
            flagged_ids=[ids[i] for i in np.where(mask & flagged)[0]],
            histograms=({v.name: make_histogram(scored.scores[v.name][sm, 0], prep.hold_scores[v.name])
                         for v in views} if released else {}),
            withheld=withheld,
        )

    per_type = [metrics(t, np.array([x == t for x in types])) for t in sorted(set(types))]
    return per_type, metrics("all", np.ones(len(ids), bool))


def _membership(cfg: SiteConfig, prep: PreparedIndex, audit: AuditConfig, components: Any | None,
                per_sample_loss: Callable[..., np.ndarray] | None) -> MembershipSummary | None:
    """The loss-threshold membership probe, where the site allows it and a model is given."""
    if "membership" not in cfg.privacy.allowed_audits or (per_sample_loss is None and components is None):
        return None
    fn = per_sample_loss or components_loss_fn(components, seed=audit.seed)
    try:
        mres = membership_probe(fn, prep.train, prep.hold, n_max=256, seed=audit.seed)
        return MembershipSummary(**{k2: mres[k2] for k2 in MembershipSummary.model_fields})
    except Exception as e:  # the copy audit must not fail because a model is odd
        log.warning("membership probe failed: %s", e)
        return None


def _privacy(cfg: SiteConfig, privacy: SitePrivacy | Mapping[str, Any] | None) -> SitePrivacy:
    pr = privacy if isinstance(privacy, SitePrivacy) else SitePrivacy(**(privacy or {}))
    if pr.max_epsilon is None:
        pr = pr.model_copy(update={"max_epsilon": cfg.privacy.max_epsilon, "dp": cfg.privacy.dp})
    return pr


def _write_site_report(out_dir: Path, out: dict[str, Any], agg: SiteAggregate, prep: PreparedIndex,
                       scored: _Scored, ids: list[str], prompts: list[str], syn_imgs: list[np.ndarray],
                       types: list[str], validation: dict[str, Any] | None) -> None:
    """The site-local report (stays on site): per image its neighbours in every view, with
    their sources and patients, and the flagged pairs side by side."""
    images = prep.images
    details = []
    flagged_pairs = []
    for n_i in range(len(ids)):
        flagged = bool(scored.flagged[n_i])
        entry: dict[str, Any] = {"id": ids[n_i], "prompt": prompts[n_i], "flagged": flagged,
                                 "image_type": types[n_i], "views": {}}
        neigh = []
        for v in prep.views:
            nbs = []
            for s_val, t_i in zip(scored.scores[v.name][n_i], scored.neighbours[v.name][n_i], strict=True):
                orig = prep.clean.train_idx[int(t_i)]
                nbs.append({"similarity": float(s_val), "source": images.train_sources[orig]
                            if images.train_sources else str(orig),
                            "patient": prep.train_patient(int(t_i)),
                            "fires": bool(s_val >= v.threshold)})
                if flagged and len(neigh) < 6 and (s_val >= v.threshold or len(neigh) < 2):
                    neigh.append({"view": v.name, "similarity": float(s_val),
                                  "source": nbs[-1]["source"], "patient": nbs[-1]["patient"],
                                  "image": images.train[orig]})
            entry["views"][v.name] = {"threshold": v.threshold, "neighbours": nbs}
        details.append(entry)
        if flagged:
            flagged_pairs.append({"id": ids[n_i], "prompt": prompts[n_i], "synthetic": syn_imgs[n_i],
                                  "neighbours": neigh})
    local = {"kind": "medisyn-site-local-audit-report", "warning": "contains site-local data; never share",
             "aggregate": out, "views": [v.describe() for v in prep.views],
             "data_findings": prep.clean.findings, "validation": validation, "synthetic": details}
    _write_json(out_dir / "site_report.json", local)
    _write_text(out_dir / "site_report.html", render_site_html(agg, flagged_pairs))
    _write_json(out_dir / "aggregate.json", out)


def build_release_report(
    site_aggregates: Sequence[Mapping[str, Any] | SiteAggregate],
    synthetic_images: Sequence[Synthetic],
    *,
    out_dir: Path,
    privacy: Mapping[str, SitePrivacy | Mapping[str, Any]] | None = None,
    model_hash: str | None = None,
    config_hash: str | None = None,
    released_ids: Sequence[str] | None = None,
    alpha: float = 0.01,
    gallery_per_prompt: int = 8,
    expected_sites: Sequence[str] | None = None,
    site_errors: Mapping[str, str] | None = None,
) -> ReleaseReport:
    """Combine the sites' aggregates into the release report and run the gate.

    ``released_ids`` defaults to every synthetic id not flagged by any site (flagged images
    are excluded). ``privacy`` maps site id -> ε/δ/cap (from the ledgers); a site's own
    aggregate value is used where it is missing. ``expected_sites``: every site asked to
    audit; one without an aggregate fails the gate (``site_errors`` says why). Writes ``out_dir/release_report.json``
    and ``out_dir/release_report.html``; returns the validated report.
    """
    from medisyn.audit.gate import evaluate

    sites = [a if isinstance(a, SiteAggregate) else SiteAggregate.model_validate(a)
             for a in site_aggregates]
    for a in sites:
        assert_shareable(a.model_dump(mode="json"))
    ids = [str(s[0]) for s in synthetic_images]
    flagged = sorted({i for a in sites for i in a.flagged_ids})
    released = list(released_ids) if released_ids is not None else [i for i in ids if i not in set(flagged)]
    priv: dict[str, SitePrivacy] = {}
    for a in sites:
        given = (privacy or {}).get(a.site_id)
        if given is None:
            priv[a.site_id] = a.privacy
        else:
            p = given if isinstance(given, SitePrivacy) else SitePrivacy(**given)
            if p.max_epsilon is None:
                p = p.model_copy(update={"max_epsilon": a.privacy.max_epsilon})
            priv[a.site_id] = p
    expected = sorted(set(expected_sites or []) | {a.site_id for a in sites})
    errors = {str(k): str(v)[:500] for k, v in (site_errors or {}).items()}
    verdict = evaluate(sites, priv, released, alpha=alpha, expected_sites=expected, site_errors=errors)
    gallery: list[GalleryItem] = []
    per_prompt: dict[str, int] = {}
    rel = set(released)
    for sid, img, prompt in synthetic_images:
        if str(sid) in rel and per_prompt.get(prompt, 0) < gallery_per_prompt:
            per_prompt[prompt] = per_prompt.get(prompt, 0) + 1
            gallery.append(GalleryItem(id=str(sid), prompt=prompt, png_base64=png_base64(img)))
    report = ReleaseReport(
        created=_now(), model_hash=model_hash, config_hash=config_hash, sites=sites,
        privacy=priv, synthetic_ids=ids, released_ids=released,
        excluded_ids=[i for i in ids if i not in rel], prompts={str(s[0]): s[2] for s in synthetic_images},
        gallery=gallery, alpha=alpha, expected_sites=expected, site_errors=errors, gate=verdict,
    )
    out_dir = Path(out_dir)
    _write_json(out_dir / "release_report.json", report.model_dump(mode="json"))
    images = {str(s[0]): np.asarray(s[1]) for s in synthetic_images}
    _write_text(out_dir / "release_report.html", render_release_html(report, images))
    return report


def report_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def decode_synthetic_payload(payload: Any) -> list[Synthetic]:
    """``[{"id", "prompt", "png_base64"}, ...]`` (a list, or its JSON string, optionally with
    the ``json:`` prefix of ``medisyn.config.flatten``) -> (id, uint8 image, prompt)."""
    import base64
    import io

    if isinstance(payload, str):
        text = payload[5:] if payload.startswith("json:") else payload
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"synthetic payload is not valid JSON: {e}") from None
    if not isinstance(payload, list):
        raise DataError("synthetic payload must be a list of {id, prompt, png_base64}")
    out: list[Synthetic] = []
    for n, item in enumerate(payload):
        if not isinstance(item, dict) or not {"id", "prompt", "png_base64"} <= set(item):
            raise DataError("synthetic item needs 'id', 'prompt' and 'png_base64'", row=n)
        try:
            with Image.open(io.BytesIO(base64.b64decode(item["png_base64"]))) as im:
                arr = np.asarray(im.convert("L" if im.mode in ("L", "I;16", "I") else "RGB"))
        except Exception as e:
            raise DataError(f"synthetic item {item['id']!r}: not a PNG image ({e})", row=n) from None
        out.append((str(item["id"]), arr.astype(np.uint8), str(item["prompt"])))
    return out


def encode_synthetic_payload(items: Sequence[Synthetic]) -> str:
    """The inverse of :func:`decode_synthetic_payload` (what the server sends)."""
    return json.dumps([{"id": str(i), "prompt": p, "png_base64": png_base64(img, scale=1)}
                       for i, img, p in items])


def site_privacy(site: SiteConfig) -> SitePrivacy:
    """ε and δ from the site's own privacy ledger (the authority; never the server's word).

    A site with a ledger reports its cumulative ε (∞ when it ever trained without DP; that
    is reported as ``epsilon = None`` with ``dp = False``). A site without a ledger that has
    DP on has spent nothing (ε = 0); one with DP off trained without DP (ε = ∞).
    """

    from medisyn.privacy.ledger import open_site_ledger

    priv = site.privacy
    # the training code's opener: a site that trained and lost its ledger is a LedgerError
    # (a reader: the ledger's own δ, even where [privacy] delta now differs)
    ledger = open_site_ledger(site.site.state_dir, site.site.id, priv.model_copy(update={"delta": None}),
                              n_records=None)
    if ledger.exists:
        eps = ledger.epsilon()
        finite = math.isfinite(eps)
        return SitePrivacy(epsilon=eps if finite else None, delta=ledger.delta,
                           max_epsilon=priv.max_epsilon, dp=bool(priv.dp and finite))
    if priv.dp:
        return SitePrivacy(epsilon=0.0, delta=priv.delta, max_epsilon=priv.max_epsilon, dp=True)
    return SitePrivacy(epsilon=None, delta=None, max_epsilon=priv.max_epsilon, dp=False)


SCHEDULERS = ("dpm", "ddim", "ddpm")


def verify_synthetic(components: Any, synthetic: Sequence[Synthetic], meta: str, generation: str, *,
                     sample: int | None, tolerance: float, site_id: str = "site") -> dict[str, Any]:
    """Check that the query's images came from the model: regenerate ``sample`` of them
    (None: all), chosen at random by the site, from their prompt and seed with the
    message's model and the query's sampler settings, and compare pixel by pixel.

    ``meta``: the query's JSON list of ``{id, prompt, seed}``; ``generation``: JSON
    ``{steps, guidance, guidance_interval, scheduler}`` (``guidance_interval`` absent or
    null: guidance at every step). Generation is deterministic by seed
    (``medisyn.generate``: image k of a call has seed ``seed + k``), so runs of consecutive
    seeds are regenerated in one call each. An image whose mean absolute difference is
    over ``tolerance`` (8-bit levels) or whose largest difference is over ``16 ×
    tolerance`` refuses the whole query (:class:`AuditRefused`). Returns what was checked.
    """
    from medisyn.generate import generate

    def refuse(why: str) -> AuditRefused:
        return AuditRefused(f"site {site_id}: copy-detection query refused: {why}")

    try:
        rows = json.loads(meta)
        seeds = {str(r["id"]): int(r["seed"]) for r in rows}
        prompts = {str(r["id"]): str(r["prompt"]) for r in rows}
        gen = json.loads(generation)
        steps, guidance, scheduler = int(gen["steps"]), float(gen["guidance"]), str(gen["scheduler"])
        grey_types = {str(t) for t in gen.get("grey_types", [])}
        raw_interval = gen.get("guidance_interval")
        if raw_interval is not None and len(raw_interval) != 2:
            raise ValueError("guidance_interval must be [lo, hi]")
        interval = None if raw_interval is None else (float(raw_interval[0]), float(raw_interval[1]))
    except (ValueError, KeyError, TypeError) as e:
        raise refuse(f"the images cannot be verified: the query needs a seed per image and the "
                     f"sampler settings ({type(e).__name__}: {e})") from None
    if not (1 <= steps <= 1000 and 0 <= guidance <= 50 and scheduler in SCHEDULERS
            and interval_ok(interval)):
        raise refuse(f"sampler settings out of range (steps {steps}, guidance {guidance}, "
                     f"guidance interval {interval}, scheduler {scheduler!r})")
    items = [(str(i), np.asarray(img), p) for i, img, p in synthetic]
    for i, _, p in items:
        if i not in seeds or prompts[i] != p:
            raise refuse(f"image {i!r} has no seed (or another prompt) in the query's image list")
    n = len(items)
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))  # the coordinator cannot predict it
    chosen = range(n) if sample is None or sample >= n else sorted(rng.choice(n, sample, replace=False))
    todo = sorted((seeds[items[k][0]], k) for k in chosen)
    worst = 0.0
    run: list[tuple[int, int]] = []
    for j, (seed, k) in enumerate(todo):
        run.append((seed, k))
        nxt = todo[j + 1][0] if j + 1 < len(todo) else None
        if nxt == seed + 1:
            continue
        made = generate(components, [items[k2][2] for _, k2 in run], n_per_prompt=1, seed=run[0][0],
                        steps=steps, guidance=guidance, guidance_interval=interval, scheduler=scheduler,
                        grey_types=grey_types)
        for (_, k2), g in zip(run, made, strict=True):
            sid, got, _ = items[k2]
            want = np.asarray(g.image.convert("L") if got.ndim == 2 else g.image.convert("RGB"))
            if want.shape != got.shape:
                raise refuse(f"image {sid!r} has shape {got.shape}; the model makes {want.shape}")
            diff = np.abs(want.astype(np.int16) - got.astype(np.int16))
            mean, peak = float(diff.mean()), int(diff.max())
            worst = max(worst, mean)
            if mean > tolerance or peak > 16 * tolerance:
                raise refuse(f"image {sid!r} is not what the model makes from its prompt and seed "
                             f"(mean |difference| {mean:.2f}, max {peak} levels; tolerance {tolerance:g}, "
                             f"max {16 * tolerance:g})")
        run = []
    log.info("site %s: verified %d of %d synthetic images against the model (worst mean |diff| %.3f)",
             site_id, len(todo), n, worst)
    return {"verified": len(todo), "of": n, "worst_mean_abs_diff": worst}


def site_query(site: SiteConfig, config: Mapping[str, Any], components: Any | None = None,
               *, audit_config: AuditConfig | None = None,
               synthetic: Sequence[Synthetic] | None = None,
               privacy: SitePrivacy | Mapping[str, Any] | None = None,
               warm: WarmIndex | None = None) -> dict[str, Any]:
    """The site's handler of the server's audit ``query`` (``client/site.py`` calls it).

    ``config``: ``audit`` (must be in the site's ``allowed_audits``; ``copy-detection``
    runs the copy audit — with ``components`` also the membership probe when allowed),
    optional ``model_hash``. The images: ``synthetic`` (``(id, image, prompt)`` triples, as
    the federated query delivers them), else ``config["synthetic"]`` (see
    :func:`decode_synthetic_payload`) or ``config["synthetic_dir"]`` (a folder of PNG +
    sidecars on the site's machine). ε/δ: ``privacy``, else the site's own ledger
    (:func:`site_privacy`); a value the server put in ``config`` is never trusted.
    Returns the shareable aggregate (nested, JSON-safe). Audit settings: ``audit_config``,
    else the site's ``[audit]`` table, else defaults. ``warm``: see
    :func:`audit_synthetic_at_site`.
    """
    audit = str(config.get("audit", "copy-detection"))
    if audit not in site.privacy.allowed_audits:
        raise AuditRefused(f"audit {audit!r} is not allowed by site {site.site.id}'s policy "
                           f"(allowed: {site.privacy.allowed_audits})")
    if audit != "copy-detection":
        raise AuditRefused(f"audit {audit!r}: only 'copy-detection' is answered by a query "
                           "(the membership probe runs inside it when a model is given)")
    if synthetic is not None:
        syn = list(synthetic)
    elif "synthetic" in config:
        syn = decode_synthetic_payload(config["synthetic"])
    elif "synthetic_dir" in config:
        syn = load_synthetic_dir(Path(str(config["synthetic_dir"])))
    else:
        raise DataError("audit query carries no synthetic images ('synthetic' or 'synthetic_dir')")
    if audit_config is None:
        from medisyn.audit.settings import audit_config as site_audit_config

        audit_config = site_audit_config(site)
    mh = config.get("model_hash")
    return audit_synthetic_at_site(site, syn, components,
                                   privacy=privacy if privacy is not None else site_privacy(site),
                                   audit_config=audit_config,
                                   model_hash=None if mh is None else str(mh), warm=warm)
