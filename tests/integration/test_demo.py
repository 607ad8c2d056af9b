"""The README's main job, `medisyn demo --quick`, end to end (opt-in: ~6 minutes on 2 cores).

Run with ``MEDISYN_SLOW=1 .venv/bin/python -m pytest tests/integration/test_demo.py``.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from medisyn.procs import child_env, executable

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(1500)
def test_quick_demo_ends_with_release_report(tmp_path):
    if os.environ.get("MEDISYN_SLOW") != "1":
        pytest.skip("slow: set MEDISYN_SLOW=1")
    from medisyn.audit.report import ReleaseReport

    out = tmp_path / "demo"
    res = subprocess.run([executable("medisyn"), "demo", "--quick", "--out", str(out)], env=child_env(),
                         capture_output=True, text=True, timeout=1400, start_new_session=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summary = json.loads((out / "demo-summary.json").read_text())
    assert (out / "run" / "model" / "model_index.json").is_file()
    assert all((out / "samples" / s / "grid.png").is_file() for s in ("breast-us", "chest-xray", "fundus", "dermoscopy"))
    rep = ReleaseReport.model_validate_json((out / "release" / "release_report.json").read_text())
    assert {a.site_id for a in rep.sites} == {"breast-us", "chest-xray", "fundus", "dermoscopy"}
    assert rep.privacy["breast-us"].dp is True and 0 < rep.privacy["breast-us"].epsilon <= 10
    assert summary["release_gate_passed"] == rep.gate.passed
    assert "release report:" in res.stdout and "release/release_report.html" in res.stdout
