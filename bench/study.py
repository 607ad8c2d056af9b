"""The generalist-vs-specialist study (issue 9, part 3): one training budget, five arms.

On the four shared datasets (full training splits from ``/work/shared/data``; dataset
metadata from ``medisyn/assets/demo/<site>/dataset.toml``, horizontal flips on for breast
ultrasound, fundus and dermoscopy, off for chest X-ray):

- ``a`` centralized: ``train_local`` on the pooled datasets (what ``medisyn train`` does);
- ``b`` federated generalist: FedAvg over 4 sites, real ``flower-superlink`` /
  ``flower-supernode`` processes on loopback (``medisyn.server.demo.run_federation``),
  stage ``unet`` (and first stage ``vae`` with ``--vae-steps``), trained federatedly;
- ``c`` local specialists: each site alone, its own VAE and UNet, with the same steps per
  site as in ``b``; each is evaluated on its own image type;
- ``d`` federated generalist with DP-SGD at every site (every stage trained), σ per site computed
  with ``medisyn.privacy.accounting`` so that the site's steps of the whole run spend
  ε ≤ 8 at δ = 1e-5 (RDP accountant; the site's ledger caps it at 8 too);
- ``e`` as ``b`` with another server optimizer (the levers): FedAvgM (``--server-lr``,
  default 4, ``--server-momentum``; FedAvg passes each site's type-specific progress on at
  its weight, ~1/4), FedAdam (``--server-eta``, ``--server-tau``), either with
  ``--weighting equal``, or cyclic rounds (``--server-opt cyclic``: the sites train one
  after another, each from the previous site's model).

The budget: ``--budget-steps`` UNet optimizer steps of batch ``--batch`` for the central
arm; the federated arms split it evenly over 4 sites × ``--rounds`` rounds (total steps
summed over sites = budget), the specialists get budget / 4 steps each. The VAE likewise
with ``--vae-steps`` (``--vae-rounds`` federated rounds); ``--vae-steps 0``, the default,
trains no VAE stage: every arm uses the shipped procedural autoencoder as it is, as the
central reference run does (``bench/central.toml``). Every arm is judged by
``medisyn.evaluation.evaluate_model`` against the real data of all four types (the same
seeded classifiers and encoder for every arm), per image type.

Writes ``RESULTS/study.json`` (budgets, seeds, wall/CPU seconds, model hashes, losses,
ε per DP site, every metric per type per arm), ``RESULTS/study.md`` (the table printed at
the end) and ``RESULTS/study/<site>.png`` (per image type: real images, then one row per
arm, ``--grid-per-label`` images per label). Models and evaluation reports go to
``OUT/<arm>/`` (``OUT/c/<site>/`` for the specialists), so ``--skip-train`` re-evaluates.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/study.py --arms a,b,c,d,e \\
        --config bench/central.toml --budget-steps 800 --batch 64 --rounds 4 --n-per-label 64 --threads 2

Smoke (every arm end to end, minutes): ``--budget-steps 8 --rounds 1
--n-per-label 4 --classifier-steps 20 --results /tmp/study-smoke``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medisyn.config import (
    DEFAULT_GUIDANCE,
    DEFAULT_INTERVAL_TEXT,
    INTERVAL_HELP,
    DatasetConfig,
    ModelConfig,
    Stage,
    TrainConfig,
    load_dataset_config,
    parse_interval,
    read_toml,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "medisyn" / "assets" / "demo"
SITES = ("breast-us", "chest-xray", "fundus", "dermoscopy")
SHARED = {
    "breast-us": "medmnist/breastmnist.npz",
    "chest-xray": "medmnist/pneumoniamnist_balanced_subset.npz",
    "fundus": "medmnist/retinamnist.npz",
    "dermoscopy": "isic_uda1/isic_uda1_28.npz",
}
# A mirrored chest X-ray is not a valid chest X-ray (situs); skin, breast and fundus allow it.
HFLIP = {"breast-us": True, "chest-xray": False, "fundus": True, "dermoscopy": True}
ARMS = {
    "a": "centralized (pooled)",
    "b": "federated generalist (FedAvg)",
    "c": "local specialist (site alone)",
    "d": "federated generalist, DP-SGD at every site",
    "e": "federated generalist, server optimizer",
}
# Arm e: with one image type per site, FedAvg passes each site's type-specific progress on
# at its weight (~1/4); a server learning rate of 4 (no momentum) passes it on whole, and
# prompt anchoring keeps the four updates from pulling on each other's prompts
# (--server-lr: the default).
SERVER_LR_E = 4.0
DP_TARGET_EPSILON = 8.0
DP_DELTA = 1e-5
DP_ACCOUNTANT = "rdp"
TABLE_METRICS = ("type_recognised", "label_alignment", "tstr_balanced_accuracy", "kid")


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- data


def dataset_toml(site: str, data_root: Path) -> str:
    """The demo site's ``[dataset]`` table with ``path`` -> the full shared file and the
    site's ``hflip``."""
    text = (DEMO / site / "dataset.toml").read_text()
    path = (data_root / SHARED[site]).resolve()
    if not path.is_file():
        raise SystemExit(f"error: {path}: the shared dataset for site {site} is missing (--data-root)")
    old = 'path = "dataset.npz"'
    if old not in text:
        raise SystemExit(f"error: {DEMO / site / 'dataset.toml'}: no line {old!r} to point at {path}")
    text = text.replace(old, f"path = {json.dumps(path.as_posix())}")
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#") and not ln.startswith("hflip"))
    return (f"# bench/study.py: site {site!r}, the full shared training data ({SHARED[site]})\n"
            + text.strip() + f"\nhflip = {'true' if HFLIP[site] else 'false'}\n")


