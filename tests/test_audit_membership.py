"""Membership-inference probe: AUC and intervals; the Components adapter."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from medisyn.audit.membership import components_loss_fn, membership_probe


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: one thread is fastest
    yield
    torch.set_num_threads(old)


def _imgs(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(n)]


def test_probe_detects_a_leaky_model_and_not_a_fair_one():
    members, non = _imgs(300, 0), _imgs(300, 1)
    member_set = {m.tobytes() for m in members}
    rng = np.random.default_rng(5)

    def leaky(batch):  # members get a lower loss
        return np.array([rng.normal(0.5 if b.tobytes() in member_set else 1.0, 0.2) for b in batch])

    r = membership_probe(leaky, members, non, n_max=300, n_boot=200)
    assert r["auc"] > 0.9 and r["auc_ci_delong"][0] > 0.85 and r["significant_leak"]
    assert r["tpr_at_1pct_fpr"] > 0.2

    def fair(batch):
        return rng.normal(1.0, 0.2, len(batch))

    r = membership_probe(fair, members, non, n_max=300, n_boot=200)
    assert r["auc_ci_delong"][0] < 0.5 < r["auc_ci_delong"][1]
    assert r["auc_ci_bootstrap"][0] < 0.5 < r["auc_ci_bootstrap"][1]


@dataclass
class _Cfg:
    resolution: int = 16
    channels: int = 1
    prediction_type: str = "epsilon"


def _tiny_components():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=4, layers_per_block=1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)

    class PE:
        def encode(self, texts):
            return torch.stack([torch.full((3, 12), float(len(t) % 7) / 7) for t in texts])

    return SimpleNamespace(vae=vae, unet=unet, noise_scheduler=DDPMScheduler(num_train_timesteps=1000),
                           config=_Cfg(), prompt_encoder=PE(), tokenizer=None, text_encoder=None)


def test_components_adapter_is_deterministic_per_sample():
    c = _tiny_components()
    f = components_loss_fn(c, timesteps=(100, 500))
    imgs = _imgs(5, 2)
    a = f(imgs)
    b = f(list(reversed(imgs)))
    assert a.shape == (5,) and np.all(np.isfinite(a)) and np.all(a > 0)
    np.testing.assert_allclose(a, b[::-1], rtol=1e-4)  # same noise for every image: order-free
    c2 = f(imgs, ["radiology, chest x-ray, normal"] * 5)
    assert c2.shape == (5,)
    r = membership_probe(f, imgs, _imgs(5, 3), n_max=5, n_boot=20)
    assert 0.0 <= r["auc"] <= 1.0 and r["n_members"] == 5


@pytest.mark.slow
def test_real_components_adapter_and_vae_view():
    """The adapter and the VAE view on medisyn's own Components (~40 s: loads MiniLM)."""
    import os

    if os.environ.get("MEDISYN_SLOW") != "1":
        pytest.skip("slow: set MEDISYN_SLOW=1")
    from medisyn.audit.embedders import VAEEmbedder

    from medisyn.config import ModelConfig, UNetConfig, VAEConfig
    from medisyn.models import build_components

    cfg = ModelConfig(resolution=16, channels=1,
                      vae=VAEConfig(block_out_channels=(8, 8), norm_num_groups=4),
                      unet=UNetConfig(block_out_channels=(16, 16), cross_attention=(True, True),
                                      norm_num_groups=4, attention_head_dim=4))
    c = build_components(cfg)
    imgs = _imgs(6, 7)
    f = components_loss_fn(c)
    a = f(imgs, ["radiology, chest x-ray, normal"] * 6)
    assert a.shape == (6,) and np.all(np.isfinite(a))
    np.testing.assert_allclose(a, f(imgs, ["radiology, chest x-ray, normal"] * 6), rtol=1e-5)
    v = VAEEmbedder(c.vae, resolution=16, channels=1)
    v.fit(imgs)
    e = v.embed(imgs)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
