"""Model presets (tiny, sd), prompt encoding, save/load in diffusers' layout."""

from medisyn.models.components import (
    Components,
    build_components,
    live_trainable_state,
    load_components,
    load_trainable_state,
    model_hash,
    pipeline_from,
    read_model_meta,
    save_components,
    set_latent_scale,
    state_hash,
    trainable_module,
    trainable_state,
)
from medisyn.models.text import PromptEncoder, default_text_encoder_dir, load_text_encoder

__all__ = [
    "Components",
    "PromptEncoder",
    "build_components",
    "default_text_encoder_dir",
    "load_components",
    "load_text_encoder",
    "live_trainable_state",
    "load_trainable_state",
    "model_hash",
    "pipeline_from",
    "read_model_meta",
    "save_components",
    "set_latent_scale",
    "state_hash",
    "trainable_module",
    "trainable_state",
]
