"""``medisyn-server evaluate`` through real processes: a real ``flower-superlink`` (started
by the command), two real ``flower-supernode`` sites (``medisyn-client``'s supervisor)
on loopback, a finished run with a tiny untrained model (evaluation needs no training)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_federation_real import site_toml

from medisyn.procs import child_env, executable, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "medisyn" / "assets" / "demo"
TINY = {
    "resolution": 16,
    "vae": {"block_out_channels": [8, 16], "norm_num_groups": 4},
    "unet": {"block_out_channels": [16, 32], "norm_num_groups": 8, "cross_attention": [False, True]},
}


def _finished_run(tmp: Path, port: int, sites: list[str]):
    from medisyn.server.config import FederationConfig

    from medisyn.models import build_components, save_components

    cfg = FederationConfig.model_validate(dict(
        rounds=1, local_steps=1, stages=["vae", "unet"], min_sites=len(sites), site_wait_timeout=180,
        evaluate=False, model=TINY, train={"batch_size": 8, "num_threads": 1}, sites=sites,
        superlink={"host": "127.0.0.1", "port": port, "insecure": True, "database": "memory"},
        run_dir=str(tmp / "run")))
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "federation.resolved.json").write_text(cfg.model_dump_json(indent=1))
    save_components(build_components(cfg.model, seed=cfg.seed), cfg.run_dir / "model")
    return cfg


def _kill_leftovers(markers: list[str]) -> None:
    """Any process of ours still naming this test's directory or port (e.g. an orphaned
    flwr-clientapp) is killed, by pid."""
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


@pytest.mark.timeout(400)
def test_federated_evaluation_with_real_daemons(tmp_path):
    """Two sites evaluate the run's model on their own data and answer with aggregates
    only; the coordinator writes evaluation.json/html with one entry per image type. The
    second site ("general") holds two datasets and answers one evaluation for each."""
    from medisyn.audit.report import assert_shareable
    from medisyn.client.supervisor import SiteSupervisor

    port = free_port()
    sites = ["breast-us", "general"]
    cfg = _finished_run(tmp_path, port, sites)
    sups = [SiteSupervisor(site_toml(tmp_path, s, port, datasets=["dermoscopy", "chest-xray"] if s == "general" else None),
                           extra_env={"OMP_NUM_THREADS": "1"}, echo=print).start()
            for s in sites]
    out = tmp_path / "evaluation"
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            [executable("medisyn-server"), "evaluate", "--run", str(cfg.run_dir), "--out", str(out),
             "--n-per-label", "4", "--steps", "2", "--classifier-steps", "10", "--timeout", "300",
             # one site at a time: the pool over the real SuperLink's push/pull (co-located sites)
             "--max-parallel-sites", "1"],
            env=child_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=360,
            start_new_session=True)
        print(res.stdout, res.stderr)
    finally:
        for s in sups:
            s.stop()
        _kill_leftovers([str(tmp_path), f"127.0.0.1:{port}"])
    print(f"federated evaluation took {time.monotonic() - t0:.1f} s")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "evaluate: site breast-us: evaluated breast ultrasound" in res.stdout
    assert "evaluate: site general: evaluated paediatric chest X-ray" in res.stdout
    assert "evaluation report:" in res.stdout
    r = json.loads((out / "evaluation.json").read_text())
    assert r["sites"] == sorted(sites) and r["site_errors"] == {}
    assert set(r["types"]) == {"breast ultrasound", "dermoscopy", "paediatric chest X-ray"}
    assert {t: e["site"] for t, e in r["types"].items()} == {
        "breast ultrasound": "breast-us", "dermoscopy": "general", "paediatric chest X-ray": "general"}
    assert r["types"]["paediatric chest X-ray"]["channels"] == 1 and r["types"]["dermoscopy"]["channels"] == 3
    for e in r["types"].values():
        assert e["n_synthetic"] == 8 and e["metrics"]["fd"] is not None
        assert e["metrics"]["tstr_balanced_accuracy"] is not None
        assert "one site's data" in e["skipped"]["type_recognised"]
    text = (out / "evaluation.json").read_text()
    assert str(tmp_path / "sites") not in text and str(DEMO) not in text
    for site in sites:  # what each site answered: shareable, kept on site
        answered = list((tmp_path / "sites" / site / "state" / "evaluation").glob("answered-*.json"))
        assert len(answered) == 1
        assert_shareable(json.loads(answered[0].read_text()))
    assert (out / "evaluation.html").read_text().count("data:image/png;base64,") >= 4


if sys.platform != "linux":  # process groups, /proc
    pytestmark = [pytestmark, pytest.mark.skip(reason="needs Linux")]