def write_dataset_tomls(out: Path, data_root: Path) -> tuple[dict[str, str], dict[str, Path]]:
    texts = {s: dataset_toml(s, data_root) for s in SITES}
    paths = {}
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    for s, t in texts.items():
        (d / f"{s}.toml").write_text(t)
        paths[s] = d / f"{s}.toml"
    return texts, paths


def load_parts(dcfgs: dict[str, DatasetConfig], model_cfg: ModelConfig) -> dict[str, Any]:
    from medisyn.data import load_dataset

    return {s: load_dataset(c, resolution=model_cfg.resolution, channels=model_cfg.channels, splits=c.split.train)
            for s, c in dcfgs.items()}


# --------------------------------------------------------------------------- budget


def make_plan(args: argparse.Namespace, n_sites: int) -> dict[str, Any]:
    """Steps per arm; the budget is rounded down to a multiple of sites x rounds so every
    arm gets exactly the same number of optimizer steps."""
    unet_site_round = args.budget_steps // (n_sites * args.rounds)
    vae_site_round = args.vae_steps // (n_sites * args.vae_rounds)
    if unet_site_round < 1 or (args.vae_steps > 0 and vae_site_round < 1):
        raise SystemExit(f"error: --budget-steps {args.budget_steps} / --vae-steps {args.vae_steps} give less than "
                         f"one step per site and round ({n_sites} sites, {args.rounds} UNet / {args.vae_rounds} "
                         "VAE rounds)")
    unet_total = unet_site_round * n_sites * args.rounds
    vae_total = vae_site_round * n_sites * args.vae_rounds
    for name, asked, got in (("--budget-steps", args.budget_steps, unet_total), ("--vae-steps", args.vae_steps, vae_total)):
        if asked != got:
            log(f"note: {name} {asked} rounded down to {got} (a multiple of {n_sites} sites x rounds)")
    per_site = {"unet": unet_site_round * args.rounds, "vae": vae_site_round * args.vae_rounds}
    return {
        "batch_size": args.batch,
        "unet_steps_total": unet_total, "vae_steps_total": vae_total,
        "unet_images_total": unet_total * args.batch, "vae_images_total": vae_total * args.batch,
        "n_sites": n_sites,
        "federated": {"unet_rounds": args.rounds, "vae_rounds": args.vae_rounds,
                      "unet_steps_per_site_per_round": unet_site_round,
                      "vae_steps_per_site_per_round": vae_site_round},
        "steps_per_site": per_site,
        "arms": {
            "a": {"unet_steps": unet_total, "vae_steps": vae_total, "where": "one process, pooled data"},
            "b": {"unet_steps": unet_total, "vae_steps": vae_total,
                  "where": f"{n_sites} sites x {args.rounds} UNet rounds x {unet_site_round} steps "
                           f"(VAE: {args.vae_rounds} x {vae_site_round}), FedAvg"},
            "c": {"unet_steps": unet_total, "vae_steps": vae_total,
                  "where": f"{n_sites} specialists x {per_site['unet']} UNet steps ({per_site['vae']} VAE)"},
            "d": {"unet_steps": unet_total, "vae_steps": vae_total,
                  "where": "as b, DP-SGD (Poisson sampling, expected batch = batch_size) at every site"},
            "e": {"unet_steps": unet_total, "vae_steps": vae_total,
                  "where": f"as b, {arm_e_where(args)}"},
        },
    }


# --------------------------------------------------------------------------- time


def _tree_cpu_ticks(root: int) -> dict[tuple[int, str], int]:
    """utime + stime (clock ticks) of every live descendant of ``root``, keyed by
    (pid, start time) so a reused pid is another process."""
    from medisyn.procs import descendants

    out = {}
    for pid in descendants(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            f = stat[stat.rindex(")") + 2:].split()
            out[(pid, f[19])] = int(f[11]) + int(f[12])
        except (OSError, ValueError, IndexError):
            continue
    return out


@contextmanager
def meter(record: dict[str, Any], key: str) -> Iterator[None]:
    """Wall and CPU seconds of a block: this process plus its child processes.
    ``cpu_seconds`` = own CPU + max(reaped children's CPU from getrusage, CPU of the
    live descendants sampled every second from /proc): the first misses children that
    are never reaped by a process we wait for, the second misses those that live less
    than a second."""
    seen: dict[tuple[int, str], int] = {}
    stop = threading.Event()

    def sample() -> None:
        while True:
            for k, v in _tree_cpu_ticks(os.getpid()).items():
                seen[k] = max(seen.get(k, 0), v)
            if stop.wait(1.0):
                return

    t = threading.Thread(target=sample, daemon=True)
    s0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=10)
        wall = time.perf_counter() - w0
        s1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        own = (s1.ru_utime + s1.ru_stime) - (s0.ru_utime + s0.ru_stime)
        reaped = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
        sampled = sum(seen.values()) / os.sysconf("SC_CLK_TCK")
        record[key] = {"wall_seconds": round(wall, 1), "cpu_seconds": round(own + max(reaped, sampled), 1),
                       "cpu_own_seconds": round(own, 1), "cpu_children_reaped_seconds": round(reaped, 1),
                       "cpu_children_sampled_seconds": round(sampled, 1)}


# --------------------------------------------------------------------------- training


