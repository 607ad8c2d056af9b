"""The dataset contract: read any supported format, build prompts, serve model-space tensors."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medisyn.config import DatasetConfig
from medisyn.data.formats import RawData, read_folder, read_npz
from medisyn.errors import DataError


def build_prompt(cfg: DatasetConfig, label_id: str | None, caption: str | None = None) -> str:
    """Build a record's prompt from the dataset's caption template.

    A free-text caption is used as-is unless the template has a ``{prompt}`` field.
    Without a label, the ``{label}`` part and its separator are dropped.
    """
    if caption is not None and "{prompt}" not in cfg.caption:
        return caption
    words = cfg.labels.get(label_id, "") if label_id is not None else ""
    text = cfg.caption.format(
        specialty=cfg.specialty, image_type=cfg.image_type, label=words, prompt=caption or ""
    )
    text = re.sub(r"(,\s*)+,", ",", text)  # drop empty fields
    return re.sub(r"\s+", " ", text).strip(" ,")


def label_prompts(cfg: DatasetConfig) -> dict[str, str]:
    """label id -> prompt, for every label the dataset declares (what a site generates)."""
    if not cfg.labels:
        return {"": build_prompt(cfg, None)}
    return {lid: build_prompt(cfg, lid) for lid in cfg.labels}


def read_raw(cfg: DatasetConfig) -> RawData:
    """Read every record of a dataset and build its prompts; raise DataError on bad input."""
    path = cfg.path
    if path.is_dir():
        raw = read_folder(cfg)
    elif path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError("unsupported dataset file; expected a .npz archive or a folder", file=path)
        raw = read_npz(cfg)
    else:
        raise DataError("dataset path not found", file=path)
    if not raw.images:
        raise DataError("dataset holds no images", file=path)
    for i, lid in enumerate(raw.labels):
        if lid is not None and cfg.labels and lid not in cfg.labels:
            raise DataError(
                f"label id {lid!r} is not in [dataset].labels {sorted(cfg.labels)}",
                file=path,
                row=raw.sources[i],
            )
    known = set(cfg.split.train) | set(cfg.split.holdout)
    unknown = sorted(set(raw.splits) - known)
    if unknown:
        raise DataError(
            f"split name(s) {unknown} are neither training splits {cfg.split.train} nor holdout "
            f"splits {cfg.split.holdout}; set [dataset].split",
            file=path,
        )
    raw.prompts = [build_prompt(cfg, lid, cap) for lid, cap in zip(raw.labels, raw.captions, strict=True)]
    return raw


def to_model_space(img: np.ndarray, resolution: int, channels: int) -> torch.Tensor:
    """uint8 H×W[×3] -> float32 C×R×R in [-1, 1] (centre crop to square, bicubic resize)."""
    from PIL import Image

    if img.ndim == 2:
        im = Image.fromarray(img, mode="L")
    else:
        im = Image.fromarray(img, mode="RGB")
    w, h = im.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
    im = im.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


class ImageDataset(Dataset):
    """Map-style dataset over the records of ``raw`` whose split is in ``splits``.

    Images are converted to model space once (the datasets are small); ``ds[i]`` is a
    dict with ``image``, ``prompt``, ``label``, ``split``, ``patient_id``, ``index``.
    """

    def __init__(self, raw: RawData, *, resolution: int, channels: int, splits: list[str] | None = None):
        self.raw = raw
        self.resolution = resolution
        self.channels = channels
        self.splits = splits
        self.idx = raw.indices(splits)
        if not self.idx:
            raise DataError(f"no images in split(s) {splits}", file=raw.config.path)
        self.images = torch.stack([to_model_space(raw.images[i], resolution, channels) for i in self.idx])

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.idx[i]
        r = self.raw
        return {
            "image": self.images[i],
            "prompt": r.prompts[j],
            "label": r.labels[j],
            "split": r.splits[j],
            "patient_id": r.patient_ids[j],
            "index": j,
        }

    @property
    def prompts(self) -> list[str]:
        return [self.raw.prompts[j] for j in self.idx]

    @property
    def source_channels(self) -> int:
        """1 if the site's images are grey (as stored, or ``[dataset].channels = 1``), else 3."""
        return source_channels(self.raw)

    @property
    def hflip(self) -> torch.Tensor:
        """Per record: may training flip it horizontally ([dataset].hflip)."""
        return torch.full((len(self.idx),), bool(self.raw.config.hflip))

    def train_view(self) -> ImageDataset:
        return ImageDataset(self.raw, resolution=self.resolution, channels=self.channels, splits=self.raw.config.split.train)

    def holdout_view(self) -> ImageDataset:
        return ImageDataset(
            self.raw, resolution=self.resolution, channels=self.channels, splits=self.raw.config.split.holdout
        )


