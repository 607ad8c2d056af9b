"""The run's EMA (``[train] ema_scope = "run"``): one EMA over the whole federated run
travels with the weights (each site steps it through its own steps and returns both),
and the released model is that EMA — not each round's short average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medisyn.server import federation as fed
from medisyn.server.checkpoint import latest_checkpoint
from safetensors.numpy import load_file
from test_federation_units import (  # noqa: F401  (fixture below)
    SITES,
    TINY_MODEL,
    LocalGrid,
    client_app,  # noqa: F401
    fed_cfg,
    node_configs,
)
from test_train import breast_ds  # noqa: F401

from medisyn import protocol as P
from medisyn.config import TrainConfig
from medisyn.models import build_components, trainable_state
from medisyn.train import EMA_PREFIX, EMAHook, RunEMAHook, split_run_ema, train_local


def _trajectory(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=g) + 0.1 * k for k in range(n)]


def test_carried_ema_equals_one_ema_over_the_whole_run():
    """Three 'rounds' of a run-EMA hook, each started from the last one's EMA and step
    count, give exactly the diffusers EMAModel that one process keeps over all steps."""
    steps = _trajectory(30)
    p = torch.nn.Parameter(torch.zeros(3, 4))
    one = EMAHook([p], 0.9)
    for k, v in enumerate(steps):
        p.data.copy_(v)
        one.after_step(k + 1)

    q = torch.nn.Parameter(torch.zeros(3, 4))
    shadow, step = {"w": torch.zeros(3, 4)}, 0
    for part in (steps[:7], steps[7:19], steps[19:]):  # rounds of unequal length
        hook = RunEMAHook({"w": q.data}, shadow, step, 0.9)
        for v in part:
            q.data.copy_(v)
            hook.after_step(0)
        shadow, step = split_run_ema(hook.weights())[1], hook.step
    assert step == 30
    torch.testing.assert_close(shadow["w"], one.ema.shadow_params[0], rtol=1e-6, atol=1e-6)
    # and it is an average, not the last weights
    assert not torch.allclose(shadow["w"], steps[-1], atol=1e-2)


def test_run_ema_refuses_weights_it_does_not_cover():
    live = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match="1 missing"):
        RunEMAHook(live, {"a": torch.zeros(2)}, 0, 0.9)
    with pytest.raises(ValueError, match=r"'b' has shape \(4,\)"):
        RunEMAHook(live, {"a": torch.zeros(2), "b": torch.zeros(4)}, 0, 0.9)
    with pytest.raises(ValueError, match="step must be >= 0"):
        RunEMAHook(live, {"a": torch.zeros(2), "b": torch.zeros(3)}, -1, 0.9)


def test_train_local_returns_its_weights_and_the_runs_ema(breast_ds, tiny_cfg):  # noqa: F811
    c = build_components(tiny_cfg)
    start = trainable_state(c, "unet")
    cfg = TrainConfig(batch_size=8, num_threads=1, ema_decay=0.99)
    r = train_local(c, breast_ds, steps=4, config=cfg, stage="unet", progress=False, run_ema=(start, 10))
    weights, ema = split_run_ema(r.state)
    assert set(weights) == set(start) == set(ema)
    # the model keeps its trained weights (not the EMA's), and the EMA moved off its start
    # toward them: at run step 10 the decay is 1 - 11**(-2/3) ~ 0.80, not 0
    live = trainable_state(c, "unet")
    name = next(k for k in start if k.endswith("conv_in.weight"))
    torch.testing.assert_close(weights[name], live[name])
    assert not torch.equal(weights[name], start[name])
    assert not torch.equal(ema[name], start[name]) and not torch.equal(ema[name], weights[name])
    moved = (ema[name] - start[name]).norm() / (weights[name] - start[name]).norm()
    assert 0.05 < float(moved) < 0.9
    # without the run's EMA the round's own EMA is returned as the weights, no ema.* keys
    r2 = train_local(build_components(tiny_cfg), breast_ds, steps=2, config=cfg, stage="unet", progress=False)
    assert not any(k.startswith(EMA_PREFIX) for k in r2.state)


def _recording(client_app, log):  # noqa: F811
    def app(msg, ctx):
        cr = msg.content.config_records.get(P.CONFIG, {})
        if msg.metadata.message_type != P.QUERY_MESSAGE and P.STAGE in cr:
            log.append((msg.metadata.message_type, ctx.node_id, cr.get(P.EMA_STEP),
                        int(msg.content["arrays"][P.PACKED].numpy().size)))
        return client_app(msg, ctx)
    return app


@pytest.mark.parametrize("strategy", ["cyclic", "fedavg"])
def test_federation_carries_the_runs_ema_and_releases_it(tmp_path, client_app, strategy):  # noqa: F811
    sites = SITES[:2]
    train = TrainConfig(batch_size=8, num_threads=1, ema_decay=0.99, ema_scope="run")
    cfg = fed_cfg(tmp_path, stages=["unet"], rounds=2, local_steps=2, sites=sites, train=train, min_sites=2,
                  strategy={"name": strategy}, evaluate=True)
    log: list = []
    assert fed.run_federation(LocalGrid(node_configs(tmp_path, sites=sites), _recording(client_app, log)),
                              cfg) == fed.Outcome.DONE
    n_weights = sum(v.numel() for v in trainable_state(build_components(TINY_MODEL), "unet").values())
    train_msgs = [(step, size) for kind, _, step, size in log if kind == "train"]
    # the chain steps the EMA on from site to site; FedAvg's sites all start from the round's
    if strategy == "cyclic":
        assert [s for s, _ in train_msgs] == [0, 2, 4, 6]
    else:
        assert [s for s, _ in train_msgs] == [0, 0, 2, 2]
    assert all(size == 2 * n_weights for _, size in train_msgs)  # the weights and their EMA
    # evaluation rounds get the model as released (no EMA beside it, no step)
    evals = [(step, size) for kind, _, step, size in log if kind == "evaluate"]
    assert evals and all(step is None and size == n_weights for step, size in evals)

    ckpt = latest_checkpoint(cfg.run_dir)
    kept = fed.GlobalModel(TINY_MODEL, from_dir=ckpt.model_dir)
    assert kept.ema_step == {"unet": 8 if strategy == "cyclic" else 4}
    released = load_file(str(cfg.run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    raw = load_file(str(ckpt.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    for k, v in kept.ema["unet"].items():
        np.testing.assert_array_equal(released[k], v)
    assert any(not np.array_equal(released[k], raw[k]) for k in kept.ema["unet"])
    assert not (cfg.run_dir / "model" / fed.RUN_EMA_FILE).exists()  # a release is one plain model


def test_resume_continues_the_runs_ema(tmp_path, client_app):  # noqa: F811
    sites = SITES[:2]
    train = TrainConfig(batch_size=8, num_threads=1, ema_decay=0.99, ema_scope="run")
    cfg = fed_cfg(tmp_path, stages=["unet"], rounds=2, local_steps=2, sites=sites, train=train, min_sites=2,
                  strategy={"name": "cyclic"})
    nodes = node_configs(tmp_path, sites=sites)
    log: list = []
    grid = LocalGrid(nodes, _recording(client_app, log))
    grid.crash_after_sends = 2  # round 1's two hops, then the coordinator "crashes"
    with pytest.raises(KeyboardInterrupt):
        fed.run_federation(grid, cfg)
    assert fed.GlobalModel(TINY_MODEL, from_dir=latest_checkpoint(cfg.run_dir).model_dir).ema_step == {"unet": 4}
    log.clear()
    assert fed.run_federation(LocalGrid(nodes, _recording(client_app, log)), cfg, resume=True) == fed.Outcome.DONE
    assert [step for kind, _, step, _ in log if kind == "train"] == [4, 6]


def test_a_site_counts_the_model_once_when_the_ema_travels_with_it():
    from medisyn.client.site import _message_parameters, stage_layout

    arrays, frozen = np.zeros(10, np.float32), np.zeros(3, np.float32)
    assert _message_parameters(arrays, frozen, {}) == 13
    assert _message_parameters(arrays, frozen, {P.EMA_STEP: 4}) == 8
    own = {"b": (2,), "a": (3,)}
    assert stage_layout({}, own) == [("a", (3,)), ("b", (2,))]
    assert stage_layout({P.EMA_STEP: 0}, own) == [("a", (3,)), ("b", (2,)), ("ema.a", (3,)), ("ema.b", (2,))]


def test_a_server_optimizer_would_move_the_runs_ema_so_it_is_refused(tmp_path):
    from medisyn.server.config import load_federation_config

    from medisyn.errors import ConfigError

    p = tmp_path / "f.toml"
    for strategy, ok in (('name = "fedadam"', False), ('name = "fedavgm"\nserver_lr = 2.0', False),
                         ('name = "fedavgm"', True), ('name = "cyclic"', True), ('name = "fedprox"', True)):
        p.write_text(f'[train]\nema_scope = "run"\n[strategy]\n{strategy}\n')
        if ok:
            assert load_federation_config(p).train.ema_scope == "run"
        else:
            with pytest.raises(ConfigError, match=r"ema_scope = \"run\" needs an averaging strategy"):
                load_federation_config(p)
    # with the EMA off there is nothing to carry
    p.write_text('[train]\nema_scope = "run"\nema_decay = 0\n[strategy]\nname = "fedadam"\n')
    assert load_federation_config(p).strategy.name == "fedadam"


def test_resuming_without_the_runs_ema_continues_from_it(tmp_path, client_app, caplog):  # noqa: F811
    """A run checkpointed with ema_scope "run" and resumed with "round" must not release
    the stale EMA: it continues from the EMA's weights, with a warning."""
    sites = SITES[:2]
    train = TrainConfig(batch_size=8, num_threads=1, ema_decay=0.99, ema_scope="run")
    cfg = fed_cfg(tmp_path, stages=["unet"], rounds=2, local_steps=2, sites=sites, train=train, min_sites=2,
                  strategy={"name": "cyclic"})
    nodes = node_configs(tmp_path, sites=sites)
    grid = LocalGrid(nodes, client_app)
    grid.crash_after_sends = 2
    with pytest.raises(KeyboardInterrupt):
        fed.run_federation(grid, cfg)
    ema = fed.GlobalModel(TINY_MODEL, from_dir=latest_checkpoint(cfg.run_dir).model_dir).ema["unet"]
    sent: list = []

    def first_weights(msg, ctx):
        if msg.metadata.message_type == "train":
            sent.append((msg.content.config_records[P.CONFIG].get(P.EMA_STEP),
                         np.asarray(msg.content["arrays"][P.PACKED].numpy()).copy()))
        return client_app(msg, ctx)

    cfg2 = cfg.model_copy(update={"train": train.model_copy(update={"ema_scope": "round"})})
    with caplog.at_level("WARNING"):
        assert fed.run_federation(LocalGrid(nodes, first_weights), cfg2, resume=True) == fed.Outcome.DONE
    assert "continuing from the EMA's weights" in caplog.text
    step, packed = sent[0]
    assert step is None  # plain weights, no EMA beside them: the EMA's own
    np.testing.assert_array_equal(packed, P.pack(ema))
    assert not (latest_checkpoint(cfg.run_dir).model_dir / fed.RUN_EMA_FILE).exists()
