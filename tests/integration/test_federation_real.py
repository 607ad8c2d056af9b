"""Integration tests with real ``flower-superlink`` / ``flower-supernode`` processes on
loopback (no Ray, no mocked Flower). Each site runs ``medisyn-client``'s supervisor: a
SuperNode in process isolation and the site's own ClientApp worker. Slow on 2 cores, so
the scenarios are combined and tiny."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from medisyn.server.config import FederationConfig
from medisyn.server.federation import iter_metrics, read_status

from medisyn.procs import child_env, executable, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "medisyn" / "assets" / "demo"
# a site-installed wrapper of medisyn's ClientApp that sends a NaN update: the *site*
# chooses it (SiteSupervisor(clientapp=...)); the run's FAB is medisyn's own
NAN_APP_DIR = Path(__file__).parent / "nan_fab"

TINY = {
    "resolution": 16,
    "vae": {"block_out_channels": [8, 16], "norm_num_groups": 4},
    "unet": {"block_out_channels": [16, 32], "norm_num_groups": 8, "cross_attention": [False, True]},
}


def site_toml(tmp: Path, site: str, port: int, privacy: str = "", datasets: list[str] | None = None) -> Path:
    """A site TOML over the demo data: ``site``'s dataset, or one ``[[dataset]]`` table per
    demo dataset in ``datasets`` (a site that holds several)."""
    d = tmp / "sites" / site
    d.mkdir(parents=True, exist_ok=True)
    tables = []
    for name in datasets or [site]:
        t = (DEMO / name / "dataset.toml").read_text().replace(
            'path = "dataset.npz"', f'path = "{(DEMO / name / "dataset.npz").as_posix()}"')
        tables.append(t.replace("[dataset]", "[[dataset]]") if datasets else t)
    ds = "\n".join(tables)
    p = d / "site.toml"
    p.write_text(f'[site]\nid = "{site}"\nstate_dir = "state"\n\n{ds}\n{privacy}\n'
                 f'[superlink]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    return p


def federation(tmp: Path, port: int, sites: list[str], database: str = "memory", **kw) -> FederationConfig:
    base = dict(
        rounds=2, local_steps=3, stages=["unet"], min_sites=len(sites), round_timeout=300,
        site_wait_timeout=240, evaluate=False, model=TINY,
        train={"batch_size": 8, "num_threads": 1}, sites=sites,
        superlink={"host": "127.0.0.1", "port": port, "insecure": True, "database": database},
        run_dir=str(tmp / "run"),
    )
    base.update(kw)
    return FederationConfig.model_validate(base)


def group_members(pgid: int) -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(entry.name)) == pgid:
                out.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, ValueError):
            continue
    return out


def wait_for(pred, timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def final_unet(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def initial_unet(cfg: FederationConfig) -> dict[str, np.ndarray]:
    from medisyn.models import build_components

    c = build_components(cfg.model, seed=cfg.seed)
    return {k: v.detach().numpy().copy() for k, v in c.unet.state_dict().items()}


@pytest.fixture
def cleanup(tmp_path):
    """Process groups to kill at teardown, whatever happened; then any process of ours
    still naming this test's directory or port (e.g. an orphaned flower-superexec)."""
    class Registry(list):
        ports: list[int] = []

    groups = Registry()
    yield groups
    for pgid in groups:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            time.sleep(1)
    markers = [str(tmp_path)] + [f"127.0.0.1:{p}" for p in groups.ports]
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(entry.name) != os.getpid() and any(m in cmd for m in markers):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(420)
def test_three_sites_kill_restart_and_nan_site(tmp_path, cleanup):
    """3 sites, 2 rounds of the real daemons:
    - breast-us trains normally; fundus sends NaN weights (rejected, model stays finite);
    - chest-xray's SuperNode is SIGKILLed mid-round 1 (while its worker runs the task):
      the round completes with the others, its supervisor restarts it on the same
      Runtime port, and the same worker answers round 2;
    - weights change, checkpoints and metrics.jsonl appear, per-site metrics arrive."""
    from medisyn.client.supervisor import SiteSupervisor
    from medisyn.server.supervisor import ServerSupervisor

    port = free_port()
    cleanup.ports.append(port)
    sites = ["breast-us", "chest-xray", "fundus"]
    cfg = federation(tmp_path, port, sites, min_sites=3)
    paths = {s: site_toml(tmp_path, s, port) for s in sites}
    server = ServerSupervisor(cfg, echo=print)
    sups: dict[str, SiteSupervisor] = {}
    try:
        server.prepare()
        server.start_superlink()
        cleanup.append(server.superlink.pid)
        for s in sites:
            env = {"OMP_NUM_THREADS": "1"}
            extra = {}
            if s == "fundus":
                env.update(MEDISYN_TEST_NAN="1", PYTHONPATH=str(NAN_APP_DIR))
                extra["clientapp"] = "nan_clientapp:app"
            sups[s] = SiteSupervisor(paths[s], extra_env=env, echo=print, **extra).start()
            cleanup.extend([sups[s].daemon.pid, sups[s].worker.pid])
        server.submit()

        victim = sups["chest-xray"]
        first = victim.daemon.pid
        worker = victim.worker.pid

        def task_running():
            try:
                st = json.loads(victim.worker_status_path.read_text())
                # served >= 1: the prompts query before the first UNet round is done; busy: training
                return st.get("state") == "busy" and st.get("served", 0) >= 1
            except (OSError, ValueError):
                return False

        wait_for(task_running, 240, "chest-xray's worker to start round 1")
        os.killpg(first, signal.SIGKILL)
        wait_for(lambda: victim.restarts >= 1 and victim.daemon.pid != first, 60, "the supervisor to restart chest-xray")
        cleanup.append(victim.daemon.pid)

        code = server.watch()
        assert victim.worker.pid == worker and victim.worker_restarts == 0  # the worker stayed up
    finally:
        daemons = [d for s in sups.values() for d in (s.daemon, s.worker)]
        for s in sups.values():
            s.stop()
        server.close()

    assert code == 0
    records = list(iter_metrics(cfg.run_dir))
    assert [r["round"] for r in records] == [1, 2]
    r1, r2 = records
    for s in sites:  # every task ran in the site's own worker, none refused
        st = json.loads(sups[s].worker_status_path.read_text())
        assert st["refused"] == 0 and st["state"] == "stopped", (s, st)
    assert r1["sites"]["breast-us"]["status"] == "ok"
    assert r1["sites"]["fundus"]["status"] == "failed" and "non-finite" in r1["sites"]["fundus"]["reason"]
    assert r1["answered"] == 1 and r1["failed"] == 2  # the killed node is reported as a failure
    assert r2["sites"]["chest-xray"]["status"] == "ok", r2["sites"]  # rejoined after restart
    assert r2["sites"]["breast-us"]["status"] == "ok"
    assert r2["sites"]["fundus"]["status"] == "failed"
    for r in records:
        for m in r["sites"].values():
            if m["status"] == "ok":
                assert m["num-examples"] > 0 and np.isfinite(m["loss"]) and m["bytes-up"] > 0

    assert (cfg.run_dir / "checkpoints" / "LATEST").read_text().strip() == "round-0002"
    assert read_status(cfg.run_dir)["state"] == "done"
    final = final_unet(cfg.run_dir)
    start = initial_unet(cfg)
    assert all(np.isfinite(v).all() for v in final.values())
    changed = sum(not np.allclose(final[k], start[k]) for k in start)
    assert changed > len(start) // 2
    for d in daemons:  # every SuperNode group was stopped
        assert d is not None and not d.alive() and not group_members(d.pid)


