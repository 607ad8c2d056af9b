"""What a long-lived site worker keeps between messages (``medisyn.client.worker``).

Only things that do not change from one message to the next are kept, each under a key
made from the content it was built from, so a changed config or changed data files give
a new key and the old entry is dropped:

- the model *template* for a model config and seed (with the frozen text encoder and its
  prompt-embedding cache): every task gets fresh copies of the VAE and UNet, then loads
  the weights the message carries into them; the template itself is never trained;
- the decoded dataset tensors for a (dataset config, data files, resolution, channels,
  splits);
- the copy-detection audit's prepared index (fitted encoders, views and thresholds over
  the site's real images, ``medisyn.audit.prepare``) for a (dataset config, data files,
  audit settings, model fingerprint).

Never cached: the site config, its privacy policy and counters, the privacy ledger. They
are read from disk at every task (``medisyn.client.site`` / ``medisyn.client.policy``), so
a warm worker changes no privacy accounting.

In a one-message-per-process ``flwr-clientapp`` this cache simply starts empty each time.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# entries kept per kind (e.g. a train and a held-out view of the same dataset)
MAX_PER_KIND = 2


def content_key(*parts: Any) -> str:
    """sha256 over a JSON rendering of ``parts`` (paths and other objects as strings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class FileHasher:
    """sha256 of files' contents, re-read only when a file's (size, mtime, inode) changes."""

    def __init__(self) -> None:
        self._memo: dict[str, tuple[tuple[int, int, int], str]] = {}

    def file(self, path: Path) -> str:
        st = os.stat(path)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        key = str(Path(path).resolve())
        hit = self._memo.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        self._memo[key] = (stamp, digest)
        return digest

    def tree(self, path: Path | None) -> str:
        """Content hash of a file, or of every file under a directory (names included)."""
        if path is None:
            return "none"
        path = Path(path)
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            return "missing:" + str(path)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return content_key([(str(p.relative_to(path)), self.file(p)) for p in files])


class WarmCache:
    """Small keyed cache: per kind, the last ``MAX_PER_KIND`` keys; a new key evicts the oldest."""

    def __init__(self, max_per_kind: int = MAX_PER_KIND):
        self.max_per_kind = max_per_kind
        self.hasher = FileHasher()
        self._slots: dict[str, OrderedDict[str, Any]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, kind: str, key: str, build: Callable[[], T]) -> T:
        with self._lock:
            slot = self._slots.setdefault(kind, OrderedDict())
            if key in slot:
                slot.move_to_end(key)
                self.hits += 1
                return slot[key]
        value = build()  # outside the lock: may take seconds
        with self._lock:
            self.misses += 1
            slot[key] = value
            slot.move_to_end(key)
            while len(slot) > self.max_per_kind:
                old, _ = slot.popitem(last=False)
                logger.info("warm cache: dropped %s entry %s (config or data changed)", kind, old[:12])
        return value

    def keys(self, kind: str) -> list[str]:
        return list(self._slots.get(kind, {}))

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()

    # ----------------------------------------------------------------- what is kept

    def model_key(self, model_cfg: Any, seed: int) -> str:
        """The model config, the seed, and the contents of the directories it loads from."""
        dirs = [getattr(model_cfg, "text_encoder", None), getattr(model_cfg, "sd_path", None)]
        if dirs[0] is None:
            from medisyn.models.text import default_text_encoder_dir

            dirs[0] = default_text_encoder_dir()
        return content_key("model", model_cfg.model_dump_json(), int(seed), [self.hasher.tree(d) for d in dirs])

    def components(self, model_cfg: Any, seed: int) -> Any:
        """Fresh trainable copies of the cached template for ``model_cfg``/``seed``: the VAE,
        UNet and scheduler are deep copies; the frozen text encoder, tokenizer and the
        prompt-embedding cache are shared."""
        import torch

        from medisyn.models import build_components

        def build():  # noqa: ANN202
            built = build_components(model_cfg, seed=seed)
            # the tiny preset seeds torch's global RNG and draws the initial weights from
            # it: keep that state, so a copy leaves the RNG as a fresh build would
            rng = torch.get_rng_state() if model_cfg.preset == "tiny" else None
            return built, rng

        template, rng = self.get("components", self.model_key(model_cfg, seed), build)
        if rng is not None:
            torch.set_rng_state(rng)
        return dataclasses.replace(
            template,
            vae=copy.deepcopy(template.vae),
            unet=copy.deepcopy(template.unet),
            noise_scheduler=copy.deepcopy(template.noise_scheduler),
            image_types=copy.deepcopy(template.image_types),
        )

    def dataset_key(self, dataset_cfg: Any, *, resolution: int, channels: int,
                    splits: Iterable[str] | None) -> str:
        return content_key("dataset", dataset_cfg.model_dump_json(), self.hasher.tree(Path(dataset_cfg.path)),
                           int(resolution), int(channels), None if splits is None else list(splits))

    def dataset(self, dataset_cfg: Any, *, resolution: int, channels: int, splits: list[str] | None) -> Any:
        from medisyn.data import load_dataset

        key = self.dataset_key(dataset_cfg, resolution=resolution, channels=channels, splits=splits)
        # one slot group per dataset and splits: a site with several datasets keeps each
        kind = f"dataset:{dataset_cfg.image_type}:" + ",".join(splits or [])
        return self.get(kind, key, lambda: load_dataset(dataset_cfg, resolution=resolution,
                                                        channels=channels, splits=splits))


WARM = WarmCache()
