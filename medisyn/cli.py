"""``medisyn``: the umbrella command (data check, train, generate, demo, privacy, audit).

Errors a person can cause are printed as one readable message and exit non-zero
(config 2, data 3, privacy budget 4, ledger 5, other 1); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from medisyn.config import DEFAULT_GUIDANCE, DEFAULT_INTERVAL_TEXT, INTERVAL_HELP, parse_interval
from medisyn.errors import ConfigError, MediSynError

app = typer.Typer(
    name="medisyn",
    help="MediSyn: federated, privacy-audited text-guided latent diffusion for medical images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect site data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_state = {"debug": False}
log = logging.getLogger("medisyn")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------- data


@data_app.command("check")
def data_check(
    dataset: Annotated[Path, typer.Argument(help="TOML file with a [dataset] table (a site config or a dataset file).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Read every record; print counts per split and label, sizes, duplicates and prompts."""
    from medisyn.config import load_dataset_configs
    from medisyn.data import check_dataset

    reports = [check_dataset(cfg) for cfg in load_dataset_configs(dataset)]
    if as_json:
        docs = [r.to_dict() for r in reports]
        typer.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
        return
    for i, report in enumerate(reports):
        if i:
            typer.echo("")
        _print_data_report(report)


def _print_data_report(report: Any) -> None:
    typer.echo(f"dataset   {report.path}")
    typer.echo(f"images    {report.n_images}" + (f" from {report.patients} patients" if report.patients else ""))
    typer.echo("splits    " + ", ".join(f"{s}: {n}" for s, n in report.per_split.items()))
    for s, labels in report.per_label.items():
        typer.echo(f"  {s:8s}" + ", ".join(f"{lab} ({n})" for lab, n in sorted(labels.items())))
    typer.echo("sizes     " + ", ".join(f"{k}: {n}" for k, n in report.sizes.items()))
    typer.echo(f"exact duplicates {report.exact_duplicates} ({report.cross_split_duplicates} across splits)")
    typer.echo("prompts")
    for p, n in sorted(report.prompts.items()):
        typer.echo(f"  {n:6d}  {p}")


# --------------------------------------------------------------------------- train


def _load_model_train_config(path: Path | None, preset: str, seed: int | None):
    from medisyn.config import ModelConfig, TrainConfig, read_toml, validate

    data = read_toml(path) if path else {}
    unknown = set(data) - {"model", "train"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}; allowed: [model], [train]")
    model = dict(data.get("model", {}))
    model.setdefault("preset", preset)
    train = dict(data.get("train", {}))
    if seed is not None:
        train["seed"] = seed
    return validate(ModelConfig, model, f"{path or 'defaults'} [model]"), validate(TrainConfig, train, f"{path or 'defaults'} [train]")


@app.command()
def train(
    data: Annotated[list[Path], typer.Option("--data", help="Dataset TOML; repeat to pool several (centralised).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (model in diffusers layout).")],
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps per stage.")] = 200,
    preset: Annotated[str, typer.Option("--preset", help="tiny | sd")] = "tiny",
    stage: Annotated[str, typer.Option("--stage", help="vae | unet | all")] = "all",
    vae_steps: Annotated[int | None, typer.Option("--vae-steps", help="Steps for stage vae (default: --steps).")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML with [model] and [train] tables.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints.")] = False,
) -> None:
    """Train on one or more datasets on this machine (stage vae, then unet)."""
    from medisyn.config import config_hash, load_dataset_configs
    from medisyn.data import ConcatImageDataset, image_type_info, load_dataset
    from medisyn.models import build_components, load_components, save_components, set_latent_scale
    from medisyn.train import train_local

    if stage not in ("vae", "unet", "all"):
        raise ConfigError(f"--stage {stage!r} is not one of vae, unet, all")
    model_cfg, train_cfg = _load_model_train_config(config, preset, seed)
    stages = ["vae", "unet"] if stage == "all" else [stage]
    if model_cfg.preset == "sd" and "vae" in stages:
        stages.remove("vae")
    dcfgs = [d for p in data for d in load_dataset_configs(p)]
    parts = [load_dataset(d, resolution=model_cfg.resolution, channels=model_cfg.channels, splits=d.split.train) for d in dcfgs]
    dataset = parts[0] if len(parts) == 1 else ConcatImageDataset(parts)
    model_dir = out / "model"
    if (model_dir / "model_index.json").is_file() and (resume or stages == ["unet"]):
        components = load_components(model_dir)
    elif stages == ["unet"] and model_cfg.preset == "tiny":
        raise ConfigError(f"--stage unet needs a model with a trained VAE in {model_dir}; run --stage vae first")
    else:
        components = build_components(model_cfg, seed=train_cfg.seed)
    components.image_types = {**components.image_types, **image_type_info(parts)}
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"model": model_cfg.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json"),
                "data": [str(p.resolve()) for p in data], "stages": stages, "steps": steps}
    (out / "config.json").write_text(json.dumps({**resolved, "hash": config_hash(resolved)}, indent=2))
    all_metrics: dict[str, dict] = {}
    typer.echo(f"training on {len(dataset)} images from {len(parts)} dataset(s): stages {', '.join(stages)}")
    for st in stages:
        n = (vae_steps if vae_steps is not None else steps) if st == "vae" else steps
        result = train_local(components, dataset, steps=n, config=train_cfg, stage=st,  # type: ignore[arg-type]
                             checkpoint_dir=out / "checkpoints", resume=resume)
        if st == "vae":
            set_latent_scale(components, result.metrics["latent-std"])
        all_metrics[st] = result.metrics
        typer.echo(f"  {st}: {int(result.metrics['steps'])} steps, loss {result.metrics['loss']:.4f}, "
                   f"{result.metrics['images-per-s']:.1f} images/s")
        save_components(components, model_dir, extra={"config_hash": config_hash(resolved)})
    (out / "metrics.json").write_text(json.dumps(all_metrics, indent=2))
    typer.echo(f"model: {model_dir}")


