"""Per-round checkpoints of a federated run, written durably (no pickle).

Layout under ``RUN_DIR/checkpoints/``::

    round-0003/
        model/                  global model, diffusers layout (medisyn.models.save_components)
        strategy.safetensors    server optimiser state (FedAdam moments), if any
        state.json              round, stage, strategy state, metrics so far, config + hash,
                                and ``files``: size and sha256 of every other file
    LATEST                      name of the newest complete checkpoint

Write order (a power loss at any point leaves a checkpoint ``--resume`` can use):

1. everything is written under a temporary name ``.round-0003.*``;
2. every file in it is fsynced (and hashed into ``state.json``), then ``state.json``
   itself, then every directory in it, bottom-up;
3. it is renamed to ``round-0003`` and ``checkpoints/`` is fsynced;
4. only then does ``LATEST`` move (temp file, fsync, rename, fsync of ``checkpoints/``).

Reading (:func:`latest_checkpoint`) verifies the checkpoint LATEST names — ``state.json``
parses, names its own round, and every listed file has its size and sha256 — and when it
is torn or missing falls back, with a warning, to the newest older checkpoint that
verifies (also when LATEST itself is missing or names nothing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medisyn.fileio import append_jsonl, atomic_write_text, fsync_dir  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

LATEST = "LATEST"
STATE = "state.json"


@dataclass
class Checkpoint:
    round: int
    stage: str
    stage_round: int
    metrics: list[dict[str, Any]]
    config: dict[str, Any]
    config_hash: str
    strategy: dict[str, Any] = field(default_factory=dict)
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None

    @property
    def model_dir(self) -> Path:
        assert self.path is not None
        return self.path / "model"


class TornCheckpoint(Exception):
    """A checkpoint directory that is incomplete or does not match its manifest."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sync_file(path: Path) -> tuple[int, str]:
    """fsync ``path``; return its (size, sha256)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return size, h.hexdigest()


def fsync_tree(root: Path) -> dict[str, list[Any]]:
    """fsync every file under ``root`` and then every directory, bottom-up (``root``
    last); return ``{relative path: [size, sha256]}`` of the files."""
    root = Path(root)
    files: dict[str, list[Any]] = {}
    dirs: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        dirs.append(Path(dirpath))
        for name in filenames:
            p = Path(dirpath) / name
            size, digest = _sync_file(p)
            files[p.relative_to(root).as_posix()] = [size, digest]
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)
    return files


def write_checkpoint(
    run_dir: Path,
    ckpt: Checkpoint,
    save_model: Callable[[Path], None],
    *,
    keep: int = 2,
) -> Path:
    """Write ``ckpt`` (``save_model(dir)`` writes the model) durably, then point LATEST at it."""
    from safetensors.numpy import save_file

    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    fsync_dir(root.parent)
    name = f"round-{ckpt.round:04d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_model(tmp / "model")
        if ckpt.strategy_arrays:
            save_file(
                {k: np.ascontiguousarray(v) for k, v in ckpt.strategy_arrays.items()},
                str(tmp / "strategy.safetensors"),
            )
        files = fsync_tree(tmp)  # every file durable before the manifest that lists it
        state = {
            "round": ckpt.round,
            "stage": ckpt.stage,
            "stage_round": ckpt.stage_round,
            "strategy": ckpt.strategy,
            "metrics": ckpt.metrics,
            "config": ckpt.config,
            "config_hash": ckpt.config_hash,
            "files": files,
        }
        with open(tmp / STATE, "w") as f:
            f.write(json.dumps(state, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        old = None
        if final.exists():  # a rerun of the same round after a crash: replace it
            old = root / f".{name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, name + "\n")  # fsyncs the file and checkpoints/
    _prune(root, keep=keep, current=name)
    return final


def _prune(root: Path, *, keep: int, current: str) -> None:
    rounds = sorted(p for p in root.glob("round-*") if p.is_dir())
    for p in rounds[:-keep]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".round-*"):  # leftovers of a crash mid-write
        shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(path: Path, *, verify: bool = True) -> Checkpoint:
    """Load the checkpoint in ``path``; :class:`TornCheckpoint` says what is wrong with it."""
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
        rnd = int(state["round"])
        stage, stage_round = str(state["stage"]), int(state["stage_round"])
        metrics, config, config_hash = list(state["metrics"]), dict(state["config"]), str(state["config_hash"])
    except FileNotFoundError:
        raise TornCheckpoint(f"{path}: no {STATE}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise TornCheckpoint(f"{path}/{STATE} is unreadable or incomplete: {type(e).__name__}: {e}") from None
    if path.name.startswith("round-") and path.name != f"round-{rnd:04d}":
        raise TornCheckpoint(f"{path}/{STATE} says round {rnd}")
    files = state.get("files")
    if verify and files is not None:  # checkpoints written before manifests have none
        for rel, (size, digest) in sorted(files.items()):
            p = path / rel
            if not p.is_file():
                raise TornCheckpoint(f"{path}: {rel} is missing")
            if p.stat().st_size != size:
                raise TornCheckpoint(f"{path}: {rel} has {p.stat().st_size} bytes, expected {size}")
            if _digest(p) != digest:
                raise TornCheckpoint(f"{path}: {rel} does not match its sha256")
    if not (path / "model").is_dir():
        raise TornCheckpoint(f"{path}: no model/")
    arrays: dict[str, np.ndarray] = {}
    if (path / "strategy.safetensors").is_file():
        try:
            arrays = dict(load_file(str(path / "strategy.safetensors")))
        except Exception as e:
            raise TornCheckpoint(f"{path}/strategy.safetensors is unreadable: {e}") from None
    return Checkpoint(
        round=rnd, stage=stage, stage_round=stage_round, metrics=metrics, config=config,
        config_hash=config_hash, strategy=dict(state.get("strategy", {})), strategy_arrays=arrays,
        path=path,
    )


def _round_of(name: str) -> int | None:
    """``round-0012`` -> 12; None for any other name."""
    head, _, num = name.partition("-")
    return int(num) if head == "round" and num.isdigit() else None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint, or None if the run has none.

    Tries the one LATEST names first; if it (or LATEST) is torn or missing, falls back
    with a warning to the newest older ``round-*`` that verifies.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    named: str | None = None
    try:
        named = (root / LATEST).read_text().strip() or None
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        logger.warning("checkpoint pointer %s is unreadable (%s); looking for older checkpoints", root / LATEST, e)
    candidates = sorted((p for p in root.glob("round-*") if p.is_dir() and _round_of(p.name) is not None),
                        key=lambda p: _round_of(p.name), reverse=True)
    if named is not None:
        if _round_of(named) is None:
            logger.warning("checkpoint pointer %s names %r; ignoring it", root / LATEST, named)
            named = None
        else:
            candidates = [root / named] + [p for p in candidates if _round_of(p.name) < _round_of(named)]
    elif candidates:
        logger.warning("%s is missing; looking for the newest checkpoint that verifies", root / LATEST)
    for i, path in enumerate(candidates):
        try:
            ckpt = read_checkpoint(path)
        except TornCheckpoint as e:
            logger.warning("checkpoint %s is torn or missing (%s); falling back to an older one", path.name, e)
            continue
        if i > 0 or named is None:
            logger.warning("resuming from checkpoint %s (round %d), not the newest", path.name, ckpt.round)
        return ckpt
    if candidates:
        logger.warning("no checkpoint in %s verifies; the run has to start again", root)
    return None
