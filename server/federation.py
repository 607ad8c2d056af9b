"""The federated run: stages, rounds, reply checks, aggregation, checkpoints, metrics.

``run_federation(grid, cfg, resume=...)`` is plain Python over a Flower ``Grid``; the
ServerApp (``medisyn.server.app``) only calls it. Unit tests drive it with an
in-process Grid, integration tests with a real SuperLink.

The message layout (records, config and metric keys, packed and frozen weights, coded
errors) is :mod:`medisyn.protocol`. A ``train`` / ``evaluate`` message carries the stage's
trainable weights, the frozen weights a site needs that it cannot build itself (the
federated VAE in stage ``unet`` of the tiny preset; absent otherwise) and the config; a
train reply must hold exactly one packed ArrayRecord, one MetricRecord with
``num-examples`` and the echoed ``reply-token`` (a reply without the round's token is
rejected).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from medisyn.server.checkpoint import (
    Checkpoint,
    append_jsonl,
    atomic_write_text,
    fsync_tree,
    latest_checkpoint,
    write_checkpoint,
)
from medisyn.server.checks import Candidate, Verdict, check_replies
from medisyn.server.config import FederationConfig, read_enrolment
from medisyn.server.strategy import aggregate_checked, export_state, make_strategy, restore_state

from medisyn import protocol as P
from medisyn.config import ModelConfig, Stage
from medisyn.fileio import fsync_dir
from medisyn.protocol import BUDGET_CODE, PACKED, layout_of, pack, unpack  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------- outcome


class Outcome:
    """How a run ended; the supervisor maps it to an exit code."""

    DONE = "done"
    NO_SITES = "no-sites"
    BUDGET = "budget-exhausted"
    FAILED = "failed"
    RUNNING = "running"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, timeout: float = 180.0) -> Iterator[None]:
    """Exclusive lock on ``RUN_DIR/serverapp.lock`` (waits for a previous holder)."""
    import fcntl

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / "serverapp.lock", "w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"another ServerApp holds {run_dir}/serverapp.lock for over {timeout:.0f} s"
                    ) from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_status(run_dir: Path, state: str, **extra: Any) -> None:
    atomic_write_text(
        Path(run_dir) / "status.json",
        json.dumps({"state": state, "time": time.time(), **extra}, sort_keys=True),
    )


def read_status(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / "status.json"
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- model


RUN_EMA_FILE = "run-ema.safetensors"  # a checkpoint's run EMA ([train] ema_scope = "run")


class GlobalModel:
    """The coordinator's copy of the model (medisyn core; never sent whole).

    With ``[train] ema_scope = "run"`` it also holds, per stage, the run's EMA of the
    weights and the number of steps that EMA has averaged (:attr:`ema`, :attr:`ema_step`):
    the weights train on, the EMA is what is released, audited and evaluated."""

    def __init__(self, cfg: ModelConfig, *, seed: int = 0, from_dir: Path | None = None):
        from medisyn.models import build_components, load_components

        self.components = load_components(from_dir) if from_dir else build_components(cfg, seed=seed)
        self.ema: dict[str, dict[str, np.ndarray]] = {}
        self.ema_step: dict[str, int] = {}
        if from_dir is not None and (Path(from_dir) / RUN_EMA_FILE).is_file():
            self._load_run_ema(Path(from_dir) / RUN_EMA_FILE)

    def weights(self, stage: Stage) -> dict[str, np.ndarray]:
        """The stage's weights as they train (not the run's EMA)."""
        from medisyn.models import trainable_state

        return {
            k: v.detach().cpu().float().numpy().copy()
            for k, v in trainable_state(self.components, stage).items()
        }

    def state(self, stage: Stage) -> dict[str, np.ndarray]:
        """The stage's model as released: the run's EMA where the run keeps one, else the
        weights (what the audit, the evaluation and later stages get)."""
        if stage in self.ema:
            return {k: v.copy() for k, v in self.ema[stage].items()}
        return self.weights(stage)

    def train_state(self, stage: Stage, carry_ema: bool) -> dict[str, np.ndarray]:
        """What a training round sends: the weights, plus (``carry_ema``) the run's EMA of
        them as ``ema.<name>`` (the weights themselves at the run's first round)."""
        from medisyn.train import EMA_PREFIX

        weights = self.weights(stage)
        if not carry_ema:
            return weights
        ema = self.ema.get(stage) or weights
        return {**weights, **{EMA_PREFIX + k: v.copy() for k, v in ema.items()}}

    def load(self, stage: Stage, arrays: dict[str, np.ndarray], ema_steps: int = 0) -> None:
        """Load a round's aggregate; a run EMA in it (``ema.<name>``) is kept beside the
        weights, its step count advanced by ``ema_steps``."""
        import torch

        from medisyn.models import load_trainable_state
        from medisyn.train import split_run_ema

        weights, ema = split_run_ema(arrays)
        load_trainable_state(
            self.components, stage, {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        )
        if ema:
            if set(ema) != set(weights):
                raise ValueError(f"stage {stage!r}: the run's EMA does not cover the same weights as the model")
            self.ema[stage] = {k: np.array(v, dtype=np.float32) for k, v in ema.items()}
            self.ema_step[stage] = self.ema_step.get(stage, 0) + int(ema_steps)

    def fold_run_ema(self) -> None:
        """Make each stage's run EMA its weights and keep no EMA from here on."""
        for stage, ema in self.ema.items():
            self.load(stage, ema)  # type: ignore[arg-type]
        self.ema.clear()
        self.ema_step.clear()

    def _load_run_ema(self, path: Path) -> None:
        from safetensors.numpy import load_file

        for key, v in load_file(str(path)).items():
            stage, _, name = key.partition("/")
            if name == "":
                raise ValueError(f"{path}: key {key!r} is not <stage>/<weight>")
            if name == "#step":
                self.ema_step[stage] = int(v)
            else:
                self.ema.setdefault(stage, {})[name] = v

    def _save_run_ema(self, out_dir: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {f"{stage}/{k}": np.ascontiguousarray(v) for stage, e in self.ema.items() for k, v in e.items()}
        tensors.update({f"{stage}/#step": np.asarray(n, dtype=np.int64) for stage, n in self.ema_step.items()})
        save_file(tensors, str(out_dir / RUN_EMA_FILE))

    def extra_config(self, stage: Stage) -> dict[str, Any]:
        """Non-weight model settings a site needs: the tiny VAE's latent scale."""
        if stage == "unet" and self.components.config.preset == "tiny":
            return {P.LATENT_STD: 1.0 / float(self.components.scaling_factor)}
        return {}

    def update_latent_scale(self, site_metrics: dict[str, dict[str, Any]]) -> None:
        """Set the VAE latent scale from the sites' ``latent-std`` (example-weighted)."""
        from medisyn.models import set_latent_scale

        pairs = [(float(m[P.LATENT_STD]), float(m[P.NUM_EXAMPLES])) for m in site_metrics.values()
                 if P.LATENT_STD in m and math.isfinite(float(m[P.LATENT_STD])) and float(m[P.LATENT_STD]) > 0]
        if pairs:
            std = sum(s * n for s, n in pairs) / sum(n for _, n in pairs)
            set_latent_scale(self.components, std)

    def save(self, out_dir: Path) -> None:
        """A checkpoint: the weights as they train, and the run's EMA beside them."""
        from medisyn.models import save_components

        save_components(self.components, out_dir)
        if self.ema:
            self._save_run_ema(out_dir)

    def save_release(self, out_dir: Path) -> None:
        """The released model: each stage's run EMA where the run keeps one (the weights
        stay as they train in this object)."""
        from medisyn.models import save_components

        kept = {stage: self.weights(stage) for stage in self.ema}  # type: ignore[arg-type]
        try:
            for stage in self.ema:
                self.load(stage, self.ema[stage])  # type: ignore[arg-type]
            save_components(self.components, out_dir)
        finally:
            for stage, w in kept.items():
                self.load(stage, w)  # type: ignore[arg-type]


def carries_run_ema(cfg: FederationConfig) -> bool:
    """Whether training rounds carry the run's EMA with the weights (``[train] ema_scope =
    "run"`` with an EMA on)."""
    return cfg.train.ema_scope == "run" and bool(cfg.train.ema_decay)


def frozen_for(cfg: FederationConfig, stage: Stage) -> list[Stage]:
    """Stages whose (already federated) weights a site needs, frozen, to train ``stage``."""
    if cfg.model.preset == "tiny" and stage == "unet" and "vae" in cfg.stages:
        return ["vae"]
    return []


def stage_payload(model: GlobalModel, cfg: FederationConfig, stage: Stage
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """What a message for ``stage`` carries (training rounds and the audit query alike):
    the stage's weights, the frozen weights a site needs (``medisyn.protocol.frozen_arrays``;
    empty if none), and the extra config (latent scale, ``frozen-stages``)."""
    stages = frozen_for(cfg, stage)
    frozen = P.frozen_arrays({fs: model.state(fs) for fs in stages})
    extra = model.extra_config(stage)
    if frozen:
        extra[P.FROZEN_STAGES] = P.encode_stages(stages)
    return model.state(stage), frozen, extra


# --------------------------------------------------------------------------- helpers


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({PACKED: _array(pack(arrays))})


def _array(v: np.ndarray):  # noqa: ANN202
    from flwr.app import Array

    return Array(np.ascontiguousarray(v))


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


_SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # [site] id's pattern


def reply_error(msg: Message) -> tuple[str, str, str | None]:
    """``(code, message, site id)`` of an error reply: the fields of a site's coded error
    (``medisyn.protocol.decode_site_error``), else ``("flower-<code>", reason, None)``."""
    err = msg.error
    info = P.decode_site_error(int(err.code), err.reason)
    if info is None:
        return f"flower-{err.code}", str(err.reason or ""), None
    return info["code"], info["message"], info[P.SITE_ID]


def reply_site(msg: Message, node_sites: dict[int, str], sent: dict[str, int] | None = None) -> str:
    """The site a reply comes from: its ``site`` record, the site id field of its coded
    error, or the site this node answered as before. ``sent`` (message id -> destination
    node of the messages sent) names the node of an error the SuperLink wrote in its
    place (e.g. ``Node Unavailable`` for a SuperNode that died with the message)."""
    node = msg.metadata.src_node_id
    if msg.has_error() and node not in node_sites and sent:
        node = sent.get(msg.metadata.reply_to_message_id, node)
    if msg.has_error():
        site = reply_error(msg)[2]
        if site is not None and _SITE_ID.fullmatch(site) and node not in node_sites:
            return site
    else:
        cfg = msg.content.config_records.get(P.SITE_RECORD)
        if cfg is not None and isinstance(cfg.get(P.SITE_ID), str):
            node_sites[node] = cfg[P.SITE_ID]
            return cfg[P.SITE_ID]
    return node_sites.get(node, f"node-{node}")


def _metrics_of(msg: Message) -> dict[str, float | int]:
    records = list(msg.content.metric_records.values())
    if len(records) != 1:
        return {}
    return {k: v for k, v in records[0].items() if isinstance(v, int | float)}


def reply_token(grid: Grid, global_round: int) -> str:
    """``run=<id>;round=<n>;nonce=<random>``: sent in a train message's config, echoed by
    the site; a reply with another token (an older run or round, a replay) is rejected."""
    import secrets

    try:
        run_id = str(grid.run.run_id)
    except Exception:  # an in-process test grid without a Run
        run_id = "local"
    return f"run={run_id};round={global_round};nonce={secrets.token_hex(12)}"


def _token_of(msg: Message) -> str | None:
    rec = msg.content.config_records.get(P.SITE_RECORD)
    tok = rec.get(P.REPLY_TOKEN) if rec is not None else None
    return tok if isinstance(tok, str) else None


POLL_SECONDS = 1.0  # the longest wait between two pulls
FIRST_POLL_SECONDS = 0.1  # the first; each next wait is 1.5x longer, up to POLL_SECONDS


def _flower_grid(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's real grid (the ServerAppIo connection to a SuperLink)."""
    from flwr.superlink.grid.http_grid import HttpGrid

    return isinstance(grid._grid if isinstance(grid, _OneSite) else grid, HttpGrid)


def send_and_receive(grid: Grid, messages: list[Message], *, timeout: float,
                     max_parallel: int | None = None) -> list[Message]:
    """``grid.send_and_receive``, with at most ``max_parallel`` messages out at once.

    For sites that share one machine (the demo, a researcher's workstation): there, N
    CPU-bound site tasks on fewer cores take about as long one per core at a time, and
    hold N tasks' memory at once. A message goes out when an earlier one is answered;
    each has ``timeout`` seconds from its own push (no answer by then: no reply, as
    with Flower's own). None, or a limit of at least ``len(messages)``: all at once.

    On Flower's real grid the replies are pulled here, first after 0.1 s and then ever
    less often, up to every ``POLL_SECONDS``: Flower's own ``send_and_receive`` pulls
    every 3 s, which a round of short site tasks (a cyclic round asks one site at a time)
    pays on every message. Another grid (a test's) answers its own ``send_and_receive``."""
    if (max_parallel is None or max_parallel >= len(messages)) and not _flower_grid(grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    limit = len(messages) if max_parallel is None else max(1, max_parallel)
    waiting = list(messages)
    out: dict[str, float] = {}  # message id -> push time
    replies: list[Message] = []
    wait = FIRST_POLL_SECONDS
    while waiting or out:
        while waiting and len(out) < limit:
            msg = waiting.pop(0)
            ids = list(grid.push_messages([msg]))
            if ids:  # refused by the SuperLink (too large): no reply, as send_and_receive
                out[ids[0]] = time.time()
                wait = FIRST_POLL_SECONDS
        if not out:
            continue
        for reply in grid.pull_messages(list(out)):
            replies.append(reply)
            out.pop(reply.metadata.reply_to_message_id, None)
        now = time.time()
        for mid in [m for m, t in out.items() if now - t > timeout]:
            logger.warning("no answer to message %s within %.0f s", mid[:12], timeout)
            out.pop(mid)
        if out and (not waiting or len(out) >= limit):
            time.sleep(wait)
            wait = min(POLL_SECONDS, wait * 1.5)
    return replies


def query_sites(grid: Grid, nodes: list[int], content: Callable[[], RecordDict], timeout: float,
                node_sites: dict[int, str], *, max_parallel: int | None = None,
                ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Send one ``query`` per node; return (site -> result JSON, site -> error).

    ``max_parallel``: at most this many sites are asked at once (:func:`send_and_receive`)."""
    msgs = [Message(content=content(), message_type=P.QUERY_MESSAGE, dst_node_id=n, group_id=P.QUERY_GROUP)
            for n in nodes]
    replies = send_and_receive(grid, msgs, timeout=timeout, max_parallel=max_parallel)
    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for reply in replies:
        site = reply_site(reply, node_sites)
        if reply.has_error():
            errors[site] = reply_error(reply)[1]
            continue
        rec = reply.content.config_records.get(P.RESULT)
        try:
            results[site] = json.loads(str(rec[P.RESULT_JSON])) if rec is not None else {}
        except (KeyError, json.JSONDecodeError) as e:
            errors[site] = f"unreadable reply: {e}"
        if site in results and not isinstance(results[site], dict):
            errors[site] = "unreadable reply: not a JSON object"
            results.pop(site)
    return results, errors


def site_prompts(grid: Grid, nodes: list[int], timeout: float, node_sites: dict[int, str]
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The prompts query: every site's label prompts, image type and channels (or its error)."""
    return query_sites(grid, nodes, lambda: RecordDict({P.CONFIG: ConfigRecord({P.AUDIT: P.QUERY_PROMPTS})}),
                       timeout, node_sites)


def answer_types(r: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The image types of one site's ``prompts`` answer: ``{type: {prompts, specialty,
    channels}}`` from ``P.PROMPTS_TYPES`` (a site may hold several), else from the single-type
    keys of a site that answers only those. Malformed entries are left out."""
    out: dict[str, dict[str, Any]] = {}
    listed = r.get(P.PROMPTS_TYPES)
    if isinstance(listed, dict):
        items = [(t, e) for t, e in listed.items() if isinstance(e, dict)]
    elif isinstance(r.get(P.PROMPTS_IMAGE_TYPE), str):
        items = [(r[P.PROMPTS_IMAGE_TYPE], r)]
    else:
        items = []
    for t, e in items:
        if not isinstance(t, str):
            continue
        ps = e.get(P.QUERY_PROMPTS, [])
        out[t] = {P.QUERY_PROMPTS: sorted({str(p) for p in ps if isinstance(p, str)}) if isinstance(ps, list) else [],
                  P.PROMPTS_SPECIALTY: e.get(P.PROMPTS_SPECIALTY), P.PROMPTS_CHANNELS: e.get(P.PROMPTS_CHANNELS)}
    return out


def site_catalogue(grid: Grid, cfg: FederationConfig, node_sites: dict[int, str]
                   ) -> tuple[list[str], dict[str, dict[str, Any]], int]:
    """Ask every site for its prompts (the ``prompts`` query: dataset metadata, no records).
    Returns (every prompt, the model's ``image_types`` catalogue, sites that answered). A
    site that refuses (its policy) trains on; its prompts are then not anchored and its
    image type is not in the catalogue."""
    results, errors = site_prompts(grid, sorted(grid.get_node_ids()), cfg.round_timeout, node_sites)
    for site, err in sorted(errors.items()):
        logger.warning("site %s did not give its prompts (not anchored, not in the model's image types): %s",
                       site, err[:200])
    prompts: set[str] = set()
    types: dict[str, dict[str, Any]] = {}
    for r in results.values():
        prompts |= {str(p) for p in r.get(P.QUERY_PROMPTS, []) if isinstance(p, str)}
        for t, answered in answer_types(r).items():
            ps = answered[P.QUERY_PROMPTS]
            if not ps:
                continue
            entry = types.setdefault(t, {"channels": 1, "prompts": []})
            entry["channels"] = max(entry["channels"], 3 if answered.get(P.PROMPTS_CHANNELS) != 1 else 1)
            entry["prompts"] = sorted(set(entry["prompts"]) | set(ps))
            if isinstance(answered.get(P.PROMPTS_SPECIALTY), str):
                entry["specialty"] = answered[P.PROMPTS_SPECIALTY]
    logger.info("%d prompt(s) of %d image type(s) from %d site(s)", len(prompts), len(types), len(results))
    return sorted(prompts), types, len(results)


def wait_for_sites(grid: Grid, n: int, timeout: float, poll: float = 1.0) -> int:
    """Wait until ``n`` nodes are connected; return how many are (maybe < n on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        have = len(list(grid.get_node_ids()))
        if have >= n or time.monotonic() >= deadline:
            return have
        time.sleep(poll)


@dataclass
class RoundResult:
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # site -> reason (errors + rejects)
    budget_failures: int = 0
    new_state: dict[str, np.ndarray] | None = None
    loss: float | None = None
    update_norms: dict[str, float] = field(default_factory=dict)
    send_receive_seconds: float = 0.0
    capped: dict[str, tuple[float, int]] = field(default_factory=dict)  # site -> (claimed, cap)
    aggregate_problem: str | None = None  # why the aggregate was refused (model unchanged)
    ema_steps: int = 0  # steps the new state's run EMA has taken beyond the one sent


def _packed_record(msg: Message) -> ArrayRecord:
    """A checked reply's one ArrayRecord (the packed weights)."""
    return next(iter(msg.content.array_records.values()))


def _read_reply(msg: Message, site: str, enrolled: dict[int, str], layout: Any) -> tuple[str, Candidate | str]:
    """``(site, the reply as a Candidate)`` for :func:`check_replies`, or ``(key, why it
    is rejected before the checks)``: a node answering as another site than the one it was
    enrolled as (under SuperNode auth; key ``node-<id>`` if not enrolled), a reply of the
    wrong shape, or weights that do not unpack to the stage's layout."""
    node = msg.metadata.src_node_id
    if enrolled and enrolled.get(node) != site:
        # bound to the authenticated node: a node answers only as the site it was enrolled as
        return enrolled.get(node, f"node-{node}"), (
            f"rejected: reply claims site {site!r} but node {node} is "
            + (f"enrolled as {enrolled[node]!r}" if node in enrolled else "not enrolled"))
    recs = list(msg.content.array_records.values())
    metrics = _metrics_of(msg)
    if len(recs) != 1 or set(recs[0].keys()) != {PACKED} or P.NUM_EXAMPLES not in metrics:
        return site, f"rejected: reply needs one ArrayRecord {{{PACKED!r}}} and num-examples"
    try:
        flat = recs[0][PACKED].numpy()
        if not np.issubdtype(flat.dtype, np.floating):
            raise ValueError(f"packed weights have dtype {flat.dtype}, expected a floating type")
        site_arrays = unpack(flat, layout)
    except Exception as e:  # a malformed array is a bad reply, not a crash
        return site, f"rejected: unreadable weights: {e}"
    return site, Candidate(site=site, arrays=site_arrays, metrics=metrics, token=_token_of(msg))


def train_round(
    grid: Grid,
    strategy: Any,
    cfg: FederationConfig,
    *,
    global_round: int,
    stage: Stage,
    stage_round: int,
    current: dict[str, np.ndarray],
    frozen: dict[str, np.ndarray] | None,
    node_sites: dict[int, str],
    extra_config: dict[str, Any] | None = None,
    site_seconds: dict[str, float] | None = None,
) -> RoundResult:
    """One training round: send, collect, check, aggregate (strategy), report.

    ``site_seconds``: each site's task time in the last round; with ``max_parallel_sites``
    the slowest are asked first (longest first: the round then waits for the slowest
    site beside the others, not after them)."""
    token = reply_token(grid, global_round)
    enrolled = read_enrolment(cfg.run_dir)  # node id -> site id, under SuperNode auth
    config = ConfigRecord(
        {
            P.STAGE: stage,
            P.ROUND: global_round,
            P.REPLY_TOKEN: token,
            P.LOCAL_STEPS: cfg.steps_for(stage),
            P.SEED: cfg.seed,
            P.MODEL_CONFIG: cfg.model.model_dump_json(),
            P.TRAIN_CONFIG: cfg.train.model_dump_json(),
            **({P.LR_SCHEDULE: json.dumps([(stage_round - 1) * cfg.steps_for(stage),
                                           cfg.rounds_for(stage) * cfg.steps_for(stage)])}
               if cfg.train.lr_schedule_scope == "run" else {}),
            **(extra_config or {}),
        }
    )
    layout = layout_of(current)
    arrays = to_record(current)
    messages = list(strategy.configure_train(stage_round, arrays, config, grid))
    if site_seconds and cfg.max_parallel_sites:
        messages.sort(key=lambda m: -site_seconds.get(node_sites.get(m.metadata.dst_node_id, ""), 0.0))
    down = record_bytes(arrays)
    if frozen:
        frozen_record = to_record(frozen)
        down += record_bytes(frozen_record)
        for m in messages:
            m.content[P.FROZEN] = frozen_record
    t_send = time.time()
    replies = send_and_receive(grid, messages, timeout=cfg.round_timeout, max_parallel=cfg.max_parallel_sites)
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set when pushed
    result = RoundResult()
    result.send_receive_seconds = time.time() - t_send
    candidates: list[Candidate] = []
    by_site: dict[str, Message] = {}
    for msg in replies:
        site = reply_site(msg, node_sites, sent)
        if msg.has_error():
            code, reason, _ = reply_error(msg)
            result.failed[site] = reason
            if code == BUDGET_CODE:
                result.budget_failures += 1
            logger.warning("site %s failed round %d: %s", site, global_round, reason)
            continue
        key, read = _read_reply(msg, site, enrolled, layout)
        if isinstance(read, str):
            result.failed[key] = read
            logger.warning("rejected reply from %s: %s", key, read)
            continue
        candidates.append(read)
        by_site[site] = msg
        result.accepted[site] = {**read.metrics, "bytes-up": record_bytes(_packed_record(msg)),
                                 "bytes-down": down}

    verdict = check_replies(
        candidates,
        current,
        expected_sites=cfg.sites,
        max_norm_ratio=cfg.strategy.max_norm_ratio,
        max_update_norm=cfg.strategy.max_update_norm,
        max_examples=cfg.max_examples_for,
        expected_token=token,
    )
    result.update_norms = verdict.update_norms
    result.capped = verdict.capped
    for site, reason in verdict.rejected:
        result.failed[site] = f"rejected: {reason}"
        result.accepted.pop(site, None)
    weights = _site_weights(cfg, verdict, result.accepted)
    # Aggregate over a uniform reply shape (the weights and the capped weight only); the
    # full per-site metrics are reported separately.
    result.new_state, result.loss, result.aggregate_problem = aggregate_checked(
        strategy, stage_round,
        [(by_site[c.site], _packed_record(by_site[c.site]),
          weights[c.site], float(c.metrics.get("loss", 0.0))) for c in verdict.accepted],
        layout,
    )
    if result.new_state is not None:
        result.ema_steps = cfg.steps_for(stage)
    return result


def _site_weights(cfg: FederationConfig, verdict: Verdict, accepted: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each accepted site's weight in the average (its checked, capped num-examples, or 1
    with ``weighting = "equal"``); records ``weight-share`` (and, with example weighting,
    a capped claim's ``weight-examples``) in the site's round metrics."""
    if cfg.strategy.weighting == "examples":  # equal weighting: a claim weighs nothing, capped or not
        for site, (_claimed, cap) in verdict.capped.items():
            accepted[site]["weight-examples"] = cap
    weights = ({c.site: 1.0 for c in verdict.accepted} if cfg.strategy.weighting == "equal"
               else verdict.weights)
    total = sum(weights[c.site] for c in verdict.accepted)
    for c in verdict.accepted:
        accepted[c.site]["weight-share"] = weights[c.site] / total
    return weights


class _OneSite:
    """The grid as one node sees it: a cyclic round asks one site at a time."""

    def __init__(self, grid: Grid, node: int):
        self._grid, self._node = grid, node

    def get_node_ids(self) -> list[int]:
        return [self._node]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def cyclic_round(grid: Grid, strategy: Any, cfg: FederationConfig, *, current: dict[str, np.ndarray],
                 stage_round: int, site_seconds: dict[str, float] | None = None, **kw: Any) -> RoundResult:
    """One round of cyclic training (``[strategy] name = "cyclic"``; cyclical weight
    transfer, Chang et al. 2018): the sites train one after another, each from the model
    the site before it trained, so a round of N sites is N× as deep as an averaged round
    of the same steps. Each site's reply is checked as in :func:`train_round` (alone: the
    median rule needs 3 replies, ``max_update_norm`` applies). The order rotates every
    round, so no site is always the last to train. A site that fails or is rejected is
    skipped; the chain goes on from the model before it. A run EMA (``P.EMA_STEP`` in the
    extra config) goes along the chain: each site steps it on from where the site before
    it left it."""
    nodes = sorted(grid.get_node_ids())
    shift = (stage_round - 1) % len(nodes) if nodes else 0
    out = RoundResult()
    losses: list[float] = []
    extra = dict(kw.pop("extra_config", None) or {})
    ema_base = int(extra.get(P.EMA_STEP, 0))
    for node in nodes[shift:] + nodes[:shift]:
        if P.EMA_STEP in extra:
            extra[P.EMA_STEP] = ema_base + out.ema_steps
        res = train_round(_OneSite(grid, node), strategy, cfg, current=current, stage_round=stage_round,
                          extra_config=dict(extra), **kw)
        out.accepted.update(res.accepted)
        out.failed.update(res.failed)
        out.budget_failures += res.budget_failures
        out.update_norms.update(res.update_norms)
        out.capped.update(res.capped)
        out.send_receive_seconds += res.send_receive_seconds
        out.aggregate_problem = res.aggregate_problem or out.aggregate_problem
        if res.loss is not None:
            losses.append(res.loss)
        if res.new_state is not None:
            current = out.new_state = res.new_state
            out.ema_steps += res.ema_steps
    out.loss = float(np.mean(losses)) if losses else None
    return out


def evaluate_round(
    grid: Grid,
    strategy: Any,
    cfg: FederationConfig,
    *,
    global_round: int,
    stage: Stage,
    stage_round: int,
    current: dict[str, np.ndarray],
    frozen: dict[str, np.ndarray] | None,
    node_sites: dict[int, str],
    extra_config: dict[str, Any] | None = None,
) -> tuple[float | None, dict[str, float], dict[str, str]]:
    """Held-out loss per site and the example-weighted mean."""
    config = ConfigRecord(
        {
            P.STAGE: stage,
            P.ROUND: global_round,
            P.SEED: cfg.seed,
            P.MODEL_CONFIG: cfg.model.model_dump_json(),
            **(extra_config or {}),
        }
    )
    messages = list(strategy.configure_evaluate(stage_round, to_record(current), config, grid))
    if frozen:
        rec = to_record(frozen)
        for m in messages:
            m.content[P.FROZEN] = rec
    per_site: dict[str, float] = {}
    failed: dict[str, str] = {}
    total, weight = 0.0, 0.0
    for msg in send_and_receive(grid, messages, timeout=cfg.round_timeout):
        site = reply_site(msg, node_sites)
        if msg.has_error():
            failed[site] = reply_error(msg)[1]
            continue
        m = _metrics_of(msg)
        loss, n = m.get(P.LOSS), m.get(P.NUM_EXAMPLES)
        if loss is None or n is None or not math.isfinite(loss) or n <= 0:
            failed[site] = "evaluate reply needs a finite loss and positive num-examples"
            continue
        per_site[site] = float(loss)
        total += float(loss) * float(n)
        weight += float(n)
    return (total / weight if weight else None), per_site, failed


# --------------------------------------------------------------------------- the run


def _should_evaluate(cfg: FederationConfig, stage: Stage, stage_round: int) -> bool:
    if not cfg.evaluate:
        return False
    last = stage_round == cfg.rounds_for(stage)
    return last or (cfg.evaluate_every > 0 and stage_round % cfg.evaluate_every == 0)


def run_federation(grid: Grid, cfg: FederationConfig, *, resume: bool = False, attempt: str = "") -> str:
    """Run (or resume) the whole federation; return an :class:`Outcome` value.

    ``attempt`` tags ``status.json`` so the supervisor that submitted this run ignores a
    status written by an older, orphaned ServerApp.
    """
    import functools

    status = functools.partial(write_status, attempt=attempt)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    plan = cfg.round_plan()
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        logger.warning("--resume: no checkpoint in %s; starting at round 1", run_dir)
    model, history = _starting_point(cfg, ckpt, metrics_path)
    if model.ema and not carries_run_ema(cfg):
        # a run resumed with ema_scope changed from "run": its EMA would be released stale
        logger.warning("the checkpoint keeps the run's EMA of %s but [train] ema_scope is not \"run\" now: "
                       "continuing from the EMA's weights", sorted(model.ema))
        model.fold_run_ema()
    start = ckpt.round + 1 if ckpt is not None else 1
    status(run_dir, Outcome.RUNNING, round=start - 1, total_rounds=cfg.total_rounds)

    node_sites: dict[int, str] = {}
    site_seconds: dict[str, float] = {}  # site -> its last task time (the pool asks the slowest first)
    anchor: str | None = None  # ANCHOR_PROMPTS ("": none), from the prompts query at the first UNet round
    strategy: Any = None
    strategy_stage: Stage | None = None
    for global_round, stage, stage_round in plan[start - 1 :]:
        if strategy_stage != stage:
            strategy = make_strategy(cfg.strategy)
            strategy_stage = stage
            if ckpt is not None and ckpt.stage == stage and ckpt.round == global_round - 1:
                restore_state(strategy, ckpt.strategy, ckpt.strategy_arrays)
        have = wait_for_sites(grid, cfg.min_sites, cfg.site_wait_timeout)
        if have < cfg.min_sites:
            msg = f"only {have} of min_sites={cfg.min_sites} sites connected within {cfg.site_wait_timeout:g} s"
            logger.error(msg)
            status(run_dir, Outcome.NO_SITES, round=global_round - 1, message=msg)
            return Outcome.NO_SITES
        t0 = time.time()
        _, frozen, extra = stage_payload(model, cfg, stage)
        carry_ema = carries_run_ema(cfg)
        current = model.train_state(stage, carry_ema)
        if stage == "unet" and anchor is None:  # asked once per run, at its first UNet round
            prompts, types, answered = site_catalogue(grid, cfg, node_sites)
            # the saved model then knows which types are grey (generation makes them channel-equal)
            model.components.image_types = {**model.components.image_types, **types}
            anchor = P.encode_prompts(prompts) if cfg.train.anchor_weight > 0 and answered >= 2 else ""
        if stage == "unet" and anchor:
            extra[P.ANCHOR_PROMPTS] = anchor
        kw = dict(
            global_round=global_round, stage=stage, stage_round=stage_round,
            frozen=frozen or None, node_sites=node_sites, extra_config=extra,
        )
        train_kw = {**kw, "extra_config": {**extra, P.EMA_STEP: model.ema_step.get(stage, 0)} if carry_ema else extra}
        one_round = cyclic_round if cfg.strategy.name == "cyclic" else train_round
        res = one_round(grid, strategy, cfg, current=current, site_seconds=site_seconds, **train_kw)
        site_seconds.update({site: float(m[P.SITE_SECONDS]) for site, m in res.accepted.items()
                             if P.SITE_SECONDS in m})
        if res.new_state is not None:
            model.load(stage, res.new_state, ema_steps=res.ema_steps)
            if stage == "vae":
                model.update_latent_scale(res.accepted)
        eval_loss, eval_sites, eval_failed = (None, {}, {})
        if res.accepted and _should_evaluate(cfg, stage, stage_round):
            # the held-out loss of the model as it would be released (the run's EMA, if kept)
            eval_loss, eval_sites, eval_failed = evaluate_round(grid, strategy, cfg, current=model.state(stage), **kw)
        record = round_record(
            cfg, global_round, stage, stage_round, res, time.time() - t0,
            eval_loss=eval_loss, eval_sites=eval_sites, eval_failed=eval_failed,
        )
        history.append(record)
        meta, arrays = export_state(strategy)
        t_ckpt = time.time()
        write_checkpoint(
            run_dir,
            Checkpoint(
                round=global_round, stage=stage, stage_round=stage_round, metrics=history,
                config=json.loads(cfg.model_dump_json()), config_hash=cfg.hash(),
                strategy=meta, strategy_arrays=arrays,
            ),
            model.save,
            keep=cfg.keep_checkpoints,
        )
        record = {**record, "checkpoint_seconds": round(time.time() - t_ckpt, 3)}
        append_jsonl(metrics_path, record)
        status(run_dir, Outcome.RUNNING, round=global_round, total_rounds=cfg.total_rounds)
        if not res.accepted and res.failed and res.budget_failures == len(res.failed):
            msg = f"every site refused round {global_round}: privacy budget exhausted"
            logger.error(msg)
            status(run_dir, Outcome.BUDGET, round=global_round, message=msg)
            return Outcome.BUDGET

    final = _publish(model, run_dir)
    status(run_dir, Outcome.DONE, round=cfg.total_rounds, total_rounds=cfg.total_rounds, model=str(final))
    return Outcome.DONE


def _starting_point(cfg: FederationConfig, ckpt: Checkpoint | None, metrics_path: Path
                    ) -> tuple[GlobalModel, list[dict[str, Any]]]:
    """The model and the metrics history a run starts from: fresh, or the checkpoint's
    (refused if its ``[model]`` differs from the config's; ``metrics.jsonl``, appended
    after each checkpoint, is cut back to match it)."""
    if ckpt is None:
        return GlobalModel(cfg.model, seed=cfg.seed), []
    if ckpt.config.get("model") != json.loads(cfg.model.model_dump_json()):
        raise ValueError(
            "cannot resume: the checkpoint's [model] differs from the config's "
            f"({ckpt.path}); start a new run_dir"
        )
    if ckpt.config_hash != cfg.hash():
        logger.warning("resuming with a changed config (hash %s -> %s)", ckpt.config_hash[:12], cfg.hash()[:12])
    model = GlobalModel(cfg.model, from_dir=ckpt.model_dir)
    _check_frozen_autoencoder(cfg, model, ckpt.path)
    history = list(ckpt.metrics)
    atomic_write_text(metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))
    logger.info("resuming after round %d from %s", ckpt.round, ckpt.path)
    return model, history


def _check_frozen_autoencoder(cfg: FederationConfig, model: GlobalModel, where: Path) -> None:
    """A tiny-preset run without a ``vae`` stage never sends its autoencoder: every site
    builds it from ``[model]`` (the weights MediSyn ships, normalised per channel). A
    checkpoint whose autoencoder is not that one (made by another MediSyn version) would
    have the sites train on another latent space without an error: refuse it."""
    if "vae" in cfg.stages or cfg.model.preset != "tiny":
        return
    from medisyn.models import state_hash

    fresh = GlobalModel(cfg.model, seed=cfg.seed).components
    same = state_hash(model.components.vae.state_dict()) == state_hash(fresh.vae.state_dict())
    if not same or float(model.components.scaling_factor) != float(fresh.scaling_factor):
        raise ValueError(
            f"cannot resume: the checkpoint's autoencoder ({where}) is not the one this MediSyn "
            "builds for the config's [model] (the run has no vae stage, so every site builds its own "
            "and would train on another latent space; was the checkpoint made by another version?); "
            "start a new run_dir"
        )


def _publish(model: GlobalModel, run_dir: Path) -> Path:
    """Write the final model to ``run_dir/model`` atomically (a temporary folder, synced,
    renamed over the old one)."""
    import shutil

    final, tmp = run_dir / "model", run_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_release(tmp)
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(run_dir)
    return final


def round_record(
    cfg: FederationConfig,
    global_round: int,
    stage: Stage,
    stage_round: int,
    res: RoundResult,
    seconds: float,
    *,
    eval_loss: float | None,
    eval_sites: dict[str, float],
    eval_failed: dict[str, str],
) -> dict[str, Any]:
    """The one JSON line per round in ``metrics.jsonl``."""
    sites: dict[str, dict[str, Any]] = {}
    for site, m in res.accepted.items():
        sites[site] = {"status": "ok", **m}
        if site in eval_sites:
            sites[site]["eval-loss"] = eval_sites[site]
    for site, reason in res.failed.items():
        sites[site] = {"status": "failed", "reason": reason[:500]}
    train_seconds = [float(m[P.SECONDS]) for m in res.accepted.values() if P.SECONDS in m]
    task_seconds = [float(m[P.SITE_SECONDS]) for m in res.accepted.values() if P.SITE_SECONDS in m]
    return {
        "round": global_round,
        "stage": stage,
        "stage_round": stage_round,
        "total_rounds": cfg.total_rounds,
        "time": time.time(),
        "seconds": round(seconds, 3),
        "slowest_site_seconds": max(train_seconds) if train_seconds else None,
        "slowest_site_task_seconds": max(task_seconds) if task_seconds else None,
        "send_receive_seconds": round(res.send_receive_seconds, 3),
        "answered": len(res.accepted),
        "failed": len(res.failed),
        "loss": res.loss,
        "eval_loss": eval_loss,
        "eval_failed": {k: v[:500] for k, v in eval_failed.items()},
        "update_norms": res.update_norms,
        "aggregate_problem": res.aggregate_problem,
        "sites": sites,
        "config_hash": cfg.hash(),
    }


def iter_metrics(run_dir: Path) -> Iterable[dict[str, Any]]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
