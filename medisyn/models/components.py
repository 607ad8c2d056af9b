"""Model presets built from diffusers/transformers classes, saved in diffusers' layout.

- ``tiny``: a small ``AutoencoderKL`` and ``UNet2DConditionModel`` built from config
  (CPU-sized); the VAE is trained on the data first (stage ``vae``), then frozen while
  the UNet trains (stage ``unet``).
- ``sd``: a local Stable-Diffusion-style directory; only the UNet (or LoRA adapters on
  it, ``lora_rank > 0``) is trained.

A saved model is a ``StableDiffusionPipeline`` directory (``model_index.json``, one
subfolder per component, safetensors) plus ``medisyn.json`` (our ModelConfig), so
``diffusers.StableDiffusionPipeline.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medisyn.config import ModelConfig, Stage
from medisyn.errors import ConfigError
from medisyn.models.text import PromptEncoder, load_text_encoder

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MEDISYN_FILE = "medisyn.json"


@dataclass
class Components:
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    config: ModelConfig
    prompt_encoder: PromptEncoder
    # image type -> {"specialty", "channels" (1: grey, generated channel-equal), "prompts"};
    # saved in medisyn.json (see medisyn.data.image_type_info)
    image_types: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def to(self, device: torch.device | str) -> Components:
        self.vae.to(device)
        self.unet.to(device)
        self.text_encoder.to(device)
        return self


def _noise_scheduler(cfg: ModelConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def build_tiny(cfg: ModelConfig, *, seed: int = 0) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder, cfg.max_tokens)
    torch.manual_seed(seed)
    v = cfg.vae
    n = len(v.block_out_channels)
    vae = AutoencoderKL(
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=v.block_out_channels,
        layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels,
        norm_num_groups=v.norm_num_groups,
        sample_size=cfg.resolution,
        scaling_factor=1.0,
        mid_block_add_attention=v.mid_block_attention,
    )
    if v.init != "random":
        from medisyn.models.procedural import load_pretrained

        load_pretrained(vae, cfg, required=v.init == "procedural")
    u = cfg.unet
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.cross_attention))
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (n - 1),
        in_channels=v.latent_channels,
        out_channels=v.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=u.block_out_channels,
        layers_per_block=u.layers_per_block,
        cross_attention_dim=int(text_encoder.config.hidden_size),
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )
    return Components(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=_noise_scheduler(cfg),
        config=cfg,
        prompt_encoder=PromptEncoder(tokenizer, text_encoder),
    )


def _add_lora(unet: torch.nn.Module, rank: int) -> None:
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )


def load_sd(cfg: ModelConfig) -> Components:
    """The ``sd`` preset: a local Stable-Diffusion-style directory, UNet or LoRA trained."""
    from diffusers import StableDiffusionPipeline

    path = cfg.sd_path
    assert path is not None  # checked by ModelConfig
    if not (Path(path) / "model_index.json").is_file():
        raise ConfigError(f"sd_path {path} is not a diffusers pipeline directory (no model_index.json)")
    pipe = StableDiffusionPipeline.from_pretrained(
        path, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    if cfg.text_encoder is not None:
        tokenizer, text_encoder = load_text_encoder(cfg.text_encoder, cfg.max_tokens)
    return _sd_components(pipe, cfg, tokenizer, text_encoder, _noise_scheduler(cfg))


def _sd_components(pipe, cfg: ModelConfig, tokenizer, text_encoder, noise_scheduler) -> Components:
    """Components from a loaded pipeline: text encoder frozen; for ``sd`` the VAE too, LoRA on."""
    text_encoder.requires_grad_(False).eval()
    if cfg.preset == "sd":
        pipe.vae.requires_grad_(False)
        if cfg.lora_rank > 0:
            _add_lora(pipe.unet, cfg.lora_rank)
    return Components(
        vae=pipe.vae,
        unet=pipe.unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        config=cfg,
        prompt_encoder=PromptEncoder(tokenizer, text_encoder),
    )


def build_components(cfg: ModelConfig, *, seed: int = 0) -> Components:
    return build_tiny(cfg, seed=seed) if cfg.preset == "tiny" else load_sd(cfg)


# --------------------------------------------------------------------------- what travels


def _lora_active(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def trainable_module(c: Components, stage: Stage) -> torch.nn.Module:
    if stage == "vae":
        if c.config.preset != "tiny":
            raise ConfigError("stage 'vae' trains the tiny preset's autoencoder; the sd preset's VAE is frozen")
        return c.vae
    return c.unet


def live_trainable_state(c: Components, stage: Stage) -> dict[str, torch.Tensor]:
    """The weights of :func:`trainable_state` as the model holds them (no copy: they share
    the parameters' storage, so they follow the optimizer's in-place steps)."""
    if stage == "unet" and _lora_active(c.unet):
        from peft.utils import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(c.unet))
    return dict(trainable_module(c, stage).state_dict())


def trainable_state(c: Components, stage: Stage) -> dict[str, torch.Tensor]:
    """Exactly the weights that train (and travel) in ``stage``, as detached CPU tensors."""
    return {k: v.detach().cpu().clone() for k, v in live_trainable_state(c, stage).items()}


def load_trainable_state(c: Components, stage: Stage, state: dict[str, torch.Tensor]) -> None:
    """Load weights produced by :func:`trainable_state`; keys and shapes must match exactly."""
    current = trainable_state(c, stage)
    missing = sorted(set(current) - set(state))
    extra = sorted(set(state) - set(current))
    if missing or extra:
        raise ValueError(
            f"stage {stage!r} weights do not match the model: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ValueError(f"weight {k!r} has shape {tuple(v.shape)}; the model expects {tuple(current[k].shape)}")
    if stage == "unet" and _lora_active(c.unet):
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(c.unet, state)
    else:
        trainable_module(c, stage).load_state_dict(state, strict=True)


def set_latent_scale(c: Components, latent_std: float) -> None:
    """Set the VAE's ``scaling_factor`` so that scaled latents have unit variance."""
    if not latent_std > 0:
        raise ValueError(f"latent std must be positive, got {latent_std}")
    c.vae.register_to_config(scaling_factor=float(1.0 / latent_std))


