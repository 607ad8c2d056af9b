"""Tiny models, data and losses for privacy tests, the kill test's child and the bench.

Not used in production code paths; kept here (not in tests/) so that subprocesses and
``bench/dp_overhead.py`` can import it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset


def tiny_unet(seed: int = 0, sample_size: int = 8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )


def tiny_vae(seed: int = 0, sample_size: int = 16):
    """A small AutoencoderKL with the standard blocks, incl. the mid-block attention."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )


class ToyLatents(Dataset):
    """Deterministic random "latents", "images", per-record text embeddings and prompts."""

    def __init__(self, n: int = 64, *, latent_size: int = 8, image_size: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, 4, latent_size, latent_size, generator=g)
        self.images = torch.rand(n, 3, image_size, image_size, generator=g) * 2 - 1
        self.text = torch.randn(n, 3, 32, generator=g)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "latent": self.latents[i],
            "image": self.images[i],
            "text": self.text[i],
            "prompt": f"record {i}",
            "label": None,
            "index": i,
        }


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


def unet_loss(
    unet, batch: dict[str, Any], *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DDPM-style ε-prediction loss (mean over the batch of per-record means)."""
    x0 = batch["latent"]
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, 1000, (b,), generator=generator)
    alpha = torch.cos(t.float() / 1000 * torch.pi / 2).view(b, 1, 1, 1)
    xt = alpha * x0 + (1 - alpha**2).sqrt() * noise
    pred = unet(xt, t, encoder_hidden_states=batch["text"]).sample
    return ((pred - noise) ** 2).mean()


def vae_loss(vae, batch: dict[str, Any], kl_weight: float = 1e-6) -> torch.Tensor:
    post = vae.encode(batch["image"]).latent_dist
    rec = vae.decode(post.sample()).sample
    return ((rec - batch["image"]) ** 2).mean() + kl_weight * post.kl().mean()
