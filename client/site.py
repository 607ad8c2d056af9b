"""What a site does for a federated round, as plain functions (no Flower types).

Site settings come only from the SuperNode's ``node_config`` (``site-config``: the path
of the site's TOML; ``state-dir``), never from the run config: the data, the state
directory and the site's privacy policy are the site's. The server only says which
stage, round and how many local steps.

What leaves the site: the trained weights of the stage, scalar metrics and the site id
(the full list, and what DP covers: docs/privacy.md). Before any site data is read, the
site's policy (``medisyn.client.policy.SitePolicy``) checks and counts the task from the
site's own state. Errors are re-raised as :class:`SiteError` with a wire code, the site
id and a message with every file path removed (the ClientApp answers a coded error).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medisyn import protocol as P
from medisyn.config import SiteConfig, load_site_config
from medisyn.errors import ConfigError, MediSynError, PrivacyBudgetError
from medisyn.protocol import (  # noqa: F401  (the one message layout; re-exported)
    PACKED,
    QUERIES,
    REPORTED_METRICS,
    REPORTED_METRICS_DP,
    pack,
    unpack,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

NODE_SITE_CONFIG = "site-config"
NODE_STATE_DIR = "state-dir"


class SiteError(MediSynError):
    """A site failed a task; the message names the site and holds no file path.

    ``code`` (a name in ``medisyn.protocol.SITE_ERROR_CODES``) and ``site_id`` go to the
    server as fields of a coded error reply (the ClientApp's ``coded_errors`` mod).
    """

    def __init__(self, message: str, *, code: str = "site-error", site_id: str = "unknown-site"):
        super().__init__(message)
        self.code = code
        self.site_id = site_id


def node_config_for(site_config_path: Path, state_dir: Path) -> dict[str, str]:
    """The ``--node-config`` entries ``medisyn-client`` passes to ``flower-supernode``."""
    return {NODE_SITE_CONFIG: str(Path(site_config_path).resolve()), NODE_STATE_DIR: str(Path(state_dir).resolve())}


def site_from_node_config(node_config: Mapping[str, Any]) -> SiteConfig:
    path = node_config.get(NODE_SITE_CONFIG)
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"this SuperNode has no {NODE_SITE_CONFIG!r} in its node config; start it with "
            "`medisyn-client start --site site.toml`"
        )
    site = load_site_config(Path(path))
    state_dir = node_config.get(NODE_STATE_DIR)
    if state_dir is not None and Path(str(state_dir)).resolve() != Path(site.site.state_dir).resolve():
        raise ConfigError(f"node config {NODE_STATE_DIR} differs from [site] state_dir of the site config")
    return site


# --------------------------------------------------------------------------- redaction

_PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"<>:,;()\[\]{}]+){2,}|~[\\/][^\s'\"<>]+")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove file paths (and the given site-specific strings) from a message."""
    for s in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(s, "<site-path>")
    return _PATH_RE.sub("<path>", text)


def site_secrets(site: SiteConfig | None, node_config: Mapping[str, Any]) -> tuple[str, ...]:
    out = [str(v) for v in node_config.values() if isinstance(v, str)]
    if site is not None:
        out += [*site.data_paths(), str(site.site.state_dir)]
    return tuple(out)


def guarded(site_id: str, secrets: tuple[str, ...], fn: Callable[[], T]) -> T:
    """Run a site task; on failure log the full error locally and raise a sanitized
    :class:`SiteError` with the error's code (:func:`error_code`) and the site id.

    A ``PrivacyBudgetError`` (code ``privacy-budget``: the server stops a run when every
    site refuses for budget) carries the spent ε and the cap in its message.
    """
    try:
        return fn()
    except PrivacyBudgetError as e:
        logger.error("site %s: privacy budget refused the round", site_id, exc_info=e)
        raise SiteError(f"site {site_id}: {type(e).__name__}: {redact(budget_message(e), secrets)}",
                        code="privacy-budget", site_id=site_id) from None
    except Exception as e:
        logger.error("site %s: task failed", site_id, exc_info=e)
        raise SiteError(f"site {site_id}: {type(e).__name__}: {redact(str(e), secrets)[:400]}",
                        code=error_code(e), site_id=site_id) from None


def error_code(e: BaseException) -> str:
    """The wire code (``medisyn.protocol.SITE_ERROR_CODES``) of a site task's error."""
    from medisyn.errors import DataError, LedgerError

    code = getattr(e, "code", None)
    if isinstance(code, str):
        return code
    for cls, name in ((PrivacyBudgetError, "privacy-budget"), (LedgerError, "ledger"),
                      (PermissionError, "policy-refused"), (DataError, "data"), (ConfigError, "config")):
        if isinstance(e, cls):
            return name
    return "site-error"


def budget_message(e: PrivacyBudgetError) -> str:
    """The error's message, with spent ε and cap appended if the error carries them."""
    msg = str(e)
    parts = []
    for attr, label in (("spent", "spent ε"), ("epsilon", "spent ε"), ("projected", "ε after this round"),
                        ("cap", "cap ε"), ("max_epsilon", "cap ε")):
        v = getattr(e, attr, None)
        if isinstance(v, int | float) and label not in " ".join(parts) and label not in msg:
            parts.append(f"{label}={v:.4g}")
    return msg + (f" ({', '.join(parts)})" if parts else "")


# --------------------------------------------------------------------------- tasks


def _components(site: SiteConfig, config: Mapping[str, Any], arrays: np.ndarray | None,
                frozen: np.ndarray | None):
    """Build the model the server describes (``model-config``) and load the weights it sent."""
    import torch
    from medisyn.client.policy import SitePolicy
    from medisyn.client.warm import WARM

    from medisyn.config import ModelConfig
    from medisyn.models import (
        load_trainable_state,
        set_latent_scale,
        trainable_state,
    )

    policy = SitePolicy(site)
    policy.check_model_size(_message_parameters(arrays, frozen, config))
    model_cfg = ModelConfig.model_validate_json(str(config[P.MODEL_CONFIG]))
    stage = str(config[P.STAGE])
    # a fresh trainable copy of the model; the template (and the text encoder with its
    # prompt-embedding cache) stays warm in a long-lived worker (medisyn.client.warm)
    components = WARM.components(model_cfg, int(config.get(P.SEED, 0)))
    policy.check_model_size(sum(p.numel() for m in (components.unet, components.vae) for p in m.parameters()))
    # Make the scheduler config explicit, as the coordinator's model loaded from disk has
    # it: a freshly built one marks keys as defaults, and a sampling scheduler made from it
    # then takes its own defaults (e.g. timestep_spacing), so the same weights and seed
    # would generate other images than the coordinator's (the audit verifies them).
    sched: Any = components.noise_scheduler
    components.noise_scheduler = type(sched).from_config(
        {k: v for k, v in sched.config.items() if k != "_use_default_values"})

    def shapes(fs: str) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in trainable_state(components, fs).items()}  # type: ignore[arg-type]

    def tensors(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}

    if frozen is not None and frozen.size:
        stages = P.decode_stages(config.get(P.FROZEN_STAGES))
        for fs, state in P.unpack_frozen(frozen, {fs: shapes(fs) for fs in stages}).items():
            load_trainable_state(components, fs, tensors(state))  # type: ignore[arg-type]
    if P.LATENT_STD in config:
        set_latent_scale(components, float(config[P.LATENT_STD]))
    if arrays is None:
        raise ConfigError("the message carries no weights for the stage")
    from medisyn.train import split_run_ema

    sent = tensors(unpack(arrays, stage_layout(config, shapes(stage))))
    weights, ema = split_run_ema(sent)
    load_trainable_state(components, stage, weights)  # type: ignore[arg-type]
    run_ema = (ema, _ema_step(config)) if P.EMA_STEP in config else None
    return components, model_cfg, stage, run_ema


