"""The one-machine demo: a real federation of four hospital sites on loopback.

``run_demo(out_dir, quick)`` starts a real ``flower-superlink`` and one real
``flower-supernode`` per site (:data:`DEMO_SITE_DATA`: breast-us, chest-xray, eye-skin
with fundus and dermoscopy, chest-xray-dp under DP-SGD; the small vendored samples in
``medisyn/assets/demo/<sample>/``), trains stage ``unet`` (the quick run ``vae`` first)
federatedly, writes the global model, and prints where everything is. Every process it started is stopped at the end, also
on Ctrl-C. The lead mounts it as ``medisyn demo [--out DIR] [--quick]``.

One site trains under DP-SGD (``dp_site``). The demo ends with the release audit
(``medisyn.server.audit``): K images per prompt go to every site in a Flower ``query``,
each site audits them against its own data, and the release report is written to
``OUT/release/``; then the federated evaluation (``medisyn.server.evaluate``): each site
measures the model's images against its own data and ``OUT/evaluation/`` gets the joined
report (one line per image type is printed).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path

from medisyn.server.config import FederationConfig, ServerSuperLink, StrategyConfig
from medisyn.server.supervisor import ExitCode, ServerSupervisor, SupervisorError, supervise

from medisyn.config import ModelConfig, TrainConfig, UNetConfig, VAEConfig
from medisyn.procs import PeakRSS, free_port

logger = logging.getLogger(__name__)

# The demo's hospitals and the vendored samples (``medisyn/assets/demo/<name>/``) each
# holds: a whole sample (``(name, None)``) or a share of one (``(name, (first, stop, of))``:
# every split dealt label by label into ``of`` parts, the site holding parts
# ``first..stop-1``; two sites' shares of one sample share no record). The DP site holds
# chest X-rays as another site does: at ~550 records and ε ≤ 8, DP-SGD taught the shared
# model nothing of a type no other site held (breast ultrasound stayed grain in five
# variants, docs/quality.md); a DP site whose type the others also teach gains from them.
# Fundus and dermoscopy share one site (two [[dataset]] tables): four processes, five
# datasets.
DEMO_SITE_DATA: dict[str, tuple[tuple[str, tuple[int, int, int] | None], ...]] = {
    "breast-us": (("breast-us", None),),
    "chest-xray": (("chest-xray", (0, 2, 3)),),
    "eye-skin": (("fundus", None), ("dermoscopy", None)),
    "chest-xray-dp": (("chest-xray", (2, 3, 3)),),
}
DEMO_SITES = tuple(DEMO_SITE_DATA)
DEMO_DP_SITE = "chest-xray-dp"
# The full demo's UNet plan (docs/quality.md: measured in-process on the demo data).
DEMO_UNET_ROUNDS, DEMO_UNET_STEPS = 10, 36


def demo_assets() -> Path:
    return Path(str(resources.files("medisyn") / "assets" / "demo"))


def demo_config(out_dir: Path, port: int, *, quick: bool, sites: Sequence[str] = DEMO_SITES) -> FederationConfig:
    """The demo's federation: the tiny preset, sized for 2 CPU cores and 4 sites."""
    if quick:
        model = ModelConfig(
            resolution=16,
            vae=VAEConfig(block_out_channels=(8, 16), norm_num_groups=4),
            unet=UNetConfig(block_out_channels=(16, 32), norm_num_groups=8, cross_attention=(False, True)),
        )
        stages = ["vae", "unet"]
        rounds, steps = {"vae": 1, "unet": 1}, {"vae": 20, "unet": 30}
        strategy = StrategyConfig(name="fedavg")
    else:
        # The tiny preset as it is (f = 2 autoencoder, UNet (32, 64, 128)). Its autoencoder
        # starts from the weights pretrained on procedural images (no patient data), which
        # reconstruct the demo's held-out images better (MSE 0.0067) than any federated
        # VAE stage we measured (0.030 after 10 x 25 steps; fine-tuning the pretrained one
        # federatedly made it worse: 0.0077 after 2 x 25 at lr 3e-4): so the demo spends
        # its minutes on the UNet. Sites that see one image type each make plain FedAvg
        # forget which prompt means which type (recognised 0.00/0.03/0.50/0.47 in
        # process); the sites' prompt anchoring ([train] anchor_weight, on by default)
        # keeps it (docs/quality.md). 10 x 36 steps: with the eye-skin site auditing and
        # evaluating two datasets, 10 x 40 took 888-892 s of the 900 s budget on 2 cores
        # (10 x 50 had passed it with one dataset per site).
        model = ModelConfig(resolution=32)
        stages = ["unet"]
        rounds, steps = {"unet": DEMO_UNET_ROUNDS}, {"unet": DEMO_UNET_STEPS}
        # FedAvg. FedAvgM at server lr 2 (which helps the study's plan, docs/quality.md) was
        # measured in this demo too: breast ultrasound recognised 0.73 (FedAvg: 0.94).
        strategy = StrategyConfig(name="fedavg")
    return FederationConfig(
        name="medisyn-demo",
        rounds=1,
        stage_rounds=rounds,
        local_steps=10,
        stage_local_steps=steps,
        stages=stages,
        min_sites=len(sites),
        max_parallel_sites=parallel_sites(),
        round_timeout=1800,
        site_wait_timeout=300,
        # Held-out loss costs one more message round per stage; the demo skips it to stay
        # within its time budget on 2 cores.
        evaluate=False,
        keep_checkpoints=1,
        strategy=strategy,
        model=model,
        # each site keeps its AdamW moments between rounds (medisyn.train.LocalOptimizerState)
        train=TrainConfig(batch_size=16, num_threads=1, lr=1e-3, vae_lr=2e-3 if quick else 1e-3,
                          keep_optimizer_state=True),
        sites=list(sites),
        superlink=ServerSuperLink(host="127.0.0.1", port=port, insecure=True, database="memory"),
        run_dir=out_dir / "run",
    )


