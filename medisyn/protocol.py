"""The message layout between the coordinator and the sites: one module, imported by both.

Everything a ``train``, ``evaluate`` or ``query`` message and its reply carry is named
here: the records, the config keys, the metric keys, the packed-weights and synthetic
image encodings, the frozen-weight keys, and the coded site errors. Numpy only (no Flower
types, no torch): the server and the site build their Flower records from these names.

Coordinator -> site (``train`` / ``evaluate``):
- :data:`ARRAYS`: ArrayRecord ``{PACKED: float32 vector}`` (:func:`pack`), the stage's
  trainable weights in sorted key order;
- :data:`FROZEN`: the same for the already federated weights a site needs frozen, keyed
  :func:`frozen_key` (``<stage>/<name>``); the stages are listed in the config's
  :data:`FROZEN_STAGES` (:func:`encode_stages`);
- :data:`CONFIG`: ConfigRecord with :data:`STAGE`, :data:`ROUND` (a label only: the site
  counts rounds itself), :data:`SEED`, :data:`MODEL_CONFIG`, and for ``train``
  :data:`LOCAL_STEPS`, :data:`TRAIN_CONFIG`, :data:`REPLY_TOKEN`, :data:`PROXIMAL_MU`
  (FedProx), :data:`LR_SCHEDULE`, :data:`EMA_STEP` (the run's EMA); :data:`LATENT_STD` and :data:`ANCHOR_PROMPTS` for the tiny preset's UNet stage.

Site -> coordinator: :data:`METRICS` (MetricRecord, always with :data:`NUM_EXAMPLES`),
:data:`SITE_RECORD` (ConfigRecord: :data:`SITE_ID`, the echoed :data:`REPLY_TOKEN`), and
for ``train`` :data:`ARRAYS`; or a coded error (:func:`encode_site_error`).

Audit and evaluation queries (``query`` messages, group :data:`QUERY_GROUP`): the config's
:data:`AUDIT` names the query (:data:`QUERIES`), plus :data:`MODEL_HASH`; copy detection adds
:data:`SYNTHETIC` (ArrayRecord ``{IMAGES: uint8 (N, H, W, C)}``, :func:`pack_images`) with
:data:`SYNTHETIC_META` and :data:`GENERATION`; evaluate adds :data:`EVALUATION` and
:data:`MODEL_IMAGE_TYPES`. The reply's :data:`RESULT` ConfigRecord holds the aggregate as
JSON under :data:`RESULT_JSON`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import numpy as np

# --------------------------------------------------------------------------- records

CONFIG = "config"  # ConfigRecord: the task's settings (both ways: the server's ask)
ARRAYS = "arrays"  # ArrayRecord: the stage's weights (packed)
FROZEN = "frozen"  # ArrayRecord: frozen weights of other stages (packed, frozen keys)
SYNTHETIC = "synthetic"  # ArrayRecord: the copy-detection query's images
METRICS = "metrics"  # MetricRecord of a reply
SITE_RECORD = "site"  # ConfigRecord of a reply: who answers
RESULT = "result"  # ConfigRecord of a query reply: the aggregate as JSON
RESULT_JSON = "json"  # its one key

QUERY_MESSAGE = "query"  # Flower message type of the audit / evaluate queries
QUERY_GROUP = "audit"  # their group id

# --------------------------------------------------------------------------- config keys

STAGE = "stage"
ROUND = "round"  # the coordinator's global round: a label (the site's policy counts its own)
SEED = "seed"
MODEL_CONFIG = "model-config"  # ModelConfig JSON
TRAIN_CONFIG = "train-config"  # TrainConfig JSON
LOCAL_STEPS = "local-steps"
REPLY_TOKEN = "reply-token"  # train: run id, round, nonce; echoed in the reply's site record
PROXIMAL_MU = "proximal-mu"  # FedProx only
# UNet rounds: JSON list of every site's prompts (from the prompts query), for prompt
# anchoring (medisyn.train.PromptAnchorHook); prompts are dataset metadata, not records
ANCHOR_PROMPTS = "anchor-prompts"
# JSON [offset, total]: this round's local steps are steps offset+1.. of the stage's
# whole round plan of ``total`` steps (warmup and cosine over the run: [train] lr_schedule_scope)
LR_SCHEDULE = "lr-schedule"
# The run's EMA travels with the weights ([train] ema_scope = "run"): the message's
# arrays hold the stage's weights plus their EMA as "ema.<name>" (medisyn.train.EMA_PREFIX),
# and this key gives the number of steps the EMA has averaged over so far (its warm-up)
EMA_STEP = "ema-step"
LATENT_STD = "latent-std"  # the tiny VAE's latent scale (also a metric of the VAE stage)
FROZEN_STAGES = "frozen-stages"  # comma-separated stages in the FROZEN record

AUDIT = "audit"  # the query's name, one of QUERIES
MODEL_HASH = "model_hash"
SYNTHETIC_META = "synthetic-meta"  # JSON list of {id, prompt, seed}
GENERATION = "generation"  # JSON {steps, guidance, guidance_interval, scheduler, grey_types}
EVALUATION = "evaluation"  # JSON of EvaluationSettings fields
MODEL_IMAGE_TYPES = "model-image-types"  # JSON, from the model's medisyn.json

# what defines the model a message carries, next to its weights (a site's query budget
# is per model: medisyn.client.policy.model_fingerprint)
MODEL_KEYS = (MODEL_CONFIG, STAGE, FROZEN_STAGES, LATENT_STD)

# the queries a site answers
QUERY_PROMPTS = "prompts"
QUERY_COPY_DETECTION = "copy-detection"
QUERY_EVALUATE = "evaluate"
QUERIES = (QUERY_PROMPTS, QUERY_COPY_DETECTION, QUERY_EVALUATE)
# what the prompts query answers (besides nothing else)
PROMPTS_IMAGE_TYPE = "image-type"
PROMPTS_CHANNELS = "channels"
PROMPTS_SPECIALTY = "specialty"
# every image type of the site: {type: {prompts, specialty, channels}} (a site may hold several)
PROMPTS_TYPES = "types"
# a site with several datasets answers copy-detection with one aggregate per dataset
SITE_AUDITS_KIND = "medisyn-site-audit-aggregates"
AUDIT_PARTS = "parts"
# ... and the evaluate query with one site evaluation per dataset ("evaluations")
SITE_EVALUATIONS_KIND = "medisyn-site-evaluations"

# --------------------------------------------------------------------------- metric keys

NUM_EXAMPLES = "num-examples"
LOSS = "loss"
SECONDS = "seconds"  # local training time
SITE_SECONDS = "site-seconds"  # the whole task at the site
REPLAYED = "replayed"  # 1: a repeated train request answered with the stored reply (client/replay.py)
# Metrics a site may report (numbers only). Anything else the core returns stays local.
# docs/privacy.md ("What leaves a site") says which are covered by DP and which are not.
REPORTED_METRICS = (
    LOSS, "loss-first", NUM_EXAMPLES, "steps", SECONDS, "images-per-s",
    "epsilon", "delta", "noise-multiplier", "sample-rate", LATENT_STD, "anchor-prompts",
)
# Under DP, two avoidable outside-DP values stay at the site: the first batch's loss and
# the images per second (the Poisson-sampled batch sizes of the round, summed).
REPORTED_METRICS_DP = tuple(m for m in REPORTED_METRICS if m not in ("loss-first", "images-per-s"))

# --------------------------------------------------------------------------- reply site record

SITE_ID = "site-id"


def site_record(site_id: str, reply_token: object | None = None) -> dict[str, str]:
    """The content of a reply's :data:`SITE_RECORD`: the site id and the echoed token."""
    return {SITE_ID: site_id, **({REPLY_TOKEN: str(reply_token)} if reply_token else {})}


