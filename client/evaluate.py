"""The site's answer to the federated ``evaluate`` query (``medisyn-server evaluate``).

The server sends the final model's weights (as in a training message) and the evaluation
settings; the site builds the model, generates ``n_per_label`` images for each label of
its own image type, and measures them against its own real data with
:func:`medisyn.evaluation.evaluate_site`. Only the aggregate leaves the site (scalars,
label words, prompts, counts; checked with ``medisyn.audit.report.assert_shareable``):
no per-image value, no real pixel, no embedding, no path. The site's policy decides:
``evaluate`` must be in ``[privacy] allowed_audits``, each model may be queried at most
``max_queries_per_model`` times, label groups smaller than ``audit_min_group`` keep their
real-data statistics at the site, and ``n_per_label`` is capped.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medisyn import protocol as P
from medisyn.config import SiteConfig
from medisyn.errors import ConfigError

logger = logging.getLogger(__name__)

QUERY = P.QUERY_EVALUATE
MAX_N_PER_LABEL = 1024  # what a site generates per label for one query, at most
# settings a server may set; the rest (threads, workers) is the site's and ignored
SERVER_SETTINGS = ("n_per_label", "seed", "steps", "guidance", "guidance_interval", "scheduler", "batch_size", "resolution",
                   "classifier_steps", "encoder_steps", "classifier_batch", "classifier_lr",
                   "classifier_width", "k", "near_duplicate_threshold", "real_fraction")


def evaluation_settings(config: Mapping[str, Any]):
    """The settings of the query (``config["evaluation"]``: JSON), checked and capped."""
    from medisyn.evaluation import EvaluationSettings, make_settings

    raw = config.get(P.EVALUATION, "{}")
    try:
        asked = json.loads(str(raw)) if not isinstance(raw, Mapping) else dict(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"the evaluate query's settings are not valid JSON: {e}") from None
    if not isinstance(asked, dict):
        raise ConfigError("the evaluate query's settings must be a JSON object")
    unknown = sorted(set(asked) - set(EvaluationSettings.model_fields))  # the others are the site's own
    if unknown:
        raise ConfigError(f"the evaluate query asks for unknown setting(s) {unknown}")
    s = make_settings({k: v for k, v in asked.items() if k in SERVER_SETTINGS})
    if s.n_per_label > MAX_N_PER_LABEL:
        raise PermissionError(f"the server asks for {s.n_per_label} images per label; the site generates at "
                              f"most {MAX_N_PER_LABEL}")
    return s


def evaluate_query(site: SiteConfig, config: Mapping[str, Any], arrays: np.ndarray | None,
                   frozen: np.ndarray | None) -> dict[str, Any]:
    """Run the ``evaluate`` query at the site; return the shareable aggregate."""
    from medisyn.audit.report import assert_shareable
    from medisyn.client.site import _components, _model_hash

    from medisyn.evaluation import evaluate_site

    if QUERY not in site.privacy.allowed_audits:
        raise PermissionError(f"query {QUERY!r} is not allowed by the site's policy "
                              f"(allowed: {site.privacy.allowed_audits})")
    if arrays is None or P.MODEL_CONFIG not in config:
        raise ConfigError("the evaluate query carries no model (weights and model-config)")
    settings = evaluation_settings(config)
    policy = None
    try:
        from medisyn.client.policy import SitePolicy

        policy = SitePolicy(site)
    except ImportError:  # an older site install without the policy module
        pass
    if policy is not None:
        policy.admit_query(QUERY, _model_hash(config, arrays, frozen))
    min_group = int(getattr(site.privacy, "audit_min_group", 1) or 1)
    components, _, _, _ = _components(site, config, arrays, frozen)
    components.unet.eval()
    components.vae.eval()
    meta = None
    if config.get(P.MODEL_IMAGE_TYPES):
        try:
            meta = {"image_types": json.loads(str(config[P.MODEL_IMAGE_TYPES]))}
        except json.JSONDecodeError:
            meta = None
        if meta is not None and isinstance(meta["image_types"], dict) and hasattr(components, "image_types"):
            # what the model knows of its image types (e.g. grey ones generate grey), as on disk
            components.image_types = dict(meta["image_types"])
    # the site's own types: grey data -> channel-equal images (a federated model's meta may
    # not know its types); the answer says so, and the coordinator's gallery matches it
    from medisyn.data import read_raw, source_channels

    mh = config.get(P.MODEL_HASH)
    results = []
    for ds in site.datasets:  # one evaluation per dataset (image type), each on its own data
        channels = source_channels(read_raw(ds))
        if hasattr(components, "image_types") and ds.image_type not in components.image_types:
            components.image_types = {**components.image_types, ds.image_type: {"channels": channels}}
        result = evaluate_site(components, ds, settings=settings, site_id=site.site.id,
                               model_hash=None if mh is None else str(mh), model_meta=meta,
                               min_group=min_group, progress=lambda m: logger.info("evaluate: %s", m))
        if isinstance(result.get("type"), dict):
            result["type"]["channels"] = int(channels)
        results.append(result)
    answer = results[0] if len(results) == 1 else {
        "kind": P.SITE_EVALUATIONS_KIND, "site_id": site.site.id, "evaluations": results}
    assert_shareable(answer, forbidden=[*site.data_paths(), str(site.site.state_dir)])
    _keep_local_copy(site, answer)
    return answer


def _keep_local_copy(site: SiteConfig, result: Mapping[str, Any]) -> None:
    """What the site answered, in its state directory (``evaluation/<time>.json``)."""
    try:
        from medisyn.fileio import atomic_write_json

        d = Path(site.site.state_dir) / "evaluation"
        d.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        atomic_write_json(d / f"answered-{stamp}.json", dict(result))
    except Exception as e:  # the record is a convenience; never fail the query for it
        logger.warning("could not keep a local copy of the evaluation: %s", e)
