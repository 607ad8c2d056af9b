"""Model presets: save/load round trip, stock diffusers loading, the sd preset with LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medisyn.config import ModelConfig
from medisyn.models import (
    build_components,
    load_components,
    load_trainable_state,
    model_hash,
    save_components,
    state_hash,
    trainable_state,
)


def test_save_load_roundtrip(tmp_path: Path, tiny_cfg):
    c = build_components(tiny_cfg, seed=3)
    save_components(c, tmp_path / "m")
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert list((tmp_path / "m" / "unet").glob("*.safetensors"))
    assert not list((tmp_path / "m").rglob("*.bin")) and not list((tmp_path / "m").rglob("*.pt"))
    c2 = load_components(tmp_path / "m")
    assert c2.config == tiny_cfg
    for stage in ("vae", "unet"):
        assert state_hash(trainable_state(c, stage)) == state_hash(trainable_state(c2, stage))
    assert model_hash(c) == model_hash(c2)


def test_trainable_state_shape_mismatch_is_clear(tiny_cfg):
    c = build_components(tiny_cfg)
    state = trainable_state(c, "unet")
    key = next(iter(state))
    state[key] = torch.zeros(3)
    with pytest.raises(ValueError, match=f"weight '{key}' has shape"):
        load_trainable_state(c, "unet", state)
    state.pop(key)
    with pytest.raises(ValueError, match="1 missing"):
        load_trainable_state(c, "unet", state)


def test_stock_pipeline_loads_and_generates(tmp_path: Path, tiny_cfg):
    from diffusers import DiffusionPipeline

    save_components(build_components(tiny_cfg), tmp_path / "m")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "m", local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    out = pipe("radiology, chest X-ray", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 16, 3)


def _tiny_sd_dir(tmp_path: Path) -> Path:
    """A tiny random pipeline in Stable Diffusion layout (what a user's SD download looks like)."""
    cfg = ModelConfig(resolution=16, vae={"block_out_channels": (8, 16), "norm_num_groups": 8},
                      unet={"block_out_channels": (16, 32), "norm_num_groups": 8, "cross_attention": (True, True)})
    c = build_components(cfg)
    from medisyn.models import pipeline_from

    pipeline_from(c).save_pretrained(tmp_path / "sd", safe_serialization=True)
    return tmp_path / "sd"


def test_sd_preset_lora(tmp_path: Path):
    sd_dir = _tiny_sd_dir(tmp_path)
    cfg = ModelConfig(preset="sd", sd_path=sd_dir, resolution=16, lora_rank=4)
    c = build_components(cfg)
    state = trainable_state(c, "unet")
    assert state and all("lora" in k for k in state)
    n_lora = sum(v.numel() for v in state.values())
    n_unet = sum(p.numel() for p in c.unet.parameters() if "lora" not in p.__class__.__name__)
    assert n_lora < 0.2 * n_unet
    trainable = {n for n, p in c.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    assert not any(p.requires_grad for p in c.vae.parameters())
    # Move the adapters away from zero, save (merged), and load with a stock pipeline.
    with torch.no_grad():
        load_trainable_state(c, "unet", {k: v + 0.05 for k, v in state.items()})
    save_components(c, tmp_path / "out")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    assert not any("lora" in k for k in pipe.unet.state_dict())
    base = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    diff = sum(float((pipe.unet.state_dict()[k] - v).abs().sum()) for k, v in base.unet.state_dict().items())
    assert diff > 0, "merged LoRA weights should differ from the base UNet"


def test_sd_preset_rejects_non_pipeline_dir(tmp_path: Path):
    from medisyn.errors import ConfigError

    with pytest.raises(ConfigError, match="no model_index.json"):
        build_components(ModelConfig(preset="sd", sd_path=tmp_path))
