"""Embedders: the views the audit compares images in.

One small interface (:class:`Embedder`): ``name``, optional ``fit(train_images)``,
``embed(images) -> float32 N×d`` with L2-normalised rows, and ``embed_query(images)`` which
returns one array per query variant (the score of a query is the maximum over its variants;
the pixel view uses the image and its mirror, so a flipped copy scores like the original).

Views shipped here:

* :class:`PixelEmbedder` — area-downsampled to 16×16, mean-centred, L2-normalised.
  Catches exact copies only (see ``shared/notes/audit-floor.md``).
* :class:`VAEEmbedder` — the generator's own VAE encoder (``latent_dist.mean``), given a
  diffusers ``AutoencoderKL``.
* :class:`ContrastiveEmbedder` — a small CNN trained at the site on its own training split
  with SimCLR/InfoNCE and exactly the augmentation families the audit plants; cached in the
  site state directory as safetensors + JSON.
* :class:`LocalModelEmbedder` — a user-supplied model from a local directory (see its
  docstring for the layout).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from medisyn.audit import augment

from medisyn.errors import ConfigError

log = logging.getLogger(__name__)

Images = Sequence[np.ndarray] | np.ndarray


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


class Embedder:
    """Base class. Subclasses set ``name`` and implement ``_embed_tensor`` or ``embed``."""

    name: str = "embedder"

    def fit(self, train_images: Images) -> None:  # noqa: B027 - optional hook
        """Optional: learn from the site's training images (default: nothing)."""

    def describe(self) -> dict[str, Any]:
        """A JSON-safe description (kind, parameters, weight hash) for reports."""
        return {"name": self.name, "kind": type(self).__name__}

    def embed(self, images: Images) -> np.ndarray:
        raise NotImplementedError

    def embed_query(self, images: Images) -> list[np.ndarray]:
        """Embeddings of each query variant; a query's score is the max over variants."""
        return [self.embed(images)]


# --------------------------------------------------------------------------- pixel


class PixelEmbedder(Embedder):
    """Downsampled (area), mean-centred, L2-normalised pixels.

    With ``shifts = m`` the view is the central (H-2m)×(W-2m) window, and a query is scored
    at every window offset up to ±m px (and mirrored with ``flip_invariant``), so a copy
    shifted by up to m px meets its source exactly aligned. Mean-centring plus L2 normalisation makes the view blind to brightness scaling.
    With ``blur = σ`` > 0 every image (training and query) is first blurred with the audit's
    fixed 3×3 Gaussian: pixel noise on a low-contrast image otherwise survives the area
    downsample and pulls a noisy copy below the threshold.
    """

    def __init__(self, *, size: int = 16, channels: int | None = None, flip_invariant: bool = True,
                 shifts: int = 0, blur: float = 0.0, name: str = "pixel"):
        self.size = size
        self.blur = blur
        self.channels = channels
        self.flip_invariant = flip_invariant
        self.shifts = shifts
        self.name = name

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "pixel", "size": self.size,
                "flip_invariant": self.flip_invariant, "query_shifts_px": self.shifts,
                "blur_sigma": self.blur}

    def _tensor(self, images: Images) -> torch.Tensor:
        t = augment.to_tensor(images, channels=self.channels)
        if self.channels is None:
            self.channels = int(t.shape[1])
        return augment.blur(t, sigma=self.blur) if self.blur > 0 else t

    def _vec(self, t: torch.Tensor) -> np.ndarray:
        v = F.adaptive_avg_pool2d(t, self.size).reshape(t.shape[0], -1)
        v = v - v.mean(1, keepdim=True)
        return l2n(v.numpy())

    def _window(self, t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        m = self.shifts
        h, w = t.shape[-2:]
        return t[:, :, m + dy:h - m + dy, m + dx:w - m + dx]

    def embed(self, images: Images) -> np.ndarray:
        # with shifts = m, the view is the central (H-2m)×(W-2m) window: a copy shifted by
        # up to m px still contains that window's content, unpadded
        return self._vec(self._window(self._tensor(images), 0, 0))

    def embed_query(self, images: Images) -> list[np.ndarray]:
        t = self._tensor(images)
        bases = [t, t.flip(-1)] if self.flip_invariant else [t]
        m = self.shifts
        return [self._vec(self._window(b, dy, dx)) for b in bases
                for dy in range(-m, m + 1) for dx in range(-m, m + 1)]


# --------------------------------------------------------------------------- VAE latent


class VAEEmbedder(Embedder):
    """The generator's VAE encoder: ``vae.encode(x).latent_dist.mean`` flattened, centred on
    the training mean (set by :meth:`fit`) and L2-normalised."""

    def __init__(self, vae: Any, *, resolution: int, channels: int, batch_size: int = 256,
                 name: str = "vae"):
        self.vae = vae
        self.resolution = resolution
        self.channels = channels
        self.batch_size = batch_size
        self.name = name
        self.center: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "vae-latent", "resolution": self.resolution,
                "channels": self.channels}

    @torch.no_grad()
    def _raw(self, images: Images) -> np.ndarray:
        t = augment.to_tensor(images, size=self.resolution, channels=self.channels)
        was_training = self.vae.training
        self.vae.eval()
        p = next(self.vae.parameters())
        outs = []
        for i in range(0, t.shape[0], self.batch_size):
            x = (t[i:i + self.batch_size] * 2 - 1).to(device=p.device, dtype=p.dtype)
            z = self.vae.encode(x).latent_dist.mean
            outs.append(z.float().reshape(z.shape[0], -1).cpu().numpy())
        if was_training:
            self.vae.train()
        return np.concatenate(outs) if outs else np.zeros((0, 1), np.float32)

    def fit(self, train_images: Images) -> None:
        self.center = self._raw(train_images).mean(0, keepdims=True)

    def embed(self, images: Images) -> np.ndarray:
        z = self._raw(images)
        if self.center is not None:
            z = z - self.center
        return l2n(z)