# The site audit sized for the demo on 2 shared cores (the defaults, for a real site, are
# 300 encoder steps and 500 planted copies per family; see docs/audit.md).
DEMO_AUDIT = {
    True: "[audit]\ncontrastive_steps = 30\ncontrastive_batch = 64\nn_plant = 50\nthreads = 1\n",
    False: "[audit]\ncontrastive_steps = 120\ncontrastive_batch = 64\nn_plant = 200\nthreads = 1\n",
}


def write_site_configs(out_dir: Path, port: int, *, sites: Sequence[str] = DEMO_SITES,
                       dp_site: str | None = None, quick: bool = False,
                       datasets: Mapping[str, str] | None = None,
                       privacy: Mapping[str, str] | None = None) -> dict[str, Path]:
    """One ``site.toml`` per demo site, pointing at the vendored data.

    ``datasets``: per site, the ``[dataset]`` table's TOML text to use instead of the
    vendored sample (e.g. a full dataset, ``bench/study.py``); ``privacy``: per site, the
    ``[privacy]`` table's TOML text (overrides ``dp_site``). A ``dp_site`` that is not
    one of ``sites`` is refused (ValueError naming both): else the demo would run with no
    DP site at all."""
    if dp_site is not None and dp_site not in sites:
        raise ValueError(f"dp_site {dp_site!r} is not one of the demo's sites: {', '.join(sites)}")
    paths: dict[str, Path] = {}
    for site in sites:
        d = out_dir / "sites" / site
        d.mkdir(parents=True, exist_ok=True)
        if datasets is not None and site in datasets:
            dataset = datasets[site]
        else:
            dataset = site_dataset_tables(site, d)
        site_privacy = ""
        if privacy is not None and site in privacy:
            site_privacy = privacy[site]
        elif site == dp_site:
            # DP-SGD at this site: σ = 1.6 over the demo's 10 x 36 steps of an expected 16
            # from its 199 training records spends ε = 5.39 (δ 1e-5, RDP), under the site's
            # cap of 10. Poisson batches run in parts of at most 8 records: the same update
            # and ε, about half the per-sample-gradient memory, ~15% more time per step.
            site_privacy = ("[privacy]\ndp = true\nnoise_multiplier = 1.6\n"
                            "max_epsilon = 10.0\naccountant = \"rdp\"\nmax_physical_batch = 8\n")
        (d / "site.toml").write_text(
            f'[site]\nid = "{site}"\nstate_dir = "state"\n\n{dataset}\n{site_privacy}\n'
            f'[superlink]\naddress = "127.0.0.1:{port}"\ninsecure = true\n\n{DEMO_AUDIT[quick]}'
        )
        paths[site] = d / "site.toml"
    return paths


