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


# --------------------------------------------------------------------------- images

IMAGES = "images"


def pack_images(items: list[tuple[str, np.ndarray, str]]) -> tuple[np.ndarray, str]:
    """Synthetic images for the audit query: one uint8 ``(N, H, W, C)`` array plus a JSON
    list of ``{"id", "prompt"}`` in the same order. All images must share one shape."""
    import json

    if not items:
        raise ValueError("no images to pack")
    arrs = [np.asarray(img, dtype=np.uint8) for _, img, _ in items]
    arrs = [a[..., None] if a.ndim == 2 else a for a in arrs]
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ValueError(f"synthetic images differ in shape: {sorted(shapes)}")
    meta = json.dumps([{"id": str(i), "prompt": str(p)} for i, _, p in items])
    return np.ascontiguousarray(np.stack(arrs)), meta


def unpack_images(array: np.ndarray, meta: str) -> list[tuple[str, np.ndarray, str]]:
    """The inverse of :func:`pack_images`; raises ``ValueError`` naming what is wrong."""
    import json

    try:
        rows = json.loads(meta)
    except json.JSONDecodeError as e:
        raise ValueError(f"synthetic image list is not valid JSON: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"id", "prompt"} <= set(r) for r in rows):
        raise ValueError("synthetic image list must be a JSON list of {id, prompt}")
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"synthetic images must be uint8 (N, H, W, 1|3); got {array.dtype} {tuple(array.shape)}")
    if len(rows) != array.shape[0]:
        raise ValueError(f"{array.shape[0]} synthetic images but {len(rows)} ids")
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("synthetic image ids are not unique")
    return [(i, (a[..., 0] if a.shape[-1] == 1 else a).copy(), str(r["prompt"]))
            for i, a, r in zip(ids, array, rows, strict=True)]


# --------------------------------------------------------------------------- site errors
#
# A site that fails a task answers with a Flower ``Error`` whose ``code`` is one of
# ``SITE_ERROR_CODES`` (1000 + the CLI exit code; Flower's own codes are < 100) and whose
# ``reason`` is JSON ``{"code": <name>, "site-id": <id>, "message": <text>}``: the server
# reads the code and the site from the fields, never from the text. The message is
# sanitized at the site (no file path). Errors Flower makes itself (a crashed app, an
# unreachable node) keep Flower's codes and free-text reasons.

SITE_ERROR_CODES: dict[str, int] = {
    "site-error": 1001,  # anything else that failed the task
    "config": 1002,  # ConfigError: the site's config or the message's settings
    "data": 1003,  # DataError: the site's data
    "privacy-budget": 1004,  # PrivacyBudgetError: ε cap, max_rounds, max_total_steps
    "ledger": 1005,  # LedgerError: ledger or policy counters missing/corrupt/rolled back
    "policy-refused": 1006,  # the site's policy refuses the task (limits, audits, budgets)
}


def encode_site_error(code: str, site_id: str, message: str) -> tuple[int, str]:
    """(Flower error code, reason) for a site's failed task."""
    import json

    if code not in SITE_ERROR_CODES:
        code = "site-error"
    return SITE_ERROR_CODES[code], json.dumps({"code": code, "site-id": site_id, "message": message},
                                              ensure_ascii=False, sort_keys=True)


def decode_site_error(code: int, reason: str | None) -> dict[str, str] | None:
    """``{"code", "site-id", "message"}`` of a site's coded error; None for any other error
    (a Flower error, or a reason that does not match its code)."""
    import json

    names = {v: k for k, v in SITE_ERROR_CODES.items()}
    if code not in names:
        return None
    try:
        data = json.loads(reason or "")
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("code") != names[code]:
        return None
    if not all(isinstance(data.get(k), str) for k in ("site-id", "message")):
        return None
    return {"code": data["code"], "site-id": data["site-id"], "message": data["message"]}
