"""Local training on real data: the loss falls, checkpoints resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medisyn.config import TrainConfig, load_dataset_config
from medisyn.data import load_dataset
from medisyn.models import build_components, set_latent_scale, state_hash
from medisyn.train import evaluate_loss, train_local


@pytest.fixture
def breast_ds(demo_site_toml, tiny_cfg):
    """Real BreastMNIST, as vendored for the demo (always present, unlike ../shared/data)."""
    cfg = load_dataset_config(demo_site_toml)
    return load_dataset(cfg, resolution=tiny_cfg.resolution, channels=3, splits=["train"])


def test_training_lowers_loss_on_real_data(breast_ds, tiny_cfg):
    torch.manual_seed(0)
    c = build_components(tiny_cfg)
    cfg = TrainConfig(batch_size=16, vae_lr=3e-3, lr=1e-3)
    before = evaluate_loss(c, breast_ds, stage="vae", max_batches=2)
    r = train_local(c, breast_ds, steps=25, config=cfg, stage="vae", progress=False)
    after = evaluate_loss(c, breast_ds, stage="vae", max_batches=2)
    assert after < 0.6 * before, (before, after)
    assert r.metrics["num-examples"] == len(breast_ds) and r.metrics["steps"] == 25
    set_latent_scale(c, r.metrics["latent-std"])
    before = evaluate_loss(c, breast_ds, stage="unet", max_batches=2)
    train_local(c, breast_ds, steps=25, config=cfg, stage="unet", progress=False)
    after = evaluate_loss(c, breast_ds, stage="unet", max_batches=2)
    assert after < before, (before, after)


def test_only_the_stage_weights_change(breast_ds, tiny_cfg):
    c = build_components(tiny_cfg)
    vae_before = state_hash(c.vae.state_dict())
    text_before = state_hash(c.text_encoder.state_dict())
    r = train_local(c, breast_ds, steps=2, config=TrainConfig(batch_size=8), stage="unet", progress=False)
    assert state_hash(c.vae.state_dict()) == vae_before
    assert state_hash(c.text_encoder.state_dict()) == text_before
    assert set(r.state) == set(c.unet.state_dict())


def test_seeded_training_is_deterministic(breast_ds, tiny_cfg):
    results = []
    for _ in range(2):
        c = build_components(tiny_cfg, seed=1)
        results.append(train_local(c, breast_ds, steps=3, config=TrainConfig(batch_size=8, seed=5), stage="unet", progress=False))
    assert state_hash(results[0].state) == state_hash(results[1].state)


def test_resume_equals_uninterrupted(tmp_path: Path, breast_ds, tiny_cfg):
    cfg = TrainConfig(batch_size=8, checkpoint_every=2, ema_decay=0.9)
    full = train_local(build_components(tiny_cfg, seed=1), breast_ds, steps=4, config=cfg, stage="unet",
                       progress=False, checkpoint_dir=tmp_path / "a")
    # "Crash" after step 2: train only 2 steps (checkpoint at 2), then resume to 4.
    c = build_components(tiny_cfg, seed=1)
    train_local(c, breast_ds, steps=2, config=cfg, stage="unet", progress=False, checkpoint_dir=tmp_path / "b")
    assert (tmp_path / "b" / "unet-latest" / "weights.safetensors").is_file()
    resumed = train_local(build_components(tiny_cfg, seed=1), breast_ds, steps=4, config=cfg, stage="unet",
                          progress=False, checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed.metrics["steps"] == 2
    for k in full.state:
        torch.testing.assert_close(full.state[k], resumed.state[k], rtol=1e-5, atol=1e-6)


def test_nan_loss_is_an_error(breast_ds, tiny_cfg):
    c = build_components(tiny_cfg)
    with torch.no_grad():
        next(c.unet.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train_local(c, breast_ds, steps=1, config=TrainConfig(batch_size=4), stage="unet", progress=False)


def test_cli_train_two_stages_then_generate(tmp_path: Path, demo_site_toml: Path):
    import json
    import subprocess
    import sys

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        "[model]\nresolution = 16\n[model.vae]\nblock_out_channels = [8, 16]\nnorm_num_groups = 8\n"
        "[model.unet]\nblock_out_channels = [16, 32]\nnorm_num_groups = 8\ncross_attention = [true, true]\n"
        "[train]\nbatch_size = 8\n"
    )
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "medisyn.cli", "train", "--data", str(demo_site_toml), "--out", str(out),
                        "--steps", "2", "--config", str(cfg)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"vae", "unet"} and metrics["unet"]["steps"] == 2
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["model"]["resolution"] == 16 and len(resolved["hash"]) == 64
    from medisyn.models import load_components

    c = load_components(out / "model")
    assert abs(c.scaling_factor - 1.0 / metrics["vae"]["latent-std"]) < 1e-5
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nbatch_size = 0\n")
    r = subprocess.run([sys.executable, "-m", "medisyn.cli", "train", "--data", str(demo_site_toml), "--out", str(out),
                        "--config", str(bad)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "train.batch_size" not in r.stderr and "batch_size" in r.stderr
    assert "Traceback" not in r.stderr


def test_proximal_term_keeps_weights_closer(breast_ds, tiny_cfg):
    def drift(mu: float) -> float:
        c = build_components(tiny_cfg, seed=2)
        start = {k: v.clone() for k, v in c.unet.state_dict().items()}
        r = train_local(c, breast_ds, steps=4, config=TrainConfig(batch_size=8, lr=5e-3), stage="unet",
                        progress=False, proximal_mu=mu)
        return sum(float((r.state[k] - v).pow(2).sum()) for k, v in start.items())

    assert drift(100.0) < drift(0.0)
