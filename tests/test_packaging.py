"""Both ``pip install .`` and ``pip install -e .`` ship server/client/audit as
``medisyn.server`` / ``medisyn.client`` / ``medisyn.audit`` and never as bare names."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import importlib.util, json, medisyn, medisyn.server, medisyn.client, medisyn.audit, medisyn.data
bare = {n: importlib.util.find_spec(n) is not None for n in ("server", "client", "audit")}
print(json.dumps({"bare": bare, "server": medisyn.server.__file__, "demo": importlib.util.find_spec("medisyn.assets") is not None}))
"""


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_install_imports_namespaced_packages(tmp_path: Path, editable: bool):
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the source tree")
    src = tmp_path / "src"
    # A clean copy of the tracked tree (what a clone holds).
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    venv = tmp_path / "venv"
    # No pip/setuptools of its own: the build uses this environment's setuptools.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # Dependencies come from this environment (no downloads): expose its site-packages.
    sp = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                        text=True, check=True).stdout.strip()
    Path(sp, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--no-index"]
    cmd += ["-e", str(src)] if editable else [str(src)]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=300)
    out = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["bare"] == {"server": False, "client": False, "audit": False}
    where = Path(info["server"])
    assert (where.parent == src / "server") if editable else ("site-packages" in where.parts)
