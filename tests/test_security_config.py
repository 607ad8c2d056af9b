"""Secure by default: `medisyn-server check` / `medisyn-client check` refuse a SuperLink
reachable beyond loopback without TLS, and name every TLS / key file that does not exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from medisyn.client.cli import app as client_cli
from medisyn.server.cli import app as server_cli
from medisyn.server.config import FederationConfig, load_federation_config
from typer.testing import CliRunner

from medisyn.config import is_loopback_host

DEMO = Path(__file__).resolve().parents[1] / "medisyn" / "assets" / "demo" / "breast-us" / "dataset.npz"


def server_check(tmp_path: Path, text: str):
    p = tmp_path / "federation.toml"
    p.write_text(text)
    return CliRunner().invoke(server_cli, ["check", "--config", str(p)])


def client_check(tmp_path: Path, superlink: str | None):
    p = tmp_path / "site.toml"
    p.write_text(
        f'[site]\nid = "breast-us"\nstate_dir = "state"\n'
        f'[dataset]\npath = "{DEMO}"\nspecialty = "radiology"\nimage_type = "breast ultrasound"\n'
        'labels = { "0" = "malignant", "1" = "normal or benign" }\n'
        + (f"[superlink]\n{superlink}\n" if superlink is not None else "")
    )
    return CliRunner().invoke(client_cli, ["check", "--site", str(p), "--json"])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_hosts(host):
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5", "fl.example.org", "192.168.1.1"])
def test_non_loopback_hosts(host):
    assert not is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "fl.example.org"])
def test_server_check_refuses_insecure_non_loopback(tmp_path, host):
    res = server_check(tmp_path, f'[superlink]\nhost = "{host}"\ninsecure = true\n')
    assert res.exit_code == 2
    assert "not loopback" in res.output and "TLS" in res.output


def test_server_check_names_each_missing_tls_and_key_file(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    res = server_check(tmp_path, (
        '[superlink]\ninsecure = false\nssl_certfile = "pki/server.pem"\n'
        'ssl_keyfile = "pki/server.key"\nssl_ca_certfile = "ca.pem"\nenable_supernode_auth = true\n'
        '[sites.a]\npublic_key = "pki/site-a-key.pub"\n[sites.b]\nmax_examples = 10\n'
    ))
    assert res.exit_code == 2, res.output
    for name in ("ssl_certfile", "server.pem", "ssl_keyfile", "server.key", "[sites.a] public_key",
                 "site-a-key.pub"):
        assert name in res.output
    assert "ssl_ca_certfile" not in res.output  # that one exists


def test_server_check_ok_with_tls_files_and_warns_what_is_open(tmp_path):
    pki = tmp_path / "pki"
    pki.mkdir()
    for f in ("server.pem", "server.key", "a.pub"):
        (pki / f).write_text("x")
    res = server_check(tmp_path, (
        '[superlink]\ninsecure = false\nssl_certfile = "pki/server.pem"\nssl_keyfile = "pki/server.key"\n'
        'enable_supernode_auth = true\n[sites.a]\npublic_key = "pki/a.pub"\nmax_examples = 500\n'
        '[sites.b]\n'
    ))
    assert res.exit_code == 0, res.output
    assert "max_update_norm is not set" in res.output
    assert "no max_examples cap for sites ['b']" in res.output


def test_default_server_config_is_loopback_insecure_and_says_so(tmp_path):
    res = server_check(tmp_path, 'sites = ["a", "b"]\n')
    assert res.exit_code == 0, res.output
    assert "warning: superlink: no TLS (allowed only on loopback)" in res.output


def test_site_tables_and_plain_list_are_both_valid(tmp_path):
    p = tmp_path / "f.toml"
    p.write_text('sites = ["a", "b"]\n[strategy]\nmax_examples = 7\n')
    cfg = load_federation_config(p)
    assert cfg.sites == ["a", "b"] and cfg.enrolment == {} and cfg.max_examples_for("a") == 7
    p.write_text('min_sites = 2\n[sites.a]\nmax_examples = 5\n[sites.b]\n')
    cfg = load_federation_config(p)
    assert cfg.sites == ["a", "b"] and cfg.max_examples_for("a") == 5 and cfg.max_examples_for("b") is None
    # the resolved JSON the ServerApp reads back round-trips
    again = FederationConfig.model_validate(json.loads(cfg.model_dump_json()))
    assert again == cfg and again.hash() == cfg.hash()


def test_client_check_refuses_insecure_non_loopback(tmp_path):
    res = client_check(tmp_path, 'address = "fl.example.org:443"\ninsecure = true')
    assert res.exit_code == 2
    assert "not loopback" in res.output and "TLS" in res.output


def test_client_check_names_missing_tls_file(tmp_path):
    res = client_check(tmp_path, 'address = "fl.example.org:443"\nroot_certificates = "nope/ca.pem"')
    assert res.exit_code == 2
    assert "root_certificates" in res.output and "ca.pem" in res.output and "does not exist" in res.output


def test_client_without_superlink_table_is_loopback_insecure_and_says_so(tmp_path):
    res = client_check(tmp_path, None)
    assert res.exit_code == 0, res.output
    sl = json.loads(res.output)["superlink"]
    assert sl["tls"] is False and sl["address"].startswith("127.0.0.1")
    assert "loopback" in sl["warning"]