# --------------------------------------------------------------------------- save / load


def _merged_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy of the UNet with LoRA adapters merged in (a plain UNet for stock loaders)."""
    if not _lora_active(unet):
        return unet
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(unet)
    targets = [(n, m) for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in targets:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, module.get_base_layer())
    del merged.peft_config
    merged._hf_peft_config_loaded = False
    return merged


def pipeline_from(c: Components, scheduler=None):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=c.unet,
        scheduler=scheduler if scheduler is not None else c.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_components(c: Components, directory: Path, *, extra: dict | None = None) -> Path:
    """Save atomically in diffusers' layout (write to a temp dir, then rename)."""
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        pipe = StableDiffusionPipeline(
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            unet=_merged_unet(c.unet),
            scheduler=c.noise_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        meta = {"model": c.config.model_dump(mode="json"), **(extra or {})}
        if c.image_types and "image_types" not in meta:
            meta["image_types"] = c.image_types
        (tmp / MEDISYN_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_model_meta(directory: Path) -> dict:
    f = Path(directory) / MEDISYN_FILE
    if not f.is_file():
        return {}
    return json.loads(f.read_text())


def load_components(directory: Path) -> Components:
    """Load a model saved by :func:`save_components` (or any SD-layout pipeline dir)."""
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    if not (directory / "model_index.json").is_file():
        raise ConfigError(f"{directory} is not a MediSyn model directory (no model_index.json)")
    meta = read_model_meta(directory)
    pipe = StableDiffusionPipeline.from_pretrained(
        directory, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    if "model" in meta:
        cfg = ModelConfig.model_validate(meta["model"])
    else:
        cfg = ModelConfig(preset="sd", sd_path=directory, resolution=int(pipe.unet.config.sample_size) * pipe.vae_scale_factor)
    comps = _sd_components(pipe, cfg, pipe.tokenizer, pipe.text_encoder, pipe.scheduler)
    comps.image_types = dict(meta.get("image_types") or {})
    return comps


def state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def model_hash(model: Components | Path) -> str:
    """sha256 over every saved weight file (a directory) or every weight (components)."""
    if isinstance(model, Components):
        h = hashlib.sha256()
        for name in ("vae", "unet", "text_encoder"):
            h.update(state_hash(getattr(model, name).state_dict()).encode())
        return h.hexdigest()
    h = hashlib.sha256()
    root = Path(model)
    for f in sorted(root.rglob("*.safetensors")):
        h.update(str(f.relative_to(root)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
