"""``medisyn-server``: the coordinator's command line (typer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from medisyn.server.supervisor import EXIT_HELP, ExitCode

from medisyn.config import DEFAULT_GUIDANCE, DEFAULT_INTERVAL_TEXT, INTERVAL_HELP, parse_interval

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
    from medisyn.server.config import config_warnings

    for w in config_warnings(cfg):
        typer.echo(f"warning: {w}", err=True)


# --max-parallel-sites of `audit` and `evaluate`
MaxParallelSites = Annotated[int | None, typer.Option(
    "--max-parallel-sites", min=1,
    help="Ask at most this many sites at once (default: the run's max_parallel_sites, else all). For sites "
         "that share one machine: about one per core takes as long and holds less memory.")]


@app.command(help=(
    "Release audit of a finished run: generate K images per prompt of every site's image "
    "types from RUN_DIR/model, send them to every site in a Flower query, collect each "
    "site's shareable aggregate and write OUT/release_report.{json,html} and OUT/released/. "
    "Exit codes: 0 report written and the release gate passed; 1 report written and the "
    "gate failed (reasons printed); 2 config error; 7 no sites; 8 internal error; 130 interrupted "
    "(medisyn.exitcodes)."))
def audit(
    run: Annotated[Path, typer.Option("--run", help="RUN_DIR of a finished `medisyn-server start` run")],
    n_per_prompt: Annotated[int, typer.Option("--n-per-prompt", "-k", min=1, help="Images generated per prompt.")] = 8,
    out: Annotated[Path | None, typer.Option("--out", help="Report directory (default RUN_DIR/audit).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Sampling steps.")] = 25,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0, help="Classifier-free guidance scale.")] = DEFAULT_GUIDANCE,
    guidance_interval: Annotated[str, typer.Option("--guidance-interval", metavar="LO,HI", help=INTERVAL_HELP)] = DEFAULT_INTERVAL_TEXT,
    seed: Annotated[int, typer.Option("--seed", help="First sampling seed.")] = 0,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Prompt(s) to generate instead of asking the sites (repeatable).")] = None,
    no_model: Annotated[bool, typer.Option("--no-model", help="Do not send the model's weights to the sites (no VAE view, no membership probe).")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds to wait for the sites' answers to one query.")] = 3600.0,
    max_parallel_sites: MaxParallelSites = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show debug logs.")] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from medisyn.server.audit import AuditRequest, run_audit_command

    run = run.resolve()
    req = AuditRequest(run_dir=run, out_dir=(out or run / "audit").resolve(), n_per_prompt=n_per_prompt,
                       steps=steps, guidance=guidance, guidance_interval=parse_interval(guidance_interval),
                       seed=seed, prompts=prompt or None,
                       send_model=not no_model, timeout=timeout, max_parallel_sites=max_parallel_sites)
    raise typer.Exit(run_audit_command(req, echo=typer.echo))


@app.command(help=(
    "Federated evaluation of a finished run: every site builds RUN_DIR/model from a Flower "
    "query, generates N images per label of its own image type, measures them against its own "
    "data (label alignment, TSTR vs real, FD/KID, precision/recall, density/coverage, "
    "near-duplicates, each with its real floor) and answers with aggregates only; writes "
    "OUT/evaluation.{json,html}. Exit codes: 0 every site evaluated; 1 report written, some "
    "site refused or failed; 2 config error; 3 no sites; 5 internal error; 130 interrupted."))
def evaluate(
    run: Annotated[Path, typer.Option("--run", help="RUN_DIR of a finished `medisyn-server start` run")],
    out: Annotated[Path | None, typer.Option("--out", help="Report directory (default RUN_DIR/evaluation).")] = None,
    n_per_label: Annotated[int, typer.Option("--n-per-label", min=1, max=1024, help="Images each site generates per label.")] = 64,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Sampling steps.")] = 20,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0, help="Classifier-free guidance scale.")] = DEFAULT_GUIDANCE,
    guidance_interval: Annotated[str, typer.Option("--guidance-interval", metavar="LO,HI", help=INTERVAL_HELP)] = DEFAULT_INTERVAL_TEXT,
    seed: Annotated[int, typer.Option("--seed", help="First sampling seed (also the classifiers' seed).")] = 0,
    classifier_steps: Annotated[int, typer.Option("--classifier-steps", min=1, help="Steps of each site classifier (the encoder CNN gets a third more).")] = 300,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds to wait for the sites' answers.")] = 3600.0,
    max_parallel_sites: MaxParallelSites = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show debug logs.")] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from medisyn.server.evaluate import EvaluateRequest, run_evaluate_command

    run = run.resolve()
    req = EvaluateRequest(run_dir=run, out_dir=(out or run / "evaluation").resolve(), n_per_label=n_per_label,
                          steps=steps, guidance=guidance, guidance_interval=parse_interval(guidance_interval),
                          seed=seed, classifier_steps=classifier_steps,
                          encoder_steps=max(1, classifier_steps * 4 // 3), timeout=timeout,
                          max_parallel_sites=max_parallel_sites)
    raise typer.Exit(run_evaluate_command(req, echo=typer.echo))


def main() -> None:
    app()
