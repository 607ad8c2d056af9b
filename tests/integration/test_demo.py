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
    # one grid per image type; chest X-ray once although two sites hold it
    grids = ["breast-us", "chest-xray", "eye-skin/fundus-photograph", "eye-skin/dermoscopy"]
    assert sorted(p.parent.relative_to(out / "samples").as_posix() for p in (out / "samples").rglob("grid.png")) == sorted(grids)
    rep = ReleaseReport.model_validate_json((out / "release" / "release_report.json").read_text())
    # one aggregate per dataset: the eye-skin site audits its fundus and dermoscopy data apart
    assert sorted((a.site_id, a.dataset) for a in rep.sites) == sorted([
        ("breast-us", "breast ultrasound"), ("chest-xray", "paediatric chest X-ray"),
        ("chest-xray-dp", "paediatric chest X-ray"), ("eye-skin", "dermoscopy"), ("eye-skin", "fundus photograph")])
    assert rep.privacy["chest-xray-dp"].dp is True and 0 < rep.privacy["chest-xray-dp"].epsilon <= 10
    assert not rep.privacy["chest-xray"].dp
    evaluation = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert {"paediatric chest X-ray @ chest-xray", "paediatric chest X-ray @ chest-xray-dp",
            "fundus photograph", "dermoscopy", "breast ultrasound"} == set(evaluation["types"])
    assert summary["release_gate_passed"] == rep.gate.passed
    assert "release report:" in res.stdout and "release/release_report.html" in res.stdout