AUDIT_FAST = "[audit]\ncontrastive_steps = 8\ncontrastive_batch = 32\nn_plant = 20\nthreads = 1\n"


@pytest.mark.timeout(720)
def test_server_killed_mid_run_resumes_at_next_round(tmp_path, cleanup):
    """`medisyn-server start` killed (SIGKILL, with its SuperLink) after round 1 of 2;
    `medisyn-server start --resume` continues at round 2 and ends at round 2.

    One site trains under DP-SGD: its ε grows round over round, across the server crash,
    and equals a fresh Opacus accountant fed the history in the site's ledger. The other
    ("general") holds two datasets, dermoscopy and fundus (``[[dataset]]`` tables).

    Then `medisyn-server audit` (a new SuperLink; the same site daemons) runs the release
    audit of the final model: the report carries that ε, both sites' aggregates (general:
    one per dataset), and the gate's verdict, which `medisyn audit gate` reproduces."""
    from medisyn.client.supervisor import SiteSupervisor

    port = free_port()
    cleanup.ports.append(port)
    sites = ["breast-us", "general"]
    # the run's EMA travels with the weights (ema_scope "run"): through the real processes,
    # a DP site, the crash and the resume, into the released model the audit checks
    cfg = federation(tmp_path, port, sites, stages=["vae", "unet"], rounds=1,
                     train={"batch_size": 8, "num_threads": 1, "ema_scope": "run"})
    cfg_path = tmp_path / "federation.toml"
    cfg_path.write_text(_toml(cfg))
    dp = '[privacy]\ndp = true\nnoise_multiplier = 1.0\nmax_epsilon = 50.0\naccountant = "rdp"\n'
    sups = [SiteSupervisor(site_toml(tmp_path, s, port, privacy=(dp if s == "breast-us" else "") + AUDIT_FAST,
                                     datasets=["dermoscopy", "fundus"] if s == "general" else None),
                           extra_env={"OMP_NUM_THREADS": "1"}, echo=print).start()
            for s in sites]
    cleanup.extend(s.daemon.pid for s in sups)
    env = child_env()
    cli = [executable("medisyn-server"), "start", "--config", str(cfg_path)]
    try:
        first = subprocess.Popen(cli, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        cleanup.append(first.pid)
        pids = cfg.run_dir / "pids.json"
        wait_for(pids.is_file, 120, "the SuperLink to start")
        cleanup.append(json.loads(pids.read_text())["superlink"])
        wait_for(lambda: (cfg.run_dir / "checkpoints" / "LATEST").is_file(), 300, "round 1's checkpoint")
        # crash: the supervisor and its SuperLink group die without cleanup
        os.killpg(first.pid, signal.SIGKILL)
        os.killpg(json.loads(pids.read_text())["superlink"], signal.SIGKILL)
        first.wait(timeout=30)
        assert [r["round"] for r in iter_metrics(cfg.run_dir)] == [1]

        second = subprocess.run(cli + ["--resume"], env=env, capture_output=True, text=True, timeout=330,
                                start_new_session=True)
        print(second.stdout, second.stderr)
        cleanup.append(json.loads(pids.read_text())["superlink"])
        audit_out = tmp_path / "release"
        audit = subprocess.run(
            [executable("medisyn-server"), "audit", "--run", str(cfg.run_dir), "--n-per-prompt", "2",
             "--steps", "2", "--out", str(audit_out), "--timeout", "400"],
            env=env, capture_output=True, text=True, timeout=480, start_new_session=True)
        print(audit.stdout, audit.stderr)
    finally:
        for s in sups:
            s.stop()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stdout and "round 2/2" in second.stdout
    assert "round 1/2" not in second.stdout  # round 1 is not re-run
    records = list(iter_metrics(cfg.run_dir))
    assert [r["round"] for r in records] == [1, 2] and [r["stage"] for r in records] == ["vae", "unet"]
    assert records[1]["answered"] == 2
    state = json.loads((cfg.run_dir / "checkpoints" / "round-0002" / "state.json").read_text())
    assert state["round"] == 2 == cfg.total_rounds and len(state["metrics"]) == 2
    assert read_status(cfg.run_dir)["state"] == "done"
    assert (cfg.run_dir / "model" / "model_index.json").is_file()
    # the run's EMA: kept beside the weights over the crash (3 steps of each stage), released
    from medisyn.server.federation import RUN_EMA_FILE
    from safetensors.numpy import load_file

    kept = load_file(str(cfg.run_dir / "checkpoints" / "round-0002" / "model" / RUN_EMA_FILE))
    assert int(kept["vae/#step"]) == 3 and int(kept["unet/#step"]) == 3
    released = load_file(str(cfg.run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    raw = load_file(str(cfg.run_dir / "checkpoints" / "round-0002" / "model" / "unet" /
                        "diffusion_pytorch_model.safetensors"))
    ema = {k.split("/", 1)[1]: v for k, v in kept.items() if k.startswith("unet/") and not k.endswith("#step")}
    assert all(np.array_equal(released[k], v) for k, v in ema.items())
    assert any(not np.array_equal(released[k], raw[k]) for k in ema)
    assert not (cfg.run_dir / "model" / RUN_EMA_FILE).exists()
    # DP at breast-us: cumulative ε, checked against a fresh accountant on the ledger.
    eps = [r["sites"]["breast-us"]["epsilon"] for r in records]
    assert 0 < eps[0] < eps[1]
    assert "epsilon" not in records[1]["sites"]["general"] or records[1]["sites"]["general"]["epsilon"] in (None, "-")
    from opacus.accountants import RDPAccountant

    ledger = json.loads((tmp_path / "sites" / "breast-us" / "state" / "privacy-ledger.json").read_text())
    assert {e["stage"] for e in ledger["entries"]} == {"vae", "unet"}
    fresh = RDPAccountant()
    fresh.history = [(e["sigma"], e["q"], e["steps"]) for e in ledger["entries"]]
    assert fresh.get_epsilon(ledger["delta"]) == pytest.approx(eps[1], rel=1e-6)

    # the release audit over real processes
    from medisyn.audit.report import ReleaseReport

    assert audit.returncode == 1, audit.stdout + audit.stderr  # report written, gate failed
    assert "release gate: FAIL" in audit.stdout and "general: ε within cap" in audit.stdout
    rep = ReleaseReport.model_validate_json((audit_out / "release_report.json").read_text())
    assert {a.site_id for a in rep.sites} == set(sites) and rep.site_errors == {}
    # general audited each of its datasets on its own; the gate names each
    assert sorted((a.site_id, a.dataset) for a in rep.sites) == [
        ("breast-us", "breast ultrasound"), ("general", "dermoscopy"), ("general", "fundus photograph")]
    checks = {c.name for c in rep.gate.checks}
    assert {"general [dermoscopy]: flagged images excluded", "general [fundus photograph]: flagged images excluded",
            "breast-us: flagged images excluded"} <= checks
    assert rep.privacy["breast-us"].epsilon == pytest.approx(eps[1], rel=1e-6)
    assert rep.privacy["general"].dp is False
    n_prompts = len(set(rep.prompts.values()))
    assert n_prompts >= 2 + 2 + 5 and len(rep.synthetic_ids) == 2 * n_prompts  # breast 2, derm ≥ 2, fundus 5
    assert rep.model_hash and rep.config_hash == cfg.hash()
    text = (audit_out / "release_report.json").read_text()
    assert str(tmp_path) not in text and str(DEMO) not in text
    gate = subprocess.run([executable("medisyn"), "audit", "gate", str(audit_out / "release_report.json")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert gate.returncode == 1 and "general: ε within cap" in gate.stdout
    assert len(list((audit_out / "released").glob("*.png"))) == len(rep.released_ids)


def _toml(cfg: FederationConfig) -> str:
    """A federation.toml for ``cfg`` (only the fields the test sets)."""
    d = json.loads(cfg.model_dump_json())
    lines = []
    tables = {}
    for k, v in d.items():
        if isinstance(v, dict):
            tables[k] = v
        elif v is not None:
            lines.append(f"{k} = {json.dumps(v)}")
    for name, t in tables.items():
        scal = {k: v for k, v in t.items() if not isinstance(v, dict) and v is not None}
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in scal.items()]
        for sub, st in t.items():
            if isinstance(st, dict):
                lines.append(f"[{name}.{sub}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in st.items() if v is not None]
    return "\n".join(lines) + "\n"


if sys.platform != "linux":  # process groups, /proc
    pytestmark = [pytestmark, pytest.mark.skip(reason="needs Linux")]