# --------------------------------------------------------------------------- generate


@app.command()
def generate(
    model: Annotated[Path, typer.Option("--model", help="Model directory (diffusers layout).")],
    prompt: Annotated[list[str], typer.Option("--prompt", help="Prompt; repeat for several.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for PNGs, sidecars and grid.png.")],
    n: Annotated[int, typer.Option("--n", help="Images per prompt.")] = 8,
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps.")] = 25,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = DEFAULT_GUIDANCE,
    guidance_interval: Annotated[str, typer.Option("--guidance-interval", metavar="LO,HI", help=INTERVAL_HELP)] = DEFAULT_INTERVAL_TEXT,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    scheduler: Annotated[str, typer.Option("--scheduler", help="dpm | ddim | ddpm")] = "dpm",
) -> None:
    """Generate N images per prompt; same seed, same images."""
    from medisyn.generate import generate as run_generate
    from medisyn.generate import write_generated
    from medisyn.models import load_components, model_hash

    interval = parse_interval(guidance_interval)  # a bad value fails before the model loads
    components = load_components(model)
    items = run_generate(components, prompt, n_per_prompt=n, seed=seed, steps=steps, guidance=guidance,
                         scheduler=scheduler, progress=True, guidance_interval=interval)
    write_generated(items, out, model_hash=model_hash(model), steps=steps, guidance=guidance,
                    guidance_interval=interval, scheduler=scheduler)
    typer.echo(f"{len(items)} images, sidecars and grid.png in {out}")


# --------------------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Model directory (diffusers layout).")],
    data: Annotated[list[Path], typer.Option("--data", help="Dataset TOML; repeat for every image type.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for evaluation.json and evaluation.html.")],
    n_per_label: Annotated[int, typer.Option("--n-per-label", help="Images generated per label.")] = 64,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps.")] = 20,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = DEFAULT_GUIDANCE,
    guidance_interval: Annotated[str, typer.Option("--guidance-interval", metavar="LO,HI", help=INTERVAL_HELP)] = DEFAULT_INTERVAL_TEXT,
    classifier_steps: Annotated[int | None, typer.Option("--classifier-steps", help="Steps of each classifier (default 300; the encoder CNN gets a third more).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (default: torch's).")] = None,
) -> None:
    """Judge a model by its images: type recognition, label alignment, TSTR, FD/KID,
    precision/recall, density/coverage, near-duplicates, each next to its real-data floor."""
    from medisyn.config import load_dataset_configs
    from medisyn.evaluation import evaluate_model, make_settings
    from medisyn.evaluation_report import summary_lines, write_evaluation
    from medisyn.models import load_components, model_hash, read_model_meta

    # the interval in the mapping, not as an override: None ("all") is a value here
    settings = make_settings({"guidance_interval": parse_interval(guidance_interval)},
                             n_per_label=n_per_label, seed=seed, steps=steps, guidance=guidance,
                             classifier_steps=classifier_steps, threads=threads,
                             encoder_steps=None if classifier_steps is None else max(1, classifier_steps * 4 // 3))
    if not model.is_dir():
        raise ConfigError(f"--model {model}: no such directory")
    if not (model / "model_index.json").is_file():
        raise ConfigError(f"--model {model} is not a MediSyn model directory (no model_index.json); "
                          "pass the model/ folder that `medisyn train` or a federation wrote")
    dcfgs = [d for p in data for d in load_dataset_configs(p)]
    components = load_components(model)
    gallery: dict = {}
    result = evaluate_model(components, dcfgs, settings=settings, model_hash=model_hash(model),
                            model_meta=read_model_meta(model), gallery=gallery, progress=typer.echo)
    result["model_dir"] = str(model.resolve())
    js, page = write_evaluation(result, out, gallery)
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo(f"took {result['timings']['total_seconds']:.0f} s (generation "
               f"{result['timings'].get('generate_seconds', 0):.0f} s); report: {page} (JSON: {js})")


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run directory.")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A few-minute smoke run.")] = False,
    dp_site: Annotated[str, typer.Option("--dp-site", help="Site trained under DP-SGD ('none': no DP).")] = "chest-xray-dp",
) -> None:
    """Run a real federation on this machine: four hospitals holding four image types, one
    under DP-SGD."""
    from medisyn.server.demo import DEMO_SITES, run_demo

    if dp_site != "none" and dp_site not in DEMO_SITES:  # else the demo would run with no DP site at all
        raise typer.BadParameter(f"{dp_site!r} is not one of the demo's sites: {', '.join(DEMO_SITES)} "
                                 "(or 'none')", param_hint="--dp-site")
    raise typer.Exit(run_demo(out, quick, dp_site=None if dp_site == "none" else dp_site))


def _mount_optional(name: str, module: str, help: str) -> None:
    import importlib

    try:
        sub = importlib.import_module(module).app
    except (ImportError, AttributeError):
        return
    app.add_typer(sub, name=name, help=help)


_mount_optional("privacy", "medisyn.privacy.cli", "A site's privacy ledger and budget.")
_mount_optional("audit", "medisyn.audit.cli", "Memorisation audit: validate, audit a site, release gate.")


def main() -> None:
    try:
        app()
    except MediSynError as e:
        if _state["debug"]:
            raise
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # an internal error: still one readable line unless --debug
        if _state["debug"]:
            raise
        typer.secho(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True,
                    fg=typer.colors.RED)
        sys.exit(1)


if __name__ == "__main__":
    main()
