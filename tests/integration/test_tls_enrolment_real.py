"""TLS, node authentication and enrolment end to end, with real processes on loopback:
the CA and keys from ``deploy/make-certs.sh``, nginx (Debian package) with
``deploy/nginx-medisyn.conf`` on a high port in front of a TLS SuperLink with
``--enable-supernode-auth``, and a site whose SuperNode reaches the SuperLink only
through the proxy.

- ``medisyn-server`` registers the enrolled site's key itself when it starts the
  SuperLink (in-memory state), and the enrolled site trains a round;
- a SuperNode with a key nobody enrolled is refused;
- the Control API (``flwr ls`` / ``flwr run``) is not reachable through the proxy;
- after a SuperLink restart (``--resume``), the key is registered again, the enrolled
  site reconnects through the proxy and trains the next round.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from medisyn.server.config import FederationConfig, read_enrolment
from medisyn.server.federation import iter_metrics

from medisyn.procs import child_env, executable, free_port, port_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (system_tools)
from system_tools import ensure_tool  # noqa: E402
from test_federation_real import DEMO, TINY, cleanup, wait_for  # noqa: E402, F401  (fixture)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def make_certs(pki: Path, *sites: str) -> None:
    res = subprocess.run(["bash", str(ROOT / "deploy" / "make-certs.sh"), str(pki), "localhost", *sites],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def nginx_config(tmp: Path, pki: Path, proxy_port: int, superlink_port: int) -> Path:
    """deploy/nginx-medisyn.conf with only its port, certificate paths and upstream port
    changed, inside a minimal nginx.conf that keeps every file under ``tmp``."""
    conf = (ROOT / "deploy" / "nginx-medisyn.conf").read_text()
    for old, new in [("listen 443 ssl;", f"listen 127.0.0.1:{proxy_port} ssl;"),
                     ("/etc/medisyn/pki/", f"{pki}/"),
                     ("server 127.0.0.1:9092;", f"server 127.0.0.1:{superlink_port};"),
                     ("server_name fl.coordinator.example.org;", "server_name localhost;")]:
        assert old in conf, old
        conf = conf.replace(old, new)
    (tmp / "medisyn.conf").write_text(conf)
    temp = "\n".join(f"    {k}_temp_path {tmp / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = tmp / "nginx.conf"
    main.write_text(
        f"daemon off;\nmaster_process off;\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'} info;\n"
        f"events {{ worker_connections 128; }}\n"
        f"http {{\n    access_log {tmp / 'access.log'};\n{temp}\n    include {tmp / 'medisyn.conf'};\n}}\n")
    return main


def site_toml(tmp: Path, site: str, proxy_port: int, pki: Path, key: str) -> Path:
    d = tmp / "sites" / site
    d.mkdir(parents=True, exist_ok=True)
    ds = (DEMO / site / "dataset.toml").read_text().replace(
        'path = "dataset.npz"', f'path = "{(DEMO / site / "dataset.npz").as_posix()}"')
    p = d / "site.toml"
    p.write_text(f'[site]\nid = "{site}"\nstate_dir = "state"\n\n{ds}\n'
                 f'[superlink]\naddress = "localhost:{proxy_port}"\ninsecure = false\n'
                 f'root_certificates = "{pki / "ca.pem"}"\nauth_private_key = "{pki / key}"\n')
    return p


def federation(tmp: Path, pki: Path, port: int, rounds: int) -> FederationConfig:
    return FederationConfig.model_validate(dict(
        rounds=rounds, local_steps=2, stages=["unet"], min_sites=1, round_timeout=240,
        site_wait_timeout=180, evaluate=False, model=TINY, keep_checkpoints=2,
        train={"batch_size": 8, "num_threads": 1},
        sites={"breast-us": {"public_key": str(pki / "site-breast-us-key.pub"), "max_examples": 10_000},
               "chest-xray": {}},
        superlink={"host": "127.0.0.1", "port": port, "insecure": False,
                   "ssl_certfile": str(pki / "superlink.pem"), "ssl_keyfile": str(pki / "superlink.key"),
                   "ssl_ca_certfile": str(pki / "ca.pem"), "enable_supernode_auth": True},
        run_dir=str(tmp / "run")))


def flwr_against_proxy(tmp: Path, pki: Path, proxy_port: int, *args: str) -> subprocess.CompletedProcess:
    home = tmp / "proxy-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "proxy"\n\n[superlink.proxy]\n'
        f'address = "localhost:{proxy_port}"\nroot-certificates = {json.dumps(str(pki / "ca.pem"))}\n')
    return subprocess.run([executable("flwr"), *args], capture_output=True, text=True, timeout=120,
                          env=child_env({"FLWR_HOME": str(home)}), cwd=tmp)


@pytest.mark.timeout(600)
def test_tls_proxy_node_auth_enrolment_survives_superlink_restart(tmp_path, cleanup):  # noqa: F811
    from medisyn.client.supervisor import SiteSupervisor
    from medisyn.server.supervisor import ServerSupervisor

    nginx = ensure_tool("nginx", "nginx")
    pki = tmp_path / "pki"
    make_certs(pki, "breast-us", "intruder")
    sl_port, px_port = free_port(), free_port()
    cleanup.ports.extend([sl_port, px_port])
    cfg = federation(tmp_path, pki, sl_port, rounds=1)

    proxy = subprocess.Popen([nginx, "-c", str(nginx_config(tmp_path, pki, px_port, sl_port)),
                              "-p", str(tmp_path)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cleanup.append(proxy.pid)
    wait_for(lambda: port_open("127.0.0.1", px_port) or proxy.poll() is not None, 30, "nginx")
    assert proxy.poll() is None, (tmp_path / "error.log").read_text()

    server = ServerSupervisor(cfg, echo=print)
    sups: list[SiteSupervisor] = []
    try:
        server.prepare()
        server.start_superlink()  # registers the enrolled key
        cleanup.append(server.superlink.pid)
        first_nodes = read_enrolment(cfg.run_dir)
        assert list(first_nodes.values()) == ["breast-us"]

        good = SiteSupervisor(site_toml(tmp_path, "breast-us", px_port, pki, "site-breast-us-key"),
                              extra_env={"OMP_NUM_THREADS": "1"}, echo=print).start()
        sups.append(good)
        cleanup.append(good.daemon.pid)
        # chest-xray is listed, but its SuperNode holds a key nobody registered
        bad = SiteSupervisor(site_toml(tmp_path, "chest-xray", px_port, pki, "site-intruder-key"),
                             extra_env={"OMP_NUM_THREADS": "1"}, echo=print).start()
        sups.append(bad)
        cleanup.append(bad.daemon.pid)
        server.submit()
        assert server.watch() == 0

        rec = list(iter_metrics(cfg.run_dir))
        assert [r["round"] for r in rec] == [1] and rec[0]["sites"]["breast-us"]["status"] == "ok", rec
        assert "chest-xray" not in rec[0]["sites"]  # never became a node
        # the unenrolled key was refused by the SuperLink, through the proxy
        bad_log = Path(bad.daemon.log_path).read_text()
        assert "Failed to activate SuperNode" in bad_log, bad_log[-3000:]
        superlink_log = (cfg.run_dir / "logs" / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in superlink_log
        assert bad.restarts >= 1 and good.restarts == 0
        access = (tmp_path / "access.log").read_text()
        assert "/v1/fleet/" in access  # the sites really went through the proxy

        # the Control API is not reachable through the proxy
        for args in (["ls", "proxy"], ["run", str(cfg.run_dir / "app"), "proxy"]):
            res = flwr_against_proxy(tmp_path, pki, px_port, *args, "--format", "json")
            out = json.loads(res.stdout)
            assert out["success"] is False and "404 Not Found" in out["error-message"], res.stdout + res.stderr
            assert "/v1/control/" in out["error-message"]
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        for path in ("/v1/control/ListRuns", "/v1/runtime/GetRun", "/"):
            req = urllib.request.Request(f"https://localhost:{px_port}{path}", data=b"{}", method="POST")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, context=ctx, timeout=30)
            assert e.value.code == 404, path

        # SuperLink restart (in-memory state: every node is gone); --resume re-registers
        server.close()
        cfg2 = federation(tmp_path, pki, sl_port, rounds=2)
        server = ServerSupervisor(cfg2, resume=True, echo=print)
        server.prepare()
        t0 = time.monotonic()
        server.start_superlink()
        cleanup.append(server.superlink.pid)
        second_nodes = read_enrolment(cfg.run_dir)
        assert list(second_nodes.values()) == ["breast-us"]
        server.submit()
        assert server.watch() == 0
        print(f"resumed round took {time.monotonic() - t0:.0f} s")
    finally:
        for s in sups:
            s.stop()
        server.close()
        proxy.terminate()
        proxy.wait(timeout=30)

    rec = list(iter_metrics(cfg.run_dir))
    assert [r["round"] for r in rec] == [1, 2]
    assert rec[1]["sites"]["breast-us"]["status"] == "ok", rec[1]  # reconnected through the proxy
    assert "chest-xray" not in rec[1]["sites"]
