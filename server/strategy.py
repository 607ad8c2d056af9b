"""Build the Flower strategy a config asks for, aggregate checked replies with it, and
save/restore its state for resume."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx
from medisyn.server.checks import non_finite_problem
from medisyn.server.config import StrategyConfig

from medisyn import protocol as P
from medisyn.protocol import PACKED, unpack

logger = logging.getLogger(__name__)


def make_strategy(cfg: StrategyConfig) -> FedAvg:
    """A fresh strategy for one stage.

    Node sampling never blocks here (``min_available_nodes=1``): the federation loop
    waits for ``min_sites`` itself, with a timeout, before every round.
    """
    common: dict[str, Any] = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
        weighted_by_key=P.NUM_EXAMPLES,
    )
    if cfg.name in ("fedavg", "cyclic"):  # cyclic: one reply per "aggregate" (federation.cyclic_round)
        return FedAvg(**common)
    if cfg.name == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.name == "fedadam":
        return FedAdam(
            eta=cfg.eta, eta_l=cfg.eta_l, beta_1=cfg.beta_1, beta_2=cfg.beta_2, tau=cfg.tau,
            **common,
        )
    if cfg.name == "fedavgm":
        return FedAvgM(server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum, **common)
    raise ValueError(f"unknown strategy {cfg.name!r}")  # unreachable: config is validated


def export_state(strategy: FedAvg) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON-safe meta, arrays) that :func:`restore_state` turns back into the strategy."""
    meta: dict[str, Any] = {"class": type(strategy).__name__}
    arrays: dict[str, np.ndarray] = {}
    for moment in ("m_t", "v_t"):
        value = getattr(strategy, moment, None)
        if value:
            meta[moment] = sorted(value)
            for k, v in value.items():
                arrays[f"{moment}/{k}"] = np.asarray(v)
    momentum = getattr(strategy, "momentum_vector", None)  # FedAvgM
    if momentum:
        meta["momentum_vector"] = len(momentum)
        for i, v in enumerate(momentum):
            arrays[f"momentum_vector/{i}"] = np.asarray(v)
    return meta, arrays


def restore_state(strategy: FedAvg, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    if meta.get("class") not in (None, type(strategy).__name__):
        raise ValueError(
            f"checkpoint holds {meta['class']} state but the config asks for "
            f"{type(strategy).__name__}"
        )
    for moment in ("m_t", "v_t"):
        if moment in meta:
            setattr(strategy, moment, {k: arrays[f"{moment}/{k}"] for k in meta[moment]})
    if "momentum_vector" in meta:
        strategy.momentum_vector = [arrays[f"momentum_vector/{i}"] for i in range(int(meta["momentum_vector"]))]


def aggregate_checked(
    strategy: FedAvg,
    server_round: int,
    accepted: Sequence[tuple[Message, ArrayRecord, float, float]],
    layout: Any,
) -> tuple[dict[str, np.ndarray] | None, float | None, str | None]:
    """Aggregate accepted replies ``(reply, packed ArrayRecord, weight, loss)`` with the
    Flower strategy; return ``(new state, loss, problem)``.

    Each reply's content is replaced by a uniform one: the packed weights and a
    MetricRecord whose ``num-examples`` is the checked, capped ``weight``
    (:attr:`medisyn.server.checks.Verdict.weights`), so the strategy never sees a claim.
    An aggregate with a non-finite value is refused (state None, ``problem`` says why):
    the global model stays as it was.
    """
    if not accepted:
        return None, None, None
    msgs = []
    for msg, record, weight, loss in accepted:
        msg.content = RecordDict({
            P.ARRAYS: ArrayRecord({PACKED: record[PACKED]}),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: float(weight), P.LOSS: float(loss)}),
        })
        msgs.append(msg)
    agg_arrays, agg_metrics = strategy.aggregate_train(server_round, msgs)
    loss = float(agg_metrics[P.LOSS]) if agg_metrics is not None and P.LOSS in agg_metrics else None
    if agg_arrays is None:
        return None, loss, None
    flat = np.asarray(agg_arrays[PACKED].numpy())
    state: Mapping[str, np.ndarray] = unpack(flat.astype(np.float32), layout)
    problem = non_finite_problem({PACKED: flat}) or non_finite_problem(state)
    if problem is not None:
        logger.error("round %d: %s; the global model is not updated", server_round, problem)
        if hasattr(strategy, "current_arrays"):
            # FedAvgM / FedOpt keep the model they produced as the next round's base: drop it,
            # so the next configure_train takes the global model that was actually kept.
            strategy.current_arrays = None
        return None, loss, problem
    return dict(state), loss, None
