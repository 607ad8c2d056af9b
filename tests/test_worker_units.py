"""The site worker's own logic without daemons: which FAB it accepts, how it dispatches
tasks, the SuperExec secret, the SuperNode argv, and the warm cache's keys."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DEMO_DATA, tiny_model_config

from medisyn.errors import ConfigError


def write_site(tmp: Path, site_id: str = "fundus") -> Path:
    d = tmp / site_id
    d.mkdir(parents=True, exist_ok=True)
    ds = (DEMO_DATA / site_id / "dataset.toml").read_text()
    ds = ds.replace('path = "dataset.npz"', f'path = "{(DEMO_DATA / site_id / "dataset.npz").as_posix()}"')
    (d / "site.toml").write_text(f'[site]\nid = "{site_id}"\nstate_dir = "state"\n\n{ds}\n'
                                 '[superlink]\naddress = "127.0.0.1:9092"\ninsecure = true\n')
    return d / "site.toml"


# --------------------------------------------------------------------------- the FAB


def test_expected_hash_is_the_hash_of_the_fab_the_server_submits(tmp_path):
    """The worker's expected hash is what `flwr run` computes for the app that
    medisyn-server writes to RUN_DIR/app (built by Flower's own builder)."""
    from flwr.cli.build import build_fab_from_disk
    from medisyn.client.worker import fab_hash
    from medisyn.server.config import FederationConfig
    from medisyn.server.supervisor import ServerSupervisor

    cfg = FederationConfig(rounds=1, local_steps=1, sites=["a"], min_sites=1, run_dir=tmp_path / "run")
    sup = ServerSupervisor(cfg, echo=lambda _m: None)
    sup.write_flwr_home_and_app()
    submitted = hashlib.sha256(build_fab_from_disk(cfg.run_dir / "app")).hexdigest()
    assert fab_hash() == submitted
    assert fab_hash() == fab_hash()  # deterministic


def test_a_fab_naming_another_clientapp_or_shipping_code_has_another_hash(tmp_path):
    from medisyn.client.worker import fab_hash, shipped_fab_dir

    ours = fab_hash()
    text = (shipped_fab_dir() / "pyproject.toml").read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / "pyproject.toml").write_text(text.replace('clientapp = "medisyn.client.app:app"',
                                                       'clientapp = "evil:app"'))
    assert fab_hash(other) != ours
    shipping = tmp_path / "shipping"
    shipping.mkdir()
    (shipping / "pyproject.toml").write_text(text)
    (shipping / "evil.py").write_text("print('hi')\n")
    assert fab_hash(shipping) != ours


def test_refusal_reason():
    from medisyn.client.worker import refusal

    assert refusal("a" * 64, "a" * 64, site_id="s", run_id=7) is None
    why = refusal("b" * 64, "a" * 64, site_id="s", run_id=7)
    assert why is not None and "site s refused run 7" in why and "bbbbbbbbbbbbbbbb" in why and "aaaa" in why
    assert "not the medisyn FAB" in why
    assert refusal(None, "a" * 64, site_id="s", run_id=7) is not None  # no hash: refused
    assert refusal("", "a" * 64, site_id="s", run_id=7) is not None


# --------------------------------------------------------------------------- dispatch


class _Task(SimpleNamespace):
    def HasField(self, name: str) -> bool:  # noqa: N802
        return getattr(self, name, None) is not None


def _worker(tmp_path, tasks, monkeypatch):
    from medisyn.client import worker as w

    sw = w.SiteWorker(write_site(tmp_path), "127.0.0.1:1", b"secret", expected_fab_hash="a" * 64)
    calls = []
    queue = list(tasks)

    def acquire():
        if not queue:
            sw.stop.set()
            return None
        item = queue.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    monkeypatch.setattr(sw, "acquire", acquire)
    monkeypatch.setattr(sw, "preload", lambda: None)
    monkeypatch.setattr(sw, "refuse", lambda token, reason: calls.append(("refuse", token, reason)))
    monkeypatch.setattr(sw, "run_task", lambda token: calls.append(("run", token)))
    return sw, calls


def test_worker_runs_only_matching_tasks_one_at_a_time(tmp_path, monkeypatch):
    import json

    sw, calls = _worker(tmp_path, [
        (_Task(task_id=1, run_id=10, fab_hash="b" * 64), "t1"),
        None,
        (_Task(task_id=2, run_id=11, fab_hash="a" * 64), "t2"),
        (_Task(task_id=3, run_id=12, fab_hash=None), "t3"),
    ], monkeypatch)
    sw.poll = 0.01
    sw.serve_forever()
    assert [c[:2] for c in calls] == [("refuse", "t1"), ("run", "t2"), ("refuse", "t3")]
    assert "run 10" in calls[0][2] and "run 12" in calls[2][2]
    st = json.loads(sw.status_path.read_text())
    assert st["state"] == "idle" and st["task_id"] is None and st["expected_fab_hash"] == "a" * 64