def stage_layout(config: Mapping[str, Any], own: Mapping[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    """The layout of a message's stage weights: the stage's own, plus the run's EMA of each
    (``ema.<name>``) when the coordinator carries one (``P.EMA_STEP``)."""
    from medisyn.train import EMA_PREFIX

    keys = dict(own)
    if P.EMA_STEP in config:
        keys.update({EMA_PREFIX + k: v for k, v in own.items()})
    return [(k, keys[k]) for k in sorted(keys)]


def _ema_step(config: Mapping[str, Any]) -> int:
    """The run's EMA step count (``P.EMA_STEP``), checked."""
    value = config[P.EMA_STEP]
    try:
        step = int(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{P.EMA_STEP}: expected a whole number of steps, got {str(value)[:80]!r}") from e
    if step < 0 or step != float(value):
        raise ConfigError(f"{P.EMA_STEP}: expected a whole number of steps >= 0, got {value!r}")
    return step


def _model_and_data(site: SiteConfig, config: Mapping[str, Any], arrays: np.ndarray | None,
                    frozen: np.ndarray | None, *, holdout: bool):
    from medisyn.client.warm import WARM

    from medisyn.data import ConcatImageDataset

    components, model_cfg, stage, run_ema = _components(site, config, arrays, frozen)
    parts = []
    for ds in site.datasets:
        split = ds.split.holdout if holdout else ds.split.train
        # decoded tensors kept warm, keyed by the dataset config and the data files' contents
        part = WARM.dataset(ds, resolution=model_cfg.resolution, channels=model_cfg.channels, splits=list(split))
        if len(part) == 0:
            which = "held-out" if holdout else "training"
            raise ConfigError(f"the site's {ds.image_type} dataset has no {which} records (splits {split})")
        parts.append(part)
    # a site with several datasets trains on all of them in shuffled (or Poisson) batches:
    # one model step sees several image types, as pooled training does (docs/federation.md)
    dataset = parts[0] if len(parts) == 1 else ConcatImageDataset(parts)
    return components, dataset, stage, run_ema


def enforce_policy(site: SiteConfig, config: Mapping[str, Any], arrays: np.ndarray | None = None,
                   frozen: np.ndarray | None = None) -> None:
    """The site's policy beats anything the server asks (``medisyn.client.policy``):
    checked against the site's own counters and counted before any site data is read.
    The message's ``round`` is a label only."""
    from medisyn.client.policy import SitePolicy

    SitePolicy(site).admit_train(local_steps=int(config.get(P.LOCAL_STEPS, 0)),
                                 n_parameters=_message_parameters(arrays, frozen, config))


def _message_parameters(arrays: np.ndarray | None, frozen: np.ndarray | None, config: Mapping[str, Any]) -> int:
    """The model's parameters in a message: its weights (not counting the run's EMA of
    them, which has as many again) and the frozen stages'."""
    n = int(arrays.size) // (2 if P.EMA_STEP in config else 1) if arrays is not None else 0
    return n + (int(frozen.size) if frozen is not None else 0)


def _model_hash(config: Mapping[str, Any], arrays: np.ndarray | None, frozen: np.ndarray | None) -> str:
    from medisyn.client.policy import model_fingerprint

    return model_fingerprint(config, arrays, frozen)


def _open_ledger_if_trained(site: SiteConfig, n_records: int) -> None:
    """Open the site's ledger with the training code's own opener when the site has a
    ledger or its marker (``LedgerError`` for a missing, corrupt or rolled-back one)."""
    from medisyn.privacy.ledger import LEDGER_NAME, MARKER_NAME

    state = Path(site.site.state_dir)
    if (state / LEDGER_NAME).exists() or (state / MARKER_NAME).exists():
        from medisyn.privacy.ledger import open_site_ledger

        open_site_ledger(state, site.site.id, site.privacy, n_records=n_records)


def decode_schedule(value: Any, local_steps: int) -> tuple[int, int]:
    """The round's place in the run's learning-rate schedule (``P.LR_SCHEDULE``), checked."""
    try:
        offset, total = (int(v) for v in json.loads(str(value)))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{P.LR_SCHEDULE}: expected JSON [offset, total], got {str(value)[:80]!r}") from e
    if offset < 0 or total < offset + local_steps:
        raise ConfigError(f"{P.LR_SCHEDULE}: [offset {offset}, total {total}] does not hold this round's "
                          f"{local_steps} local steps")
    return offset, total


def train_task(site: SiteConfig, config: Mapping[str, Any], arrays: np.ndarray | None,
               frozen: np.ndarray | None, *, run_id: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Train the stage locally; return (weights, reportable metrics).

    A repeat of the last request (a round the coordinator redoes after a crash) is
    answered with the stored reply, without training (``medisyn.client.replay``)."""
    from medisyn.client import replay

    from medisyn.config import TrainConfig
    from medisyn.train import LocalOptimizerState, train_local

    t0 = time.perf_counter()
    state_dir = Path(site.site.state_dir)
    key = replay.request_key(site, config, arrays, frozen)
    stored = replay.load_reply(state_dir, key)
    if stored is not None:
        logger.info("site %s: round %s repeats the last request: answering with the stored reply "
                    "(no new steps, no new ε)", site.site.id, config.get(P.ROUND))
        state, metrics = stored
        return state, {**metrics, P.REPLAYED: 1, P.SITE_SECONDS: time.perf_counter() - t0}
    enforce_policy(site, config, arrays, frozen)
    if float(config.get(P.PROXIMAL_MU, 0.0)) > 0:
        import inspect

        if "proximal_mu" not in inspect.signature(train_local).parameters:
            raise ConfigError(
                "the server asks for FedProx (proximal-mu > 0) but this site's "
                "medisyn.train.train_local has no proximal term"
            )
    components, dataset, stage, run_ema = _model_and_data(site, config, arrays, frozen, holdout=False)
    if not site.privacy.dp:
        # Fail closed before any step: a site that has trained (ledger or marker on disk)
        # must have a readable ledger to record these non-private steps in.
        _open_ledger_if_trained(site, len(dataset))
    train_cfg = TrainConfig.model_validate_json(str(config[P.TRAIN_CONFIG]))
    kwargs: dict[str, Any] = {}
    if float(config.get(P.PROXIMAL_MU, 0.0)) > 0:
        kwargs["proximal_mu"] = float(config[P.PROXIMAL_MU])
    if P.ANCHOR_PROMPTS in config:
        kwargs["anchor_prompts"] = P.decode_prompts(config[P.ANCHOR_PROMPTS])
    if P.LR_SCHEDULE in config:
        kwargs["schedule"] = decode_schedule(config[P.LR_SCHEDULE], int(config[P.LOCAL_STEPS]))
    if run_ema is not None:
        kwargs["run_ema"] = run_ema
    if train_cfg.keep_optimizer_state:
        kwargs["optimizer_state"] = LocalOptimizerState(state_dir, stage, run_id)
    result = train_local(
        components,
        dataset,
        steps=int(config[P.LOCAL_STEPS]),
        config=train_cfg,
        stage=stage,  # type: ignore[arg-type]
        # Always the site's policy, DP on or off: with DP off, train_local records the
        # steps as non-private in the site's ledger (if it has one), so ε becomes ∞.
        privacy=site.privacy,
        ledger_path=Path(site.site.state_dir),
        site_id=site.site.id,
        run_id=run_id,
        round=int(config.get(P.ROUND, 0)),
        progress=False,
        **kwargs,
    )
    state = {k: v.detach().cpu().float().numpy() for k, v in result.state.items()}
    reported = REPORTED_METRICS_DP if site.privacy.dp else REPORTED_METRICS
    metrics = {k: float(v) for k, v in result.metrics.items() if k in reported and isinstance(v, int | float)}
    metrics[P.NUM_EXAMPLES] = int(result.metrics[P.NUM_EXAMPLES])
    try:
        replay.store_reply(state_dir, key, state, metrics)
    except OSError as e:  # the reply still goes out; a redo of this round would train again
        logger.warning("site %s: could not keep the reply for a redone round: %s", site.site.id, e)
    metrics[P.SITE_SECONDS] = time.perf_counter() - t0
    return state, metrics


def evaluate_task(site: SiteConfig, config: Mapping[str, Any], arrays: np.ndarray | None,
                  frozen: np.ndarray | None) -> dict[str, float]:
    from medisyn.client.policy import SitePolicy

    from medisyn.train import evaluate_loss

    SitePolicy(site).admit_query(P.QUERY_EVALUATE, _model_hash(config, arrays, frozen))
    components, dataset, stage, _ = _model_and_data(site, config, arrays, frozen, holdout=True)
    loss = evaluate_loss(components, dataset, stage=stage, seed=int(config.get(P.SEED, 0)))  # type: ignore[arg-type]
    return {P.LOSS: float(loss), P.NUM_EXAMPLES: int(len(dataset))}


def query_task(site: SiteConfig, config: Mapping[str, Any], arrays: np.ndarray | None = None,
               frozen: np.ndarray | None = None,
               synthetic: list[tuple[str, np.ndarray, str]] | None = None,
               site_path: Path | None = None) -> dict[str, Any]:
    """The server's audit queries (run at the site; only aggregates come back).

    ``audit = "prompts"``: the prompts of the site's image types, built from the labels in
    its dataset config (never from a record's caption), so the server can generate K
    images for each. ``audit = "copy-detection"``: ``synthetic`` holds the server's
    generated images; with ``arrays``/``frozen`` (the final model's weights, as in a
    training message) the VAE view and the membership probe run too. ``site_path``: the
    site TOML, whose ``[audit]`` table configures the audit. The site reads ε
    and δ from its own ledger. Returns the shareable aggregate (checked by
    ``medisyn.audit.report.assert_shareable``).
    """
    audit = str(config.get(P.AUDIT, ""))
    if audit not in QUERIES:
        raise PermissionError(f"unknown audit query {audit!r}; a site answers {list(QUERIES)}")
    if audit == P.QUERY_EVALUATE:  # model quality on the site's own data (medisyn.client.evaluate)
        from medisyn.client.evaluate import evaluate_query

        return evaluate_query(site, config, arrays, frozen)
    # Both queries serve the copy-detection audit; the site's policy must allow it.
    if P.QUERY_COPY_DETECTION not in site.privacy.allowed_audits:
        raise PermissionError(
            f"audit {audit!r} is not allowed by the site's policy (allowed: {site.privacy.allowed_audits})"
        )
    if audit == P.QUERY_PROMPTS:
        return prompts_answer(site)
    from medisyn.audit import site_query
    from medisyn.audit.settings import audit_config

    if synthetic is None:
        raise ConfigError("the copy-detection query carries no synthetic images")
    from medisyn.client.policy import SitePolicy

    # budgeted per model: the weights sent, or (without them) the model hash the server names
    fingerprint = (_model_hash(config, arrays, frozen) if arrays is not None
                   else "unverified:" + str(config.get(P.MODEL_HASH, "")))
    SitePolicy(site).admit_query(P.QUERY_COPY_DETECTION, fingerprint)
    components = None
    if arrays is not None and P.MODEL_CONFIG in config:
        components, _, _, _ = _components(site, config, arrays, frozen)
        components.unet.eval()
        components.vae.eval()
    sample = site.privacy.audit_verify_sample
    if sample != 0:
        # The site audits only images it has verified came from the model under audit
        # (a real image slipped in would make the audit a membership oracle).
        from medisyn.audit.site_audit import verify_synthetic

        if components is None:
            raise PermissionError(
                "the site verifies the query's images against the model (privacy.audit_verify_sample "
                "is not 0), but the query carries no model: send it (no --no-model)")
        verify_synthetic(components, synthetic, str(config.get(P.SYNTHETIC_META, "[]")),
                         str(config.get(P.GENERATION, "")), sample=sample,
                         tolerance=site.privacy.audit_verify_tolerance, site_id=site.site.id)
    # the site's [audit] table (thresholds, views, encoder settings), as read with its config
    audit_cfg = audit_config(site, Path(site_path).resolve().parent if site_path is not None else None)
    model = fingerprint if components is not None else "none"
    # One audit per dataset: each image type's real images indexed and calibrated on their
    # own (every synthetic image is checked against each; the other types' prompts are the
    # cross-type group). A site with one dataset answers its aggregate as before.
    answers = [dict(site_query(one, {k: v for k, v in config.items() if k in (P.AUDIT, P.MODEL_HASH)},
                               components, audit_config=audit_cfg, synthetic=synthetic,
                               warm=_warm_audit_index(one, audit_cfg, model)))
               for one in site.per_dataset()]
    if len(answers) == 1:
        return answers[0]
    return {"kind": P.SITE_AUDITS_KIND, "site_id": site.site.id, P.AUDIT_PARTS: answers}


def prompts_answer(site: SiteConfig) -> dict[str, Any]:
    """The ``prompts`` query's answer: the label prompts of each of the site's image types,
    with its specialty and channels (grey 1 or colour 3: the coordinator then generates
    channel-equal images for a grey type; a property of the dataset's format, not of any
    record). ``P.PROMPTS_TYPES`` lists every type; a site with one dataset also answers
    the single-type keys older coordinators read."""
    from medisyn.data import label_prompts, read_raw, source_channels

    types = {ds.image_type: {P.QUERY_PROMPTS: sorted(set(label_prompts(ds).values())),
                             P.PROMPTS_SPECIALTY: ds.specialty,
                             P.PROMPTS_CHANNELS: source_channels(read_raw(ds))} for ds in site.datasets}
    out: dict[str, Any] = {P.QUERY_PROMPTS: sorted({p for t in types.values() for p in t[P.QUERY_PROMPTS]}),
                           P.PROMPTS_TYPES: types}
    if len(types) == 1:
        (t, entry), = types.items()
        out.update({P.PROMPTS_IMAGE_TYPE: t, P.PROMPTS_SPECIALTY: entry[P.PROMPTS_SPECIALTY],
                    P.PROMPTS_CHANNELS: entry[P.PROMPTS_CHANNELS]})
    return out


def _warm_audit_index(site: SiteConfig, audit_cfg: Any, model: str):  # noqa: ANN202
    """The audit's prepared index (fitted encoders, views, thresholds over the site's real
    images) kept warm in a long-lived worker (``medisyn.client.warm``), keyed by the content
    it is built from: the dataset config and its files' contents, the audit settings and the
    model's fingerprint (its VAE is a view). Another model, changed data or settings build a
    new one; the query is still counted and admitted by the site's policy as before."""
    from medisyn.audit.prepare import prepared_key
    from medisyn.client.warm import WARM, content_key

    dataset = site.only_dataset  # the audit runs per dataset (SiteConfig.per_dataset)
    key = content_key(*prepared_key(
        dataset=dataset.model_dump_json(), data_files=WARM.hasher.tree(Path(dataset.path)),
        audit=audit_cfg, model=model, cache_dir=Path(site.site.state_dir) / "audit" / "encoders"))
    return lambda build: WARM.get(f"audit-index:{dataset.image_type}", key, build)


def dumps_config(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), sort_keys=True, default=str)
