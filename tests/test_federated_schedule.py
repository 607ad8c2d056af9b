"""A federated run's learning-rate schedule and the sites' kept optimizer state: warmup
and cosine counted over the run (not restarted every round), AdamW moments kept at the
site between rounds of one run and nowhere else."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_federation_units import (  # noqa: F401  (fixture below)
    SITES,
    LocalGrid,
    client_app,  # noqa: F401
    fed_cfg,
    node_configs,
)
from test_train import breast_ds  # noqa: F401

from medisyn import protocol as P
from medisyn.config import TrainConfig
from medisyn.errors import ConfigError
from medisyn.models import build_components
from medisyn.train import LocalOptimizerState, _lr_scheduler, train_local


def _lrs(cfg: TrainConfig, steps: int, schedule) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = _lr_scheduler(opt, cfg, steps, 0, schedule)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_rounds_continue_the_runs_schedule():
    cfg = TrainConfig(lr_warmup_steps=6, lr_schedule="cosine")
    whole = _lrs(cfg, 24, None)
    rounds = [lr for k in range(4) for lr in _lrs(cfg, 6, (6 * k, 24))]
    assert rounds == pytest.approx(whole)
    assert whole[0] == pytest.approx(1 / 6) and max(whole) == pytest.approx(1.0) and whole[-1] < 0.15
    # per round (no schedule given): every round warms up again
    assert _lrs(cfg, 6, None)[0] == pytest.approx(1 / 6) and rounds[6] == pytest.approx(1.0)


def _step_of(path) -> float:
    return float(load_file(path)["opt.0.step"])


def test_site_keeps_its_adam_moments_within_a_run(tmp_path, breast_ds, tiny_cfg, caplog):  # noqa: F811
    cfg = TrainConfig(batch_size=8, num_threads=1)
    kept = LocalOptimizerState(tmp_path, "unet", "run-1")

    def round_(state):
        return train_local(build_components(tiny_cfg, seed=1), breast_ds, steps=3, config=cfg, stage="unet",
                           progress=False, optimizer_state=state)

    round_(kept)
    assert _step_of(kept.path) == 3
    with safe_open(str(kept.path), "pt") as f:
        assert f.metadata() == {"run_id": "run-1", "rounds": "1"}
    round_(kept)
    assert _step_of(kept.path) == 6  # the moments carried on: AdamW counted 3 + 3 steps
    with safe_open(str(kept.path), "pt") as f:
        assert f.metadata()["rounds"] == "2"
    # the restored moments change the update: same start, same batches, different result
    a = round_(LocalOptimizerState(tmp_path / "other", "unet", "run-1")).state
    b = round_(kept).state
    assert any(not torch.equal(a[k], b[k]) for k in a)

    # another run starts fresh, and so does a damaged file (logged, never an error)
    other = LocalOptimizerState(tmp_path, "unet", "run-2")
    round_(other)
    assert _step_of(other.path) == 3
    other.path.write_bytes(b"not safetensors")
    with caplog.at_level(logging.WARNING, logger="medisyn.train"):
        round_(other)
    assert "unreadable" in caplog.text and _step_of(other.path) == 3


def test_kept_state_of_another_model_shape_is_not_loaded(tmp_path, caplog):
    kept = LocalOptimizerState(tmp_path, "unet", "r")
    big = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(big.parameters())
    big(torch.ones(1, 4)).sum().backward()
    opt.step()
    kept.save(opt, 1)
    small = torch.nn.Linear(2, 2)
    opt2 = torch.optim.AdamW(small.parameters())
    with caplog.at_level(logging.WARNING, logger="medisyn.train"):
        assert kept.load(opt2) == 0
    assert "does not fit" in caplog.text and not opt2.state


def test_schedule_in_the_message_is_checked():
    from medisyn.client.site import decode_schedule

    assert decode_schedule("[10, 40]", 10) == (10, 40)
    for bad in ("[35, 40]", "[-1, 40]", "nonsense", "[1]"):
        with pytest.raises(ConfigError, match=P.LR_SCHEDULE):
            decode_schedule(bad, 10)


def test_federation_sends_the_runs_schedule_and_sites_keep_moments(tmp_path, client_app):  # noqa: F811
    from medisyn.server import federation as fed

    sent: list[str] = []

    def recording(msg, ctx):
        if P.LR_SCHEDULE in msg.content.config_records.get(P.CONFIG, {}):
            sent.append(msg.content.config_records[P.CONFIG][P.LR_SCHEDULE])
        return client_app(msg, ctx)

    sites = SITES[:2]
    train = TrainConfig(batch_size=8, num_threads=1, lr_warmup_steps=2, lr_schedule="cosine",
                        keep_optimizer_state=True)
    cfg = fed_cfg(tmp_path, stages=["unet"], rounds=3, local_steps=2, sites=sites, train=train, min_sites=2)
    nodes = node_configs(tmp_path, sites=sites)
    assert fed.run_federation(LocalGrid(nodes, recording), cfg) == fed.Outcome.DONE
    assert sorted(json.loads(s) for s in sent) == sorted([[0, 6], [2, 6], [4, 6]] * 2)
    for s in sites:
        path = tmp_path / s / "state" / "optimizer" / "unet.safetensors"
        assert _step_of(path) == 6
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["rounds"] == "3"

    # scope "round": no schedule in the messages
    sent.clear()
    cfg2 = fed_cfg(tmp_path / "b", stages=["unet"], rounds=1, local_steps=2, sites=sites, min_sites=2,
                   train=train.model_copy(update={"lr_schedule_scope": "round"}))
    assert fed.run_federation(LocalGrid(node_configs(tmp_path / "b", sites=sites), recording), cfg2) == fed.Outcome.DONE
    assert sent == []
    assert np.isfinite(fed.iter_metrics(cfg2.run_dir)[-1]["loss"])


def test_a_dp_site_keeps_its_moments_and_follows_the_schedule(tmp_path, breast_ds, tiny_cfg):  # noqa: F811
    from medisyn.config import PrivacyConfig

    dp = PrivacyConfig(dp=True, noise_multiplier=1.0, max_epsilon=50.0)
    cfg = TrainConfig(batch_size=8, lr_warmup_steps=4, lr_schedule="cosine")
    kept = LocalOptimizerState(tmp_path, "unet", "run-1")
    eps = []
    for k in range(2):
        m = train_local(build_components(tiny_cfg), breast_ds, steps=2, config=cfg, stage="unet", privacy=dp,
                        ledger_path=tmp_path, site_id="s", run_id="run-1", round=k + 1, progress=False,
                        schedule=(2 * k, 4), optimizer_state=kept).metrics
        eps.append(m["epsilon"])
    assert _step_of(kept.path) == 4 and eps[1] > eps[0]  # Opacus' steps went into the kept moments
