"""Crash-safe checkpoints: every file and directory is fsynced before LATEST moves, and a
torn or missing newest checkpoint falls back to the previous one with a warning."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from medisyn.server import checkpoint as ck
from medisyn.server.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    read_checkpoint,
    write_checkpoint,
)

from medisyn import fileio


def save(d: Path) -> None:
    d.mkdir(parents=True)
    (d / "unet").mkdir()
    (d / "model_index.json").write_text('{"x": 1}')
    (d / "unet" / "weights.safetensors").write_bytes(os.urandom(4096))


def write(run: Path, r: int, keep: int = 3, **kw) -> Path:
    c = Checkpoint(r, "unet", r, [{"round": i} for i in range(1, r + 1)], {"m": 1}, "h", **kw)
    return write_checkpoint(run, c, save, keep=keep)


def three(run: Path) -> Path:
    for r in (1, 2, 3):
        write(run, r, strategy={"class": "FedAdam", "m_t": ["w"]}, strategy_arrays={"m_t/w": np.ones(3)})
    return run / "checkpoints"


def test_every_file_and_directory_is_fsynced_before_latest_moves(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):  # noqa: ANN001, ANN202
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")))
        return real_fsync(fd)

    def rename(a, b):  # noqa: ANN001, ANN202
        events.append(("rename", f"{a} -> {b}"))
        return real_rename(a, b)

    def replace(a, b):  # noqa: ANN001, ANN202
        events.append(("replace", f"{a} -> {b}"))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    final = write(tmp_path, 1, strategy_arrays={"m_t/w": np.ones(3)})
    root = str(tmp_path / "checkpoints")
    i_rename = next(i for i, (k, v) in enumerate(events) if k == "rename" and v.endswith(str(final)))
    i_latest = next(i for i, (k, v) in enumerate(events) if k == "replace" and v.endswith("/LATEST"))
    tmp_dir = events[i_rename][1].split(" -> ")[0]
    synced_before = {v for k, v in events[:i_rename] if k == "fsync"}
    files = [p for p in final.rglob("*")]
    assert files
    for p in files:  # every file and directory of the checkpoint, under its temporary name
        assert str(p).replace(str(final), tmp_dir) in synced_before, p
    assert tmp_dir in synced_before
    # checkpoints/ is fsynced after the rename and before LATEST moves; LATEST's own
    # temp file is fsynced before it replaces LATEST, and checkpoints/ again after
    assert ("fsync", root) in events[i_rename:i_latest]
    latest_tmp = events[i_latest][1].split(" -> ")[0]
    assert ("fsync", latest_tmp) in events[i_rename:i_latest]
    assert ("fsync", root) in events[i_latest:]


def test_newest_is_read_and_verified(tmp_path):
    root = three(tmp_path)
    c = latest_checkpoint(tmp_path)
    assert c.round == 3 and c.path == root / "round-0003" and c.metrics[-1] == {"round": 3}
    np.testing.assert_array_equal(c.strategy_arrays["m_t/w"], np.ones(3))
    state = json.loads((root / "round-0003" / "state.json").read_text())
    assert set(state["files"]) == {"model/model_index.json", "model/unet/weights.safetensors",
                                   "strategy.safetensors"}


def tear_state(d: Path) -> None:
    p = d / "state.json"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def truncate_weights(d: Path) -> None:
    p = d / "model" / "unet" / "weights.safetensors"
    p.write_bytes(p.read_bytes()[:100])


def zero_block(d: Path) -> None:  # same size, a block of zeros (ext4 after a power loss)
    p = d / "model" / "unet" / "weights.safetensors"
    b = bytearray(p.read_bytes())
    b[1024:2048] = bytes(1024)
    p.write_bytes(bytes(b))


def drop_model_file(d: Path) -> None:
    (d / "model" / "model_index.json").unlink()


def tear_strategy(d: Path) -> None:
    p = d / "strategy.safetensors"
    p.write_bytes(p.read_bytes()[:10])


def remove_dir(d: Path) -> None:
    import shutil

    shutil.rmtree(d)


def empty_state(d: Path) -> None:
    (d / "state.json").write_text("")


@pytest.mark.parametrize("tear", [tear_state, truncate_weights, zero_block, drop_model_file, tear_strategy,
                                  remove_dir, empty_state])
def test_torn_or_missing_newest_falls_back_to_previous_with_a_warning(tmp_path, caplog, tear):
    root = three(tmp_path)
    tear(root / "round-0003")
    with caplog.at_level(logging.WARNING, logger="medisyn.server.checkpoint"):
        c = latest_checkpoint(tmp_path)
    assert c.round == 2 and c.path == root / "round-0002" and c.metrics[-1] == {"round": 2}
    assert "round-0003" in caplog.text and "falling back" in caplog.text


def test_two_torn_checkpoints_fall_back_two(tmp_path, caplog):
    root = three(tmp_path)
    tear_state(root / "round-0003")
    truncate_weights(root / "round-0002")
    assert latest_checkpoint(tmp_path).round == 1


def test_all_torn_is_no_checkpoint(tmp_path, caplog):
    root = three(tmp_path)
    for d in root.glob("round-*"):
        tear_state(d)
    with caplog.at_level(logging.WARNING, logger="medisyn.server.checkpoint"):
        assert latest_checkpoint(tmp_path) is None
    assert "no checkpoint" in caplog.text


def test_missing_or_garbage_latest_uses_newest_that_verifies(tmp_path, caplog):
    root = three(tmp_path)
    (root / "LATEST").unlink()
    with caplog.at_level(logging.WARNING, logger="medisyn.server.checkpoint"):
        assert latest_checkpoint(tmp_path).round == 3
    assert "LATEST is missing" in caplog.text
    (root / "LATEST").write_text("../../etc\n")
    assert latest_checkpoint(tmp_path).round == 3
    (root / "LATEST").write_bytes(b"")
    assert latest_checkpoint(tmp_path).round == 3


def test_latest_pointing_at_an_older_round_ignores_newer_dirs(tmp_path):
    """A round-N dir renamed into place but LATEST not yet moved (crash in between) is
    not used ahead of LATEST: LATEST decides, older ones are the fallback."""
    root = three(tmp_path)
    fileio.atomic_write_text(root / "LATEST", "round-0002\n")
    assert latest_checkpoint(tmp_path).round == 2


def test_rerun_of_a_round_replaces_it_and_leaves_no_temporaries(tmp_path):
    root = three(tmp_path)
    write(tmp_path, 3)
    assert latest_checkpoint(tmp_path).round == 3
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_crash_before_rename_leaves_previous_checkpoint(tmp_path, monkeypatch):
    three(tmp_path)

    def boom(*_a):  # noqa: ANN002, ANN202
        raise OSError("power loss")

    monkeypatch.setattr(ck, "fsync_tree", boom)
    with pytest.raises(OSError):
        write(tmp_path, 4)
    assert latest_checkpoint(tmp_path).round == 3


def test_checkpoint_without_manifest_still_loads(tmp_path):
    root = three(tmp_path)
    p = root / "round-0003" / "state.json"
    state = json.loads(p.read_text())
    del state["files"]
    p.write_text(json.dumps(state))
    assert read_checkpoint(root / "round-0003").round == 3


def test_state_naming_another_round_is_torn(tmp_path):
    root = three(tmp_path)
    p = root / "round-0003" / "state.json"
    state = json.loads(p.read_text())
    state["round"] = 7
    p.write_text(json.dumps(state))
    assert latest_checkpoint(tmp_path).round == 2
