"""A redone round costs no ε: the site answers a repeat of its last training request
with the update it computed then, without training again.

When the coordinator loses a round in flight (its SuperLink or its ServerApp died), it
resumes from its last checkpoint and sends the *same* request again: the same weights,
stage, round, steps and settings (only the reply token is new). Training again would
take new DP-SGD steps on the site's data and charge them to the ledger a second time.
Instead the site keeps its last train reply (weights and metrics) in
``state_dir/last-train-reply.safetensors`` together with the sha256 of the request it
answers; a request with the same key gets that reply back. Sending the same output again
is post-processing of what the ledger already charged: no new steps, no new ε, no site
data read. The policy counters are not touched either (no steps are taken).

The key covers everything that defines the computation: the site (id, dataset, privacy
settings, the SuperLink it serves), the request's config minus its reply token, and the
bytes of the weights and frozen weights it carries. Any difference (another round, a
changed model, a changed site setting) trains afresh. Only the newest reply is kept
(one file of the size of one update, replaced every round).

What it cannot save: steps taken by a training that never finished (the worker killed
mid-round) or whose reply was lost before it was stored here are charged, because they
were taken; the next request trains again and is charged again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from medisyn.client.policy import hash_arrays

from medisyn import protocol as P
from medisyn.config import SiteConfig
from medisyn.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

REPLY_NAME = "last-train-reply.safetensors"
META_KEY = "medisyn-replay"  # the safetensors metadata entry: JSON {key, metrics}


def request_key(site: SiteConfig, config: Mapping[str, Any], arrays: np.ndarray | None,
                frozen: np.ndarray | None) -> str:
    """sha256 of a train request as this site would compute it (the reply token excluded)."""
    h = hashlib.sha256()
    ident = {
        "site": site.site.id,
        "dataset": [json.loads(d.model_dump_json()) for d in site.datasets],
        "privacy": json.loads(site.privacy.model_dump_json()),
        "superlink": site.superlink.address,
        "config": {k: v for k, v in config.items() if k != P.REPLY_TOKEN},
    }
    h.update(json.dumps(ident, sort_keys=True, default=str).encode())
    hash_arrays(h, (arrays, frozen))
    return h.hexdigest()


def load_reply(state_dir: Path, key: str) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
    """The stored reply to the request ``key``; None if the last reply answers another
    request (or there is none, or it cannot be read: then the site trains)."""
    path = Path(state_dir) / REPLY_NAME
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            if meta.get("key") != key:
                return None
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no iteration)
        metrics = {str(k): v for k, v in dict(meta["metrics"]).items()}
    except Exception as e:  # unreadable: train as if there were none
        logger.warning("site reply store %s is unreadable (%s); training afresh", path, e)
        return None
    return state, metrics


def store_reply(state_dir: Path, key: str, state: Mapping[str, np.ndarray],
                metrics: Mapping[str, float]) -> None:
    """Keep the reply to the request ``key`` (atomic and durable; replaces the last one)."""
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v) for k, v in state.items()},
                metadata={META_KEY: json.dumps({"key": key, "metrics": dict(metrics)}, sort_keys=True)})
    atomic_write_bytes(Path(state_dir) / REPLY_NAME, blob)
