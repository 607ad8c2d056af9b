"""Generation from prompts with a stock diffusers pipeline over our components.

Every image has its own seed (``seed + k`` for the k-th image of the call), so any
single image is reproducible from its sidecar: same seed, same image.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from medisyn.config import DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INTERVAL, interval_ok, parse_interval  # noqa: F401 (re-exported)
from medisyn.errors import ConfigError
from medisyn.models import Components, pipeline_from

log = logging.getLogger(__name__)

SchedulerName = Literal["dpm", "ddim", "ddpm"]


@dataclass
class Generated:
    image: Image.Image
    prompt: str
    seed: int
    index: int


def sampling_scheduler(c: Components, name: str):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    # Explicit, whatever the model's saved scheduler says: "trailing" spacing starts
    # sampling at t = T (pure noise under the cosine schedule); a model built in memory
    # and the same model loaded from disk then sample identically (the audit's
    # regeneration check relies on it).
    cfg = {k: v for k, v in c.noise_scheduler.config.items() if not k.startswith("_")}
    cfg.update(timestep_spacing="trailing")
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler.from_config(cfg)
    if name == "ddpm":
        return DDPMScheduler.from_config(cfg)
    raise ConfigError(f"unknown scheduler {name!r}; use dpm, ddim or ddpm")


@torch.no_grad()
def generate(
    components: Components,
    prompts: list[str],
    *,
    n_per_prompt: int,
    seed: int = 0,
    steps: int = 25,
    guidance: float = DEFAULT_GUIDANCE,
    scheduler: str = "dpm",
    batch_size: int = 16,
    progress: bool = False,
    grey_types: set[str] | None = None,
    guidance_interval: tuple[float, float] | None = DEFAULT_GUIDANCE_INTERVAL,
) -> list[Generated]:
    """Generate ``n_per_prompt`` images for every prompt, in order.

    ``guidance_interval = (lo, hi)``: classifier-free guidance only at the steps whose
    noise level sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in (lo, hi]; the other
    steps use the conditional prediction alone (Kynkaenniemi et al. 2024, "Applying
    guidance in a limited interval improves sample and distribution quality"). ``None``:
    guidance at every step (the only choice when ``guidance`` <= 1).

    A prompt that names a grey image type (``grey_types``, default: the types the model
    was trained on whose data is grey, from ``components.image_types``) gives a
    channel-equal image (its luminance), as its dataset says, never a colour cast.
    """
    if n_per_prompt < 1:
        raise ConfigError(f"n must be >= 1, got {n_per_prompt}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if not interval_ok(guidance_interval):
        raise ConfigError(f"guidance interval must be finite 0 <= lo < hi, got {guidance_interval}")
    device = next(components.unet.parameters()).device
    grey = grey_types if grey_types is not None else grey_image_types(components)
    pipe = pipeline_from(components, scheduler=sampling_scheduler(components, scheduler))
    pipe.set_progress_bar_config(disable=not progress)
    jobs = [(p, seed + k) for k, p in enumerate(p for p in prompts for _ in range(n_per_prompt))]
    res = components.config.resolution
    out: list[Generated] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(s) for _, s in chunk]
        latents = torch.stack([
            torch.randn((components.latent_channels, res // pipe.vae_scale_factor, res // pipe.vae_scale_factor), generator=g)
            for g in gens
        ]).to(device)
        if guidance_interval is None or guidance <= 1:
            text: dict = {"prompt": [p for p, _ in chunk], "guidance_scale": guidance}
        else:
            text = _interval_guidance(pipe, [p for p, _ in chunk], steps, guidance, guidance_interval, device)
        images = pipe(
            **text,
            num_inference_steps=steps,
            height=res,
            width=res,
            latents=latents,
            generator=gens,
            output_type="pil",
        ).images
        for i, ((p, s), im) in enumerate(zip(chunk, images, strict=True)):
            if is_grey_prompt(p, grey):
                im = im.convert("L").convert("RGB")
            out.append(Generated(image=im, prompt=p, seed=s, index=start + i))
    return out


def _interval_guidance(pipe, prompts: list[str], steps: int, scale: float, interval: tuple[float, float],
                       device) -> dict:
    """The pipeline arguments for guidance at ``scale`` only inside ``interval`` (sigma).

    A step-end callback switches the pipeline between guided steps (the batch doubled with
    the empty prompt's embedding) and conditional-only ones; diffusers reads the guidance
    scale and the embeddings afresh at every step (its own "dynamic classifier-free
    guidance" callback sets ``_guidance_scale`` the same way; tests/test_generate.py checks
    that a full interval is plain guidance bit for bit, so a diffusers change shows)."""
    pipe.scheduler.set_timesteps(steps, device=device)
    ts = [int(t) for t in pipe.scheduler.timesteps]
    abar = pipe.scheduler.alphas_cumprod
    lo, hi = interval
    guided = [lo < math.sqrt((1 - float(abar[t])) / float(abar[t])) <= hi for t in ts]
    cond, uncond = pipe.encode_prompt(prompts, device, 1, True)
    both = torch.cat([uncond, cond])

    def switch(p, i: int, _t, kw: dict) -> dict:
        if i + 1 < len(guided):
            p._guidance_scale = scale if guided[i + 1] else 1.0
            kw["prompt_embeds"] = both if guided[i + 1] else cond
        return kw

    return {"prompt_embeds": cond, "negative_prompt_embeds": uncond,
            "guidance_scale": scale if guided[0] else 1.0,
            "callback_on_step_end": switch, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}


def grey_image_types(components: Components) -> set[str]:
    """Image types the model learnt from grey data (``medisyn.json`` ``image_types``)."""
    return {t for t, info in components.image_types.items() if int(info.get("channels", 3)) == 1}


def is_grey_prompt(prompt: str, grey_types: set[str]) -> bool:
    """Does ``prompt`` name one of ``grey_types`` (case-insensitive, as a whole phrase)?"""
    low = prompt.lower()
    return any(re.search(rf"(^|[^a-z0-9]){re.escape(t.lower())}($|[^a-z0-9])", low) for t in grey_types)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def make_grid(images: list[Image.Image], ncols: int, scale: int = 2) -> Image.Image:
    if not images:
        raise ValueError("no images for a grid")
    w, h = images[0].size
    nrows = math.ceil(len(images) / ncols)
    grid = Image.new("RGB", (ncols * w * scale, nrows * h * scale), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w * scale, h * scale), Image.Resampling.NEAREST),
                   ((i % ncols) * w * scale, (i // ncols) * h * scale))
    return grid


def write_generated(items: list[Generated], out_dir: Path, *, model_hash: str, steps: int, guidance: float,
                    guidance_interval: tuple[float, float] | None, scheduler: str,
                    grid_cols: int | None = None) -> list[Path]:
    """Write PNGs, one JSON sidecar each, and ``grid.png`` (one row per prompt).
    ``guidance_interval`` None: guidance was applied at every step."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, g in enumerate(items):
        stem = f"{k:05d}-{_slug(g.prompt)}"
        png = out_dir / f"{stem}.png"
        g.image.save(png)
        sidecar = {
            "file": png.name,
            "prompt": g.prompt,
            "seed": g.seed,
            "scheduler": scheduler,
            "steps": steps,
            "guidance": guidance,
            "guidance_interval": list(guidance_interval) if guidance_interval is not None else None,
            "model_hash": model_hash,
        }
        (out_dir / f"{stem}.json").write_text(json.dumps(sidecar, indent=2))
        paths.append(png)
    if items:
        per_prompt: dict[str, int] = {}
        for g in items:
            per_prompt[g.prompt] = per_prompt.get(g.prompt, 0) + 1
        cols = grid_cols or max(per_prompt.values())
        make_grid([g.image for g in items], ncols=min(cols, 16)).save(out_dir / "grid.png")
    return paths
