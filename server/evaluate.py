"""Federated evaluation: ``medisyn-server evaluate --run RUN_DIR --out DIR [--n-per-label N]``.

Mirrors the release audit (``medisyn.server.audit``):

1. The supervisor (:class:`EvaluateSupervisor`) starts a SuperLink (or reuses the demo's),
   submits the thin app bundle with ``mode = "evaluate"`` and follows ``OUT/progress.jsonl``.
2. The ServerApp (:func:`run_evaluate`) waits for the run's sites and sends each one
   ``query`` message with the final model's weights and the evaluation settings.
3. Each site builds the model, generates ``n_per_label`` images per label of its own image
   type and measures them against its own data (:func:`medisyn.evaluation.evaluate_site`),
   if its policy allows (``evaluate`` in ``[privacy] allowed_audits``); it answers with the
   aggregate only, which the server checks with ``assert_shareable`` (no per-image value,
   no real pixel, no embedding, no path) before using it.
4. The server joins the answers per image type (:func:`medisyn.evaluation.join_site_evaluations`),
   regenerates the first few images of each prompt for the gallery (same model, same
   seeds as the site used) and writes ``OUT/evaluation.json`` and ``OUT/evaluation.html``.

Message contract (server -> site), ``query`` content:
- ``config``: ``audit = "evaluate"``, ``model_hash``, ``evaluation`` (JSON of
  :class:`medisyn.evaluation.EvaluationSettings` fields), ``model-image-types`` (JSON, from
  the model's ``medisyn.json`` when present), and the model's ``model-config``, ``stage``
  (``unet``), ``seed``, ``frozen-stages``/``latent-std`` as in a training message;
- ``arrays``/``frozen``: the final model's trainable weights (packed, ``medisyn.protocol``).
Reply: ConfigRecord ``result`` with ``json`` (the site's aggregate), a MetricRecord, ``site``.

Exit codes: 0 report written and every site evaluated; 1 report written, some site
refused or failed (named in the report); 2 config error; 3 no sites; 5 internal error;
130 interrupted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid
from medisyn.server.audit import AuditProgress, AuditSupervisor, load_run
from medisyn.server.checkpoint import atomic_write_text
from medisyn.server.config import FederationConfig
from medisyn.server.federation import (
    GlobalModel,
    Outcome,
    query_sites,
    stage_payload,
    to_record,
    wait_for_sites,
)
from medisyn.server.supervisor import ExitCode, supervise
from pydantic import BaseModel, ConfigDict, Field

from medisyn import protocol as P
from medisyn.config import DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INTERVAL
from medisyn.errors import ConfigError

logger = logging.getLogger(__name__)

REQUEST_NAME = "evaluate-request.json"
SITE_KIND = "medisyn-site-evaluation"


class EvaluateRequest(BaseModel):
    """What the coordinator asked for (written to ``OUT/evaluate-request.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: Path
    out_dir: Path
    n_per_label: int = Field(default=64, ge=1, le=1024)
    steps: int = Field(default=20, ge=1, le=1000)
    guidance: float = Field(default=DEFAULT_GUIDANCE, ge=0)
    # guidance only at noise levels sigma in (lo, hi] (medisyn.generate); None: every step
    guidance_interval: tuple[float, float] | None = DEFAULT_GUIDANCE_INTERVAL
    scheduler: str = "dpm"
    seed: int = 0
    classifier_steps: int = Field(default=300, ge=1)
    encoder_steps: int = Field(default=400, ge=1)
    timeout: float = Field(default=3600.0, gt=0)
    site_wait_timeout: float | None = Field(default=None, gt=0)  # None: the run's
    gallery_per_prompt: int = Field(default=8, ge=0, le=64)
    # at most this many sites are asked at once (None: the run's max_parallel_sites)
    max_parallel_sites: int | None = Field(default=None, ge=1)

    def settings(self) -> dict[str, Any]:
        return {"n_per_label": self.n_per_label, "seed": self.seed, "steps": self.steps,
                "guidance": self.guidance, "scheduler": self.scheduler,
                "guidance_interval": list(self.guidance_interval) if self.guidance_interval is not None else None,
                "classifier_steps": self.classifier_steps, "encoder_steps": self.encoder_steps}


def _check_site_answer(site: str, res: dict[str, Any]) -> str | None:
    """Why a site's answer is refused (None: accepted): one evaluation, or one per dataset
    of a site that holds several (each checked as one)."""
    if res.get("kind") == P.SITE_EVALUATIONS_KIND:
        if res.get("site_id") != site:
            return "rejected answer: it names another site"
        parts = res.get("evaluations")
        if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
            return "rejected answer: no evaluations in a several-dataset answer"
        types = [p.get("image_type") for p in parts]
        if len(set(map(str, types))) != len(types):
            return "rejected answer: an image type twice in one site's answer"
        return next((why for why in (_check_site_result(site, p) for p in parts) if why), None)
    return _check_site_result(site, res)


def _check_site_result(site: str, res: dict[str, Any]) -> str | None:
    """Why a site's evaluation is refused (None: accepted). Never echoes the offending value."""
    from medisyn.audit.report import assert_shareable

    if res.get("kind") != SITE_KIND:
        return f"rejected answer: not a site evaluation (kind {str(res.get('kind'))[:40]!r})"
    if res.get("site_id") != site:
        return "rejected answer: it names another site"
    if not isinstance(res.get("type"), dict) or not isinstance(res.get("image_type"), str):
        return "rejected answer: no image type entry"
    try:
        assert_shareable(res)
    except ValueError:
        return ("rejected answer: it failed the shareability check (a path-like string, a "
                "site-local value or an array-like list); nothing of it is used")
    return None


def _gallery(comps: Any, results: dict[str, dict[str, Any]], req: EvaluateRequest,
             keys: dict[tuple[str, str], str]) -> dict[str, Any]:
    """The first ``gallery_per_prompt`` images of each prompt, regenerated here from the same
    model and seeds as the site's (image j of the site's i-th prompt has seed
    ``seed + i * n_per_label + j``); real images stay at the sites. ``keys``: (site, image
    type) -> the joined report's type key."""
    from medisyn.evaluation import site_parts

    out: dict[str, Any] = {}
    g = min(req.gallery_per_prompt, req.n_per_label)
    if g < 1:
        return out
    for site, res in results.items():
        for part in site_parts(res):
            entry = part["type"]
            if entry.get("skipped", {}).get("all"):
                continue
            key = keys.get((site, str(part.get("image_type"))))
            if key is not None:
                out[key] = _gallery_rows(comps, site, entry, req, g)
    return out


def _gallery_rows(comps: Any, site: str, entry: Mapping[str, Any], req: EvaluateRequest, g: int
                  ) -> dict[str, Any]:
    """One image type's gallery: ``g`` images of each label's prompt, regenerated here."""
    import numpy as np

    from medisyn.generate import generate, grey_image_types

    labels = [str(x) for x in entry.get("labels", [])]
    prompts = entry.get("prompts", {})
    per: dict[str, Any] = {}
    for i, lab in enumerate(labels):
        p = prompts.get(lab)
        if not isinstance(p, str):
            continue
        grey = {str(entry.get("image_type"))} if entry.get("channels") == 1 else set()
        items = generate(comps, [p], n_per_prompt=g, seed=req.seed + i * req.n_per_label, steps=req.steps,
                         guidance=req.guidance, guidance_interval=req.guidance_interval,
                         scheduler=req.scheduler, batch_size=64,
                         grey_types=grey | grey_image_types(comps))
        per[lab] = {"prompt": p, "synthetic": [np.asarray(x.image) for x in items], "real": [],
                    "real_note": f"real images stay at site {site}"}
    return per


def run_evaluate(grid: Grid, cfg: FederationConfig, req: EvaluateRequest, *, attempt: str = "") -> str:
    """The ServerApp's evaluate mode; returns an :class:`Outcome` and writes the report."""
    from medisyn.evaluation import join_site_evaluations, make_settings, site_parts
    from medisyn.evaluation_report import summary_lines, write_evaluation
    from medisyn.models import model_hash, read_model_meta

    out = Path(req.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = AuditProgress(out, attempt)
    progress.status(Outcome.RUNNING)
    settings = make_settings(req.settings())
    model_dir = Path(req.run_dir) / "model"
    expected = list(cfg.sites)
    wait = req.site_wait_timeout or cfg.site_wait_timeout
    want = max(len(expected), cfg.min_sites)
    progress(f"waiting for {want} site(s) (up to {wait:g} s)")
    have = wait_for_sites(grid, want, wait)
    if have < max(cfg.min_sites, 1):
        msg = f"only {have} site(s) connected within {wait:g} s (min_sites = {cfg.min_sites})"
        progress.status(Outcome.NO_SITES, message=msg)
        return Outcome.NO_SITES
    nodes = sorted(grid.get_node_ids())
    node_sites: dict[int, str] = {}

    model = GlobalModel(cfg.model, from_dir=model_dir)
    mhash = model_hash(model_dir)
    meta = read_model_meta(model_dir)
    stage = "unet"
    state, fz, extra = stage_payload(model, cfg, stage)
    arrays, frozen = to_record(state), (to_record(fz) if fz else None)
    config: dict[str, Any] = {P.AUDIT: P.QUERY_EVALUATE, P.MODEL_HASH: mhash,
                              P.EVALUATION: json.dumps(settings.model_dump(mode="json")),
                              P.STAGE: stage, P.SEED: cfg.seed, P.MODEL_CONFIG: cfg.model.model_dump_json(),
                              **extra}
    if meta.get("image_types"):
        config[P.MODEL_IMAGE_TYPES] = json.dumps(meta["image_types"], sort_keys=True)

    def content() -> RecordDict:
        rd = RecordDict({P.CONFIG: ConfigRecord(config), P.ARRAYS: arrays})
        if frozen is not None:
            rd[P.FROZEN] = frozen
        return rd

    progress(f"asking {len(nodes)} site(s) to evaluate the model on their own data "
             f"({req.n_per_label} image(s) per label, {req.steps} sampling steps)")
    t0 = time.time()
    results, errors = query_sites(grid, nodes, content, req.timeout, node_sites,
                                  max_parallel=req.max_parallel_sites or cfg.max_parallel_sites)
    accepted: dict[str, dict[str, Any]] = {}
    for site, res in sorted(results.items()):
        why = _check_site_answer(site, res)
        if why:
            errors[site] = why
            continue
        accepted[site] = res
        for part in site_parts(res):
            progress(f"site {site}: evaluated {part.get('image_type')} ({part.get('n_synthetic')} synthetic "
                     f"images, {part.get('timings', {}).get('total_seconds', '?')} s)", site=site)
    for site, err in errors.items():
        progress(f"site {site}: evaluation failed: {err[:300]}", site=site)
    progress(f"site evaluations took {time.time() - t0:.1f} s")

    joined = join_site_evaluations(accepted, site_errors=errors, model_hash=mhash, settings=settings,
                                   expected_sites=expected, config_hash=cfg.hash())
    keys = {(str(v.get("site")), str(v.get("image_type"))): k for k, v in joined["types"].items()}
    t1 = time.time()
    gallery = _gallery(model.components, accepted, req, keys)
    joined["timings"]["gallery_seconds"] = round(time.time() - t1, 2)
    joined["gallery_note"] = ("the gallery's images are the first images of each prompt, regenerated by "
                              "the coordinator from the same model and seeds the site used; real images "
                              "stay at the sites")
    js, page = write_evaluation(joined, out, gallery)
    for line in summary_lines(joined):
        progress(line)
    failed = sorted(joined["site_errors"])
    progress(f"evaluation report written: {page}"
             + (f"; site(s) without an evaluation: {failed}" if failed else ""))
    progress.status(Outcome.DONE, report=str(js), html=str(page), sites_failed=failed,
                    summary=summary_lines(joined))
    return Outcome.DONE


# --------------------------------------------------------------------------- supervisor side


class EvaluateSupervisor(AuditSupervisor):
    """``medisyn-server evaluate``: the SuperLink, the ``mode = "evaluate"`` submission, progress."""

    def prepare(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("status.json", "progress.jsonl"):
            (self.out_dir / name).unlink(missing_ok=True)
        atomic_write_text(self.out_dir / REQUEST_NAME, self.req.model_dump_json(indent=1))
        self.write_flwr_home_and_app()

    def run_config(self) -> dict[str, Any]:
        base = super().run_config()
        base.pop("audit-request", None)
        return {**base, "mode": "evaluate", "evaluate-request": str((self.out_dir / REQUEST_NAME).resolve())}

    def print_new_rounds(self) -> list[dict[str, Any]]:
        return self.print_new_lines(self.out_dir / "progress.jsonl",
                                    lambda rec: f"evaluate: {rec.get('message', '')}")

    def describe_submission(self) -> str:
        return (f"submitted evaluation run {self.run_id}: {self.req.n_per_label} image(s) per label, "
                f"sites {list(self.cfg.sites)}")


def run_evaluate_command(req: EvaluateRequest, *, echo: Callable[[str], None] = print,
                         superlink: Any = None) -> int:
    """Run the federated evaluation to its report; 0 every site evaluated, 1 some did not,
    else an :class:`ExitCode`."""
    try:
        cfg = load_run(req.run_dir)
    except ConfigError as e:
        echo(f"error: {e}")
        return int(ExitCode.CONFIG)
    sup = EvaluateSupervisor(cfg, req, echo=echo, superlink=superlink)  # type: ignore[arg-type]

    def body() -> int:
        code = sup.run_query()
        if code != ExitCode.OK:
            return int(code)
        st = sup.status() or {}
        echo(f"evaluation report: {Path(req.out_dir) / 'evaluation.html'}  "
             f"(JSON: {Path(req.out_dir) / 'evaluation.json'})")
        if st.get("sites_failed"):
            echo(f"site(s) without an evaluation: {', '.join(st['sites_failed'])}")
            return 1
        return 0

    return supervise(body, close=sup.close, echo=echo, interrupted="stopping the evaluation")