def train_pooled(parts: Sequence[Any], model_cfg: ModelConfig, train_cfg: TrainConfig, *, vae_steps: int,
                 unet_steps: int, out: Path, site_id: str) -> dict[str, Any]:
    """Stage vae then stage unet on ``parts`` in this process (``medisyn train``'s recipe);
    the model goes to ``out/model``."""
    from medisyn.config import config_hash
    from medisyn.data import ConcatImageDataset, image_type_info
    from medisyn.models import build_components, save_components, set_latent_scale
    from medisyn.train import train_local

    dataset = parts[0] if len(parts) == 1 else ConcatImageDataset(list(parts))
    c = build_components(model_cfg, seed=train_cfg.seed)
    c.image_types = {**c.image_types, **image_type_info(list(parts))}
    resolved = {"model": model_cfg.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json"),
                "stages": ["vae", "unet"] if vae_steps else ["unet"], "steps": {"vae": vae_steps, "unet": unet_steps},
                "site": site_id}
    metrics: dict[str, Any] = {}
    stages: tuple[tuple[Stage, int], ...] = (("vae", vae_steps), ("unet", unet_steps))
    for stage, n in stages:
        if n == 0:  # --vae-steps 0: the shipped procedural autoencoder as it is
            continue
        r = train_local(c, dataset, steps=n, config=train_cfg, stage=stage, site_id=site_id, progress=False)
        if stage == "vae":
            set_latent_scale(c, r.metrics["latent-std"])
        metrics[stage] = {k: v for k, v in r.metrics.items() if isinstance(v, int | float)}
        log(f"    {site_id} {stage}: {int(r.metrics['steps'])} steps, loss {r.metrics['loss']:.4f}")
    save_components(c, out / "model", extra={"config_hash": config_hash(resolved)})
    return {"n_train_images": len(dataset), "metrics": metrics}


