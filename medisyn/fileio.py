"""Durable file writes shared by the core, the server and the sites.

Every state file MediSyn relies on after a crash (privacy ledger, checkpoints' LATEST,
status, resolved configs, reports) is written with :func:`atomic_write_bytes`: a temp
file in the same directory, fsync, ``os.replace``, then fsync of the directory, so a
reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any, *, indent: int | None = 1) -> None:
    """JSON (sorted keys, no NaN/inf: strict JSON) written with :func:`atomic_write_bytes`."""
    blob = json.dumps(data, indent=indent, sort_keys=True, allow_nan=False).encode() + b"\n"
    atomic_write_bytes(path, blob)


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line (a single write of a complete line, fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with path.open("a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def folder_name(text: str) -> str:
    """A folder name for a label such as an image type (``"breast ultrasound"`` ->
    ``breast-ultrasound``): one folder per dataset of a site that holds several."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "dataset"
