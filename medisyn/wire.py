"""The wire format of weights between sites and the server (numpy only, no Flower).

One float32 vector, keys in sorted order, each tensor C-order. Flower moves every
Array as its own object (one HTTP request per hop), so a UNet's ~200 tensors would cost
hundreds of requests per site per round; one packed vector costs a few chunks. Sites
and server must agree byte for byte, so both import these functions from here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

PACKED = "packed"

Layout = list[tuple[str, tuple[int, ...]]]


def pack(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(arrays[k], dtype=np.float32).ravel() for k in sorted(arrays)])


def layout_of(arrays: Mapping[str, np.ndarray]) -> Layout:
    return [(k, tuple(np.shape(arrays[k]))) for k in sorted(arrays)]


def unpack(flat: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    sizes = [int(np.prod(shape)) for _, shape in layout]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise ValueError(f"packed weights have shape {tuple(flat.shape)}; the model's stage needs {sum(sizes)} values")
    out, i = {}, 0
    for (k, shape), n in zip(layout, sizes, strict=True):
        out[k] = flat[i:i + n].reshape(shape)
        i += n
    return out