# --------------------------------------------------------------------------- packed weights
#
# One float32 vector, keys in sorted order, each tensor C-order. Flower moves every
# Array as its own object (one HTTP request per hop), so a UNet's ~200 tensors would cost
# hundreds of requests per site per round; one packed vector costs a few chunks. Sites
# and server must agree byte for byte, so both import these functions from here.

PACKED = "packed"  # the one key of ARRAYS and FROZEN

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


# --------------------------------------------------------------------------- frozen weights
#
# The FROZEN record packs several stages' weights in one vector; each key is
# ``<stage>/<name>`` (a stage name has no "/"; a weight name may). The stages are listed,
# comma-separated, in the config's FROZEN_STAGES.

DEFAULT_FROZEN_STAGES = ("vae",)  # a message with frozen weights but no FROZEN_STAGES


def frozen_key(stage: str, name: str) -> str:
    if not stage or "/" in stage:
        raise ValueError(f"not a stage name: {stage!r}")
    return f"{stage}/{name}"


def split_frozen_key(key: str) -> tuple[str, str]:
    """``(stage, name)`` of a :func:`frozen_key`."""
    stage, sep, name = key.partition("/")
    if not sep or not stage or not name:
        raise ValueError(f"not a frozen-weight key: {key!r}")
    return stage, name


