"""The dataset contract: every format, prompts, and every bad-input case."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medisyn.config import DatasetConfig, load_dataset_config
from medisyn.data import build_prompt, check_dataset, load_dataset, read_raw
from medisyn.errors import ConfigError, DataError


def _toml(tmp: Path, path: str, extra: str = "", labels: str = '{ "0" = "benign", "1" = "malignant" }') -> Path:
    p = tmp / "dataset.toml"
    p.write_text(
        f'[dataset]\npath = "{path}"\nspecialty = "dermatology"\nimage_type = "dermoscopy"\nlabels = {labels}\n{extra}'
    )
    return p


# --------------------------------------------------------------------------- formats


def test_medmnist_npz_real(breast_toml: Path):
    cfg = load_dataset_config(breast_toml)
    raw = read_raw(cfg)
    assert len(raw) == 546 + 78 + 156
    assert raw.splits.count("train") == 546
    assert set(raw.labels) == {"0", "1"}
    assert raw.prompts[0] in {"radiology, breast ultrasound, malignant", "radiology, breast ultrasound, normal or benign"}
    ds = load_dataset(cfg, resolution=32, channels=3, splits=["train"])
    item = ds[0]
    assert item["image"].shape == (3, 32, 32)
    assert -1.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    # grey images are repeated to RGB: all channels equal
    assert np.allclose(item["image"][0], item["image"][1])


def test_split_npz_real_rgb(shared_data: Path, tmp_path: Path):
    p = _toml(tmp_path, str(shared_data / "isic_uda1" / "isic_uda1_28.npz"))
    raw = read_raw(load_dataset_config(p))
    assert len(raw) == 557
    assert raw.images[0].shape == (28, 28, 3)
    ds = load_dataset(load_dataset_config(p), resolution=16, channels=1, splits=["val", "test"])
    assert len(ds) == 56 + 111
    assert ds[0]["image"].shape == (1, 16, 16)


def test_split_npz_with_patient_ids(tmp_path: Path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 255, (6, 20, 24), dtype=np.uint8), labels=np.array([0, 1, 0, 1, 0, 1]),
             split=np.array(["train"] * 4 + ["test"] * 2), patient_id=np.array(["p1", "p1", "p2", "p3", "p4", "p4"]))
    cfg = load_dataset_config(_toml(tmp_path, "d.npz"))
    ds = load_dataset(cfg, resolution=16, channels=3)
    assert ds[1]["patient_id"] == "p1"
    assert ds[0]["image"].shape == (3, 16, 16)  # 20×24 centre-cropped then resized
    assert check_dataset(cfg).patients == 4


def test_image_folder_with_manifest(tmp_path: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(folder / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(folder / "c.png")
    (folder / "manifest.csv").write_text(
        "file,label,prompt,split,patient_id\n"
        "a.png,1,,train,p1\n"
        "b.jpg,,a free-text report caption,train,p2\n"
        "c.png,0,,test,\n"
    )
    cfg = load_dataset_config(_toml(tmp_path, "imgs"))
    raw = read_raw(cfg)
    assert raw.prompts == ["dermatology, dermoscopy, malignant", "a free-text report caption", "dermatology, dermoscopy, benign"]
    assert raw.splits == ["train", "train", "test"]
    assert raw.patient_ids == ["p1", "p2", None]
    assert raw.images[1].ndim == 2 and raw.images[0].shape == (30, 30, 3)


def _write_dicom(path: Path, pixels: np.ndarray, **tags) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = pixels.astype(np.int16).tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_folder_min_max_and_window(tmp_path: Path):
    folder = tmp_path / "dcm"
    folder.mkdir()
    ramp = np.tile(np.linspace(-1000, 1000, 16), (16, 1))
    _write_dicom(folder / "1.dcm", ramp)
    _write_dicom(folder / "2.dcm", ramp, WindowCenter=0, WindowWidth=400)
    cfg = load_dataset_config(_toml(tmp_path, "dcm", labels="{}"))
    raw = read_raw(cfg)
    assert len(raw) == 2 and raw.prompts[0] == "dermatology, dermoscopy"
    minmax, windowed = raw.images
    assert minmax.dtype == np.uint8 and minmax.min() == 0 and minmax.max() == 255
    # window 0±200 HU: everything below -200 is black, above +200 white
    assert (windowed[:, :6] == 0).all() and (windowed[:, -6:] == 255).all()


def test_prompt_template_override():
    cfg = DatasetConfig(path=Path("x"), specialty="radiology", image_type="chest X-ray", labels={"1": "pneumonia"},
                        caption="{image_type} showing {label} ({specialty})")
    assert build_prompt(cfg, "1") == "chest X-ray showing pneumonia (radiology)"
    default = DatasetConfig(path=Path("x"), specialty="radiology", image_type="chest X-ray")
    assert build_prompt(default, None) == "radiology, chest X-ray"


# --------------------------------------------------------------------------- bad input


def test_missing_dataset_file(tmp_path: Path):
    with pytest.raises(DataError, match="dataset path not found"):
        read_raw(load_dataset_config(_toml(tmp_path, "nope.npz")))


def test_truncated_image_names_file_and_row(tmp_path: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(folder / "ok.png")
    good = (folder / "ok.png").read_bytes()
    (folder / "bad.png").write_bytes(good[: len(good) // 2])
    (folder / "manifest.csv").write_text("file,label\nok.png,0\nbad.png,1\n")
    with pytest.raises(DataError) as e:
        read_raw(load_dataset_config(_toml(tmp_path, "imgs")))
    msg = str(e.value)
    assert "manifest.csv" in msg and "row 3" in msg and "bad.png" in msg and "truncated" in msg


def test_missing_image_file_in_manifest(tmp_path: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "manifest.csv").write_text("file,label\ngone.png,0\n")
    with pytest.raises(DataError, match=r"row 2: gone.png: image file not found"):
        read_raw(load_dataset_config(_toml(tmp_path, "imgs")))


def test_wrong_array_shape(tmp_path: Path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8, 5), np.uint8), labels=np.zeros(4), split=np.array(["train"] * 4))
    with pytest.raises(DataError, match=r"images\[0\].*shape \(8, 8, 5\)"):
        read_raw(load_dataset_config(_toml(tmp_path, "d.npz")))


def test_length_mismatch(tmp_path: Path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(3), split=np.array(["train"] * 4))
    with pytest.raises(DataError, match="'labels' has 3 entries but 'images' has 4"):
        read_raw(load_dataset_config(_toml(tmp_path, "d.npz")))


def test_label_not_in_labels(tmp_path: Path):
    np.savez(tmp_path / "d.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0, 1, 7]), split=np.array(["train"] * 3))
    with pytest.raises(DataError, match=r"images\[2\].*label id '7' is not in \[dataset\].labels"):
        read_raw(load_dataset_config(_toml(tmp_path, "d.npz")))


def test_unknown_split_name(tmp_path: Path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0, 1]), split=np.array(["train", "calib"]))
    with pytest.raises(DataError, match=r"split name\(s\) \['calib'\]"):
        read_raw(load_dataset_config(_toml(tmp_path, "d.npz")))


def test_corrupt_npz(tmp_path: Path):
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="cannot read .npz"):
        read_raw(load_dataset_config(_toml(tmp_path, "d.npz")))


def test_unknown_manifest_column(tmp_path: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "manifest.csv").write_text("file,label,diagnosis\n")
    with pytest.raises(DataError, match=r"unknown column\(s\) \['diagnosis'\]"):
        read_raw(load_dataset_config(_toml(tmp_path, "imgs")))


def test_unknown_toml_key(tmp_path: Path):
    with pytest.raises(ConfigError, match="resoluton: unknown key"):
        load_dataset_config(_toml(tmp_path, "d.npz", extra="resoluton = 32\n"))


def test_check_counts_duplicates(breast_toml: Path):
    report = check_dataset(load_dataset_config(breast_toml))
    assert report.per_split == {"train": 546, "val": 78, "test": 156}
    assert report.exact_duplicates >= 1 and report.cross_split_duplicates >= 1  # the shared README's caveat
    assert report.sizes == {"28×28×1": 780}


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medisyn.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_data_check_ok(demo_site_toml: Path):
    r = _cli("data", "check", str(demo_site_toml))
    assert r.returncode == 0, r.stderr
    assert "radiology, breast ultrasound, malignant" in r.stdout
    assert "train: 546" in r.stdout


def test_cli_data_check_bad_input_is_one_message(tmp_path: Path):
    np.savez(tmp_path / "d.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0, 1, 9]), split=np.array(["train"] * 3))
    r = _cli("data", "check", str(_toml(tmp_path, "d.npz")))
    assert r.returncode == 3
    assert "label id '9'" in r.stderr and "d.npz" in r.stderr
    assert "Traceback" not in r.stderr
