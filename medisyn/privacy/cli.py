"""``medisyn privacy ...``: read a site's privacy ledger.

``show --site site.toml`` prints ε spent per stage and run, the cap, what is left, and
how many more rounds of the current plan fit (the plan is the last recorded round's σ,
q and step count unless given with ``--sigma/--sample-rate/--steps``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from medisyn.config import load_site_config
from medisyn.errors import MediSynError
from medisyn.privacy.ledger import PrivacyLedger, open_site_ledger

app = typer.Typer(
    help="Sample-level differential privacy: the site's ledger.", no_args_is_help=True
)


def rounds_that_fit(
    ledger: PrivacyLedger,
    sigma: float,
    q: float,
    steps: int,
    max_epsilon: float,
    limit: int = 10_000,
) -> int:
    """How many more rounds of ``steps`` steps at (σ, q) keep ε ≤ ``max_epsilon``
    (ε is monotone in the number of rounds, so exponential then binary search)."""
    if steps < 1:
        return 0

    def fits(k: int) -> bool:
        return not ledger.would_exceed(sigma, q, k * steps, max_epsilon)[0]

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def current_plan(ledger: PrivacyLedger) -> dict[str, Any] | None:
    """σ, q and steps of the last recorded round (the plan assumed to continue)."""
    entries = ledger.entries()
    if not entries:
        return None
    last = entries[-1]
    steps = sum(
        e.steps
        for e in entries
        if (e.stage, e.run_id, e.round) == (last.stage, last.run_id, last.round)
        and (e.sigma, e.q) == (last.sigma, last.q)
    )
    return {
        "stage": last.stage,
        "run_id": last.run_id,
        "sigma": last.sigma,
        "q": last.q,
        "steps": steps,
    }


def build_report(
    site_toml: Path,
    *,
    sigma: float | None = None,
    sample_rate: float | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    cfg = load_site_config(site_toml)
    priv = cfg.privacy
    # the training code's opener (δ rule, marker check); the ledger's own δ when it exists
    ledger = open_site_ledger(cfg.site.state_dir, cfg.site.id, priv.model_copy(update={"delta": None}),
                              n_records=None)
    if not ledger.exists and priv.delta is not None:
        ledger.delta = priv.delta
    eps = ledger.epsilon()
    plan = current_plan(ledger)
    if plan is not None or sigma is not None:
        plan = dict(
            plan or {"stage": None, "run_id": None, "sigma": None, "q": None, "steps": None}
        )
        if sigma is not None:
            plan["sigma"] = sigma
        elif plan["sigma"] is None and priv.noise_multiplier is not None:
            plan["sigma"] = priv.noise_multiplier
        if sample_rate is not None:
            plan["q"] = sample_rate
        if steps is not None:
            plan["steps"] = steps
    fit = None
    if plan is not None and None not in (plan["sigma"], plan["q"], plan["steps"]):
        fit = rounds_that_fit(ledger, plan["sigma"], plan["q"], plan["steps"], priv.max_epsilon)
    summary = ledger.summary()
    return {
        **summary,
        "ledger": str(ledger.path),
        "exists": ledger.exists,
        "dp": priv.dp,
        "max_epsilon": priv.max_epsilon,
        "epsilon_left": (max(priv.max_epsilon - eps, 0.0) if math.isfinite(eps) else 0.0),
        "configured_delta": priv.delta,
        "plan": plan,
        "rounds_that_fit": fit,
        "max_rounds": priv.max_rounds,
    }


def format_report(r: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return x if isinstance(x, str) else f"{x:.3f}"

    lines = [
        f"site {r['site_id']}   ledger {r['ledger']}"
        + ("" if r["exists"] else "  (no DP steps yet)"),
        f"accountant {r['accountant']}   δ = "
        + (f"{r['delta']:.3g}" if r["delta"] is not None else "not pinned yet (the first DP step pins min(1e-5, 1/(10 N)))")
        + f"   DP {'on' if r['dp'] else 'off'}",
        "",
    ]
    if r["runs"]:
        lines.append(
            f"{'stage':<6} {'run':<24} {'rounds':<12} {'steps':>7} {'σ':>8} {'q':>8} {'ε alone':>8}"
        )
        for run in r["runs"]:
            rounds = run["rounds"]
            rs = f"{rounds[0]}-{rounds[-1]} ({len(rounds)})" if len(rounds) > 1 else str(rounds[0])
            sig = ",".join(f"{s:.3g}" for s in run["sigma"])
            q = ",".join(f"{s:.3g}" for s in run["q"])
            lines.append(
                f"{run['stage']:<6} {run['run_id'][:24]:<24} {rs:<12} {run['steps']:>7} {sig:>8} {q:>8} {f(run['epsilon_alone']):>8}"
            )
        for stage, s in r["stages"].items():
            lines.append(f"stage {stage}: {s['steps']} steps, ε alone {f(s['epsilon_alone'])}")
        lines.append("")
    lines.append(f"ε spent (cumulative, all stages and runs): {f(r['epsilon'])}")
    lines.append(f"cap max_epsilon: {r['max_epsilon']:g}   left: {r['epsilon_left']:.3f}")
    p = r["plan"]
    if r["rounds_that_fit"] is not None:
        lines.append(
            f"plan: {p['steps']} steps/round at σ={p['sigma']:.4g}, q={p['q']:.4g}"
            + (f" ({p['stage']}, run {p['run_id']})" if p.get("stage") else "")
            + f" -> {r['rounds_that_fit']} more round(s) fit under the cap"
        )
    else:
        lines.append("plan: unknown (no rounds recorded; give --sigma --sample-rate --steps)")
    if r["max_rounds"] is not None:
        lines.append(f"site policy max_rounds: {r['max_rounds']}")
    if r["configured_delta"] is not None and r["delta"] is not None and r["configured_delta"] != r["delta"]:
        lines.append(
            f"WARNING: [privacy] delta = {r['configured_delta']:g} differs from the ledger's "
            f"δ = {r['delta']:g}; training will refuse until they agree"
        )
    return "\n".join(lines)


@app.command()
def show(
    site: Annotated[Path, typer.Option("--site", help="the site config (site.toml)")],
    sigma: Annotated[float | None, typer.Option(help="plan: noise multiplier σ")] = None,
    sample_rate: Annotated[float | None, typer.Option(help="plan: sampling rate q")] = None,
    steps: Annotated[int | None, typer.Option(help="plan: DP steps per round")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print the site's privacy ledger: ε per stage and run, the cap, what is left, and
    how many more rounds of the current plan fit."""
    try:
        report = build_report(site, sigma=sigma, sample_rate=sample_rate, steps=steps)
    except MediSynError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        typer.echo(format_report(report))


@app.callback()
def _main() -> None:
    """Sample-level differential privacy."""
