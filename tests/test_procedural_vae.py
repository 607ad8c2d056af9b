"""The tiny preset's autoencoder pretrained on procedural images (no patient data)."""

from __future__ import annotations

import json

import pytest
import torch
from medisyn.server.demo import demo_assets
from safetensors.torch import load_file

from medisyn.config import ModelConfig, VAEConfig, load_dataset_config
from medisyn.data import load_dataset
from medisyn.errors import ConfigError
from medisyn.models import build_components
from medisyn.models.procedural import SHIPPED_NAME, procedural_images, shipped_dir, shipped_for

SITES = ("breast-us", "chest-xray", "fundus", "dermoscopy")


def test_procedural_images_are_seeded_and_in_range():
    a = procedural_images(64, 32, torch.Generator().manual_seed(3))
    b = procedural_images(64, 32, torch.Generator().manual_seed(3))
    c = procedural_images(64, 32, torch.Generator().manual_seed(4))
    assert a.shape == (64, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    grey = (a[:, 0] == a[:, 1]).flatten(1).all(1) & (a[:, 1] == a[:, 2]).flatten(1).all(1)
    assert 0.2 < grey.float().mean() < 0.8  # both grey and colour images
    with pytest.raises(ValueError, match="resolution"):
        procedural_images(2, 2, torch.Generator())


def test_default_tiny_model_starts_from_the_shipped_autoencoder():
    cfg = ModelConfig()
    path = shipped_for(cfg)
    assert path is not None and path.is_file()
    info = json.loads((shipped_dir() / f"{SHIPPED_NAME}.json").read_text())
    assert "no patient data" in info["data"]
    c = build_components(cfg)
    shipped = load_file(str(path))
    # every weight as shipped, except the two 1x1 convolutions that absorb the per-channel
    # latent normalisation (test_shipped_latents_are_normalised_per_channel)
    reparam = ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias")
    assert all(torch.equal(c.vae.state_dict()[k], v) for k, v in shipped.items() if k not in reparam)
    assert c.vae.config.scaling_factor == 1.0
    rnd = build_components(cfg.model_copy(update={"vae": cfg.vae.model_copy(update={"init": "random"})}))
    assert not torch.equal(rnd.vae.state_dict()["encoder.conv_in.weight"], shipped["encoder.conv_in.weight"])


def test_shipped_latents_are_normalised_per_channel():
    """The shipped autoencoder's latents have per-channel zero mean and unit std on held-out
    procedural images, its reconstructions are those of the raw shipped weights, and real
    medical images land near the same scale (raw: channel means of +-1 to +-3.5 in units
    of a scalar-scaled std, channel spreads of 0.14-0.5)."""
    from medisyn.models.procedural import normalize_latent_channels

    cfg = ModelConfig()
    norm = build_components(cfg).vae
    raw = build_components(cfg.model_copy(update={"vae": cfg.vae.model_copy(update={"init": "random"})})).vae
    raw.load_state_dict(load_file(str(shipped_for(cfg))))
    x = procedural_images(512, 32, torch.Generator().manual_seed(11))
    with torch.no_grad():
        z = norm.encode(x).latent_dist
        assert z.mean.mean((0, 2, 3)).abs().max() < 0.15
        assert (z.mean.std((0, 2, 3)) - 1).abs().max() < 0.15
        assert torch.allclose(norm.decode(z.mean).sample, raw.decode(raw.encode(x).latent_dist.mean).sample,
                              atol=1e-4)
        for site in SITES:
            ds = load_dataset(load_dataset_config(demo_assets() / site / "dataset.toml"), resolution=32,
                              channels=3, splits=["train"])
            m = norm.encode(ds.images[:256]).latent_dist.mean
            assert m.mean((0, 2, 3)).abs().max() < 1.0, site
            assert 0.5 < float(m.std((0, 2, 3)).min()) and float(m.std((0, 2, 3)).max()) < 1.5, site
    with pytest.raises(ValueError, match="positive"):
        normalize_latent_channels(raw, torch.zeros(4), torch.tensor([1.0, 0.0, 1.0, 1.0]))


def test_shipped_autoencoder_reconstructs_medical_images_it_never_saw():
    """The promise: a usable autoencoder without patient data, colours included. Measured
    on these images: MSE 0.0014-0.0018; the colour error (4x4-pooled squared error)
    0.0002-0.00045. The first shipped autoencoder: MSE 0.0044-0.011, colour error
    0.0013-0.0071, dark-brown lesions turned green."""
    c = build_components(ModelConfig())
    for site in SITES:
        ds = load_dataset(load_dataset_config(demo_assets() / site / "dataset.toml"), resolution=32, channels=3,
                          splits=["test"])
        x = ds.images[:128]
        with torch.no_grad():
            rec = c.vae.decode(c.vae.encode(x).latent_dist.mean).sample
        mse = float((rec - x).pow(2).mean())
        colour = float(torch.nn.functional.avg_pool2d(rec - x, 4).pow(2).mean())
        assert mse < 0.004, f"{site}: reconstruction MSE {mse:.4f}"
        assert colour < 0.0012, f"{site}: colour error {colour:.4f}"


def test_pretraining_learns_from_procedural_images_alone():
    """``pretrain`` (what ``python -m medisyn.models.procedural`` runs): a few warm-up and
    cosine steps on painted and noise scenes lower the held-out error of a random
    autoencoder; both kinds of scene are in every batch of 4 or more."""
    from medisyn.models.procedural import _noise_scenes, _painted_scenes, heldout_stats, pretrain

    cfg = ModelConfig(vae=VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, init="random"))
    before = heldout_stats(build_components(cfg, seed=0).vae, 32, 0)["procedural_heldout_mse"]
    _state, info = pretrain(cfg, steps=40, batch=16, lr=3e-3, seed=0, kl_weight=1e-6, warmup_steps=5, log_every=0)
    assert info["procedural_heldout_mse"] < 0.5 * before
    x = procedural_images(8, 32, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(x[:6], _painted_scenes(6, 32, g))
    assert torch.equal(x[6:], _noise_scenes(2, 32, g))


def test_procedural_init_needs_the_shipped_architecture():
    cfg = ModelConfig(vae=VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, init="procedural"))
    assert shipped_for(cfg) is None
    with pytest.raises(ConfigError, match=r"\[8, 16\]"):
        build_components(cfg)
    build_components(cfg.model_copy(update={"vae": cfg.vae.model_copy(update={"init": "auto"})}))  # falls back


def test_server_check_warns_when_an_untrained_autoencoder_skips_its_stage():
    from medisyn.server.config import FederationConfig, config_warnings

    small = {"vae": {"block_out_channels": [8, 16], "norm_num_groups": 4}}
    warned = config_warnings(FederationConfig(stages=["unet"], model=small))
    assert any("untrained autoencoder" in w for w in warned)
    assert not any("untrained autoencoder" in w for w in config_warnings(FederationConfig(stages=["unet"])))
    assert not any("untrained autoencoder" in w for w in config_warnings(FederationConfig(model=small)))
