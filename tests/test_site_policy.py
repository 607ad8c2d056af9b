"""Site-side guarantees through the real federated code path (ServerApp logic + the
ClientApp handlers over the in-process Grid of ``test_federation_units``)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from medisyn.server import federation as fed
from test_federation_units import LocalGrid, fed_cfg, node_configs

DP = '[privacy]\ndp = true\nnoise_multiplier = 1.0\nmax_epsilon = 50.0\naccountant = "rdp"\n'


@pytest.fixture(scope="module")
def client_app():
    from medisyn.client.app import app

    return app


def _set_privacy(site_toml: Path, table: str) -> None:
    text = site_toml.read_text()
    text = re.sub(r"\[privacy\]\n(?:[^\[\n][^\n]*\n)*", "", text)
    site_toml.write_text(text.replace("[superlink]", table + "\n[superlink]"))


def test_non_dp_round_after_dp_marks_epsilon_infinite(tmp_path, client_app):
    """A site with a ledger that then trains without DP in a federated round: its ledger
    (and so every ε it reports afterwards) says ε = ∞."""
    from medisyn.audit.site_audit import site_privacy
    from medisyn.client.site import site_from_node_config

    from medisyn.privacy.ledger import PrivacyLedger

    sites = ["breast-us"]
    nodes = node_configs(tmp_path, sites=sites, privacy={"breast-us": DP})
    state = tmp_path / "breast-us" / "state"
    cfg = fed_cfg(tmp_path / "r1", sites=sites, stages=["unet"], local_steps=1)
    assert fed.run_federation(LocalGrid(nodes, client_app), cfg) == fed.Outcome.DONE
    eps_dp = PrivacyLedger.open(state, "breast-us", "rdp").epsilon()
    assert 0 < eps_dp < math.inf

    _set_privacy(Path(nodes[1000]["site-config"]), "")  # the site turns DP off
    cfg2 = fed_cfg(tmp_path / "r2", sites=sites, stages=["unet"], local_steps=1)
    assert fed.run_federation(LocalGrid(nodes, client_app), cfg2) == fed.Outcome.DONE
    (rec,) = fed.iter_metrics(cfg2.run_dir)
    assert rec["sites"]["breast-us"]["status"] == "ok"
    led = PrivacyLedger.open(state, "breast-us", "rdp")
    assert led.epsilon() == math.inf
    assert led.entries()[-1].sigma == 0.0 and led.entries()[-1].steps == 1
    pr = site_privacy(site_from_node_config(nodes[1000]))
    assert pr.dp is False and pr.epsilon is None


def test_non_dp_round_refused_when_ledger_was_deleted(tmp_path, client_app):
    """The marker says the site trained, the ledger is gone: a non-DP round fails closed
    (it could not be recorded) instead of training silently."""
    from medisyn.privacy.ledger import LEDGER_NAME

    sites = ["breast-us"]
    nodes = node_configs(tmp_path, sites=sites, privacy={"breast-us": DP})
    cfg = fed_cfg(tmp_path / "r1", sites=sites, stages=["unet"], local_steps=1)
    assert fed.run_federation(LocalGrid(nodes, client_app), cfg) == fed.Outcome.DONE
    (tmp_path / "breast-us" / "state" / LEDGER_NAME).unlink()
    _set_privacy(Path(nodes[1000]["site-config"]), "")
    cfg2 = fed_cfg(tmp_path / "r2", sites=sites, stages=["unet"], local_steps=1)
    grid = LocalGrid(nodes, client_app)
    fed.run_federation(grid, cfg2)
    (reply,) = grid.replies
    assert reply.has_error() and "LedgerError" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason


def test_client_check_opens_the_ledger_like_training(tmp_path):
    """`medisyn-client check`: a deleted ledger whose marker says the site trained is exit
    5 with the ledger named (as `medisyn privacy show` and training say), not ok."""
    from typer.testing import CliRunner

    from medisyn.client.cli import app as client_cli
    from medisyn.client.supervisor import check_site
    from medisyn.privacy.ledger import LEDGER_NAME, PrivacyLedger

    site_toml = node_configs(tmp_path, sites=["fundus"], privacy={"fundus": DP})[1000]["site-config"]
    state = tmp_path / "fundus" / "state"
    code, report = check_site(Path(site_toml))
    assert code == 0 and "spent_epsilon" not in report["policy"], report
    PrivacyLedger.open(state, "fundus", "rdp", 1e-5).record_steps("unet", "r", 1, 1.0, 0.05, 200)
    code, report = check_site(Path(site_toml))
    assert code == 0 and 0 < report["policy"]["spent_epsilon"] < math.inf
    (state / LEDGER_NAME).unlink()
    code, report = check_site(Path(site_toml))
    assert code == 5, report
    assert "privacy ledger" in report["error"] and "missing" in report["error"] and "200" in report["error"]
    res = CliRunner().invoke(client_cli, ["check", "--site", str(site_toml)])
    assert res.exit_code == 5 and "privacy ledger" in res.output and "ok" not in res.output.split()
