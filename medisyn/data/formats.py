"""Readers for the supported dataset formats, auto-detected from ``[dataset].path``.

- MedMNIST-style ``.npz``: ``train_images``, ``train_labels``, ``val_*``, ``test_*``.
- Split ``.npz``: ``images``, ``labels``, ``split`` (optionally ``patient_id``).
- A folder of PNG/JPEG (or DICOM) images with ``manifest.csv``: columns ``file`` and
  ``prompt`` or ``label``, optional ``split``, ``patient_id``.
- A folder of DICOM files without a manifest (every ``*.dcm``, split ``train``).

Every reader returns :class:`RawData`; every bad record raises :class:`DataError`
naming the file, the row and the reason. Nothing is pickled: ``np.load`` runs with
``allow_pickle=False``.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medisyn.config import DatasetConfig
from medisyn.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
MEDMNIST_SPLITS = ("train", "val", "test")


@dataclass
class RawData:
    """All records of one dataset at native size (uint8, H×W or H×W×3)."""

    config: DatasetConfig
    images: list[np.ndarray] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    patient_ids: list[str | None] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)  # free-text prompt per record
    sources: list[str] = field(default_factory=list)  # site-local only: never leaves a site
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def indices(self, splits: list[str] | None) -> list[int]:
        if splits is None:
            return list(range(len(self)))
        wanted = set(splits)
        return [i for i, s in enumerate(self.splits) if s in wanted]


# --------------------------------------------------------------------------- checks


def _check_image_array(img: np.ndarray, file: Path, row: object) -> np.ndarray:
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 3)):
        raise DataError(
            f"image has shape {tuple(img.shape)}; expected H×W (grey) or H×W×3 (RGB)",
            file=file,
            row=row,
        )
    if img.shape[0] < 4 or img.shape[1] < 4:
        raise DataError(f"image of {img.shape[0]}×{img.shape[1]} pixels is too small", file=file, row=row)
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and not np.isfinite(img).all():
            raise DataError("image holds NaN or infinite values", file=file, row=row)
        img = _scale_to_uint8(img.astype(np.float64))
    return np.ascontiguousarray(img)


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.clip(np.round((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _label_id(value: object) -> str:
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"label has {value.size} values; expected one")
        value = value.reshape(()).item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


# --------------------------------------------------------------------------- npz


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"cannot read .npz archive ({e})", file=path) from e
    except ValueError as e:  # object arrays would need pickle
        raise DataError(f"cannot read .npz archive without pickle ({e})", file=path) from e


def read_npz(cfg: DatasetConfig) -> RawData:
    path = cfg.path
    arrays = _load_npz(path)
    raw = RawData(config=cfg)
    if "images" in arrays:
        for key in ("labels", "split"):
            if key not in arrays:
                raise DataError(f"array {key!r} is missing (an .npz with 'images' needs 'labels' and 'split')", file=path)
        images, labels, split = arrays["images"], arrays["labels"], arrays["split"]
        n = len(images)
        for key, arr in (("labels", labels), ("split", split)):
            if len(arr) != n:
                raise DataError(f"array {key!r} has {len(arr)} entries but 'images' has {n}", file=path)
        pids = arrays.get("patient_id")
        if pids is not None and len(pids) != n:
            raise DataError(f"array 'patient_id' has {len(pids)} entries but 'images' has {n}", file=path)
        if images.ndim not in (3, 4):
            raise DataError(f"array 'images' has shape {images.shape}; expected N×H×W or N×H×W×3", file=path)
        for i in range(n):
            raw.images.append(_check_image_array(images[i], path, f"images[{i}]"))
            raw.labels.append(_label_id(labels[i]))
            raw.splits.append(str(split[i]))
            raw.patient_ids.append(None if pids is None else str(pids[i]))
            raw.captions.append(None)
            raw.sources.append(f"{path.name}#images[{i}]")
        return raw
    found = [s for s in MEDMNIST_SPLITS if f"{s}_images" in arrays]
    if not found:
        raise DataError(
            f"unknown .npz layout: keys {sorted(arrays)}; expected 'images'/'labels'/'split' "
            "or MedMNIST-style 'train_images'/'train_labels'/...",
            file=path,
        )
    for s in found:
        images = arrays[f"{s}_images"]
        if f"{s}_labels" not in arrays:
            raise DataError(f"array '{s}_labels' is missing", file=path)
        labels = arrays[f"{s}_labels"]
        if len(labels) != len(images):
            raise DataError(
                f"array '{s}_labels' has {len(labels)} entries but '{s}_images' has {len(images)}", file=path
            )
        if images.ndim not in (3, 4):
            raise DataError(f"array '{s}_images' has shape {images.shape}; expected N×H×W or N×H×W×3", file=path)
        for i in range(len(images)):
            raw.images.append(_check_image_array(images[i], path, f"{s}_images[{i}]"))
            try:
                raw.labels.append(_label_id(labels[i]))
            except ValueError as e:
                raise DataError(str(e), file=path, row=f"{s}_labels[{i}]") from e
            raw.splits.append(s)
            raw.patient_ids.append(None)
            raw.captions.append(None)
            raw.sources.append(f"{path.name}#{s}_images[{i}]")
    return raw


# --------------------------------------------------------------------------- image files


def read_image_file(file: Path, row: object, cfg: DatasetConfig) -> np.ndarray:
    if not file.is_file():
        raise DataError("image file not found", file=file, row=row)
    if file.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(file, row, cfg.window)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
            elif im.mode in ("L", "RGB"):
                arr = np.asarray(im)
            elif im.mode in ("LA", "P", "PA", "1"):
                arr = np.asarray(im.convert("L" if im.mode != "P" else "RGB"))
            else:
                arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"unreadable or truncated image ({e})", file=file, row=row) from e
    return _check_image_array(arr, file, row)


def read_dicom(file: Path, row: object, window: tuple[float, float] | None) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(file)
        pixels = ds.pixel_array.astype(np.float64)
    except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError) as e:
        raise DataError(f"unreadable DICOM ({e})", file=file, row=row) from e
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    pixels = pixels * slope + intercept
    if pixels.ndim == 3 and pixels.shape[-1] != 3:
        raise DataError(
            f"DICOM pixel data has shape {pixels.shape}; multi-frame volumes are not supported", file=file, row=row
        )
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        wc, ww = ds.WindowCenter, ds.WindowWidth
        wc = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
        ww = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
        window = (wc, ww)
    if window is not None:
        centre, width = window
        lo, hi = centre - width / 2.0, centre + width / 2.0
        pixels = np.clip((pixels - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * 255.0
        out = np.round(pixels).astype(np.uint8)
    else:
        out = _scale_to_uint8(pixels)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        out = 255 - out
    return _check_image_array(out, file, row)


MANIFEST_COLUMNS = {"file", "prompt", "label", "split", "patient_id"}


def read_folder(cfg: DatasetConfig) -> RawData:
    folder = cfg.path
    manifest = folder / "manifest.csv"
    raw = RawData(config=cfg)
    if not manifest.is_file():
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in DICOM_SUFFIXES)
        if not files:
            raise DataError(
                "folder has no manifest.csv and no DICOM (*.dcm) files; an image folder needs a "
                "manifest.csv with columns file, prompt or label, [split], [patient_id]",
                file=folder,
            )
        for f in files:
            raw.images.append(read_dicom(f, None, cfg.window))
            raw.labels.append(None)
            raw.splits.append(cfg.split.train[0])
            raw.patient_ids.append(None)
            raw.captions.append(None)
            raw.sources.append(str(f.relative_to(folder)))
        return raw
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        unknown = cols - MANIFEST_COLUMNS
        if unknown:
            raise DataError(f"unknown column(s) {sorted(unknown)}; allowed: {sorted(MANIFEST_COLUMNS)}", file=manifest)
        if "file" not in cols:
            raise DataError("column 'file' is missing", file=manifest)
        if not ({"prompt", "label"} & cols):
            raise DataError("needs a 'prompt' or a 'label' column", file=manifest)
        for rowno, row in enumerate(reader, start=2):  # row 1 is the header
            name = (row.get("file") or "").strip()
            if not name:
                raise DataError("empty 'file' value", file=manifest, row=rowno)
            file = (folder / name).resolve()
            if folder.resolve() not in file.parents:
                raise DataError(f"file {name!r} lies outside the dataset folder", file=manifest, row=rowno)
            try:
                img = read_image_file(file, rowno, cfg)
            except DataError as e:
                raise DataError(f"{name}: {e.reason}", file=manifest, row=rowno) from e
            label = (row.get("label") or "").strip() or None
            prompt = (row.get("prompt") or "").strip() or None
            if label is None and prompt is None:
                raise DataError("row has neither a label nor a prompt", file=manifest, row=rowno)
            raw.images.append(img)
            raw.labels.append(label)
            raw.captions.append(prompt)
            raw.splits.append((row.get("split") or "").strip() or cfg.split.train[0])
            raw.patient_ids.append((row.get("patient_id") or "").strip() or None)
            raw.sources.append(f"manifest.csv row {rowno} ({name})")
    if not raw.images:
        raise DataError("manifest has no rows", file=manifest)
    return raw
