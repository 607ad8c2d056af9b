"""The privacy ledger and accounting: ε equals Opacus's, cumulative, atomic, fail-closed."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medisyn.errors import LedgerError
from medisyn.privacy import accounting
from medisyn.privacy.ledger import LEDGER_NAME, MARKER_NAME, PrivacyLedger

# A known history: two rounds of one stage, a VAE stage at another (σ, q), then more.
KNOWN = [
    ("unet", "run-a", 1, 1.1, 32 / 546, 20),
    ("unet", "run-a", 2, 1.1, 32 / 546, 20),
    ("vae", "run-a", 1, 0.9, 16 / 546, 10),
    ("unet", "run-b", 1, 1.1, 32 / 546, 5),
]


def _fill(ledger: PrivacyLedger, rows=KNOWN, *, one_step_at_a_time: bool = False) -> None:
    for stage, run, rnd, sigma, q, steps in rows:
        if one_step_at_a_time:
            for _ in range(steps):
                ledger.record_steps(stage, run, rnd, sigma, q, 1)
        else:
            ledger.record_steps(stage, run, rnd, sigma, q, steps)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_equals_opacus_accountant_stepped_on_same_history(
    tmp_path: Path, kind: str
) -> None:
    from opacus.accountants import create_accountant

    delta = 1e-5
    ledger = PrivacyLedger.open(tmp_path, "site-a", kind, delta)
    _fill(ledger)
    # Opacus's own accountant, stepped exactly as a training run would step it.
    acc = create_accountant(mechanism=kind)
    for _, _, _, sigma, q, steps in KNOWN:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    expected = acc.get_epsilon(delta=delta)
    assert ledger.history() == [tuple(h) for h in acc.history]
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-9)
    # And after a restart (fresh process state: reopen from disk).
    reopened = PrivacyLedger.open(tmp_path, "site-a", kind)
    assert reopened.epsilon() == pytest.approx(expected, rel=1e-9)
    assert 1.0 < expected < 20.0


def test_cumulative_not_per_round(tmp_path: Path) -> None:
    """The Flower-example bug: per-round ε stays flat; ours must grow round over round."""
    ledger = PrivacyLedger.open(tmp_path, "s", "rdp", 1e-5)
    eps = []
    for rnd in range(1, 6):
        PrivacyLedger.open(tmp_path, "s", "rdp", 1e-5).record_steps("unet", "r", rnd, 1.0, 0.125, 8)
        eps.append(PrivacyLedger.open(tmp_path, "s", "rdp").epsilon())
    per_round = accounting.epsilon([(1.0, 0.125, 8)], 1e-5, "rdp")
    assert eps[0] == pytest.approx(per_round)
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    assert eps[-1] == pytest.approx(accounting.epsilon([(1.0, 0.125, 40)], 1e-5, "rdp"))
    assert ledger.epsilon() == 0.0  # the stale in-memory object saw nothing (no writes via it)


def test_file_format_and_checksum(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, "site-a", "prv", 2e-6)
    assert not (tmp_path / LEDGER_NAME).exists()  # nothing written before a step
    _fill(ledger)
    data = json.loads((tmp_path / LEDGER_NAME).read_text())
    assert data["format"] == "medisyn-privacy-ledger" and data["version"] == 1
    assert data["site_id"] == "site-a" and data["accountant"] == "prv" and data["delta"] == 2e-6
    assert data["checksum"].startswith("sha256:")
    assert data["total_steps"] == sum(r[5] for r in KNOWN)
    assert [(e["stage"], e["run_id"], e["round"], e["steps"]) for e in data["entries"]] == [
        (r[0], r[1], r[2], r[5]) for r in KNOWN
    ]
    marker = json.loads((tmp_path / MARKER_NAME).read_text())
    assert marker["total_steps"] == data["total_steps"] and marker["site_id"] == "site-a"
    # no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [LEDGER_NAME, MARKER_NAME, "privacy-ledger.lock"]
    )


def _tamper(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_text('{"format": "medisyn-privacy-ledger", "vers'),  # truncated
        lambda p: p.write_bytes(b"\x00\xff garbage"),
        lambda p: p.write_text(""),
        # an edited step count without a matching checksum
        lambda p: _tamper(p, lambda d: d["entries"][0].__setitem__("steps", 1)),
        # a forged checksum that matches, but the total disagrees with the marker (rollback)
        "rollback",
    ],
)
def test_corrupt_ledger_is_an_error(tmp_path: Path, damage) -> None:
    ledger = PrivacyLedger.open(tmp_path, "s", "rdp", 1e-5)
    _fill(ledger)
    path = tmp_path / LEDGER_NAME
    if damage == "rollback":
        from medisyn.privacy import ledger as ledger_mod

        data = json.loads(path.read_text())
        data["entries"] = data["entries"][:1]
        data["total_steps"] = data["entries"][0]["steps"]
        body = {k: v for k, v in data.items() if k != "checksum"}
        data["checksum"] = ledger_mod._checksum(body)
        path.write_text(json.dumps(data))
    else:
        damage(path)
    with pytest.raises(LedgerError):
        PrivacyLedger.open(tmp_path, "s", "rdp")
    # and recording refuses too (never a silent reset)
    with pytest.raises(LedgerError):
        ledger.record_steps("unet", "x", 1, 1.0, 0.1, 1)


def test_missing_ledger_at_trained_site_is_an_error(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, "s", "rdp", 1e-5)
    ledger.record_steps("unet", "r", 1, 1.0, 0.1, 3)
    (tmp_path / LEDGER_NAME).unlink()
    with pytest.raises(LedgerError, match="missing"):
        PrivacyLedger.open(tmp_path, "s", "rdp", 1e-5)
    with pytest.raises(LedgerError):
        ledger.record_steps("unet", "r", 1, 1.0, 0.1, 1)


def test_new_site_starts_at_zero_and_other_mismatches(tmp_path: Path) -> None:
    fresh = PrivacyLedger.open(tmp_path, "s", "prv", None, default_delta=1e-6)
    assert fresh.epsilon() == 0.0 and fresh.delta == 1e-6 and not fresh.exists
    fresh.record_steps("unet", "r", 1, 1.0, 0.1, 2)
    with pytest.raises(LedgerError, match="site"):
        PrivacyLedger.open(tmp_path, "other-site", "prv")
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger.open(tmp_path, "s", "prv", 1e-5)
    # δ left unset: the ledger's pinned δ is used
    assert PrivacyLedger.open(tmp_path, "s", "prv", None, default_delta=1e-3).delta == 1e-6


def test_non_private_steps_make_epsilon_infinite(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, "s", "rdp", 1e-5)
    ledger.record_steps("unet", "r", 1, 1.0, 0.1, 2)
    ledger.record_non_private("unet", "r", 2, 5)
    assert math.isinf(PrivacyLedger.open(tmp_path, "s", "rdp").epsilon())
    assert ledger.would_exceed(100.0, 0.001, 1, 1e9)[0]


def test_stale_temp_files_from_a_killed_writer_are_removed(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, "s", "rdp", 1e-5)
    ledger.record_steps("unet", "r", 1, 1.0, 0.1, 1)
    stale = tmp_path / ".privacy-ledger.json.abc123.tmp"
    stale.write_text('{"half": ')
    ledger.record_steps("unet", "r", 1, 1.0, 0.1, 1)
    assert not stale.exists()
    assert PrivacyLedger.open(tmp_path, "s", "rdp").total_steps == 2


def test_two_writers_at_one_site_both_count(tmp_path: Path) -> None:
    a = PrivacyLedger.open(tmp_path, "s", "rdp", 1e-5)
    b = PrivacyLedger.open(tmp_path, "s", "rdp", 1e-5)
    a.record_steps("unet", "r", 1, 1.0, 0.1, 3)
    b.record_steps("vae", "r", 1, 1.0, 0.2, 4)  # b re-reads the disk under the lock
    assert PrivacyLedger.open(tmp_path, "s", "rdp").total_steps == 7


def test_default_delta_and_group_privacy() -> None:
    assert accounting.default_delta(546) == 1e-5
    assert accounting.default_delta(1_000_000) == pytest.approx(1e-7)
    assert accounting.default_delta(546) < 1 / 546
    eps_k, delta_k = accounting.group_epsilon(1.0, 1e-6, 3)
    assert eps_k == 3.0 and delta_k == pytest.approx(3 * math.exp(2) * 1e-6)


# --------------------------------------------------------------------------- properties

_row = st.tuples(
    st.sampled_from(["unet", "vae"]),
    st.sampled_from(["r1", "r2"]),
    st.integers(1, 3),
    st.sampled_from([0.7, 1.0, 1.5]),
    st.sampled_from([0.01, 0.05, 0.2]),
    st.integers(0, 30),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(_row, min_size=1, max_size=5), restart_after=st.integers(0, 5))
def test_ledger_monotone_and_restore_then_step_equals_no_restart(rows, restart_after) -> None:
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        continuous = PrivacyLedger.open(Path(d1), "s", "rdp", 1e-5)
        restarted = PrivacyLedger.open(Path(d2), "s", "rdp", 1e-5)
        last = 0.0
        for i, (stage, run, rnd, sigma, q, steps) in enumerate(rows):
            continuous.record_steps(stage, run, rnd, sigma, q, steps)
            if i == restart_after and restarted.exists:
                restarted = PrivacyLedger.open(Path(d2), "s", "rdp")  # a SuperNode restart
            restarted.record_steps(stage, run, rnd, sigma, q, steps)
            eps = continuous.epsilon()
            assert eps >= last  # monotone: spending never decreases ε
            last = eps
        final = PrivacyLedger.open(Path(d2), "s", "rdp", 1e-5)
        assert final.history() == continuous.history()
        assert final.entries() == continuous.entries()
        assert final.epsilon() == continuous.epsilon()
        assert final.epsilon() == pytest.approx(
            accounting.epsilon([(r[3], r[4], r[5]) for r in rows], 1e-5, "rdp")
        )


@settings(max_examples=15, deadline=None)
@given(steps=st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_split_steps_equal_one_record(steps) -> None:
    """Recording k steps one call at a time equals recording them at once."""
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        a = PrivacyLedger.open(Path(d1), "s", "rdp", 1e-5)
        b = PrivacyLedger.open(Path(d2), "s", "rdp", 1e-5)
        for k in steps:
            a.record_steps("unet", "r", 1, 1.0, 0.05, k)
        b.record_steps("unet", "r", 1, 1.0, 0.05, sum(steps))
        assert a.history() == b.history() and a.epsilon() == b.epsilon()


def test_training_without_dp_at_a_dp_site_makes_epsilon_infinite(tmp_path):
    """A site with a ledger that later trains without DP must not keep reporting its old ε."""
    import math

    from medisyn.config import PrivacyConfig, TrainConfig, load_dataset_config
    from medisyn.data import load_dataset
    from medisyn.models import build_components
    from medisyn.privacy.dp import open_site_ledger
    from medisyn.train import train_local
    from tests.conftest import DEMO_DATA, tiny_model_config

    cfg = tiny_model_config()
    ds = load_dataset(load_dataset_config(DEMO_DATA / "breast-us" / "dataset.toml"), resolution=16, channels=3,
                      splits=["train"])
    dp = PrivacyConfig(dp=True, noise_multiplier=1.0, max_epsilon=50.0, accountant="rdp")
    c = build_components(cfg)
    r = train_local(c, ds, steps=2, config=TrainConfig(batch_size=8), stage="unet", privacy=dp, ledger_path=tmp_path,
                    site_id="s", progress=False)
    assert 0 < r.metrics["epsilon"] < math.inf
    train_local(c, ds, steps=1, config=TrainConfig(batch_size=8), stage="unet",
                privacy=dp.model_copy(update={"dp": False}), ledger_path=tmp_path, site_id="s", progress=False)
    ledger = open_site_ledger(tmp_path, "s", dp, n_records=len(ds))
    assert ledger.epsilon() == math.inf