class ConcatImageDataset(Dataset):
    """Several sites' datasets pooled (centralised training across image types)."""

    def __init__(self, parts: list[ImageDataset]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.images = torch.cat([p.images for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[k][i - int(self.offsets[k])]

    @property
    def prompts(self) -> list[str]:
        return [p for part in self.parts for p in part.prompts]

    @property
    def hflip(self) -> torch.Tensor:
        return torch.cat([p.hflip for p in self.parts])


def source_channels(raw: RawData) -> int:
    """1 if a dataset is grey (every image H×W, or ``[dataset].channels = 1``), else 3."""
    if raw.config.channels is not None:
        return int(raw.config.channels)
    return 1 if all(img.ndim == 2 for img in raw.images) else 3


def image_type_info(parts: list[ImageDataset]) -> dict[str, dict[str, Any]]:
    """What a model trained on ``parts`` should know about each image type: its specialty,
    whether its images are grey (``channels``: generation then outputs channel-equal
    images), and its label prompts."""
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        cfg = part.raw.config
        entry = out.setdefault(cfg.image_type, {"specialty": cfg.specialty, "channels": 1, "prompts": []})
        entry["channels"] = max(entry["channels"], part.source_channels)
        entry["prompts"] = sorted(set(entry["prompts"]) | set(label_prompts(cfg).values()))
    return out


def load_dataset(
    cfg: DatasetConfig, *, resolution: int, channels: int, splits: list[str] | None = None
) -> ImageDataset:
    res = cfg.resolution or resolution
    if res != resolution:
        raise DataError(
            f"[dataset].resolution = {cfg.resolution} differs from the model's resolution {resolution}",
            file=cfg.path,
        )
    return ImageDataset(read_raw(cfg), resolution=resolution, channels=channels, splits=splits)


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not batch:
        return {"image": torch.empty(0), "prompt": [], "label": [], "split": [], "patient_id": [], "index": []}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


# --------------------------------------------------------------------------- data check


@dataclass
class DataReport:
    path: str
    n_images: int
    per_split: dict[str, int]
    per_label: dict[str, dict[str, int]]  # split -> label words -> count
    sizes: dict[str, int]  # "H×W×C" -> count
    exact_duplicates: int  # images whose bytes equal an earlier image's
    cross_split_duplicates: int  # of those, duplicates that cross splits
    prompts: dict[str, int] = field(default_factory=dict)
    patients: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_dataset(cfg: DatasetConfig) -> DataReport:
    """Read every record and summarise it; raises DataError naming the first bad record."""
    raw = read_raw(cfg)
    per_split = Counter(raw.splits)
    per_label: dict[str, Counter[str]] = {}
    for s, lid in zip(raw.splits, raw.labels, strict=True):
        words = cfg.labels.get(lid, lid) if lid is not None else "(none)"
        per_label.setdefault(s, Counter())[f"{lid}: {words}" if lid is not None else words] += 1
    sizes = Counter(
        f"{im.shape[0]}×{im.shape[1]}×{1 if im.ndim == 2 else im.shape[2]}" for im in raw.images
    )
    seen: dict[str, str] = {}
    dups = cross = 0
    for im, s in zip(raw.images, raw.splits, strict=True):
        h = hashlib.sha256(im.tobytes() + str(im.shape).encode()).hexdigest()
        if h in seen:
            dups += 1
            cross += seen[h] != s
        else:
            seen[h] = s
    pids = [p for p in raw.patient_ids if p is not None]
    return DataReport(
        path=str(cfg.path),
        n_images=len(raw),
        per_split=dict(per_split),
        per_label={s: dict(c) for s, c in per_label.items()},
        sizes=dict(sizes),
        exact_duplicates=dups,
        cross_split_duplicates=cross,
        prompts=dict(Counter(raw.prompts)),
        patients=len(set(pids)) if pids else None,
    )


def dataset_from_path(path: Path) -> DatasetConfig:
    from medisyn.config import load_dataset_config

    return load_dataset_config(path)
