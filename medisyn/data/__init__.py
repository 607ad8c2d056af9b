"""Site data: the dataset contract (see docs/core-api.md)."""

from medisyn.data.dataset import (
    ConcatImageDataset,
    DataReport,
    ImageDataset,
    build_prompt,
    check_dataset,
    collate,
    image_type_info,
    label_prompts,
    load_dataset,
    read_raw,
    source_channels,
    to_model_space,
)
from medisyn.data.formats import RawData

__all__ = [
    "ConcatImageDataset",
    "DataReport",
    "ImageDataset",
    "RawData",
    "build_prompt",
    "check_dataset",
    "collate",
    "image_type_info",
    "label_prompts",
    "load_dataset",
    "read_raw",
    "source_channels",
    "to_model_space",
]
