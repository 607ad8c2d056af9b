"""The systemd units in deploy/systemd are hardened: exposure <= 4.0 by
`systemd-analyze security --offline=true` (skipped where systemd-analyze is missing)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).resolve().parents[1] / "deploy" / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_exposure_at_most_4(unit):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    res = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60, cwd=unit.parent)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 4.0, res.stdout


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_keeps_torch_working_and_state_private(unit):
    text = unit.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert "MemoryDenyWriteExecute" not in settings  # PyTorch's oneDNN JIT needs W+X pages
    assert settings["UMask"] == "0077" and settings["StateDirectoryMode"] == "0700"
    assert settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
    assert settings["IPAddressDeny"] == "any"


def test_site_and_coordinator_run_as_different_users():
    users = {u.name: dict(line.split("=", 1) for line in u.read_text().splitlines()
                          if line.startswith("User="))["User"] for u in UNITS}
    assert len(set(users.values())) == len(users), users
