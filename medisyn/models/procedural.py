"""The tiny preset's autoencoder, pretrained on procedurally generated images.

A latent diffusion model needs an autoencoder before its UNet can learn anything. The
``sd`` preset has Stable Diffusion's (pretrained on web images, frozen). The ``tiny``
preset used to learn its own from the sites' data in a first federated stage, and that
stage was the weak link: four sites that each see one image type drift apart within a
round, and the average of their autoencoders reconstructs badly (held-out MSE 0.030 after
10 rounds x 25 steps on the demo data, 0.041 after 3 x 50, against 0.0074 for the same
autoencoder trained centrally; docs/quality.md).

So MediSyn ships a starting point that involves no patient data at all: the default tiny
autoencoder (f = 2, blocks (16, 32)) trained on *procedural* images, generated here from
a seeded random generator. Three quarters of each batch are painted scenes: 1/f^a
textures (a in [1, 3.5], the power law of natural and medical images) painted between
two colours drawn from the whole RGB cube (or grey), stripes, objects with wobbly soft
borders painted in their own colours, a dark circular surround; one quarter are the first
generator's noise scenes (colour-mixed 1/f noise, flat discs). At f = 2 an autoencoder is
nearly a local code (a 2x2 pixel patch -> 4 latent values), so one trained on such images
reconstructs real medical images it has never seen; the sites then only fine-tune it
(stage ``vae``, a few short rounds). The first shipped autoencoder (noise scenes only,
600 steps) turned dark-brown dermoscopy lesions green: its images had few dark saturated
colours, and that error reached every generated image (docs/quality.md).

When loaded, the shipped weights are re-parametrised so that their latents have zero mean
and unit spread per channel on held-out procedural images (``normalize_latent_channels``;
the statistics are in the JSON beside the weights). With one scalar scale instead, the
central model's breast TSTR was 0.64x real and its dermoscopy KID 1.90; per channel,
0.88x and 0.22 (docs/quality.md).

``python -m medisyn.models.procedural --out FILE`` rebuilds the shipped weights
(``medisyn/assets/vae/``): same seed, steps, schedule and generator (bit for bit only on
the same torch build and thread count: the shipped file was made with ``--threads 2``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

# What the shipped file was trained with (and is checked against before it is used).
SHIPPED_NAME = "tiny-f2-procedural"
PRETRAIN = {"steps": 2400, "batch": 64, "lr": 1e-3, "warmup_steps": 50, "schedule": "cosine", "seed": 0,
            "resolution": 32, "kl_weight": 1e-6}


def _freq_radius(res: int) -> torch.Tensor:
    fy = torch.fft.fftfreq(res)[:, None]
    fx = torch.fft.fftfreq(res)[None, :]
    return torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / res)


def _noise(n: int, r: int, alpha: torch.Tensor | float, gen: torch.Generator, ch: int = 1) -> torch.Tensor:
    """Unit-variance 1/f^alpha noise, shape (n, ch, r, r)."""
    spec = torch.randn(n, ch, r, r, dtype=torch.cfloat, generator=gen) / _freq_radius(r) ** alpha
    x = torch.fft.ifft2(spec).real
    return (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-6)


def _u(gen: torch.Generator, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=gen)


def _painted(n: int, r: int, gen: torch.Generator, grey: torch.Tensor) -> torch.Tensor:
    """A 1/f texture painted between two colours drawn from the whole RGB cube: colour that
    varies along one hue direction, as in tissue (skin to a dark-brown lesion, an orange
    retina to a dark vessel), including the dark saturated colours the first generator
    hardly drew (its decoder turned dark-brown lesions green)."""
    alpha = _u(gen, n, 1, 1, 1, lo=1.0, hi=3.5)
    t = (0.5 + _u(gen, n, 1, 1, 1, lo=0.15, hi=0.6) * _noise(n, r, alpha, gen)).clamp(0, 1)
    c0, c1 = _u(gen, n, 3, 1, 1, lo=-1, hi=1), _u(gen, n, 3, 1, 1, lo=-1, hi=1)
    c0[grey] = c0[grey, :1].expand(-1, 3, -1, -1)
    c1[grey] = c1[grey, :1].expand(-1, 3, -1, -1)
    return c0 + t * (c1 - c0)


def _painted_scenes(n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """Painted backgrounds (40% grey), colour noise on some, stripes on a fifth (ribs,
    tissue layers), up to three objects with wobbly soft borders each painted with its own
    colours, a dark circular surround with a soft edge on 30% (fundus, dermoscopy)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, r), torch.linspace(-1, 1, r), indexing="ij")
    grey = torch.rand(n, generator=gen) < 0.4
    x = _painted(n, r, gen, grey)
    noisy = torch.rand(n, generator=gen) < 0.3
    mix = torch.eye(3) + 0.8 * torch.randn(n, 3, 3, generator=gen)
    z = torch.einsum("nij,njhw->nihw", mix, _noise(n, r, _u(gen, n, 1, 1, 1, lo=1.0, hi=3.5), gen, ch=3))
    z[grey] = z[grey, :1].expand(-1, 3, -1, -1)
    x = x + (noisy[:, None, None, None] * _u(gen, n, 1, 1, 1, lo=0.05, hi=0.3)) * z
    stripes = torch.rand(n, generator=gen) < 0.2
    theta = _u(gen, n, 1, 1, lo=0, hi=math.pi)
    freq = _u(gen, n, 1, 1, lo=2, hi=10)
    phase = _u(gen, n, 1, 1, lo=0, hi=2 * math.pi)
    wave = torch.sin(freq * math.pi * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    x = x + (stripes[:, None, None] * _u(gen, n, 1, 1, lo=0.1, hi=0.5) * wave)[:, None]
    for _ in range(3):
        cx, cy = _u(gen, 2, n, 1, 1, lo=-0.8, hi=0.8)
        rx, ry = _u(gen, 2, n, 1, 1, lo=0.08, hi=0.7)
        rot = _u(gen, n, 1, 1, lo=0, hi=math.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * torch.cos(rot) + dy * torch.sin(rot)) / rx
        v = (-dx * torch.sin(rot) + dy * torch.cos(rot)) / ry
        wobble = 1 + _u(gen, n, 1, 1, lo=0, hi=0.5) * _noise(n, r, 3.0, gen)[:, 0]
        d = torch.sqrt(u**2 + v**2) - wobble.clamp_min(0.3)
        mask = torch.sigmoid(-d / _u(gen, n, 1, 1, lo=0.02, hi=0.3)) * (torch.rand(n, 1, 1, generator=gen) < 0.6)
        fill = _painted(n, r, gen, grey)
        x = x + mask[:, None] * (fill - x)
    surround = torch.rand(n, generator=gen) < 0.3
    radius = _u(gen, n, 1, 1, lo=0.7, hi=1.1)
    edge = torch.sigmoid((torch.sqrt(xx**2 + yy**2)[None] - radius) / _u(gen, n, 1, 1, lo=0.005, hi=0.05))
    dark = -1 + _u(gen, n, 1, 1, 1, lo=0, hi=0.15)
    x = torch.where(surround[:, None, None, None], x + edge[:, None] * (dark - x), x)
    return x.clamp(-1, 1)


def _noise_scenes(n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """The first generator: colour-mixed 1/f noise (half grey), flat-coloured discs, a
    hard dark surround on 30%."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, r), torch.linspace(-1, 1, r), indexing="ij")
    alpha = 1.0 + 2.5 * torch.rand(n, 1, 1, 1, generator=gen)
    spec = torch.randn(n, 3, r, r, dtype=torch.cfloat, generator=gen) / _freq_radius(r) ** alpha
    x = torch.fft.ifft2(spec).real
    mix = torch.eye(3) + 0.8 * torch.randn(n, 3, 3, generator=gen)
    grey = torch.rand(n, generator=gen) < 0.5
    x = torch.einsum("nij,njhw->nihw", mix, x)
    x[grey] = x[grey, :1].expand(-1, 3, -1, -1)
    x = (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 1e-6)
    offset = torch.rand(n, 3, 1, 1, generator=gen) - 0.5
    offset[grey] = offset[grey, :1].expand(-1, 3, -1, -1)
    x = x * (0.1 + 0.5 * torch.rand(n, 1, 1, 1, generator=gen)) + offset
    for _ in range(3):  # discs and ellipses, each present in half the images
        cx, cy = torch.rand(2, n, 1, 1, generator=gen) * 2 - 1
        rx, ry = 0.05 + 0.6 * torch.rand(2, n, 1, 1, generator=gen)
        inside = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) < 1
        present = torch.rand(n, 1, 1, generator=gen) < 0.5
        value = torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1
        value[grey] = value[grey, :1].expand(-1, 3, -1, -1)
        x = torch.where((inside & present)[:, None], 0.5 * x + value, x)
    surround = torch.rand(n, generator=gen) < 0.3  # a dark circular surround
    radius = 0.7 + 0.4 * torch.rand(n, 1, 1, generator=gen)
    outside = (xx**2 + yy**2)[None] > radius**2
    x = torch.where((outside & surround[:, None, None])[:, None], torch.full_like(x, -1.0), x)
    return x.clamp(-1, 1)


def procedural_images(n: int, resolution: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` RGB images in [-1, 1], shape (n, 3, resolution, resolution), from ``gen``:
    the first ``n - n // 4`` painted scenes, the last ``n // 4`` noise scenes."""
    if n < 1 or resolution < 4:
        raise ValueError(f"need n >= 1 and resolution >= 4, got n={n}, resolution={resolution}")
    parts = [_painted_scenes(n - n // 4, resolution, gen)]
    if n // 4:
        parts.append(_noise_scenes(n // 4, resolution, gen))
    return torch.cat(parts)


def shipped_dir() -> Path:
    return Path(str(resources.files("medisyn") / "assets" / "vae"))


def _arch(cfg: Any) -> dict[str, Any]:
    """The architecture fields a shipped autoencoder must match (``cfg``: ModelConfig)."""
    v = cfg.vae
    return {
        "channels": cfg.channels,
        "block_out_channels": list(v.block_out_channels),
        "layers_per_block": v.layers_per_block,
        "latent_channels": v.latent_channels,
        "norm_num_groups": v.norm_num_groups,
        "mid_block_attention": v.mid_block_attention,
    }


def shipped_for(cfg: Any) -> Path | None:
    """The shipped pretrained weights for ``cfg``'s autoencoder architecture, if any."""
    meta = shipped_dir() / f"{SHIPPED_NAME}.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    if info.get("architecture") != _arch(cfg):
        return None
    return shipped_dir() / f"{SHIPPED_NAME}.safetensors"


def load_pretrained(vae: torch.nn.Module, cfg: Any, *, required: bool) -> bool:
    """Load the shipped weights into ``vae`` when they match; ``required``: else raise."""
    from safetensors.torch import load_file

    from medisyn.errors import ConfigError

    path = shipped_for(cfg)
    if path is None or not path.is_file():
        if required:
            meta = shipped_dir() / f"{SHIPPED_NAME}.json"
            have = json.loads(meta.read_text()).get("architecture") if meta.is_file() else "none (not installed)"
            raise ConfigError(
                f"[model.vae] init = \"procedural\": MediSyn ships a pretrained autoencoder only for "
                f"{have}; this config asks for {_arch(cfg)} (use init = \"random\" or \"auto\")"
            )
        return False
    vae.load_state_dict(load_file(str(path)))
    info = json.loads(path.with_suffix(".json").read_text())
    if "latent_channel_mean" in info and "latent_channel_std" in info:
        # Per-channel zero mean and unit variance, as EDM2 normalises SD's latents, baked
        # into the autoencoder's 1x1 convolutions (the diffusers layout keeps only a scalar
        # scale): see normalize_latent_channels.
        normalize_latent_channels(vae, torch.tensor(info["latent_channel_mean"]),
                                  torch.tensor(info["latent_channel_std"]))
    else:  # the latent scale as Stable Diffusion sets it (1 / std of the latents)
        vae.register_to_config(scaling_factor=float(1.0 / info["latent_std"]))
    return True


@torch.no_grad()
def normalize_latent_channels(vae: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Re-parametrise ``vae`` so that its latents are ``(z - mean) / std`` per channel, and
    set its ``scaling_factor`` to 1.

    The shipped autoencoder's raw latents sit at per-channel offsets of 1-3.5 with spreads
    of 0.6-1.5 (held-out procedural images); one scalar scale leaves medical images' latents
    at means near +-1 and a spread of 0.14-0.5 per channel, so the diffusion model saw a
    signal a third of the size its noise schedule assumes. The encoder's last 1x1
    convolution (``quant_conv``: mean and log-variance) and the decoder's first
    (``post_quant_conv``) absorb the affine map exactly: encode-decode is unchanged, and the
    weights stay in diffusers' ``AutoencoderKL`` layout."""
    q, pq = vae.quant_conv, vae.post_quant_conv
    if q is None or pq is None:
        raise ValueError("normalize_latent_channels needs an autoencoder with quant_conv and post_quant_conv")
    k = mean.numel()
    mean, std = mean.to(q.weight), std.to(q.weight)
    if not bool((std > 0).all()):
        raise ValueError(f"latent channel std must be positive, got {std.tolist()}")
    q.weight[:k] /= std[:, None, None, None]
    q.bias[:k] = (q.bias[:k] - mean) / std
    q.bias[k:] -= 2 * torch.log(std)  # log-variance of (z - mean) / std
    pq.bias += (pq.weight[:, :, 0, 0] @ mean)
    pq.weight *= std[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)


def _warmup_cosine(steps: int, warmup: int) -> Any:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 1% of the rate."""
    def factor(s: int) -> float:
        return min(1.0, (s + 1) / max(warmup, 1)) * (0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.99
                                                      + 0.01)
    return factor


def pretrain(cfg: Any, *, steps: int, batch: int, lr: float, seed: int, kl_weight: float,
             warmup_steps: int = 50, log_every: int = 100) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train ``cfg``'s autoencoder (random init) on procedural images only (AdamW,
    warm-up and cosine decay)."""
    from medisyn.models.components import build_components

    comps = build_components(cfg.model_copy(update={"vae": cfg.vae.model_copy(update={"init": "random"})}), seed=seed)
    vae = comps.vae
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps, warmup_steps))
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x = procedural_images(batch, cfg.resolution, gen)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = (rec - x).pow(2).mean() + kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s", flush=True)
    state = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    return state, {**heldout_stats(vae, cfg.resolution, seed), "seconds": round(time.perf_counter() - t0, 1)}


def heldout_stats(vae: torch.nn.Module, resolution: int, seed: int) -> dict[str, Any]:
    """Reconstruction MSE and latent std on 256 held-out procedural images (seed + 1), and
    the per-channel mean and std of the latents of 1024 more (seed + 2)."""
    held = procedural_images(256, resolution, torch.Generator().manual_seed(seed + 1))
    more = procedural_images(1024, resolution, torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        mean = vae.encode(held).latent_dist.mean
        mse = float((vae.decode(mean).sample - held).pow(2).mean())
        lat = torch.cat([vae.encode(x).latent_dist.mean for x in more.split(256)])
    return {"procedural_heldout_mse": round(mse, 6), "latent_std": round(float(mean.std()), 6),
            "latent_channel_mean": [round(float(v), 6) for v in lat.mean((0, 2, 3))],
            "latent_channel_std": [round(float(v), 6) for v in lat.std((0, 2, 3))]}


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from medisyn.config import ModelConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=shipped_dir() / f"{SHIPPED_NAME}.safetensors")
    p.add_argument("--steps", type=int, default=PRETRAIN["steps"])
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = ModelConfig(resolution=PRETRAIN["resolution"])
    params = {**PRETRAIN, "steps": a.steps}
    state, info = pretrain(cfg, **{k: v for k, v in params.items() if k not in ("resolution", "schedule")})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(a.out))
    a.out.chmod(0o644)  # package data: readable by the site daemon's user
    meta = {"name": SHIPPED_NAME, "architecture": _arch(cfg), "pretrain": params, **info,
            "data": "procedural images only (medisyn.models.procedural.procedural_images); no patient data"}
    a.out.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"wrote {a.out} ({info})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
