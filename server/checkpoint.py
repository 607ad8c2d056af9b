"""Per-round checkpoints of a federated run, written atomically (no pickle).

Layout under ``RUN_DIR/checkpoints/``::

    round-0003/
        model/                  global model, diffusers layout (medisyn.models.save_components)
        strategy.safetensors    server optimiser state (FedAdam moments), if any
        state.json              round, stage, strategy state, metrics so far, config + hash
    LATEST                      name of the newest complete checkpoint

A checkpoint directory is built under a temporary name and renamed into place, then
``LATEST`` is replaced atomically, so a crash at any point leaves the previous
checkpoint intact and ``--resume`` never sees a half-written one.
"""

from __future__ import annotations

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

from medisyn.fileio import append_jsonl, atomic_write_text  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

LATEST = "LATEST"


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


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def write_checkpoint(
    run_dir: Path,
    ckpt: Checkpoint,
    save_model: Callable[[Path], None],
    *,
    keep: int = 2,
) -> Path:
    """Write ``ckpt`` (``save_model(dir)`` writes the model) and point LATEST at it."""
    from safetensors.numpy import save_file

    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
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
        state = {
            "round": ckpt.round,
            "stage": ckpt.stage,
            "stage_round": ckpt.stage_round,
            "strategy": ckpt.strategy,
            "metrics": ckpt.metrics,
            "config": ckpt.config,
            "config_hash": ckpt.config_hash,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        if final.exists():  # a rerun of the same round after a crash: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, name + "\n")
    _prune(root, keep=keep, current=name)
    return final


def _prune(root: Path, *, keep: int, current: str) -> None:
    rounds = sorted(p for p in root.glob("round-*") if p.is_dir())
    for p in rounds[:-keep]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".round-*"):  # leftovers of a crash mid-write
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint, or None if the run has none."""
    from safetensors.numpy import load_file

    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    state_file = path / "state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    arrays: dict[str, np.ndarray] = {}
    if (path / "strategy.safetensors").is_file():
        arrays = dict(load_file(str(path / "strategy.safetensors")))
    return Checkpoint(
        round=int(state["round"]),
        stage=state["stage"],
        stage_round=int(state["stage_round"]),
        metrics=list(state["metrics"]),
        config=state["config"],
        config_hash=state["config_hash"],
        strategy=dict(state.get("strategy", {})),
        strategy_arrays=arrays,
        path=path,
    )