def site_dataset_tables(site: str, site_dir: Path) -> str:
    """The ``[dataset]`` table (or ``[[dataset]]`` tables) of demo site ``site``
    (:data:`DEMO_SITE_DATA`; a site named after a vendored sample holds that sample). A
    share of a sample is written once into ``site_dir/data/`` (the site's own data folder)."""
    assets = demo_assets()
    parts = DEMO_SITE_DATA.get(site) or ((site, None),)
    tables = []
    for name, share in parts:
        if not (assets / name / "dataset.toml").is_file():
            raise ValueError(f"demo site {site!r}: no vendored sample {name!r} in {assets} "
                             f"(samples: {sorted(p.name for p in assets.iterdir() if p.is_dir())})")
        npz = assets / name / "dataset.npz"
        if share is not None:
            first, stop, of = share
            npz = write_share(npz, share, site_dir / "data" / f"{name}-parts-{first}-{stop - 1}-of-{of}.npz")
        text = (assets / name / "dataset.toml").read_text()
        text = text.replace('path = "dataset.npz"', f"path = {json.dumps(npz.as_posix())}")
        if len(parts) > 1:
            text = text.replace("\n[dataset]\n", "\n[[dataset]]\n")
        tables.append(text)
    return "\n".join(tables)


def write_share(src: Path, share: tuple[int, int, int], dst: Path) -> Path:
    """Parts ``first..stop-1`` of ``of`` of a MedMNIST-style sample: every split's records
    are taken label by label in a seeded order and dealt into the ``of`` parts in turn (so
    shares of one sample are disjoint and keep each label's proportion). Written once;
    later runs reuse the file."""
    import io

    import numpy as np

    from medisyn.fileio import atomic_write_bytes

    first, stop, of = share
    if not 0 <= first < stop <= of:
        raise ValueError(f"share {share} of {src}: expected 0 <= first < stop <= of")
    if dst.is_file():
        return dst
    rng = np.random.default_rng(0)
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    out: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        flat = labels.reshape(len(labels), -1)[:, 0]
        keep = []
        for v in np.unique(flat):
            order = rng.permutation(np.flatnonzero(flat == v))
            part = np.arange(len(order)) % of  # the part each record is dealt to
            keep.append(order[(part >= first) & (part < stop)])
        idx = np.sort(np.concatenate(keep))
        out[f"{split}_images"], out[f"{split}_labels"] = images[idx], labels[idx]
    buf = io.BytesIO()
    np.savez_compressed(buf, **out)
    atomic_write_bytes(dst, buf.getvalue())
    return dst


