"""Shared fixtures: tiny models built from config, real data from ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Shared 2-core machines: timing-based health checks would make property tests flaky.
settings.register_profile("medisyn", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("medisyn")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDISYN_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO_DATA = REPO / "medisyn" / "assets" / "demo"


def tiny_model_config(**overrides):
    """A model that builds in about a second and trains a step in well under one."""
    from medisyn.config import ModelConfig, UNetConfig, VAEConfig

    base = dict(
        resolution=16,
        vae=VAEConfig(block_out_channels=(8, 16), norm_num_groups=8),
        unet=UNetConfig(block_out_channels=(16, 32), norm_num_groups=8, cross_attention=(True, True)),
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg():
    return tiny_model_config()


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "medmnist" / "breastmnist.npz").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def breast_toml(tmp_path: Path, shared_data: Path) -> Path:
    """A dataset TOML pointing at the real BreastMNIST file (MedMNIST-style .npz)."""
    p = tmp_path / "breast.toml"
    p.write_text(
        f"""[dataset]
path = "{shared_data / 'medmnist' / 'breastmnist.npz'}"
specialty = "radiology"
image_type = "breast ultrasound"
labels = {{ "0" = "malignant", "1" = "normal or benign" }}
"""
    )
    return p


@pytest.fixture
def demo_site_toml() -> Path:
    """The vendored demo data (always present: it ships in the package)."""
    return DEMO_DATA / "breast-us" / "dataset.toml"
