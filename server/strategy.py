"""Build the Flower strategy a config asks for, and save/restore its state for resume."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from medisyn.server.config import StrategyConfig


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
        weighted_by_key="num-examples",
    )
    if cfg.name == "fedavg":
        return FedAvg(**common)
    if cfg.name == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.name == "fedadam":
        return FedAdam(
            eta=cfg.eta, eta_l=cfg.eta_l, beta_1=cfg.beta_1, beta_2=cfg.beta_2, tau=cfg.tau,
            **common,
        )
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