def frozen_arrays(by_stage: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One mapping of :func:`frozen_key` -> array for the FROZEN record (pack it with :func:`pack`)."""
    return {frozen_key(stage, k): v for stage, state in by_stage.items() for k, v in state.items()}


def frozen_layout(shapes_by_stage: Mapping[str, Mapping[str, tuple[int, ...]]]) -> Layout:
    """The layout of a packed FROZEN vector, from each stage's weight shapes."""
    shapes = {frozen_key(stage, k): tuple(shape) for stage, by_name in shapes_by_stage.items()
              for k, shape in by_name.items()}
    return [(k, shapes[k]) for k in sorted(shapes)]  # the order of pack()


def unpack_frozen(flat: np.ndarray, shapes_by_stage: Mapping[str, Mapping[str, tuple[int, ...]]]
                  ) -> dict[str, dict[str, np.ndarray]]:
    """The inverse of ``pack(frozen_arrays(...))``: stage -> name -> array."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, v in unpack(flat, frozen_layout(shapes_by_stage)).items():
        stage, name = split_frozen_key(key)
        out.setdefault(stage, {})[name] = v
    return out


def encode_stages(stages: Iterable[str]) -> str:
    """The value of FROZEN_STAGES."""
    return ",".join(stages)


def decode_stages(value: object | None) -> list[str]:
    """The stages a FROZEN_STAGES value names (absent: :data:`DEFAULT_FROZEN_STAGES`)."""
    if value is None:
        return list(DEFAULT_FROZEN_STAGES)
    return [s for s in str(value).split(",") if s]


MAX_ANCHOR_PROMPTS = 4096


def encode_prompts(prompts: Iterable[str]) -> str:
    """The value of ANCHOR_PROMPTS: a JSON list of distinct prompts, sorted."""
    return json.dumps(sorted({str(p) for p in prompts}))


def decode_prompts(value: object) -> list[str]:
    """The prompts an ANCHOR_PROMPTS value lists; ``ValueError`` naming the problem."""
    try:
        rows = json.loads(str(value))
    except json.JSONDecodeError as e:
        raise ValueError(f"{ANCHOR_PROMPTS}: not JSON ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
        raise ValueError(f"{ANCHOR_PROMPTS}: must be a JSON list of strings")
    if len(rows) > MAX_ANCHOR_PROMPTS:
        raise ValueError(f"{ANCHOR_PROMPTS}: {len(rows)} prompts, more than {MAX_ANCHOR_PROMPTS}")
    return rows

# --------------------------------------------------------------------------- images

IMAGES = "images"


def pack_images(items: list[tuple[str, np.ndarray, str]]) -> tuple[np.ndarray, str]:
    """Synthetic images for the audit query: one uint8 ``(N, H, W, C)`` array plus a JSON
    list of ``{"id", "prompt"}`` in the same order. All images must share one shape."""
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
BUDGET_CODE = "privacy-budget"  # a site refused for budget (every site: the run stops)


def encode_site_error(code: str, site_id: str, message: str) -> tuple[int, str]:
    """(Flower error code, reason) for a site's failed task."""
    if code not in SITE_ERROR_CODES:
        code = "site-error"
    return SITE_ERROR_CODES[code], json.dumps({"code": code, SITE_ID: site_id, "message": message},
                                              ensure_ascii=False, sort_keys=True)


def decode_site_error(code: int, reason: str | None) -> dict[str, str] | None:
    """``{"code", "site-id", "message"}`` of a site's coded error; None for any other error
    (a Flower error, or a reason that does not match its code)."""
    names = {v: k for k, v in SITE_ERROR_CODES.items()}
    if code not in names:
        return None
    try:
        data = json.loads(reason or "")
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("code") != names[code]:
        return None
    if not all(isinstance(data.get(k), str) for k in (SITE_ID, "message")):
        return None
    return {"code": data["code"], SITE_ID: data[SITE_ID], "message": data["message"]}
