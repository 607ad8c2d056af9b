"""Find a Debian tool the tests need (chromium, nginx), installing its package with
apt-get where it is missing (CI runs as root on Debian machines). A test is skipped,
saying why, only where apt-get is unavailable (or we are not root)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def ensure_tool(binary: str, package: str, *, extra_dirs: tuple[str, ...] = ("/usr/bin", "/usr/sbin")) -> str:
    def find() -> str | None:
        hit = shutil.which(binary)
        if hit:
            return hit
        return next((str(Path(d) / binary) for d in extra_dirs if (Path(d) / binary).is_file()), None)

    found = find()
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip(f"{binary} is not installed and apt-get is unavailable to install {package}")
    if os.geteuid() != 0:
        pytest.skip(f"{binary} is not installed and installing {package} with apt-get needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in ([apt, "install", "-y", "-q", package], [apt, "update", "-q"],
                [apt, "install", "-y", "-q", package]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        log.append(f"$ {' '.join(cmd)} -> {res.returncode}\n{res.stdout[-1500:]}{res.stderr[-1500:]}")
        if cmd[1] == "install" and res.returncode == 0:
            break
    found = find()
    if not found:
        pytest.fail(f"apt-get could not install {package}:\n" + "\n".join(log))
    return found
