"""``medisyn audit ...``: validate the detector, audit a folder of synthetic images, gate.

Mounted by the main CLI as a typer sub-app (``app``). Errors are ``MediSynError``s: one
readable line, exit code from the error class.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from medisyn.errors import ConfigError, MediSynError

log = logging.getLogger(__name__)

app = typer.Typer(name="audit", help="Privacy audit: copy detection, release report, gate.",
                  no_args_is_help=True, add_completion=False)


def _fail(e: MediSynError) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(getattr(e, "exit_code", 1))


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")


@app.command("validate")
def validate_cmd(
    site: Annotated[Path, typer.Option("--site", help="site TOML ([site], [dataset], optional [audit])")],
    out: Annotated[Path, typer.Option("--out", help="output directory (validation.json)")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Plant exact/mild/hard copies of training images among held-out images and report
    detection rates per family and the false-positive rate (OUT/validation.json)."""
    _setup_logging(verbose)
    try:
        from medisyn.audit.data import load_site_images
        from medisyn.audit.settings import load_site
        from medisyn.audit.site_audit import _write_json
        from medisyn.audit.validate import run_validation

        from medisyn.fileio import folder_name

        cfg, audit = load_site(site)
        done = []
        for one in cfg.per_dataset():  # each dataset validated on its own images
            ds = one.only_dataset
            res = run_validation(load_site_images(ds), audit,
                                 cache_dir=Path(cfg.site.state_dir) / "audit" / "encoders")
            res["site_id"] = cfg.site.id
            res["dataset"] = ds.image_type
            dest = Path(out) if len(cfg.datasets) == 1 else Path(out) / folder_name(ds.image_type)
            _write_json(dest / "validation.json", res)
            done.append((res, dest))
    except MediSynError as e:
        _fail(e)
    for res, dest in done:
        d = res["detection_rate"]
        typer.echo(f"site {res['site_id']} ({res['dataset']}): detection exact {d['exact']:.3f} "
                   f"mild {d['mild']:.3f} hard {d['hard']:.3f}; false positives "
                   f"{res['false_positive_rate']:.3f}; validated: {res['validated']} -> {dest / 'validation.json'}")


@app.command("site")
def site_cmd(
    site: Annotated[Path, typer.Option("--site", help="site TOML")],
    synthetic: Annotated[Path, typer.Option("--synthetic", help="folder of PNGs + JSON sidecars")],
    out: Annotated[Path, typer.Option("--out", help="output directory for the reports")],
    model: Annotated[Path | None, typer.Option("--model", help="model directory (adds the VAE "
                                               "view and the membership probe)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Audit synthetic images at this site: site-local report (JSON + HTML, stays here) and
    the shareable aggregate (OUT/aggregate.json)."""
    _setup_logging(verbose)
    try:
        from medisyn.audit.settings import load_site
        from medisyn.audit.site_audit import audit_synthetic_at_site, load_synthetic_dir

        cfg, audit = load_site(site)
        comps = None
        mhash = None
        if model is not None:
            try:
                from medisyn.models import load_components, model_hash  # type: ignore[attr-defined]
            except ImportError:
                raise ConfigError("--model needs medisyn.models.load_components, which is "
                                  "not available in this installation") from None
            if not Path(model).is_dir():
                raise ConfigError(f"--model {model}: not a model directory")
            comps = load_components(model)
            mhash = model_hash(comps)
        from medisyn.fileio import folder_name

        images = load_synthetic_dir(synthetic)
        aggs = []
        for one in cfg.per_dataset():  # one audit per dataset, each against its own images
            dest = Path(out) if len(cfg.datasets) == 1 else Path(out) / folder_name(one.only_dataset.image_type)
            aggs.append((audit_synthetic_at_site(one, images, comps, audit_config=audit, out_dir=dest,
                                                 model_hash=mhash), dest))
    except MediSynError as e:
        _fail(e)
    for agg, dest in aggs:
        o = agg["overall"]
        typer.echo(f"site {agg['site_id']} ({agg['dataset']}): {o['flagged']['count']}/{o['n_synthetic']} "
                   f"synthetic images flagged (held-out baseline {o['holdout_baseline']['rate']:.4f}); "
                   f"reports in {dest}")


@app.command("gate")
def gate_cmd(report: Annotated[Path, typer.Argument(help="release_report.json")]) -> None:
    """Re-evaluate the release gate on a report; exit 0 (pass) or 1 (fail) with reasons."""
    from medisyn.audit.gate import evaluate
    from medisyn.audit.report import ReleaseReport
    from pydantic import ValidationError

    try:
        data = json.loads(Path(report).read_text())
        rep = ReleaseReport.model_validate(data)
    except FileNotFoundError:
        typer.echo(f"error: {report}: file not found", err=True)
        raise typer.Exit(2) from None
    except (json.JSONDecodeError, ValidationError) as e:
        typer.echo(f"error: {report}: not a valid release report: {e}", err=True)
        raise typer.Exit(2) from None
    verdict = evaluate(rep.sites, rep.privacy, rep.released_ids, alpha=rep.alpha,
                       expected_sites=rep.expected_sites, site_errors=rep.site_errors)
    if verdict.passed:
        typer.echo(f"PASS: {len(rep.released_ids)} synthetic images may be released")
        raise typer.Exit(0)
    typer.echo("FAIL:")
    for r in verdict.reasons:
        typer.echo(f"  - {r}")
    raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app(prog_name="medisyn audit")
    sys.exit(0)
