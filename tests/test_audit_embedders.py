"""Embedders, augmentation families and the local-model plug-in."""

from __future__ import annotations

import json

import numpy as np
import torch
from medisyn.audit import augment
from medisyn.audit.calibration import View
from medisyn.audit.embedders import LocalModelEmbedder, PixelEmbedder
from medisyn.audit.validate import plant
from safetensors.torch import save_file


def _smooth_images(n, seed, size=28, channels=None):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.uniform(size=(n, 1 if channels is None else channels, 7, 7))).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic").clamp(0, 1)
    u = augment.to_uint8(x)
    return [im[:, :, 0] for im in u] if channels is None else list(u)


def test_families_are_deterministic_and_change_the_image():
    imgs = _smooth_images(20, 0)
    idx = np.arange(20)
    for fam in augment.FAMILIES + augment.SINGLE_TRANSFORMS:
        a = plant(imgs, fam, idx, seed=3)
        b = plant(imgs, fam, idx, seed=3)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert all(x.shape == (28, 28) and x.dtype == np.uint8 for x in a)
        changed = np.mean([not np.array_equal(x, y) for x, y in zip(a, imgs, strict=True)])
        assert changed == (0.0 if fam == "exact" else 1.0), fam


def test_pixel_view_aligns_shifted_and_mirrored_copies():
    train = _smooth_images(200, 1)
    v = View(PixelEmbedder(flip_invariant=False, shifts=2), train, query_flips=True)
    t = augment.to_tensor(train[:50])
    g = torch.Generator().manual_seed(0)
    copies = augment.to_uint8(augment.shift(augment.flip(t, g), g, max_px=2))[..., 0]
    s, i = v.score(list(copies))
    assert np.all(i == np.arange(50))
    assert s.min() > 0.999  # the central window of a ≤2 px shift is the source, unpadded


def test_pixel_view_preblur_keeps_noisy_low_contrast_copies_close():
    """Noise σ = 0.02 on a low-contrast image (std ≈ 0.06, like the pneumonia copies the
    unblurred view missed) survives the 16×16 area downsample; the default 3×3 pre-blur
    (``pixel_blur`` = 0.8) removes most of it, on both sides, so the copy stays close."""
    from medisyn.audit.settings import AuditConfig, make_embedders

    t = augment.to_tensor(_smooth_images(200, 1))
    low = list(augment.to_uint8(0.7 + (t - t.mean((1, 2, 3), keepdim=True)) * 0.25)[..., 0])
    g = torch.Generator().manual_seed(0)
    copies = list(augment.to_uint8(augment.noise(augment.to_tensor(low[:50]), g, sigma=0.02))[..., 0])
    (pe,) = [e for e in make_embedders(AuditConfig(embedders=["pixel"]), channels=1, cache_dir=None)]
    assert pe.blur == 0.8
    s, i = View(pe, low, query_flips=True).score(copies)
    s0, _ = View(PixelEmbedder(channels=1, flip_invariant=False, shifts=2), low,
                 query_flips=True).score(copies)
    assert np.all(i == np.arange(50))
    assert s.min() > 0.985 > s0.min()
    assert np.median(s) > np.median(s0) + 0.005


def test_local_model_embedder(tmp_path):
    (tmp_path / "model.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, dim=16):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(16 * 16, dim)\n"
        "    def forward(self, x):\n"
        "        return self.lin(x.flatten(1))\n")
    torch.manual_seed(0)
    w = {"lin.weight": torch.randn(16, 256), "lin.bias": torch.zeros(16)}
    save_file(w, str(tmp_path / "weights.safetensors"))
    (tmp_path / "embedder.json").write_text(json.dumps(
        {"module": "model.py", "class": "Net", "kwargs": {"dim": 16}, "input_size": 16,
         "channels": 1, "name": "my-view"}))
    e = LocalModelEmbedder(tmp_path)
    imgs = _smooth_images(10, 2)
    v = e.embed(imgs)
    assert e.name == "my-view" and v.shape == (10, 16)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    x = augment.to_tensor(imgs, size=16, channels=1).flatten(1)
    ref = x @ w["lin.weight"].T
    ref = ref / ref.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(v, ref.numpy(), rtol=1e-4, atol=1e-5)
    assert e.describe()["weights_sha256"]


def test_to_tensor_mixes_sizes_and_channels():
    grey = _smooth_images(3, 3)
    rgb = _smooth_images(2, 4, size=32, channels=3)
    t = augment.to_tensor(grey + rgb, size=28, channels=3)
    assert t.shape == (5, 3, 28, 28)
    assert float(t.min()) >= 0 and float(t.max()) <= 1


def test_audit_device_setting_is_checked_and_cpu_by_default(monkeypatch):
    """``[audit] device``: "cpu" by default; "auto" is the CPU on a machine without CUDA;
    a GPU asked for on such a machine, or a name that is no device, is a named error."""
    import pytest
    from medisyn.audit.settings import AuditConfig, audit_device, make_embedders
    from pydantic import ValidationError

    from medisyn.errors import ConfigError

    (ce,) = make_embedders(AuditConfig(embedders=["contrastive"]), channels=1, cache_dir=None)
    assert ce.device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert audit_device("auto") == "cpu"
    with pytest.raises(ConfigError, match=r"device = 'cuda'.*no CUDA device"):
        make_embedders(AuditConfig(embedders=["contrastive"], device="cuda"), channels=1, cache_dir=None)
    with pytest.raises(ValidationError, match="device"):
        AuditConfig(device="gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert audit_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match="sees 1 CUDA device"):
        audit_device("cuda:1")
