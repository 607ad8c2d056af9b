"""DPSession: DP-SGD on the tiny diffusers UNet and VAE with the site's ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medisyn.config import PrivacyConfig
from medisyn.errors import ConfigError, PrivacyBudgetError
from medisyn.privacy import accounting
from medisyn.privacy.dp import DPSession, EmptyBatch, open_site_ledger
from medisyn.privacy.ledger import LEDGER_NAME, PrivacyLedger
from medisyn.privacy.tiny import ToyLatents, collate, tiny_unet, tiny_vae, unet_loss, vae_loss

torch.set_num_threads(1)

PRIV = PrivacyConfig(dp=True, noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=50.0, accountant="rdp")


def _session(module, tmp_path: Path, *, privacy=PRIV, n=32, batch_size=4, steps=3, rnd=1, **kw):
    ds = ToyLatents(n)
    ledger = open_site_ledger(tmp_path, "site-a", privacy, n_records=n)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.05)
    return DPSession(
        module,
        opt,
        ds,
        batch_size=batch_size,
        collate_fn=collate,
        privacy=privacy,
        ledger=ledger,
        stage=kw.pop("stage", "unet"),
        run_id=kw.pop("run_id", "run-1"),
        round=rnd,
        planned_steps=steps,
        insecure_seed=kw.pop("insecure_seed", 0),
        **kw,
    )


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in module.modules())


def _per_example_grads(module, loss_fn, batch, n):
    """Reference: plain autograd, one example at a time."""
    out = []
    for i in range(n):
        module.zero_grad(set_to_none=True)
        one = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v[i : i + 1]) for k, v in batch.items()}
        loss_fn(module, one).backward()
        out.append({n_: p.grad.detach().clone() for n_, p in module.named_parameters() if p.requires_grad})
    return out


def _fixed_unet_loss(unet, batch):
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(batch["latent"].shape, generator=g)  # same noise for one or many
    t = batch["t"]
    pred = unet(batch["latent"] + noise, t, encoder_hidden_states=batch["text"]).sample
    return ((pred - noise) ** 2).mean()


def _fixed_vae_loss(vae, batch):
    post = vae.encode(batch["image"]).latent_dist
    rec = vae.decode(post.mode()).sample
    return ((rec - batch["image"]) ** 2).mean() + 1e-3 * post.kl().mean()


@pytest.mark.parametrize("which", ["unet", "vae"])
def test_per_sample_gradients_match_per_example_autograd(tmp_path: Path, which: str) -> None:
    """The hooks the session attaches (in place, wrap_model=False) give the same
    per-sample gradients as per-example autograd, for every trainable tensor."""
    module = tiny_unet() if which == "unet" else tiny_vae()
    loss_fn = _fixed_unet_loss if which == "unet" else _fixed_vae_loss
    b = 3
    ds = ToyLatents(b, seed=3)
    batch = collate([ds[i] for i in range(b)])
    if which == "unet":
        batch = {"latent": batch["latent"], "text": batch["text"], "t": torch.tensor([10, 500, 990])}
        # the same noise draw per example as in the batch: rows of one (b, ...) draw
        g = torch.Generator().manual_seed(7)
        full_noise = torch.randn(batch["latent"].shape, generator=g)
        batch["latent"] = batch["latent"] + full_noise - full_noise  # unchanged, explicit
    else:
        batch = {"image": batch["image"]}
    session = _session(module, tmp_path, stage=which)
    assert type(module).__name__ == ("UNet2DConditionModel" if which == "unet" else "AutoencoderKL")
    if which == "unet":
        # per-example noise must be the batch's rows: use a loss whose noise is per row
        def batch_loss(m, bt):
            g = torch.Generator().manual_seed(7)
            noise = torch.randn((b, *bt["latent"].shape[1:]), generator=g)[bt["rows"]]
            pred = m(bt["latent"] + noise, bt["t"], encoder_hidden_states=bt["text"]).sample
            return ((pred - noise) ** 2).mean()

        batch["rows"] = torch.arange(b)
        loss_fn = batch_loss
    loss_fn(module, batch).backward()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    grad_samples = {n: p.grad_sample.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert all(g.shape[0] == b for g in grad_samples.values())
    session.close()
    assert _hook_count(module) == 0
    ref = _per_example_grads(module, loss_fn, batch, b)
    worst = 0.0
    for n in names:
        for i in range(b):
            diff = (grad_samples[n][i] - ref[i][n]).abs().max().item()
            scale = ref[i][n].abs().max().item() + 1e-8
            worst = max(worst, diff / scale if scale > 1e-6 else diff)
    assert worst < 1e-3, f"max relative per-sample gradient error {worst}"
    assert len(names) > 100


def test_dp_round_trains_records_every_step_and_cleans_up(tmp_path: Path) -> None:
    unet = tiny_unet()
    before = [p.detach().clone() for p in unet.parameters()]
    hooks_before = _hook_count(unet)
    with _session(unet, tmp_path, steps=4, batch_size=4) as s:
        assert type(unet).__name__ == "UNet2DConditionModel"  # not wrapped
        n_batches = 0
        for batch in s.batches():
            n_batches += 1
            if s.is_empty(batch):
                s.noise_only_step()
                continue
            unet_loss(unet, batch).backward()
            s.step()
            # persisted progressively: the ledger on disk already has this step
            assert PrivacyLedger.open(tmp_path, "site-a", "rdp").total_steps == s.steps_taken
        m = s.metrics()
    assert n_batches == 4 and m["dp-steps"] == 4
    assert _hook_count(unet) == hooks_before
    assert any(not torch.equal(a, p) for a, p in zip(before, unet.parameters(), strict=True))
    ledger = PrivacyLedger.open(tmp_path, "site-a", "rdp")
    assert ledger.history() == [(1.0, 4 / 32, 4)]
    assert m["epsilon"] == pytest.approx(accounting.epsilon([(1.0, 4 / 32, 4)], m["delta"], "rdp"))
    assert m["delta"] == accounting.default_delta(32)


def test_noise_only_step_on_empty_batch_is_accounted(tmp_path: Path) -> None:
    unet = tiny_unet()
    before = [p.detach().clone() for p in unet.parameters()]
    with _session(unet, tmp_path, steps=2) as s:
        assert s.is_empty(EmptyBatch()) and s.is_empty({"latent": torch.zeros(0, 4, 8, 8)})
        assert not s.is_empty({"latent": torch.zeros(2, 4, 8, 8)})
        s.noise_only_step()
        assert s.steps_taken == 1 and s.noise_only_steps == 1
    # noise moved every parameter; the step is in the ledger
    assert all(not torch.equal(a, p) for a, p in zip(before, unet.parameters(), strict=True))
    assert PrivacyLedger.open(tmp_path, "site-a", "rdp").total_steps == 1


def test_poisson_sampler_yields_empty_batches_as_emptybatch(tmp_path: Path) -> None:
    unet = tiny_unet()
    with _session(unet, tmp_path, n=40, batch_size=1, steps=30, insecure_seed=5) as s:
        batches = list(s.batches())
        sizes = [0 if s.is_empty(b) else len(b["prompt"]) for b in batches]
    assert len(batches) == 30
    assert any(isinstance(b, EmptyBatch) for b in batches)  # q = 1/40: P(empty) ≈ 0.36
    assert max(sizes) >= 1


def test_refused_round_raises_before_any_step_and_leaves_ledger_unchanged(tmp_path: Path) -> None:
    ledger = open_site_ledger(tmp_path, "site-a", PRIV, n_records=32)
    ledger.record_steps("unet", "run-0", 1, 1.0, 4 / 32, 30)
    blob = (tmp_path / LEDGER_NAME).read_bytes()
    spent = ledger.epsilon()
    cap = spent + 0.05
    strict = PRIV.model_copy(update={"max_epsilon": cap})
    unet = tiny_unet()
    params = [p.detach().clone() for p in unet.parameters()]
    with pytest.raises(PrivacyBudgetError) as exc:
        _session(unet, tmp_path, privacy=strict, steps=20)
    msg = str(exc.value)
    assert "site-a" in msg and f"{spent:.3f}" in msg and f"{cap:g}" in msg
    assert (tmp_path / LEDGER_NAME).read_bytes() == blob
    assert _hook_count(unet) == 0 and not any(hasattr(p, "grad_sample") for p in unet.parameters())
    assert all(torch.equal(a, p) for a, p in zip(params, unet.parameters(), strict=True))
    # a smaller round that fits is accepted
    _session(unet, tmp_path, privacy=strict, steps=1).close()


def test_steps_beyond_the_plan_are_refused(tmp_path: Path) -> None:
    unet = tiny_unet()
    with _session(unet, tmp_path, steps=1) as s:
        s.noise_only_step()
        with pytest.raises(PrivacyBudgetError, match="planned 1"):
            s.noise_only_step()
    assert PrivacyLedger.open(tmp_path, "site-a", "rdp").total_steps == 1


def test_dp_with_gradient_checkpointing_is_refused(tmp_path: Path) -> None:
    unet = tiny_unet()
    unet.enable_gradient_checkpointing()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        _session(unet, tmp_path)
    assert not (tmp_path / LEDGER_NAME).exists()


def test_dp_off_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _session(tiny_unet(), tmp_path, privacy=PrivacyConfig(dp=False))


def test_vae_stage_runs_under_dp(tmp_path: Path) -> None:
    vae = tiny_vae()
    with _session(vae, tmp_path, stage="vae", steps=2, batch_size=4) as s:
        for batch in s.batches():
            if s.is_empty(batch):
                s.noise_only_step()
                continue
            vae_loss(vae, batch).backward()
            s.step()
    assert PrivacyLedger.open(tmp_path, "site-a", "rdp").rounds() == [("vae", "run-1", 1)]


def test_sigma_from_target_epsilon_spends_the_target_over_the_plan(tmp_path: Path) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    priv = PrivacyConfig(dp=True, target_epsilon=4.0, planned_rounds=3, max_epsilon=5.0, accountant="rdp")
    s = _session(tiny_unet(), tmp_path, privacy=priv, n=64, batch_size=8, steps=5)
    s.close()
    delta = accounting.default_delta(64)
    expected = get_noise_multiplier(
        target_epsilon=4.0, target_delta=delta, sample_rate=8 / 64, steps=15, accountant="rdp"
    )
    assert s.noise_multiplier == pytest.approx(expected)
    eps_plan = accounting.epsilon([(s.noise_multiplier, 8 / 64, 15)], delta, "rdp")
    assert 3.9 <= eps_plan <= 4.0


def test_two_rounds_with_fresh_sessions_are_cumulative(tmp_path: Path) -> None:
    """A new module, optimizer and session each round (like a ClientApp); ε must grow
    and equal a fresh Opacus accountant fed the whole history."""
    from opacus.accountants import create_accountant

    eps = []
    for rnd in (1, 2):
        unet = tiny_unet(seed=rnd)
        with _session(unet, tmp_path, steps=2, rnd=rnd, insecure_seed=rnd) as s:
            s.noise_only_step()
            s.noise_only_step()
            eps.append(s.epsilon)
    assert eps[1] > eps[0]
    acc = create_accountant("rdp")
    for _ in range(4):
        acc.step(noise_multiplier=1.0, sample_rate=4 / 32)
    assert eps[1] == pytest.approx(acc.get_epsilon(delta=accounting.default_delta(32)), rel=1e-9)
