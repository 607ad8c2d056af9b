"""The federated release audit: ``medisyn-server audit --run RUN_DIR --n-per-prompt K --out DIR``.

1. The supervisor (:class:`AuditSupervisor`) starts a SuperLink (or reuses the demo's),
   submits the thin app bundle with ``mode = "audit"`` and follows ``OUT/progress.jsonl``.
2. The ServerApp (:func:`run_audit`) waits for every site of the run, asks each for the
   prompts of its image types (a ``query`` with ``audit = "prompts"``: label prompts from
   the site's dataset config, never a record's caption), generates K images per prompt
   from the run's final model, and sends all of them, with the model's weights, to every
   site in one ``query`` message (``audit = "copy-detection"``).
3. Each site runs ``medisyn.audit`` on its own data and answers with its shareable
   aggregate only (similarity quantiles, flag counts, ids of flagged *synthetic* images,
   validation rates, ε/δ from its own ledger); the server checks every aggregate with
   ``assert_shareable`` and writes the release report (``release_report.{json,html}``)
   and the released images (``OUT/released/``; flagged ones are left out).

Message contract (server -> site), ``query`` content:
- ``config``: ``audit`` (``prompts`` | ``copy-detection``), ``model_hash``, and for copy
  detection the model's ``model-config``, ``stage`` (``unet``), ``seed``,
  ``frozen-stages``/``latent-std`` as in a training message, ``synthetic-meta`` (JSON
  list of ``{id, prompt, seed}``) and ``generation`` (JSON ``{steps, guidance,
  guidance_interval, scheduler}``): a site regenerates (a sample of) the images from the model and their
  seeds and refuses the query if they differ (``privacy.audit_verify_sample``);
- ``arrays``/``frozen``: the final model's trainable weights (packed, ``medisyn.protocol``);
- ``synthetic``: ArrayRecord ``{"images": uint8 (N, H, W, C)}``.
Reply: ConfigRecord ``result`` with ``json`` (the aggregate), a MetricRecord, ``site``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid
from medisyn.server.checkpoint import append_jsonl, atomic_write_text
from medisyn.server.config import FederationConfig, federation_from_json
from medisyn.server.federation import (
    GlobalModel,
    Outcome,
    answer_types,
    query_sites,
    read_status,
    site_prompts,
    stage_payload,
    to_record,
    wait_for_sites,
    write_status,
)
from medisyn.server.supervisor import ExitCode, ServerSupervisor, supervise
from pydantic import BaseModel, ConfigDict, Field

from medisyn import protocol as P
from medisyn.config import DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INTERVAL
from medisyn.errors import ConfigError

logger = logging.getLogger(__name__)

REQUEST_NAME = "audit-request.json"
RESOLVED_NAME = "federation.resolved.json"


class AuditRequest(BaseModel):
    """What the coordinator asked for (written to ``OUT/audit-request.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: Path
    out_dir: Path
    n_per_prompt: int = Field(default=8, ge=1, le=10_000)
    steps: int = Field(default=25, ge=1, le=1000)
    guidance: float = Field(default=DEFAULT_GUIDANCE, ge=0)
    # guidance only at noise levels sigma in (lo, hi] (medisyn.generate); None: every step
    guidance_interval: tuple[float, float] | None = DEFAULT_GUIDANCE_INTERVAL
    scheduler: str = "dpm"
    seed: int = 0
    prompts: list[str] | None = None  # None: ask every site for its image types' prompts
    send_model: bool = True  # weights to the sites: adds the VAE view and the membership probe
    timeout: float = Field(default=3600.0, gt=0)  # per query round
    site_wait_timeout: float | None = Field(default=None, gt=0)  # None: the run's
    gallery_per_prompt: int = Field(default=8, ge=0)
    # at most this many sites are asked at once (None: the run's max_parallel_sites)
    max_parallel_sites: int | None = Field(default=None, ge=1)


def load_run(run_dir: Path) -> FederationConfig:
    """The resolved config of a finished run; a clear error if the run has no final model."""
    run_dir = Path(run_dir)
    p = run_dir / RESOLVED_NAME
    if not p.is_file():
        raise ConfigError(f"{run_dir} is not a MediSyn run directory (no {RESOLVED_NAME}); "
                          "pass the run_dir of a `medisyn-server start` run")
    cfg = federation_from_json(p.read_text())
    if not (run_dir / "model" / "model_index.json").is_file():
        st = read_status(run_dir) or {}
        raise ConfigError(f"{run_dir} has no final model (run state: {st.get('state', 'unknown')}); "
                          "the audit runs on a finished federation")
    return cfg


# --------------------------------------------------------------------------- ServerApp side


class AuditProgress:
    def __init__(self, out_dir: Path, attempt: str):
        self.out_dir = Path(out_dir)
        self.attempt = attempt
        self.path = self.out_dir / "progress.jsonl"

    def __call__(self, message: str, **extra: Any) -> None:
        logger.info(message)
        append_jsonl(self.path, {"time": time.time(), "message": message, **extra})

    def status(self, state: str, **extra: Any) -> None:
        write_status(self.out_dir, state, attempt=self.attempt, **extra)


def run_audit(grid: Grid, cfg: FederationConfig, req: AuditRequest, *, attempt: str = "") -> str:
    """The ServerApp's audit mode; returns an :class:`Outcome` and writes the report.

    Four steps: the prompts (given, or the sites'), the synthetic set from the final model,
    the copy-detection query (every site's checked aggregate), the release report."""
    out = Path(req.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = AuditProgress(out, attempt)
    progress.status(Outcome.RUNNING)
    expected = list(cfg.sites)
    wait = req.site_wait_timeout or cfg.site_wait_timeout
    want = max(len(expected), cfg.min_sites)
    progress(f"waiting for {want} site(s) (up to {wait:g} s)")
    have = wait_for_sites(grid, want, wait)
    if have < max(cfg.min_sites, 1):
        msg = f"only {have} site(s) connected within {wait:g} s (min_sites = {cfg.min_sites})"
        progress.status(Outcome.NO_SITES, message=msg)
        return Outcome.NO_SITES
    if have < want:
        progress(f"only {have} of {want} sites connected; the missing ones fail the release gate")
    nodes = sorted(grid.get_node_ids())
    node_sites: dict[int, str] = {}

    prompts, grey_types = _audit_prompts(grid, nodes, req, node_sites, progress)
    if not prompts:
        msg = "no prompts: no site answered the prompts query and none were given (--prompt)"
        progress.status(Outcome.FAILED, message=msg)
        return Outcome.FAILED
    synthetic, paths, mhash, content = _synthetic_query(cfg, req, prompts, grey_types, out, progress)
    progress(f"sending {len(synthetic)} synthetic image(s) to {len(nodes)} site(s); each audits "
             "them against its own data")
    t1 = time.time()
    results, errors = query_sites(grid, nodes, content, req.timeout, node_sites,
                                  max_parallel=req.max_parallel_sites or cfg.max_parallel_sites)
    aggregates = _checked_aggregates(results, errors, progress)
    for site, err in errors.items():
        progress(f"site {site}: audit failed: {err[:300]}", site=site)
    progress(f"site audits took {time.time() - t1:.1f} s")
    _write_release(aggregates, errors, synthetic, paths, cfg=cfg, req=req, mhash=mhash, out=out, progress=progress)
    return Outcome.DONE


def _audit_prompts(grid: Grid, nodes: list[int], req: AuditRequest, node_sites: dict[int, str],
                   progress: AuditProgress) -> tuple[list[str], set[str]]:
    """The prompts to generate (``--prompt``, else every site's image types' label prompts)
    and the image types whose site's data is grey (their images are made channel-equal)."""
    grey_types: set[str] = set()
    if req.prompts:
        prompts = sorted(set(req.prompts))
        progress(f"{len(prompts)} prompt(s) given: generating {req.n_per_prompt} image(s) each")
        return prompts, grey_types
    pr_results, pr_errors = site_prompts(grid, nodes, req.timeout, node_sites)
    for site, err in pr_errors.items():
        progress(f"site {site} did not give its prompts: {err[:200]}", site=site)
    prompts = sorted({str(p) for r in pr_results.values() for p in r.get(P.QUERY_PROMPTS, [])})
    grey_types |= {t for r in pr_results.values() for t, e in answer_types(r).items()
                   if e.get(P.PROMPTS_CHANNELS) == 1}
    if prompts:
        progress(f"{len(prompts)} prompt(s) from {len(pr_results)} site(s): generating "
                 f"{req.n_per_prompt} image(s) each")
    return prompts, grey_types


def _synthetic_query(cfg: FederationConfig, req: AuditRequest, prompts: list[str], grey_types: set[str],
                     out: Path, progress: AuditProgress):
    """Generate the synthetic set from the run's final model (written to OUT/synthetic) and
    build the copy-detection query's content. Returns (synthetic, paths, model hash,
    content factory); the model itself is freed before the sites audit (minutes, and the
    demo peaks while its sites audit)."""
    from medisyn.generate import generate, grey_image_types, write_generated
    from medisyn.models import model_hash
    from medisyn.procs import trim_heap

    model_dir = Path(req.run_dir) / "model"
    model = GlobalModel(cfg.model, from_dir=model_dir)
    comps = model.components
    mhash = model_hash(model_dir)
    t0 = time.time()
    grey_types = grey_types | grey_image_types(comps)
    items = generate(comps, prompts, n_per_prompt=req.n_per_prompt, seed=req.seed, steps=req.steps, grey_types=grey_types,
                     guidance=req.guidance, guidance_interval=req.guidance_interval, scheduler=req.scheduler)
    syn_dir = out / "synthetic"
    shutil.rmtree(syn_dir, ignore_errors=True)
    paths = write_generated(items, syn_dir, model_hash=mhash, steps=req.steps, guidance=req.guidance,
                            guidance_interval=req.guidance_interval,
                            scheduler=req.scheduler)
    synthetic = [(p.stem, np.asarray(g.image), g.prompt) for p, g in zip(paths, items, strict=True)]
    progress(f"generated {len(synthetic)} image(s) in {time.time() - t0:.1f} s -> {syn_dir}")

    images, meta = P.pack_images(synthetic)
    # each image's seed and the sampler settings: a site regenerates (a sample of) the images
    # from the model to verify them before it audits (privacy.audit_verify_sample)
    rows = json.loads(meta)
    for row, g in zip(rows, items, strict=True):
        row["seed"] = int(g.seed)
    config: dict[str, Any] = {
        P.AUDIT: P.QUERY_COPY_DETECTION, P.MODEL_HASH: mhash, P.SYNTHETIC_META: json.dumps(rows),
        P.GENERATION: json.dumps({"steps": req.steps, "guidance": req.guidance, "scheduler": req.scheduler,
                                  "guidance_interval": (list(req.guidance_interval)
                                                        if req.guidance_interval is not None else None),
                                  "grey_types": sorted(grey_types)}),
    }
    arrays = frozen = None
    if req.send_model:
        stage = "unet"
        state, fz, extra = stage_payload(model, cfg, stage)
        arrays = to_record(state)
        frozen = to_record(fz) if fz else None
        config.update({P.STAGE: stage, P.SEED: cfg.seed, P.MODEL_CONFIG: cfg.model.model_dump_json(), **extra})
        del state, fz

    def content() -> RecordDict:
        from flwr.app import Array

        rd = RecordDict({P.CONFIG: ConfigRecord(config),
                         P.SYNTHETIC: ArrayRecord({P.IMAGES: Array(images)})})
        if arrays is not None:
            rd[P.ARRAYS] = arrays
        if frozen is not None:
            rd[P.FROZEN] = frozen
        return rd

    del model, comps, items
    trim_heap()
    return synthetic, paths, mhash, content


class _Refused(ValueError):
    """A site's audit answer refused for a reason that may be named in the report."""


def _checked_aggregates(results: dict[str, dict[str, Any]], errors: dict[str, str],
                        progress: AuditProgress) -> list[Any]:
    """Every site's answer as a :class:`SiteAggregate`, checked shareable again here; a
    malformed or unshareable one goes to ``errors`` (named, never echoed) and is not used."""
    from medisyn.audit.report import SiteAggregate, assert_shareable
    from pydantic import ValidationError

    aggregates: list[SiteAggregate] = []
    for site, res in sorted(results.items()):
        try:
            if res.get("kind") == P.SITE_AUDITS_KIND:  # a site with several datasets: one each
                if res.get("site_id") != site:
                    raise _Refused("the answer names another site")
                parts = res.get(P.AUDIT_PARTS)
                if not isinstance(parts, list) or not parts:
                    raise _Refused("no aggregates in a several-dataset answer")
                aggs = [SiteAggregate.model_validate(p) for p in parts]
            else:
                aggs = [SiteAggregate.model_validate(res)]
            for agg in aggs:
                if agg.site_id != site:
                    raise _Refused(f"aggregate names site {agg.site_id!r}")
                assert_shareable(agg.model_dump(mode="json"))
            if len({a.dataset for a in aggs}) != len(aggs):
                raise _Refused("one dataset audited twice in one answer")
        except Exception as e:  # name the problem, never echo the offending value (it may be a leaked path)
            if isinstance(e, ValidationError):
                where = ", ".join(".".join(str(x) for x in err["loc"]) for err in e.errors()[:5])
                errors[site] = f"rejected aggregate: not a valid site aggregate (fields: {where})"
            elif isinstance(e, _Refused):
                errors[site] = f"rejected aggregate: {e}"
            else:
                errors[site] = ("rejected aggregate: it failed the shareability check (a path-like "
                                "string, a site-local value or an array-like list); nothing of it is used")
            continue
        for agg in aggs:
            aggregates.append(agg)
            o = agg.overall
            which = f" ({agg.dataset})" if len(aggs) > 1 else ""
            progress(f"site {site}{which}: {o.flagged.count}/{o.n_synthetic} flagged (held-out baseline "
                     f"{o.holdout_baseline.rate:.3f}); detector validated: "
                     f"{agg.validation.validated if agg.validation else None}", site=site)
    return aggregates


def _write_release(aggregates: list[Any], errors: dict[str, str], synthetic: list, paths: list[Path], *,
                   cfg: FederationConfig, req: AuditRequest, mhash: str, out: Path,
                   progress: AuditProgress) -> None:
    """The release report (``release_report.{json,html}``) and OUT/released/ (flagged
    images left out)."""
    from medisyn.audit import build_release_report

    report = build_release_report(
        aggregates, synthetic, out_dir=out, model_hash=mhash, config_hash=cfg.hash(),
        expected_sites=sorted(set(cfg.sites) | set(errors)), site_errors=errors,
        gallery_per_prompt=req.gallery_per_prompt,
    )
    rel_dir = out / "released"
    shutil.rmtree(rel_dir, ignore_errors=True)
    rel_dir.mkdir(parents=True)
    released = set(report.released_ids)
    for p in paths:
        if p.stem in released:
            shutil.copy(p, rel_dir / p.name)
            shutil.copy(p.with_suffix(".json"), rel_dir / f"{p.stem}.json")
    progress(f"release report written: gate {'PASS' if report.gate.passed else 'FAIL'}; "
             f"{len(report.released_ids)} released, {len(report.excluded_ids)} excluded")
    progress.status(Outcome.DONE, gate=report.gate.passed, reasons=report.gate.reasons[:50],
                    report=str(out / "release_report.json"))


# --------------------------------------------------------------------------- supervisor side


class AuditSupervisor(ServerSupervisor):
    """``medisyn-server audit``: the SuperLink, the ``mode = "audit"`` submission, progress."""

    recovers = False  # a lost audit is run again by hand (its SuperLink may be shared)

    def __init__(self, cfg: FederationConfig, req: AuditRequest, *, echo: Callable[[str], None] = print,
                 superlink: Any = None, poll: float = 1.0):
        super().__init__(cfg, resume=False, echo=echo, poll=poll)
        self.req = req
        self.out_dir = Path(req.out_dir)
        self.status_dir = self.out_dir
        self._shared_superlink = superlink is not None
        self.superlink = superlink

    def prepare(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("status.json", "progress.jsonl"):
            (self.out_dir / name).unlink(missing_ok=True)
        atomic_write_text(self.out_dir / REQUEST_NAME, self.req.model_dump_json(indent=1))
        self.write_flwr_home_and_app()

    def start_superlink(self, timeout: float = 90.0) -> None:
        if self.superlink is None:
            super().start_superlink(timeout)

    def run_query(self) -> ExitCode:
        """Prepare the output folder, start the SuperLink (unless shared), submit the
        query run and watch it to its end."""
        self.prepare()
        self.start_superlink()
        self.submit()
        return self.watch()

    def run_config(self) -> dict[str, Any]:
        return {**super().run_config(), "mode": "audit",
                "audit-request": str((self.out_dir / REQUEST_NAME).resolve())}

    def print_new_rounds(self) -> list[dict[str, Any]]:
        return self.print_new_lines(self.out_dir / "progress.jsonl",
                                    lambda rec: f"audit: {rec.get('message', '')}")

    def describe_submission(self) -> str:
        return (f"submitted audit run {self.run_id}: {self.req.n_per_prompt} image(s) per prompt, "
                f"sites {list(self.cfg.sites)}")

    def close(self) -> None:
        if not self._shared_superlink:
            super().close()


def run_audit_command(req: AuditRequest, *, echo: Callable[[str], None] = print,
                      superlink: Any = None) -> int:
    """Run the federated audit to its report; 0 gate passed, 1 gate failed, else an ExitCode."""
    try:
        cfg = load_run(req.run_dir)
    except ConfigError as e:
        echo(f"error: {e}")
        return int(ExitCode.CONFIG)
    sup = AuditSupervisor(cfg, req, echo=echo, superlink=superlink)

    def body() -> int:
        code = sup.run_query()
        if code != ExitCode.OK:
            return int(code)
        st = sup.status() or {}
        report = Path(req.out_dir) / "release_report.json"
        html = Path(req.out_dir) / "release_report.html"
        echo(f"release report: {html}  (JSON: {report}; released images: {Path(req.out_dir) / 'released'})")
        if st.get("gate"):
            echo("release gate: PASS")
            return 0
        echo("release gate: FAIL")
        for r in st.get("reasons", []):
            echo(f"  - {r}")
        return 1

    return supervise(body, close=sup.close, echo=echo, interrupted="stopping the audit")