# --------------------------------------------------------------------------- contrastive


class SmallCNN(nn.Module):
    """A compact CNN for 32×32 inputs: 4 stages, global average pooling, a projection."""

    def __init__(self, channels: int, width: int = 32, dim: int = 128):
        super().__init__()
        w = width

        def block(i: int, o: int, s: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        # stride-2 stem: 32 px inputs are processed at 16, 8 and 4 px (fast on a CPU)
        self.features = nn.Sequential(
            *block(channels, w, 2), *block(w, w, 1), *block(w, w * 2, 2), *block(w * 2, w * 2, 1),
            *block(w * 2, w * 4, 2), *block(w * 4, w * 4, 1),
        )
        self.proj = nn.Sequential(nn.Linear(w * 4, w * 8), nn.ReLU(inplace=True),
                                  nn.Linear(w * 8, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.proj(h)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss over 2N views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
    return F.cross_entropy(sim, target)


def images_hash(images: Images) -> str:
    h = hashlib.sha256()
    for im in images:
        a = np.ascontiguousarray(augment.as_hwc(np.asarray(im)))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class ContrastiveEmbedder(Embedder):
    """A site-trained self-supervised encoder (SimCLR / InfoNCE).

    Trained on the site's *training split only*, positives are two random views built from
    exactly the families the audit plants (flips, ≤2 px shifts, 80–100 % crops, ≤10°
    rotation, 3×3 blur, noise, brightness/contrast). Every training image is its own class,
    so an augmented copy of a training image lands next to its source while a genuinely new
    image does not. Weights are cached in ``cache_dir`` as ``<key>.safetensors`` +
    ``<key>.json``, keyed by the training images and hyper-parameters (never pickle).
    """

    def __init__(self, *, channels: int, size: int = 32, width: int = 32, dim: int = 128,
                 steps: int = 600, batch_size: int = 128, lr: float = 2e-3,
                 temperature: float = 0.1, seed: int = 0, cache_dir: Path | None = None,
                 threads: int | None = None, name: str = "contrastive",
                 max_seconds: float | None = None, proxy_weight: float = 0.0,
                 preblur: float = 0.0, device: str | torch.device = "cpu"):
        self.channels = channels
        # where the encoder trains and embeds ("cpu", "cuda", "cuda:N"); the views' random
        # draws stay on a CPU generator (augment), so the plan of a run does not depend on
        # it, but the trained weights do (float arithmetic differs between devices)
        self.device = torch.device(device)
        self.preblur = preblur
        self.proxy_weight = proxy_weight
        self.size = size
        self.width = width
        self.dim = dim
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.temperature = temperature
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.threads = threads
        self.name = name
        self.max_seconds = max_seconds
        self.model = SmallCNN(channels, width, dim)
        self.model.eval()
        self.weights_sha256: str | None = None
        self.train_info: dict[str, Any] = {}

    def hparams(self) -> dict[str, Any]:
        return {"channels": self.channels, "size": self.size, "width": self.width,
                "dim": self.dim, "steps": self.steps, "batch_size": self.batch_size,
                "lr": self.lr, "temperature": self.temperature, "seed": self.seed,
                "proxy_weight": self.proxy_weight, "version": 2,
                **({"preblur": self.preblur} if self.preblur else {})}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "contrastive", **self.hparams(),
                "weights_sha256": self.weights_sha256, **self.train_info}

    def _key(self, data_hash: str) -> str:
        blob = json.dumps({"data": data_hash, **self.hparams()}, sort_keys=True).encode()
        return "contrastive-" + hashlib.sha256(blob).hexdigest()[:16]

    # -- persistence -------------------------------------------------------------------
    def save(self, path_stem: Path, meta: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        path_stem.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tmp = path_stem.with_suffix(".safetensors.tmp")
        save_file(state, str(tmp))
        tmp.replace(path_stem.with_suffix(".safetensors"))
        jtmp = path_stem.with_suffix(".json.tmp")
        jtmp.write_text(json.dumps({**self.hparams(), **meta}, indent=2))
        jtmp.replace(path_stem.with_suffix(".json"))

    def load(self, path_stem: Path) -> None:
        from safetensors.torch import load_file

        st = path_stem.with_suffix(".safetensors")
        meta = json.loads(path_stem.with_suffix(".json").read_text())
        for k, v in self.hparams().items():
            if meta.get(k) != v:
                raise ConfigError(f"{st}: cached encoder has {k}={meta.get(k)!r}, expected {v!r}")
        self.model.load_state_dict(load_file(str(st)))
        self.model.to(self.device).eval()
        self.weights_sha256 = hashlib.sha256(st.read_bytes()).hexdigest()
        self.train_info = {k: meta[k] for k in ("train_seconds", "final_loss", "n_train", "steps_done")
                           if k in meta}

    # -- training ----------------------------------------------------------------------
    def fit(self, train_images: Images) -> None:
        data_hash = images_hash(train_images)
        stem = self.cache_dir / self._key(data_hash) if self.cache_dir else None
        if stem is not None and stem.with_suffix(".safetensors").is_file() \
                and stem.with_suffix(".json").is_file():
            self.load(stem)
            log.info("contrastive encoder loaded from %s", stem)
            return
        x = augment.to_tensor(train_images, size=self.size, channels=self.channels)
        info = self._train(x)
        self.train_info = info
        if stem is not None:
            self.save(stem, {"data_sha256": data_hash, **info})
            self.weights_sha256 = hashlib.sha256(
                stem.with_suffix(".safetensors").read_bytes()).hexdigest()

    def _train(self, x: torch.Tensor) -> dict[str, Any]:
        old_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            torch.manual_seed(self.seed)
            g = torch.Generator().manual_seed(self.seed)
            self.model = SmallCNN(self.channels, self.width, self.dim)
            model = self.model.to(self.device)
            model.train()
            x = x.to(self.device)
            # one learnable proxy per training image: every step contrasts each view against
            # all N training images (instance discrimination), not only the batch
            proxies = nn.Parameter(F.normalize(torch.randn(x.shape[0], self.dim, generator=g), dim=1)
                                   .to(self.device))
            opt = torch.optim.AdamW([*model.parameters(), proxies], lr=self.lr, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr,
                                                        total_steps=self.steps, pct_start=0.1)
            n = x.shape[0]
            bs = min(self.batch_size, n)
            t0 = time.perf_counter()
            loss_v = float("nan")
            perm = torch.randperm(n, generator=g)
            pos = 0
            done = 0
            for step in range(self.steps):
                if pos + bs > n:
                    perm = torch.randperm(n, generator=g)
                    pos = 0
                idx = perm[pos:pos + bs].to(self.device)
                pos += bs
                xb = x[idx]
                v1 = self._canon(augment.random_view(xb, g))
                v2 = self._canon(augment.random_view(xb, g))
                z1, z2 = model(v1), model(v2)
                loss = info_nce(z1, z2, self.temperature)
                if self.proxy_weight > 0:
                    pw = F.normalize(proxies, dim=1)
                    lp = (F.cross_entropy(F.normalize(z1, dim=1) @ pw.t() / self.temperature, idx)
                          + F.cross_entropy(F.normalize(z2, dim=1) @ pw.t() / self.temperature, idx))
                    loss = loss + self.proxy_weight * lp / 2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_v = float(loss.detach())
                done = step + 1
                if step % 100 == 0:
                    log.info("contrastive step %d/%d loss %.3f", step, self.steps, loss_v)
                if self.max_seconds and time.perf_counter() - t0 > self.max_seconds:
                    log.warning("contrastive training stopped at the time limit after %d steps", done)
                    break
            model.eval()
            return {"train_seconds": round(time.perf_counter() - t0, 2), "final_loss": loss_v,
                    "n_train": int(n), "steps_done": done}
        finally:
            torch.set_num_threads(old_threads)

    def _canon(self, t: torch.Tensor) -> torch.Tensor:
        """Optional fixed 3×3 Gaussian pre-blur of every input (training and embedding), so
        that a blurred copy and its sharp source meet in the same canonical form."""
        return augment.blur(t, sigma=self.preblur) if self.preblur > 0 else t

    @torch.no_grad()
    def embed(self, images: Images) -> np.ndarray:
        t = self._canon(augment.to_tensor(images, size=self.size, channels=self.channels).to(self.device))
        self.model.to(self.device).eval()
        outs = [self.model(t[i:i + 1024]).float().cpu().numpy() for i in range(0, t.shape[0], 1024)]
        return l2n(np.concatenate(outs)) if outs else np.zeros((0, self.dim), np.float32)


# --------------------------------------------------------------------------- local model


class LocalModelEmbedder(Embedder):
    """An embedder from a local model directory (trusted code, loaded without network).

    Layout of ``model_dir``::

        embedder.json        {"module": "model.py", "class": "Net", "kwargs": {...},
                              "input_size": 32, "channels": 1, "name": "my-view"}
        model.py             defines ``class Net(torch.nn.Module)``: forward(x) -> N×d,
                             x float32 N×C×S×S in [0, 1]
        weights.safetensors  the module's state dict

    Only safetensors weights are read (no pickle). The module file is executed, so the
    directory must be as trusted as the audit's own code.
    """

    def __init__(self, model_dir: Path):
        from safetensors.torch import load_file

        self.model_dir = Path(model_dir)
        spec_path = self.model_dir / "embedder.json"
        if not spec_path.is_file():
            raise ConfigError(f"{spec_path}: embedder.json not found (see LocalModelEmbedder)")
        try:
            spec = json.loads(spec_path.read_text())
            self.module_file = self.model_dir / spec["module"]
            self.class_name = spec["class"]
            self.size = int(spec["input_size"])
            self.channels = int(spec["channels"])
            kwargs = dict(spec.get("kwargs", {}))
            self.name = str(spec.get("name", self.model_dir.name))
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"{spec_path}: invalid embedder spec: {e!r}") from None
        mod_spec = importlib.util.spec_from_file_location(f"medisyn_local_embedder_{self.name}",
                                                          self.module_file)
        if mod_spec is None or mod_spec.loader is None:
            raise ConfigError(f"{self.module_file}: cannot load module")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        if not hasattr(module, self.class_name):
            raise ConfigError(f"{self.module_file}: no class {self.class_name!r}")
        self.model = getattr(module, self.class_name)(**kwargs)
        weights = self.model_dir / "weights.safetensors"
        if weights.is_file():
            self.model.load_state_dict(load_file(str(weights)))
            self.weights_sha256: str | None = hashlib.sha256(weights.read_bytes()).hexdigest()
        else:
            self.weights_sha256 = None
        self.model.eval()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "local", "class": self.class_name,
                "input_size": self.size, "channels": self.channels,
                "weights_sha256": self.weights_sha256}

    @torch.no_grad()
    def embed(self, images: Images) -> np.ndarray:
        t = augment.to_tensor(images, size=self.size, channels=self.channels)
        outs = [self.model(t[i:i + 512]).float().reshape(min(512, t.shape[0] - i), -1).numpy()
                for i in range(0, t.shape[0], 512)]
        return l2n(np.concatenate(outs)) if outs else np.zeros((0, 1), np.float32)