def test_worker_stops_on_a_rejected_signature(tmp_path, monkeypatch):
    import httpx
    from medisyn.client.worker import WorkerError

    resp = httpx.Response(401, request=httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/acquire-task"))
    sw, calls = _worker(tmp_path, [httpx.HTTPStatusError("401", request=resp.request, response=resp)], monkeypatch)
    with pytest.raises(WorkerError, match="secret file differs"):
        sw.serve_forever()
    assert calls == []


def test_worker_waits_for_an_unreachable_supernode(tmp_path, monkeypatch):
    import httpx

    sw, calls = _worker(tmp_path, [httpx.ConnectError("refused"),
                                   (_Task(task_id=2, run_id=11, fab_hash="a" * 64), "t2")], monkeypatch)
    monkeypatch.setattr(sw.stop, "wait", lambda _t: False)
    sw.serve_forever()
    assert calls == [("run", "t2")]


def test_load_clientapp():
    from medisyn.client.app import app
    from medisyn.client.worker import WorkerError, load_clientapp

    assert load_clientapp() is app
    with pytest.raises(WorkerError, match="module:attribute"):
        load_clientapp("medisyn.client.app")
    with pytest.raises(WorkerError, match="not a flwr ClientApp"):
        load_clientapp("medisyn.client.app:train")


# --------------------------------------------------------------------------- supervisor pieces


def test_secret_file_is_private_random_and_renewed(tmp_path):
    from medisyn.client.supervisor import write_secret

    p = write_secret(tmp_path / "state")
    first = p.read_bytes()
    assert len(first) >= 32 and stat.S_IMODE(p.stat().st_mode) == 0o600
    assert write_secret(tmp_path / "state").read_bytes() != first
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_supernode_argv_isolation(tmp_path):
    from medisyn.client.supervisor import load_site, supernode_argv, worker_argv

    p = write_site(tmp_path)
    site = load_site(p)
    argv = supernode_argv(site, p, 9999, secret_file=tmp_path / "s")
    assert argv[argv.index("--isolation") + 1] == "process"
    assert argv[argv.index("--superexec-auth-secret-file") + 1] == str(tmp_path / "s")
    with pytest.raises(ConfigError, match="secret"):
        supernode_argv(site, p, 9999)
    plain = supernode_argv(site, p, 9999, isolation="subprocess")
    assert "--isolation" not in plain and "--superexec-auth-secret-file" not in plain
    with pytest.raises(ConfigError, match="isolation"):
        supernode_argv(site, p, 9999, isolation="thread")
    w = worker_argv(p, 9999, tmp_path / "s")
    assert w[1:3] == ["-m", "medisyn.client.worker"] and "127.0.0.1:9999" in w and "--clientapp" not in w


# --------------------------------------------------------------------------- warm cache


def test_cache_keys_follow_content(tmp_path):
    from medisyn.client.warm import WarmCache

    c = WarmCache(max_per_kind=1)
    f = tmp_path / "d.bin"
    f.write_bytes(b"one")
    k1 = c.hasher.tree(f)
    assert c.hasher.tree(f) == k1
    f.write_bytes(b"two")  # other content (and size/mtime): another key
    assert c.hasher.tree(f) != k1
    built = []
    assert c.get("x", "k1", lambda: built.append(1) or "v1") == "v1"
    assert c.get("x", "k1", lambda: built.append(1) or "other") == "v1" and built == [1]
    assert c.get("x", "k2", lambda: "v2") == "v2"
    assert c.keys("x") == ["k2"]  # the old entry was dropped
    d = tmp_path / "folder"
    (d / "a").mkdir(parents=True)
    (d / "a" / "x.png").write_bytes(b"1")
    t1 = c.hasher.tree(d)
    (d / "a" / "y.png").write_bytes(b"2")
    assert c.hasher.tree(d) != t1


def test_model_template_is_shared_and_copies_are_fresh(tmp_path):
    import torch
    from medisyn.client.warm import WarmCache

    c = WarmCache()
    cfg = tiny_model_config()
    a = c.components(cfg, 0)
    b = c.components(cfg, 0)
    assert c.misses == 1 and c.hits == 1
    assert a.unet is not b.unet and a.vae is not b.vae
    assert a.text_encoder is b.text_encoder and a.prompt_encoder is b.prompt_encoder  # frozen: shared
    for (k, va), vb in zip(a.unet.state_dict().items(), b.unet.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    with torch.no_grad():
        next(a.unet.parameters()).add_(1.0)  # training one copy leaves the next copy as built
    fresh = c.components(cfg, 0)
    assert torch.equal(next(fresh.unet.parameters()), next(b.unet.parameters()))
    from medisyn.models import build_components

    build_components(cfg, seed=0)
    after_build = torch.rand(4)
    c.components(cfg, 0)  # a hit leaves torch's global RNG as a fresh build does
    assert torch.equal(torch.rand(4), after_build)
    c.components(tiny_model_config(resolution=32), 0)
    c.components(cfg, 1)
    assert c.misses == 3 and len(c.keys("components")) == 2  # other config/seed: other key


def test_dataset_cache_key_covers_config_and_files(tmp_path):
    import shutil

    from medisyn.client.warm import WarmCache

    from medisyn.config import load_site_config

    p = write_site(tmp_path)
    site = load_site_config(p)
    c = WarmCache()
    ds1 = c.dataset(site.dataset, resolution=16, channels=3, splits=["train"])
    assert c.dataset(site.dataset, resolution=16, channels=3, splits=["train"]) is ds1
    assert c.dataset(site.dataset, resolution=16, channels=1, splits=["train"]) is not ds1
    copy = tmp_path / "copy.npz"
    shutil.copy(site.dataset.path, copy)
    moved = site.dataset.model_copy(update={"path": copy})
    k = c.dataset_key(moved, resolution=16, channels=3, splits=["train"])
    copy.write_bytes(copy.read_bytes() + b"\0")  # changed data file: another key
    assert c.dataset_key(moved, resolution=16, channels=3, splits=["train"]) != k
    hflip = site.dataset.model_copy(update={"hflip": not site.dataset.hflip})
    assert c.dataset_key(hflip, resolution=16, channels=3, splits=["train"]) != c.dataset_key(
        site.dataset, resolution=16, channels=3, splits=["train"])