def grids_from_audit(synthetic_dir: Path, site_paths: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """One grid per image type (rows: the labels' prompts) from the images the release
    audit generated with the final model (``OUT/release/synthetic``), so the demo does not
    sample twice; in ``OUT/samples/<site>/`` of the first site holding the type
    (``<site>/<type>/`` for a site with several datasets)."""
    import json as _json

    from PIL import Image

    from medisyn.config import load_site_config
    from medisyn.data import label_prompts
    from medisyn.fileio import folder_name
    from medisyn.generate import make_grid

    by_prompt: dict[str, list[Path]] = {}
    for side in sorted(Path(synthetic_dir).glob("*.json")):
        prompt = _json.loads(side.read_text()).get("prompt")
        if isinstance(prompt, str) and side.with_suffix(".png").is_file():
            by_prompt.setdefault(prompt, []).append(side.with_suffix(".png"))
    grids: dict[str, Path] = {}
    for site, path in site_paths.items():
        datasets = load_site_config(path).datasets
        for ds in datasets:
            if ds.image_type in grids:  # a type two sites hold: its prompts' images are drawn once
                continue
            rows = [by_prompt[p] for p in sorted(set(label_prompts(ds).values())) if p in by_prompt]
            if not rows:
                continue
            ncols = max(len(r) for r in rows)
            images = []
            for r in rows:
                ims = [Image.open(f).convert("RGB") for f in r]
                images += ims + [Image.new("RGB", ims[0].size, "white")] * (ncols - len(ims))
            d = out_dir / "samples" / site
            if len(datasets) > 1:  # a site with several datasets: one folder per image type
                d = d / folder_name(ds.image_type)
            d.mkdir(parents=True, exist_ok=True)
            make_grid(images, ncols=ncols).save(d / "grid.png")
            grids[ds.image_type] = d / "grid.png"
    return grids


def parallel_sites() -> int:
    """The demo's sites share this machine and each works on one thread: ask one site per
    core at a time (4 sites on 2 cores take about as long, and hold two sites' training or
    audit memory at once instead of four; the slowest site is asked first)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


# The federated evaluation sized for the demo on 2 shared cores (`medisyn-server evaluate`
# defaults: 64 images per label, 300 classifier steps).
DEMO_EVALUATION = {
    True: {"n_per_label": 4, "steps": 10, "classifier_steps": 60, "encoder_steps": 80, "gallery_per_prompt": 4},
    False: {"n_per_label": 16, "steps": 20, "classifier_steps": 150, "encoder_steps": 200, "gallery_per_prompt": 8},
}


def run_demo_evaluation(run_dir: Path, out_dir: Path, quick: bool, *, echo: Callable[[str], None],
                        superlink: object) -> int:
    """The federated evaluation of the demo's final model (every site, its own data)."""
    from medisyn.server.evaluate import EvaluateRequest, run_evaluate_command

    echo("evaluating the model at every site on its own data ...")
    req = EvaluateRequest(run_dir=run_dir, out_dir=out_dir, timeout=1800, **DEMO_EVALUATION[quick])
    code = run_evaluate_command(req, echo=echo, superlink=superlink)
    if code not in (0, 1):  # 0/1: the report was written (every site / some sites evaluated)
        raise SupervisorError(f"the federated evaluation failed (exit {code})", ExitCode(code))
    return code


def evaluation_lines(out_dir: Path) -> list[str]:
    """One line per image type from ``OUT/evaluation.json``."""
    from medisyn.evaluation_report import summary_lines

    p = Path(out_dir) / "evaluation.json"
    return summary_lines(json.loads(p.read_text())) if p.is_file() else []


def run_federation(cfg: FederationConfig, site_paths: Mapping[str, Path], *,
                   echo: Callable[[str], None] = print, threads_per_site: int = 1) -> int:
    """Train ``cfg`` with a real ``flower-superlink`` and one real ``flower-supernode`` per
    site config in ``site_paths`` (written by :func:`write_site_configs` for
    ``cfg.superlink.port``), all on this machine: the demo's federation without the audit
    and the evaluation (``bench/study.py`` uses it). Every process it starts is stopped
    before it returns, also on Ctrl-C. Returns the run's exit code (``ExitCode``; 0: the
    global model is in ``cfg.run_dir/model``)."""
    from medisyn.client.supervisor import SiteSupervisor

    server = ServerSupervisor(cfg, echo=echo)
    supervisors: list = []
    threads = str(max(1, int(threads_per_site)))

    def body() -> int:
        server.prepare()
        server.start_superlink()
        for p in site_paths.values():
            supervisors.append(SiteSupervisor(p, extra_env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
                                              echo=echo).start())
        server.submit()
        return int(server.watch())

    def close() -> None:
        for s in supervisors:
            s.stop()
        server.close()

    return supervise(body, close=close, echo=echo, interrupted="stopping every federation process")


def run_demo(out_dir: Path, quick: bool, *, echo: Callable[[str], None] = print,
             sites: Sequence[str] = DEMO_SITES, dp_site: str | None = DEMO_DP_SITE) -> int:
    """Run the whole demo; returns an exit code (0 on success, see ``ExitCode``)."""
    from medisyn.client.supervisor import SiteSupervisor

    t0 = time.time()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = demo_config(out_dir, port, quick=quick, sites=sites)
    site_paths = write_site_configs(out_dir, port, sites=sites, dp_site=dp_site, quick=quick)
    echo(f"MediSyn demo ({'quick' if quick else 'full'}): {len(sites)} sites {list(sites)}, "
         f"{cfg.total_rounds} rounds, output in {out_dir}")
    server = ServerSupervisor(cfg, echo=echo)
    supervisors: list = []

    def close() -> None:
        for s in supervisors:
            s.stop()
        supervisors.clear()
        server.close()

    def body() -> int:
        server.prepare()
        server.start_superlink()
        for p in site_paths.values():
            # one thread per site process: 4 sites share 2 cores without oversubscription
            supervisors.append(SiteSupervisor(p, extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                                              echo=echo).start())
        rss.phase = "federation"
        server.submit()
        code = int(server.watch())
        t_fed = time.time() - t0
        if code == 0:
            from medisyn.server.audit import AuditRequest, run_audit_command

            echo("federation finished; release audit at every site ...")
            rss.phase = "audit"
            release = out_dir / "release"
            req = AuditRequest(run_dir=cfg.run_dir, out_dir=release, n_per_prompt=2 if quick else 4,
                               steps=10 if quick else 25, timeout=1800)
            audit_code = run_audit_command(req, echo=echo, superlink=server.superlink)
            if audit_code not in (0, 1):  # 0/1: the report was written (gate pass/fail)
                raise SupervisorError(f"the release audit failed (exit {audit_code})", ExitCode(audit_code))
            t_audit = time.time() - t0 - t_fed
            rss.phase = "evaluation"
            evaluation = out_dir / "evaluation"
            eval_code = run_demo_evaluation(cfg.run_dir, evaluation, quick, echo=echo,
                                            superlink=server.superlink)
            t_eval = time.time() - t0 - t_fed - t_audit
            close()  # every site and the SuperLink stopped before the grids are drawn
            grids = grids_from_audit(release / "synthetic", site_paths, out_dir)
            summary = {
                "quick": quick,
                "wall_seconds": round(time.time() - t0, 1),
                "federation_seconds": round(t_fed, 1),
                "audit_seconds": round(t_audit, 1),
                "release_report": str(release / "release_report.html"),
                "release_gate_passed": audit_code == 0,
                "evaluation_seconds": round(t_eval, 1),
                "evaluation_report": str(evaluation / "evaluation.html"),
                "evaluation_all_sites": eval_code == 0,
                "peak_rss_bytes": rss.peak,
                "peak_pss_bytes": rss.peak_pss,
                "peak_rss_bytes_by_phase": dict(rss.by_phase),
                "peak_rss_processes": rss.peak_processes,
                "model": str(cfg.run_dir / "model"),
                "metrics": str(cfg.run_dir / "metrics.jsonl"),
                "checkpoints": str(cfg.run_dir / "checkpoints"),
                "grids": {k: str(v) for k, v in grids.items()},
                "sites": {k: str(v) for k, v in site_paths.items()},
                "logs": str(cfg.run_dir / "logs"),
            }
            (out_dir / "demo-summary.json").write_text(json.dumps(summary, indent=2))
            echo("")
            echo(f"global model (diffusers layout): {summary['model']}")
            echo(f"per-round metrics:               {summary['metrics']}")
            echo(f"checkpoints:                     {summary['checkpoints']}")
            for k, v in grids.items():
                echo(f"grid {k:<24} {v}")
            echo(f"site configs and site state:     {out_dir / 'sites'}")
            echo(f"release report:                  {summary['release_report']}  "
                 f"(gate {'PASS' if audit_code == 0 else 'FAIL'})")
            echo(f"evaluation report:               {summary['evaluation_report']}")
            for line in evaluation_lines(evaluation):
                echo(f"  {line}")
            pss = f" (PSS, shared pages counted once: {rss.peak_pss / 2**30:.2f} GiB)" if rss.peak_pss else ""
            echo(f"wall time {summary['wall_seconds']} s, peak RSS of all demo processes "
                 f"{rss.peak / 2**30:.2f} GiB{pss}; summary: {out_dir / 'demo-summary.json'}")
        return code

    with PeakRSS(interval=1.0) as rss:
        return supervise(body, close=close, echo=echo, interrupted="stopping every demo process")
