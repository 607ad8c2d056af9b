"""Prompt anchoring (medisyn.train.PromptAnchorHook): a site training on its own prompts
keeps the round's global model's predictions for the other sites' prompts."""

from __future__ import annotations

import pytest
import torch

from medisyn import protocol as P
from medisyn.config import TrainConfig, load_dataset_config
from medisyn.data import load_dataset
from medisyn.models import build_components
from medisyn.train import PromptAnchorHook, UNetObjective, evaluate_loss, pick_device, train_local

OTHERS = ["radiology, chest x-ray, pneumonia", "dermatology, dermoscopy, melanoma"]


@pytest.fixture
def breast_ds(demo_site_toml, tiny_cfg):
    cfg = load_dataset_config(demo_site_toml)
    return load_dataset(cfg, resolution=tiny_cfg.resolution, channels=3, splits=["train"])


@torch.no_grad()
def _predictions(c, prompts: list[str]) -> torch.Tensor:
    """The UNet's outputs for ``prompts`` at fixed noisy inputs and timesteps."""
    g = torch.Generator().manual_seed(7)
    unet = c.unet.eval()
    size = unet.config.sample_size
    x = torch.randn(8, unet.config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    outs = []
    for p in prompts:
        emb = c.prompt_encoder.encode([p] * 8, device=torch.device("cpu"))
        outs.append(unet(x, t, encoder_hidden_states=emb).sample)
    return torch.stack(outs)


def test_the_hook_anchors_only_other_prompts_and_starts_at_zero(breast_ds, tiny_cfg):
    c = build_components(tiny_cfg, seed=3)
    cfg = TrainConfig(batch_size=8)
    obj = UNetObjective(c, breast_ds, cfg, pick_device())
    own = obj.vocab[0]
    hook = PromptAnchorHook(obj, c.unet, [own, "", *OTHERS, OTHERS[0]], weight=1.0, fraction=0.5)
    assert hook.prompts == sorted(OTHERS)  # own prompts, "" and repeats dropped
    batch = tuple(r[:8] for r in obj.records)
    base = torch.tensor(0.25)
    # the module is the teacher at the start: the anchor term is exactly zero
    assert float(hook.on_loss(base, c.unet, batch, torch.Generator().manual_seed(0)).detach()) == pytest.approx(0.25, abs=1e-7)


def test_anchoring_keeps_other_prompts_and_still_learns_own(breast_ds, tiny_cfg):
    def train(weight: float):
        c = build_components(tiny_cfg, seed=2)
        before = _predictions(c, OTHERS)
        own_before = evaluate_loss(c, breast_ds, stage="unet", max_batches=2)
        cfg = TrainConfig(batch_size=8, lr=3e-3, anchor_weight=weight, ema_decay=None)
        r = train_local(c, breast_ds, steps=12, config=cfg, stage="unet", progress=False,
                        anchor_prompts=OTHERS)
        moved = float((_predictions(c, OTHERS) - before).pow(2).mean())
        own_after = evaluate_loss(c, breast_ds, stage="unet", max_batches=2)
        return moved, r.metrics, own_before, own_after

    free, m_free, _, _ = train(0.0)
    anchored, m_anch, own_before, own_after = train(10.0)
    assert m_free["anchor-prompts"] == 0 and m_anch["anchor-prompts"] == len(OTHERS)
    # the other prompts' predictions move far less when anchored ...
    assert anchored < 0.5 * free, (anchored, free)
    # ... while the site's own held-out loss still falls
    assert own_after < own_before, (own_before, own_after)


def test_a_dp_site_anchors_on_public_inputs_at_no_privacy_cost(tmp_path, breast_ds, tiny_cfg):
    from medisyn.config import PrivacyConfig

    dp = PrivacyConfig(dp=True, noise_multiplier=1.0, max_epsilon=50.0, accountant="rdp")
    runs = {}
    for name, prompts in (("plain", ()), ("anchored", OTHERS)):
        runs[name] = train_local(build_components(tiny_cfg), breast_ds, steps=2, config=TrainConfig(batch_size=8),
                                 stage="unet", privacy=dp, ledger_path=tmp_path / name, site_id="s",
                                 progress=False, anchor_prompts=prompts).metrics
    assert runs["anchored"]["anchor-prompts"] == len(OTHERS) and runs["plain"]["anchor-prompts"] == 0
    assert runs["anchored"]["epsilon"] == runs["plain"]["epsilon"]  # the public term costs no ε


def test_a_dp_site_with_max_physical_batch_trains_in_parts_at_the_same_privacy_cost(tmp_path, breast_ds, tiny_cfg,
                                                                                    monkeypatch):
    from medisyn.config import PrivacyConfig
    from medisyn.privacy.dp import DPSession

    parts = []
    real = DPSession.accumulate
    monkeypatch.setattr(DPSession, "accumulate", lambda self: (parts.append(1), real(self))[1])
    runs = {}
    for name, physical in (("whole", None), ("parts", 2)):
        dp = PrivacyConfig(dp=True, noise_multiplier=1.0, max_epsilon=50.0, accountant="rdp",
                           max_physical_batch=physical)
        runs[name] = train_local(build_components(tiny_cfg), breast_ds, steps=3, config=TrainConfig(batch_size=8),
                                 stage="unet", privacy=dp, ledger_path=tmp_path / name, site_id="s",
                                 progress=False, anchor_prompts=OTHERS).metrics
        if name == "whole":
            assert not parts  # no part of a batch is stepped on its own
    assert len(parts) >= 3  # batches of ~8 in parts of 2: at least 3 parts accumulated per step
    assert runs["parts"]["epsilon"] == runs["whole"]["epsilon"] and runs["parts"]["steps"] == 3
    assert torch.isfinite(torch.tensor(runs["parts"]["loss"]))


def test_public_anchor_gradient_pulls_back_to_the_teacher(breast_ds, tiny_cfg):
    c = build_components(tiny_cfg, seed=4)
    obj = UNetObjective(c, breast_ds, TrainConfig(batch_size=8), pick_device())
    hook = PromptAnchorHook(obj, c.unet, OTHERS, weight=1.0, fraction=1.0)
    named = [(n, p) for n, p in c.unet.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    zero = hook.public_grads(params, names, 8, torch.Generator().manual_seed(0), None)
    assert all(float(g.abs().max()) == 0 for g in zero)  # the student is the teacher: nothing to pull
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))

    def term() -> float:
        from torch.func import functional_call

        live = dict(zip(names, params, strict=True))
        gen = torch.Generator().manual_seed(0)  # the same batch, timesteps and noise as public_grads draws
        idx = torch.randint(0, len(hook._public[0]), (8,), generator=gen)
        with torch.no_grad():
            student = lambda *a, **k: functional_call(hook.teacher, live, a, k, strict=False)  # noqa: E731
            return float(hook._term(student, tuple(r[idx] for r in hook._public), gen))

    before = term()
    grads = hook.public_grads(params, names, 8, torch.Generator().manual_seed(0), None)
    assert sum(float(g.pow(2).sum()) for g in grads) > 0
    assert all(p.grad is None for p in params)  # returned, not accumulated
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(0.1 * g)
    assert term() < before


