"""The Flower ClientApp: translates messages to ``medisyn.client.site`` calls.

Kept light: only Flower and numpy are imported at module level; torch, diffusers and
the data code load inside the handlers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from medisyn.client import site as site_ops

from medisyn import protocol as P

logger = logging.getLogger(__name__)


def coded_errors(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
    """Mod: a failed site task answers with a coded error (``medisyn.protocol``: code, site
    id, sanitized message as fields), so the server never parses error text."""
    try:
        return call_next(msg, context)
    except site_ops.SiteError as e:
        from flwr.app import Error

        code, reason = P.encode_site_error(e.code, e.site_id, str(e))
        return Message(Error(code=code, reason=reason), reply_to=msg)


app = ClientApp(mods=[coded_errors])


def _inputs(msg: Message):
    config = dict(msg.content.config_records.get(P.CONFIG, ConfigRecord()))
    arrays = msg.content.array_records.get(P.ARRAYS)
    frozen = msg.content.array_records.get(P.FROZEN)
    arr = arrays[P.PACKED].numpy() if arrays is not None and P.PACKED in arrays else None
    frz = frozen[P.PACKED].numpy() if frozen is not None and P.PACKED in frozen else None
    return config, arr, frz


def _reply(msg: Message, site_id: str, metrics: dict, arrays: dict | None = None) -> Message:
    token = msg.content.config_records.get(P.CONFIG, ConfigRecord()).get(P.REPLY_TOKEN)  # echoed: binds the reply to its run and round
    content = RecordDict({P.METRICS: MetricRecord(metrics), P.SITE_RECORD: ConfigRecord(P.site_record(site_id, token))})
    if arrays is not None:
        content[P.ARRAYS] = ArrayRecord({P.PACKED: _array(P.pack(arrays))})
    return Message(content=content, reply_to=msg)


def _array(v):  # noqa: ANN001, ANN202
    import numpy as np
    from flwr.app import Array

    return Array(np.ascontiguousarray(v))


def _site(context: Context):
    node_config = dict(context.node_config)
    site = site_ops.guarded(
        "unknown-site",
        site_ops.site_secrets(None, node_config),
        lambda: site_ops.site_from_node_config(node_config),
    )
    return site, site_ops.site_secrets(site, node_config)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site, secrets = _site(context)
    config, arrays, frozen = _inputs(msg)
    state, metrics = site_ops.guarded(
        site.site.id, secrets,
        lambda: site_ops.train_task(site, config, arrays, frozen, run_id=str(msg.metadata.run_id)),
    )
    return _reply(msg, site.site.id, metrics, state)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site, secrets = _site(context)
    config, arrays, frozen = _inputs(msg)
    metrics = site_ops.guarded(
        site.site.id, secrets, lambda: site_ops.evaluate_task(site, config, arrays, frozen)
    )
    return _reply(msg, site.site.id, metrics)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The release audit (``medisyn-server audit``): ``prompts`` or ``copy-detection``.

    In: ``config`` (``audit``, ``model_hash``, the model's ``model-config``/``stage``/...),
    optional ``arrays``/``frozen`` (the final model's weights), and for copy detection the
    ``synthetic`` ArrayRecord (uint8 images) with ``synthetic-meta`` (ids, prompts) in the
    config. Out: ``result`` ConfigRecord holding the shareable aggregate as JSON, a
    MetricRecord and the site id. Nothing else leaves the site.
    """
    site, secrets = _site(context)
    config, arrays, frozen = _inputs(msg)
    site_path = context.node_config.get(site_ops.NODE_SITE_CONFIG)

    def run() -> dict:
        synthetic = None
        rec = msg.content.array_records.get(P.SYNTHETIC)
        if rec is not None:
            synthetic = P.unpack_images(rec[P.IMAGES].numpy(), str(config.get(P.SYNTHETIC_META, "[]")))
        return site_ops.query_task(site, config, arrays, frozen, synthetic=synthetic,
                                   site_path=Path(str(site_path)) if site_path else None)

    result = site_ops.guarded(site.site.id, secrets, run)
    metrics = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    metrics.setdefault(P.NUM_EXAMPLES, int(result.get("n_synthetic", 0) or 0))
    content = RecordDict({
        P.METRICS: MetricRecord(metrics),
        P.RESULT: ConfigRecord({P.RESULT_JSON: json.dumps(result, sort_keys=True)}),
        P.SITE_RECORD: ConfigRecord(P.site_record(site.site.id)),
    })
    return Message(content=content, reply_to=msg)
