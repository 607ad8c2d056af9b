"""Shared helpers for the audit tests (no tests here): small subsets of the real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path("/work/shared/data")
FILES = {
    "breast": DATA / "medmnist/breastmnist.npz",
    "pneumonia": DATA / "medmnist/pneumoniamnist_balanced_subset.npz",
    "retina": DATA / "medmnist/retinamnist.npz",
    "isic": DATA / "isic_uda1/isic_uda1_28.npz",
}


def require(name: str) -> Path:
    p = FILES[name]
    if not p.is_file():
        pytest.skip(f"real data {p} not available")
    return p


def small_npz(name: str, out: Path, *, n_train: int, n_val: int, n_test: int = 0) -> Path:
    """Write a MedMNIST-layout subset of a real dataset (first n images of each split)."""
    src = np.load(require(name))
    if "images" in src.files:
        imgs, split = src["images"], src["split"].astype(str)
        parts = {s: imgs[split == s] for s in ("train", "val", "test")}
    else:
        parts = {s: src[f"{s}_images"] for s in ("train", "val", "test")}
    data = {"train_images": parts["train"][:n_train], "val_images": parts["val"][:n_val],
            "test_images": parts["test"][:n_test]}
    for s in ("train", "val", "test"):
        data[f"{s}_labels"] = np.zeros(len(data[f"{s}_images"]), dtype=np.uint8)
    np.savez(out, **data)
    return out


def site_toml(tmp: Path, npz: Path, *, site_id: str = "hospital-a", audit: str = "",
              privacy: str = "") -> Path:
    holdout = '["val", "test"]'
    text = f"""
[site]
id = "{site_id}"
state_dir = "state"

[dataset]
path = "{npz}"
specialty = "radiology"
image_type = "breast ultrasound"
split = {{ train = ["train"], holdout = {holdout} }}

[privacy]
max_epsilon = 8.0
{privacy}
"""
    if audit:
        text += "\n[audit]\n" + audit + "\n"
    p = tmp / "site.toml"
    p.write_text(text)
    return p


FAST_AUDIT = """
embedders = ["pixel", "contrastive"]
contrastive_steps = 40
contrastive_batch = 64
contrastive_width = 8
n_plant = 60
threads = 1
"""