def dp_plan(n_records: dict[str, int], plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """σ per site: the site's whole run (VAE and UNet rounds, all DP-SGD at q = batch/N)
    spends at most ε = 8 at δ = 1e-5, checked with the same accountant as the ledger."""
    from medisyn.privacy.accounting import derive_noise_multiplier, epsilon

    steps = plan["steps_per_site"]["vae"] + plan["steps_per_site"]["unet"]
    out = {}
    for site, n in n_records.items():
        q = min(1.0, plan["batch_size"] / n)
        sigma = derive_noise_multiplier(target_epsilon=DP_TARGET_EPSILON, delta=DP_DELTA, sample_rate=q,
                                        steps=steps, kind=DP_ACCOUNTANT)
        eps = epsilon([(sigma, q, steps)], DP_DELTA, DP_ACCOUNTANT)
        while eps > DP_TARGET_EPSILON:  # never above the cap, whatever the bisection's tolerance
            sigma *= 1.01
            eps = epsilon([(sigma, q, steps)], DP_DELTA, DP_ACCOUNTANT)
        out[site] = {"n_records": n, "sample_rate": q, "dp_steps": steps, "noise_multiplier": sigma,
                     "planned_epsilon": eps, "delta": DP_DELTA, "accountant": DP_ACCOUNTANT,
                     "max_epsilon": DP_TARGET_EPSILON}
    return out


def privacy_toml(p: dict[str, Any]) -> str:
    return ("[privacy]\ndp = true\n"
            f"noise_multiplier = {p['noise_multiplier']!r}\nmax_epsilon = {p['max_epsilon']!r}\n"
            f"delta = {p['delta']!r}\naccountant = \"{p['accountant']}\"\n")


def site_groups(spec: str) -> list[list[str]]:
    """``--federated-sites``: the federated arms' sites, each a list of the datasets it
    holds (default: one site per dataset). Every dataset at exactly one site."""
    if not spec.strip():
        return [[s] for s in SITES]
    groups = [[x.strip() for x in g.split("+") if x.strip()] for g in spec.split(",") if g.strip()]
    held = sorted(x for g in groups for x in g)
    if held != sorted(SITES):
        raise SystemExit(f"error: --federated-sites {spec!r}: every one of {', '.join(SITES)} at exactly one site")
    return groups


def group_id(group: Sequence[str]) -> str:
    """The site id of a group of datasets (``breast-us_and_chest-xray``)."""
    return "_and_".join(group)


def group_texts(texts: dict[str, str], groups: list[list[str]]) -> dict[str, str]:
    """Per federated site, its dataset table(s): ``[[dataset]]`` tables for a site with several."""
    out = {}
    for g in groups:
        out[group_id(g)] = (texts[g[0]] if len(g) == 1
                            else "\n".join(texts[s].replace("[dataset]", "[[dataset]]") for s in g))
    return out


def train_federated(arm: str, arm_dir: Path, texts: dict[str, str], model_cfg: ModelConfig, train_cfg: TrainConfig,
                    plan: dict[str, Any], *, dp: dict[str, dict[str, Any]] | None, threads: int,
                    seed: int, strategy: Any = None, groups: list[list[str]] | None = None) -> dict[str, Any]:
    """One real federation on loopback: the run (checkpoints, metrics.jsonl, logs) in
    ``arm_dir``, the global model in ``arm_dir/model``. ``groups``: the sites as groups of
    datasets (:func:`site_groups`); a site holding k datasets takes k sites' steps."""
    from medisyn.server.config import FederationConfig, ServerSuperLink, StrategyConfig
    from medisyn.server.demo import run_federation, write_site_configs
    from medisyn.server.federation import iter_metrics

    from medisyn.procs import free_port

    port = free_port()
    fed = dict(plan["federated"])
    groups = groups or [[s] for s in SITES]
    sites = [group_id(g) for g in groups]
    if len(groups) != len(SITES):
        if dp:
            raise SystemExit("error: --federated-sites with the DP arm (d) is not planned: its σ is per dataset")
        if len({len(g) for g in groups}) != 1:
            raise SystemExit("error: --federated-sites: every site needs as many datasets (equal steps per site)")
        k = len(groups[0])
        fed = {**fed, **{f"{st}_steps_per_site_per_round": fed[f"{st}_steps_per_site_per_round"] * k
                         for st in ("unet", "vae")}}
        texts = group_texts(texts, groups)
    # cyclic: one site trains at a time, with all the threads
    per_site_threads = threads if strategy is not None and strategy.name == "cyclic" else max(1, threads // len(sites))
    stages = ["vae", "unet"] if fed["vae_steps_per_site_per_round"] else ["unet"]  # --vae-steps 0: no VAE stage
    cfg = FederationConfig(
        name=f"medisyn-study-{arm}",
        rounds=1,
        stage_rounds={s: fed[f"{s}_rounds"] for s in stages},
        local_steps=1,
        stage_local_steps={s: fed[f"{s}_steps_per_site_per_round"] for s in stages},
        stages=stages,
        min_sites=len(sites),
        round_timeout=6 * 3600,
        site_wait_timeout=600,
        evaluate=False,  # the study evaluates the final model with medisyn.evaluation
        keep_checkpoints=1,
        seed=seed,
        strategy=strategy or StrategyConfig(name="fedavg"),
        model=model_cfg,
        train=train_cfg.model_copy(update={"num_threads": per_site_threads}),
        sites=sites,
        superlink=ServerSuperLink(host="127.0.0.1", port=port, insecure=True, database="memory"),
        run_dir=arm_dir,
    )
    site_paths = write_site_configs(arm_dir, port, sites=sites, datasets=texts,
                                    privacy={s: privacy_toml(p) for s, p in dp.items()} if dp else None)
    def echo(m: str) -> None:
        for line in str(m).splitlines() or [""]:
            log(f"    [{arm}] {line}")

    code = run_federation(cfg, site_paths, echo=echo, threads_per_site=per_site_threads)
    rounds = list(iter_metrics(arm_dir))
    out: dict[str, Any] = {"exit_code": code, "federation_config_hash": cfg.hash(),
                           "threads_per_site": per_site_threads, "sites": {g: d for g, d in zip(sites, groups, strict=True)},
                           "steps_per_site_per_round": fed["unet_steps_per_site_per_round"], "rounds": []}
    for r in rounds:
        out["rounds"].append({"round": r.get("round"), "stage": r.get("stage"), "loss": r.get("loss"),
                              "seconds": r.get("seconds"), "answered": r.get("answered"), "failed": r.get("failed"),
                              "sites": {s: {k: v for k, v in m.items() if k in ("status", "loss", "epsilon", "delta",
                                                                                   "noise-multiplier", "sample-rate",
                                                                                   "num-examples", "steps", "reason")}
                                        for s, m in (r.get("sites") or {}).items()}})
    for stage in ("vae", "unet"):
        last = [r for r in rounds if r.get("stage") == stage]
        if last:
            out.setdefault("final_loss", {})[stage] = last[-1].get("loss")
    if dp:
        eps = {}
        for r in rounds:
            for s, m in (r.get("sites") or {}).items():
                if "epsilon" in m:
                    eps[s] = m["epsilon"]
        out["epsilon_spent"] = eps  # the site's cumulative ε as its ledger reported it, last round
        out["dp"] = dp
    if code != 0:
        raise RuntimeError(f"arm {arm}: the federation ended with exit code {code} (logs: {arm_dir / 'logs'}, "
                           f"{arm_dir / 'sites'})")
    return out


def train_arm(arm: str, out: Path, texts: dict[str, str], dcfgs: dict[str, DatasetConfig], parts: dict[str, Any],
              model_cfg: ModelConfig, train_cfg: TrainConfig, plan: dict[str, Any], args: argparse.Namespace
              ) -> dict[str, Any]:
    arm_dir = out / arm
    if arm_dir.exists():
        shutil.rmtree(arm_dir)  # this arm's own earlier output: a fresh run, a fresh DP ledger
    arm_dir.mkdir(parents=True)
    rec: dict[str, Any] = {"arm": arm, "name": ARMS[arm], "budget": plan["arms"][arm]}
    log(f"== arm {arm}: {ARMS[arm]}: {plan['arms'][arm]['where']}")
    with meter(rec, "train_time"):
        if arm == "a":
            rec["train"] = train_pooled([parts[s] for s in SITES], model_cfg, train_cfg,
                                        vae_steps=plan["vae_steps_total"], unet_steps=plan["unet_steps_total"],
                                        out=arm_dir, site_id="central")
        elif arm == "c":
            rec["train"] = {}
            for s in SITES:
                sub: dict[str, Any] = {}
                with meter(sub, "train_time"):
                    sub.update(train_pooled([parts[s]], model_cfg, train_cfg, vae_steps=plan["steps_per_site"]["vae"],
                                            unet_steps=plan["steps_per_site"]["unet"], out=arm_dir / s, site_id=s))
                rec["train"][s] = sub
        else:
            dp = dp_plan({s: len(parts[s]) for s in SITES}, plan) if arm == "d" else None
            if dp:
                for s, p in dp.items():
                    log(f"    {s}: N = {p['n_records']}, q = {p['sample_rate']:.4f}, {p['dp_steps']} DP steps, "
                        f"sigma = {p['noise_multiplier']:.4f} -> planned epsilon {p['planned_epsilon']:.3f} "
                        f"(delta {p['delta']:g})")

            strategy = arm_e_strategy(args) if arm == "e" else None
            rec["train"] = train_federated(arm, arm_dir, texts, model_cfg, train_cfg, plan, dp=dp,
                                           threads=args.threads, seed=args.seed, strategy=strategy,
                                           groups=site_groups(args.federated_sites))
    log(f"   arm {arm} trained: {rec['train_time']['wall_seconds']} s wall, {rec['train_time']['cpu_seconds']} s CPU")
    (arm_dir / "train.json").write_text(json.dumps(finite(rec), indent=2, default=str, allow_nan=False))
    return rec


def arm_e_strategy(args: argparse.Namespace) -> Any:
    from medisyn.server.config import StrategyConfig

    if args.server_opt == "fedadam":
        return StrategyConfig(name="fedadam", eta=args.server_eta, tau=args.server_tau, weighting=args.weighting)
    if args.server_opt == "cyclic":
        return StrategyConfig(name="cyclic")
    return StrategyConfig(name="fedavgm", server_lr=args.server_lr, server_momentum=args.server_momentum,
                          weighting=args.weighting)


def arm_e_where(args: argparse.Namespace) -> str:
    groups = site_groups(args.federated_sites)
    held = "" if len(groups) == len(SITES) else (
        f"; {len(groups)} sites holding {' / '.join('+'.join(g) for g in groups)} (each {len(groups[0])} sites' steps)")
    if args.server_opt == "cyclic":
        return ("cyclic: each round the sites train one after another, each from the previous site's model "
                f"(order rotating){held}")
    opt = (f"FedAdam with eta {args.server_eta:g}, tau {args.server_tau:g}" if args.server_opt == "fedadam"
           else f"FedAvgM with server lr {args.server_lr:g}, momentum {args.server_momentum:g}")
    return f"{opt}, sites weighted {'equally' if args.weighting == 'equal' else 'by examples'}{held}"


def model_dirs(arm: str, out: Path) -> dict[str, Path]:
    """Model directory per evaluated unit: the arm's one model (key "all"), or one per site."""
    if arm == "c":
        return {s: out / "c" / s / "model" for s in SITES}
    return {"all": out / arm / "model"}


# --------------------------------------------------------------------------- evaluation


def evaluate_unit(model_dir: Path, dcfgs: dict[str, DatasetConfig], parts: Callable[[], dict[str, Any]],
                  settings: Any, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``evaluate_model`` against all four types (a specialist is evaluated on its own type:
    its medisyn.json lists only that one, the others are skipped; its type recognition
    uses the same four-type classifier as every other arm)."""
    from medisyn.data import image_type_info
    from medisyn.evaluation import evaluate_model
    from medisyn.evaluation_report import summary_lines, write_evaluation
    from medisyn.models import load_components, model_hash, read_model_meta

    if not (model_dir / "model_index.json").is_file():
        raise RuntimeError(f"{model_dir}: no model (train the arm first, or drop --skip-train)")
    c = load_components(model_dir)
    meta = dict(read_model_meta(model_dir))
    note = None
    if not c.image_types:
        # A federated model knows no image types (the coordinator never sees the data):
        # give it the four types' facts (grey or colour, prompts) the central arm's model
        # carries, so generation treats grey types alike in every arm.
        c.image_types = image_type_info([parts()[s] for s in SITES])
        meta["image_types"] = c.image_types
        note = "image_types (grey/colour per type) added by the study from the four datasets"
    gallery: dict[str, Any] = {}
    h = model_hash(model_dir)
    result = evaluate_model(c, [dcfgs[s] for s in SITES], settings=settings, model_hash=h, model_meta=meta,
                            gallery=gallery, progress=lambda m: log(f"      {m}"))
    result["model_dir"] = str(model_dir.resolve())
    if note:
        result.setdefault("warnings", []).append(note)
    write_evaluation(result, out_dir, gallery)
    for line in summary_lines(result):
        log(f"    {line}")
    return result, gallery


def evaluate_arm(arm: str, out: Path, dcfgs: dict[str, DatasetConfig], parts: Callable[[], dict[str, Any]],
                 settings: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Per image type: the arm's metrics (from its model, or the type's specialist)."""
    rec: dict[str, Any] = {"models": {}, "types": {}, "evaluation_reports": {}}
    galleries: dict[str, dict[str, Any]] = {}
    type_of = {s: dcfgs[s].image_type for s in SITES}
    with meter(rec, "evaluation_time"):
        for unit, mdir in model_dirs(arm, out).items():
            log(f"== evaluating arm {arm}" + ("" if unit == "all" else f" ({unit} specialist)"))
            ev_dir = out / arm / ("evaluation" if unit == "all" else f"{unit}/evaluation")
            result, gallery = evaluate_unit(mdir, dcfgs, parts, settings, ev_dir)
            rec["models"][unit] = {"dir": str(mdir.resolve()), "hash": result["model_hash"]}
            rec["evaluation_reports"][unit] = str(ev_dir / "evaluation.html")
            rec.setdefault("eval_seconds", {})[unit] = result.get("timings", {}).get("total_seconds")
            types = [type_of[unit]] if unit != "all" else [type_of[s] for s in SITES]
            for t in types:
                e = result["types"].get(t)
                if e is not None:
                    rec["types"][t] = {**e, "model_hash": result["model_hash"],
                                       **({"specialist_site": unit} if unit != "all" else {})}
                if t in gallery:
                    galleries[t] = gallery[t]
            if rec.get("encoder") is None:
                rec["encoder"] = result.get("encoder_description")
            for w in result.get("warnings", []):
                if "was not trained on image type" not in w and w not in rec.setdefault("warnings", []):
                    rec["warnings"].append(w)
    return rec, galleries


# --------------------------------------------------------------------------- report


def finite(x: Any) -> Any:
    """JSON-safe: non-finite floats -> None (stated as such), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def table(study: dict[str, Any], type_names: Sequence[str]) -> str:
    lines = ["| image type | arm | type recognised (real) | label alignment (real classifier) | "
             "TSTR / real (TSTR, real) | KID (real floor) |",
             "|---|---|---|---|---|---|"]
    for t in type_names:
        for arm, rec in study["arms"].items():
            e = (rec.get("evaluation") or {}).get("types", {}).get(t)
            if e is None:
                lines.append(f"| {t} | {arm}: {ARMS[arm]} | {rec.get('error', 'not evaluated')} | | | |")
                continue
            if e.get("skipped", {}).get("all"):
                lines.append(f"| {t} | {arm}: {ARMS[arm]} | skipped: {e['skipped']['all']} | | | |")
                continue
            m, f = e.get("metrics", {}), e.get("floors", {})
            tstr, real = m.get("tstr_balanced_accuracy"), m.get("real_balanced_accuracy")
            ratio = tstr / real if tstr is not None and real else None
            lines.append(
                f"| {t} | {arm}: {ARMS[arm]} | {_f(m.get('type_recognised'))} ({_f(f.get('type_recognised'))}) | "
                f"{_f(m.get('label_alignment'))} ({_f(real)}) | {_f(ratio)} ({_f(tstr)}, {_f(real)}) | "
                f"{_f(m.get('kid'), '{:.3g}')}{'' if m.get('kid_se') is None else ' ± ' + _f(m['kid_se'], '{:.2g}')}"
                f" ({_f(f.get('kid'), '{:.3g}')}) |")
    return "\n".join(lines)


def comparisons(study: dict[str, Any], type_names: Sequence[str]) -> dict[str, Any]:
    """Per pair of arms and table metric: the types where the first arm is at least as good
    (KID: lower is better); for KID also the types where the difference is beyond twice
    its combined jackknife error (``kid_se``: the two models differ, not the draws)."""
    out: dict[str, Any] = {}
    pairs = (("b", "c", "federated generalist vs specialist"), ("a", "c", "central vs specialist"),
             ("d", "c", "federated DP vs specialist (no DP)"), ("d", "b", "federated DP vs federated"),
             ("b", "a", "federated vs central"), ("e", "c", "federated generalist (arm e's plan) vs specialist"),
             ("e", "b", "arm e's plan vs FedAvg"))
    for x, y, what in pairs:
        ex = (study["arms"].get(x, {}).get("evaluation") or {}).get("types")
        ey = (study["arms"].get(y, {}).get("evaluation") or {}).get("types")
        if not ex or not ey:
            continue
        per_metric = {}
        for k in TABLE_METRICS:
            at_least, better, compared = [], [], 0
            for t in type_names:
                vx = (ex.get(t) or {}).get("metrics", {}).get(k)
                vy = (ey.get(t) or {}).get("metrics", {}).get(k)
                if vx is None or vy is None:
                    continue
                compared += 1
                if (vx <= vy) if k == "kid" else (vx >= vy):
                    at_least.append(t)
                if (vx < vy) if k == "kid" else (vx > vy):
                    better.append(t)
            per_metric[k] = {"types_at_least_as_good": at_least, "types_better": better,
                             "n_types_compared": compared}
        per_metric["kid"].update(kid_beyond_noise(ex, ey, type_names))
        out[f"{x}_vs_{y}"] = {"what": what, **per_metric}
    return out


def kid_beyond_noise(ex: dict[str, Any], ey: dict[str, Any], type_names: Sequence[str]) -> dict[str, list[str]]:
    """The types whose KID differs by more than 2 sqrt(se_x² + se_y²) between two arms."""
    better, worse = [], []
    for t in type_names:
        mx, my = (ex.get(t) or {}).get("metrics", {}), (ey.get(t) or {}).get("metrics", {})
        if any(v is None for v in (mx.get("kid"), my.get("kid"), mx.get("kid_se"), my.get("kid_se"))):
            continue
        gap = 2 * math.hypot(mx["kid_se"], my["kid_se"])
        if mx["kid"] < my["kid"] - gap:
            better.append(t)
        elif mx["kid"] > my["kid"] + gap:
            worse.append(t)
    return {"types_better_beyond_2se": better, "types_worse_beyond_2se": worse}


def write_grids(galleries: dict[str, dict[str, dict[str, Any]]], dcfgs: dict[str, DatasetConfig], out: Path,
                per_label: int) -> dict[str, str]:
    """Per image type: the first row real training images, then one row per arm;
    ``per_label`` images of each label in every row."""
    from PIL import Image

    from medisyn.generate import make_grid

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for s in SITES:
        t = dcfgs[s].image_type
        arms = [a for a in galleries if t in galleries[a]]
        if not arms:
            continue
        labels = list(galleries[arms[0]][t])

        def row(key: str, arm: str, t: str = t, labels: list[str] = labels) -> list[Image.Image]:
            cells = []
            for lab in labels:
                ims = list(galleries[arm][t].get(lab, {}).get(key, []))[:per_label]
                cells += [Image.fromarray(np.asarray(i).squeeze()).convert("RGB").resize((32, 32)) for i in ims]
                cells += [Image.new("RGB", (32, 32), "white")] * (per_label - len(ims))
            return cells

        images = row("real", arms[0])
        for a in arms:
            images += row("synthetic", a)
        make_grid(images, ncols=per_label * len(labels)).save(out / f"{s}.png")
        written[t] = str(out / f"{s}.png")
        (out / f"{s}.txt").write_text(f"{t}: columns = {per_label} per label, labels {labels}; rows = real, "
                                      + ", ".join(f"{a} ({ARMS[a]})" for a in arms) + "\n")
    return written


# --------------------------------------------------------------------------- main


def load_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    data = read_toml(args.config) if args.config else {}
    unknown = set(data) - {"model", "train"}
    if unknown:
        raise SystemExit(f"error: {args.config}: unknown table(s) {sorted(unknown)}; allowed: [model], [train]")
    model = validate(ModelConfig, dict(data.get("model", {})), f"{args.config or 'defaults'} [model]")
    train = dict(data.get("train", {}))
    train.update({"batch_size": args.batch, "seed": args.seed, "num_threads": args.threads})
    return model, validate(TrainConfig, train, f"{args.config or 'defaults'} [train]")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "study", help="models, runs, evaluation reports")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                    help="study.json, study.md and study/<site>.png go here")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--config", type=Path, default=None, help="TOML with [model] and [train] tables (all arms)")
    ap.add_argument("--budget-steps", type=int, default=800, help="UNet optimizer steps of the central arm")
    ap.add_argument("--vae-steps", type=int, default=0,
                    help="VAE optimizer steps of the central arm (0, the default: every arm uses the shipped "
                         "procedural autoencoder as it is, as the central reference run does)")
    ap.add_argument("--batch", type=int, default=64, help="batch size of every arm (DP: expected batch)")
    ap.add_argument("--rounds", type=int, default=4, help="federated UNet rounds")
    ap.add_argument("--vae-rounds", type=int, default=3, help="federated VAE rounds (one long round leaves an averaged VAE that does not reconstruct: docs/quality.md)")
    ap.add_argument("--n-per-label", type=int, default=64, help="images generated per label for the evaluation")
    ap.add_argument("--sample-steps", type=int, default=20, help="sampling steps of the evaluation")
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--guidance-interval", default=DEFAULT_INTERVAL_TEXT, metavar="LO,HI", help=INTERVAL_HELP)
    ap.add_argument("--classifier-steps", type=int, default=None,
                    help="steps of each evaluation classifier (default: medisyn.evaluation's, 300)")
    ap.add_argument("--server-opt", choices=("fedavgm", "fedadam", "cyclic"), default="fedavgm",
                    help="arm e's server optimizer: FedAvgM (--server-lr, --server-momentum), FedAdam "
                         "(--server-eta, --server-tau) or cyclic (sites one after another, no averaging)")
    ap.add_argument("--server-lr", type=float, default=SERVER_LR_E, help="arm e's FedAvgM server learning rate")
    ap.add_argument("--server-eta", type=float, default=1e-2, help="arm e's FedAdam server learning rate")
    ap.add_argument("--server-tau", type=float, default=1e-3, help="arm e's FedAdam adaptivity floor tau")
    ap.add_argument("--server-momentum", type=float, default=0.0, help="arm e's FedAvgM server momentum")
    ap.add_argument("--weighting", choices=("examples", "equal"), default="examples",
                    help="arm e's site weights: by num-examples (FedAvg's) or equal")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (federated: split over the 4 sites)")
    ap.add_argument("--federated-sites", default="",
                    help="the federated arms' sites as groups of the four datasets, e.g. "
                         "'breast-us+chest-xray,fundus+dermoscopy': two sites that each hold two datasets "
                         "([[dataset]] tables), each taking the steps of the sites it stands for (same "
                         "budget); default: one site per dataset")
    ap.add_argument("--seed", type=int, default=0, help="training and evaluation seed")
    ap.add_argument("--grid-per-label", type=int, default=4)
    ap.add_argument("--skip-train", action="store_true", help="evaluate the models already in OUT/<arm>")
    ap.add_argument("--train-only", action="store_true",
                    help="train the arms and stop (evaluate later with --skip-train, e.g. all arms at once)")
    return ap


def federated_sites_text(args: argparse.Namespace, plan: dict[str, Any]) -> str:
    """The federated arms' sites and steps, as the study ran them (``--federated-sites``)."""
    groups = site_groups(args.federated_sites)
    fed = plan["federated"]
    k = len(SITES) // len(groups)
    held = "" if k == 1 else f" (each holding {k} datasets: {' / '.join('+'.join(g) for g in groups)})"
    return (f"{len(groups)} sites{held} x {fed['unet_rounds']} UNet rounds x "
            f"{fed['unet_steps_per_site_per_round'] * k} steps")


def _markdown(study: dict[str, Any], plan: dict[str, Any], args: argparse.Namespace, type_names: list[str]) -> str:
    """study.md: the table, training cost, warnings, DP ε and the comparisons (sets
    ``study["warnings"]``)."""
    md = table(study, type_names)
    lines = [f"# MediSyn study: generalist vs specialist ({time.strftime('%Y-%m-%d')})", "",
             f"Budget per arm: {plan['unet_steps_total']} UNet + {plan['vae_steps_total']} VAE optimizer steps of "
             f"batch {plan['batch_size']}; federated: {federated_sites_text(args, plan)}; specialists: "
             f"{plan['steps_per_site']['unet']} UNet + {plan['steps_per_site']['vae']} VAE steps each. "
             f"Evaluation: {args.n_per_label} images per label, seed {args.seed}. DP arm: every site DP-SGD, "
             f"ε ≤ {DP_TARGET_EPSILON:g} at δ = {DP_DELTA:g} ({DP_ACCOUNTANT}).", "", md, "",
             "| arm | train wall s | train CPU s | model hash |", "|---|---|---|---|"]
    for arm, rec in study["arms"].items():
        tt = rec.get("train_time", {})
        hashes = ", ".join(f"{u}: {m['hash'][:12]}" for u, m in (rec.get("evaluation") or {}).get("models", {}).items())
        lines.append(f"| {arm}: {ARMS[arm]} | {tt.get('wall_seconds', '–')} | {tt.get('cpu_seconds', '–')} | "
                     f"{hashes or rec.get('error', '–')} |")
    warnings = sorted({w for rec in study["arms"].values() for w in (rec.get("evaluation") or {}).get("warnings", [])})
    study["warnings"] = warnings
    if warnings:
        lines += ["", "Warnings from the evaluations:", *[f"- {w}" for w in warnings]]
    eps = (study["arms"].get("d", {}).get("train") or {}).get("epsilon_spent")
    if eps:
        lines += ["", "DP arm, ε spent per site (site ledger): "
                  + ", ".join(f"{s} {v:.3f}" for s, v in sorted(eps.items()))]
    for key, c in study["comparisons"].items():
        lines.append("")
        lines.append(f"{c['what']} ({key}), types at least as good (strictly better) of those compared: " + "; ".join(
            f"{k} {len(c[k]['types_at_least_as_good'])} ({len(c[k]['types_better'])})/{c[k]['n_types_compared']}"
            for k in TABLE_METRICS))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        ap.error(f"--arms: {bad or 'empty'}; choose from {','.join(ARMS)}")
    if min(args.budget_steps, args.batch, args.rounds, args.vae_rounds, args.n_per_label, args.threads) < 1:
        ap.error("--budget-steps, --batch, --rounds, --vae-rounds, --n-per-label and --threads must be >= 1")
    if args.vae_steps < 0:
        ap.error("--vae-steps must be >= 0 (0: the shipped procedural autoencoder, no VAE stage)")
    site_groups(args.federated_sites)  # a bad grouping fails before any arm trains
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from medisyn.evaluation import make_settings

    model_cfg, train_cfg = load_configs(args)
    plan = make_plan(args, len(SITES))
    texts, toml_paths = write_dataset_tomls(out, args.data_root)
    dcfgs = {s: load_dataset_config(p) for s, p in toml_paths.items()}
    settings = make_settings({"guidance_interval": parse_interval(args.guidance_interval)},
                             n_per_label=args.n_per_label, seed=args.seed, steps=args.sample_steps,
                             guidance=args.guidance, classifier_steps=args.classifier_steps,
                             encoder_steps=None if args.classifier_steps is None else max(1, args.classifier_steps * 4 // 3),
                             threads=args.threads, gallery_per_prompt=max(args.grid_per_label, 8))
    cache: dict[str, Any] = {}

    def parts() -> dict[str, Any]:
        if "parts" not in cache:
            cache["parts"] = load_parts(dcfgs, model_cfg)
        return cache["parts"]

    t0 = time.perf_counter()
    study: dict[str, Any] = {
        "kind": "medisyn-study", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "question": "is one generalist at least as good as each site's specialist at an equal training "
                    "budget, and what does DP cost?",
        "budget": plan, "seeds": {"train": args.seed, "federation": args.seed, "evaluation": args.seed,
                                  "note": "DP-SGD noise and Poisson sampling come from os.urandom (not seeded)"},
        "model": model_cfg.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json"),
        "evaluation_settings": settings.model_dump(mode="json"),
        "datasets": {s: {"image_type": dcfgs[s].image_type, "path": str(dcfgs[s].path), "hflip": HFLIP[s],
                         "toml": str(toml_paths[s])} for s in SITES},
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "skip_train": args.skip_train, "arms": {},
    }
    failed = False
    for arm in arms:
        rec: dict[str, Any] = {"name": ARMS[arm]}
        try:
            if args.skip_train:
                p = out / arm / "train.json"
                rec.update(json.loads(p.read_text()) if p.is_file() else {"train_note": f"{p} missing"})
            else:
                rec.update(train_arm(arm, out, texts, dcfgs, parts(), model_cfg, train_cfg, plan, args))
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except Exception as e:  # an arm that fails is reported, the others still run
            failed = True
            rec["error"] = f"training failed: {type(e).__name__}: {e}"
            log(f"error: arm {arm}: {rec['error']}")
        study["arms"][arm] = rec
    if args.train_only:
        log(f"trained {', '.join(arms)} in {out}; evaluate with --skip-train")
        return 1 if failed else 0
    galleries: dict[str, Any] = {}
    for arm in arms:
        rec = study["arms"][arm]
        if "error" in rec:
            continue
        try:
            ev, gal = evaluate_arm(arm, out, dcfgs, parts, settings)
            rec["evaluation"] = ev
            galleries[arm] = gal
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except Exception as e:
            failed = True
            rec["error"] = f"evaluation failed: {type(e).__name__}: {e}"
            log(f"error: arm {arm}: {rec['error']}")
    type_names = [dcfgs[s].image_type for s in SITES]
    study["comparisons"] = comparisons(study, type_names)
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    study["grids"] = write_grids(galleries, dcfgs, results / "study", args.grid_per_label)
    study["total_wall_seconds"] = round(time.perf_counter() - t0, 1)
    text = _markdown(study, plan, args, type_names)
    (results / "study.json").write_text(json.dumps(finite(study), indent=2, default=str, allow_nan=False))
    (results / "study.md").write_text(text)
    log("")
    log(text)
    log(f"study: {results / 'study.json'}, {results / 'study.md'}, grids in {results / 'study'}; "
        f"{study['total_wall_seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
