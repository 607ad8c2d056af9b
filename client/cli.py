"""``medisyn-client``: the site's command line (typer)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from medisyn.client.supervisor import EXIT_HELP

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Connect a hospital site to a MediSyn federation. " + EXIT_HELP,
)


@app.callback()
def _root() -> None:
    """Connect a site to a MediSyn federation."""


@app.command(help="Validate the site and keep its Flower SuperNode and its ClientApp worker running "
                  "(each restarted if it dies). The site runs only the medisyn ClientApp it installed. " + EXIT_HELP)
def start(
    site: Annotated[Path, typer.Option("--site", "-s", help="site.toml")],
    debug: Annotated[bool, typer.Option("--debug")] = False,
    isolation: Annotated[str, typer.Option(
        "--isolation", help="process (default): a site-owned worker runs only the installed medisyn "
        "ClientApp and refuses any other app bundle. subprocess: Flower's default, the SuperNode runs "
        "whatever ClientApp the coordinator's bundle names (debugging only).")] = "process",
) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from medisyn.client.supervisor import check_site, run_site

    code, report = check_site(site)
    if code:
        typer.echo(f"error: {report.get('error')}", err=True)
        raise typer.Exit(code)
    if isolation not in ("process", "subprocess"):
        typer.echo(f"error: --isolation {isolation!r}: use 'process' or 'subprocess'", err=True)
        raise typer.Exit(2)
    raise typer.Exit(run_site(site, echo=typer.echo, isolation=isolation))


@app.command(help="Check the site's data and privacy policy without connecting. " + EXIT_HELP)
def check(
    site: Annotated[Path, typer.Option("--site", "-s", help="site.toml")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    from medisyn.client.supervisor import check_site

    code, report = check_site(site)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        if "error" in report:
            typer.echo(f"error: {report['error']}", err=True)
        data = report.get("data")
        for d in (data if isinstance(data, list) else [data] if data else []):  # one per [[dataset]]
            typer.echo(f"site {report['site_id']}: {d['image_type']}: {d['n_images']} images, splits "
                       f"{d['per_split']}, exact duplicates {d['exact_duplicates']} "
                       f"(cross-split {d['cross_split_duplicates']})")
        if "policy" in report:
            typer.echo(f"policy: {report['policy']}")
        if "superlink" in report:
            typer.echo(f"superlink: {report['superlink']}")
        if code == 0:
            typer.echo("ok")
    raise typer.Exit(code)


def main() -> None:
    app()
