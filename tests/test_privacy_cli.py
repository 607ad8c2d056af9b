"""``medisyn privacy show --site site.toml``."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from medisyn.privacy import accounting
from medisyn.privacy.cli import app
from medisyn.privacy.ledger import LEDGER_NAME, PrivacyLedger

SITE = """
[site]
id = "site-a"
state_dir = "state"

[dataset]
path = "data"
specialty = "radiology"
image_type = "chest x-ray"

[privacy]
dp = true
noise_multiplier = 1.0
max_epsilon = {cap}
accountant = "rdp"
"""


def _site(tmp_path: Path, cap: float = 8.0) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(SITE.format(cap=cap))
    return p


def test_show_prints_spent_cap_left_and_rounds_that_fit(tmp_path: Path) -> None:
    toml = _site(tmp_path)
    ledger = PrivacyLedger.open(tmp_path / "state", "site-a", "rdp", 1e-5)
    q = 32 / 546
    for rnd in (1, 2):
        ledger.record_steps("unet", "run-1", rnd, 1.0, q, 20)
    ledger.record_steps("vae", "run-1", 1, 1.2, q, 10)
    runner = CliRunner()
    res = runner.invoke(app, ["show", "--site", str(toml), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    spent = accounting.epsilon([(1.0, q, 40), (1.2, q, 10)], 1e-5, "rdp")
    assert r["epsilon"] == spent and r["max_epsilon"] == 8.0
    assert r["epsilon_left"] == 8.0 - spent
    assert {s: v["steps"] for s, v in r["stages"].items()} == {"unet": 40, "vae": 10}
    # the plan is the last recorded round (vae, σ=1.2, 10 steps); k rounds fit, k+1 not
    k = r["rounds_that_fit"]
    assert r["plan"]["steps"] == 10 and r["plan"]["sigma"] == 1.2
    hist = [(1.0, q, 40), (1.2, q, 10)]
    assert accounting.epsilon([*hist, (1.2, q, 10 * k)], 1e-5, "rdp") <= 8.0
    assert accounting.epsilon([*hist, (1.2, q, 10 * (k + 1))], 1e-5, "rdp") > 8.0
    # a plan given on the command line
    res = runner.invoke(
        app,
        [
            "show",
            "--site",
            str(toml),
            "--json",
            "--sigma",
            "1.0",
            "--steps",
            "20",
            "--sample-rate",
            str(q),
        ],
    )
    k2 = json.loads(res.output)["rounds_that_fit"]
    assert accounting.epsilon([*hist, (1.0, q, 20 * k2)], 1e-5, "rdp") <= 8.0
    assert accounting.epsilon([*hist, (1.0, q, 20 * (k2 + 1))], 1e-5, "rdp") > 8.0
    # human-readable form
    res = runner.invoke(app, ["show", "--site", str(toml)])
    assert res.exit_code == 0
    out = res.output
    assert "site-a" in out and "run-1" in out and f"{spent:.3f}" in out
    assert "max_epsilon: 8" in out and f"{k} more round(s) fit" in out


def test_show_before_any_training_and_on_a_corrupt_ledger(tmp_path: Path) -> None:
    toml = _site(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["show", "--site", str(toml)])
    assert res.exit_code == 0 and "no DP steps yet" in res.output
    ledger = PrivacyLedger.open(tmp_path / "state", "site-a", "rdp", 1e-5)
    ledger.record_steps("unet", "r", 1, 1.0, 0.05, 5)
    (tmp_path / "state" / LEDGER_NAME).write_text("{not json")
    res = runner.invoke(app, ["show", "--site", str(toml)])
    assert res.exit_code == 5  # LedgerError
    assert "corrupt" in res.output
