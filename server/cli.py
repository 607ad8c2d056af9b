"""``medisyn-server``: the coordinator's command line (typer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from medisyn.server.supervisor import EXIT_HELP, ExitCode

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Coordinate a MediSyn federation on Flower 1.42. " + EXIT_HELP,
)


@app.callback()
def _root() -> None:
    """Coordinate a MediSyn federation."""


@app.command(help="Start the SuperLink, submit the run and follow it to the end. " + EXIT_HELP)
def start(
    config: Annotated[Path, typer.Option("--config", "-c", help="federation.toml")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in run_dir at the round after its last checkpoint.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show debug logs.")] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from medisyn.server.config import load_federation_config
    from medisyn.server.supervisor import run_server

    from medisyn.errors import MediSynError

    try:
        cfg = load_federation_config(config)
    except MediSynError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(int(ExitCode.CONFIG)) from None
    raise typer.Exit(run_server(cfg, resume=resume, echo=typer.echo))


@app.command(help="Validate federation.toml and print the resolved config and its hash.")
def check(config: Annotated[Path, typer.Option("--config", "-c", help="federation.toml")]) -> None:
    from medisyn.server.config import load_federation_config

    from medisyn.errors import MediSynError

    try:
        cfg = load_federation_config(config)
    except MediSynError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(int(ExitCode.CONFIG)) from None
    typer.echo(cfg.model_dump_json(indent=2))
    typer.echo(f"config hash: {cfg.hash()}  total rounds: {cfg.total_rounds}")


def main() -> None:
    app()