def test_no_anchor_without_other_prompts(breast_ds, tiny_cfg):
    c = build_components(tiny_cfg, seed=1)
    obj = UNetObjective(c, breast_ds, TrainConfig(), pick_device())
    r = train_local(c, breast_ds, steps=1, config=TrainConfig(batch_size=4), stage="unet", progress=False,
                    anchor_prompts=list(obj.vocab[:-1]))
    assert r.metrics["anchor-prompts"] == 0


def test_anchor_prompts_encoding_and_named_errors():
    assert P.decode_prompts(P.encode_prompts(["b", "a", "b"])) == ["a", "b"]
    for bad, words in (("{", "not JSON"), ('{"a": 1}', "list of strings"), ("[1, 2]", "list of strings"),
                       (str(["x"] * (P.MAX_ANCHOR_PROMPTS + 1)).replace("'", '"'), "more than")):
        with pytest.raises(ValueError, match=words) as e:
            P.decode_prompts(bad)
        assert P.ANCHOR_PROMPTS in str(e.value)


def test_a_dp_site_trains_only_its_subset_with_noise_multiplicity_at_the_same_privacy_cost(tmp_path, breast_ds,
                                                                                          tiny_cfg):
    """[privacy] trainable = "cross-attention" and noise_multiplicity = 2: only the
    cross-attention weights move, every weight is trainable again afterwards, and ε is that
    of the same σ, q and steps on all weights (neither costs privacy)."""
    from medisyn.config import PrivacyConfig
    from medisyn.models import trainable_state

    runs, moved = {}, {}
    for name, extra in (("all", {}), ("subset", {"trainable": "cross-attention", "noise_multiplicity": 2})):
        dp = PrivacyConfig(dp=True, noise_multiplier=1.0, max_epsilon=50.0, accountant="rdp", **extra)
        c = build_components(tiny_cfg, seed=5)
        before = trainable_state(c, "unet")
        runs[name] = train_local(c, breast_ds, steps=2, config=TrainConfig(batch_size=8, ema_decay=None),
                                 stage="unet", privacy=dp, ledger_path=tmp_path / name, site_id="s",
                                 progress=False, anchor_prompts=OTHERS).metrics
        after = trainable_state(c, "unet")
        moved[name] = {k for k in before if not torch.equal(before[k], after[k])}
        assert all(p.requires_grad for p in c.unet.parameters())
    assert runs["subset"]["epsilon"] == runs["all"]["epsilon"]
    assert moved["subset"] and all(".attn2." in k or ".norm2." in k for k in moved["subset"]), sorted(moved["subset"])[:5]
    assert len(moved["all"]) > 3 * len(moved["subset"])
    assert torch.isfinite(torch.tensor(runs["subset"]["loss"]))

