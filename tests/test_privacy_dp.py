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

PRIV = PrivacyConfig(
    dp=True, noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=50.0, accountant="rdp"
)


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
        one = {
            k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v[i : i + 1])
            for k, v in batch.items()
        }
        loss_fn(module, one).backward()
        out.append(
            {n_: p.grad.detach().clone() for n_, p in module.named_parameters() if p.requires_grad}
        )
    return out


_NOISE = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7))


def _fixed_unet_loss(unet, batch):
    """ε-prediction loss with fixed per-record noise and timesteps (rows of the batch)."""
    noise = _NOISE[batch["rows"]]
    pred = unet(batch["latent"] + noise, batch["t"], encoder_hidden_states=batch["text"]).sample
    return ((pred - noise) ** 2).mean()


def _fixed_vae_loss(vae, batch):
    post = vae.encode(batch["image"]).latent_dist
    rec = vae.decode(post.mode()).sample
    return ((rec - batch["image"]) ** 2).mean() + 1e-3 * post.kl().mean()


@pytest.mark.parametrize("which", ["unet", "vae"])
def test_per_sample_gradients_match_per_example_autograd(tmp_path: Path, which: str) -> None:
    """The hooks the session attaches (in place, wrap_model=False) give the same
    per-sample gradients as per-example autograd, for every trainable tensor.

    The VAE case also covers the Opacus unfold2d channels-last bug that
    ``install_opacus_fixes`` works around (convs after the VAE's mid-block attention)."""
    module = tiny_unet() if which == "unet" else tiny_vae()
    b = 3
    ds = ToyLatents(b, seed=3)
    full = collate([ds[i] for i in range(b)])
    if which == "unet":
        loss_fn = _fixed_unet_loss
        batch = {
            "latent": full["latent"],
            "text": full["text"],
            "t": torch.tensor([10, 500, 990]),
            "rows": torch.arange(b),
        }
    else:
        loss_fn = _fixed_vae_loss
        batch = {"image": full["image"]}
    session = _session(module, tmp_path, stage=which)
    assert type(module).__name__ == ("UNet2DConditionModel" if which == "unet" else "AutoencoderKL")
    loss_fn(module, batch).backward()
    grad_samples = {
        n: p.grad_sample.detach().clone() for n, p in module.named_parameters() if p.requires_grad
    }
    assert all(g.shape[0] == b for g in grad_samples.values())
    session.close()
    assert _hook_count(module) == 0
    ref = _per_example_grads(module, loss_fn, batch, b)
    global_scale = max(r[n].abs().max().item() for r in ref for n in r)
    bad = []
    for n, gs in grad_samples.items():
        for i in range(b):
            diff = (gs[i] - ref[i][n]).abs().max().item()
            scale = ref[i][n].abs().max().item()
            if diff > 1e-3 * scale + 1e-6 * global_scale:
                bad.append((n, i, diff, scale))
    assert not bad, f"per-sample gradients differ from per-example autograd: {bad[:5]}"
    assert len(grad_samples) > 100


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
    cap = round(ledger.epsilon_after(1.0, 4 / 32, 1) + 0.001, 3)  # one more step fits, 20 do not
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
    priv = PrivacyConfig(
        dp=True, target_epsilon=4.0, planned_rounds=3, max_epsilon=5.0, accountant="rdp"
    )
    s = _session(tiny_unet(), tmp_path, privacy=priv, n=64, batch_size=8, steps=5)
    s.close()
    delta = accounting.default_delta(64)
    # the plan (3 rounds x 5 steps) spends the target (Opacus bisects to within 0.01 below)
    eps_plan = accounting.epsilon([(s.noise_multiplier, 8 / 64, 15)], delta, "rdp")
    assert 3.98 <= eps_plan <= 4.0
    assert s.epsilon_planned == pytest.approx(
        accounting.epsilon([(s.noise_multiplier, 8 / 64, 5)], delta, "rdp")
    )


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


def test_state_dir_api_with_a_tensor_dataset_and_seed_not_used_for_noise(tmp_path: Path) -> None:
    """The training loop's call: TensorDataset records, ledger opened from state_dir and
    site_id. The training seed must not seed DP noise: two sessions with the same seed
    and the same model must add different noise."""
    from torch.utils.data import TensorDataset

    ds = ToyLatents(16)
    records = TensorDataset(ds.latents, ds.text)
    results = []
    for i in range(2):
        unet = tiny_unet()
        s = DPSession(
            unet,
            torch.optim.SGD(unet.parameters(), lr=0.1),
            records,
            batch_size=4,
            privacy=PRIV,
            state_dir=tmp_path / f"s{i}",
            site_id="site-a",
            stage="unet",
            run_id="r",
            round=1,
            planned_steps=2,
            seed=1234,
        )
        batch = next(s.batches())
        assert s.is_empty(batch) or (isinstance(batch, list) and batch[0].shape[1:] == (4, 8, 8))
        s.noise_only_step()
        s.close()
        results.append(torch.cat([p.detach().flatten() for p in unet.parameters()]))
        assert PrivacyLedger.open(tmp_path / f"s{i}", "site-a", "rdp").total_steps == 1
    assert not torch.equal(results[0], results[1])


def test_conv_per_sample_gradients_on_channels_last_input_are_fixed() -> None:
    """Regression for the Opacus 1.6 unfold2d bug: a channels-last activation (what the
    diffusers VAE attention emits) gave zero per-sample conv weight gradients."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    from medisyn.privacy.dp import install_opacus_fixes

    install_opacus_fixes()
    install_opacus_fixes()  # idempotent
    conv = torch.nn.Conv2d(8, 4, 3, padding=1)
    x = torch.randn(3, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    out = conv(x)
    backprops = torch.randn_like(out)
    gs = GradSampleHooks.GRAD_SAMPLERS[torch.nn.Conv2d](conv, [x], backprops)[conv.weight]
    for i in range(3):
        (g,) = torch.autograd.grad(conv(x[i : i + 1]), conv.weight, backprops[i : i + 1])
        torch.testing.assert_close(gs[i], g, rtol=1e-4, atol=1e-5)
    assert gs.abs().sum() > 0


def test_a_batch_stepped_in_parts_gives_the_same_update_and_one_accounted_step(tmp_path: Path) -> None:
    """``accumulate`` then ``step`` (what ``max_physical_batch`` does with a large Poisson
    batch) clips per record, sums, and noises once: the parameters after the step are those
    of one step on the whole batch with the same noise, and the ledger records one step."""
    b = 3
    ds = ToyLatents(b, seed=3)
    full = collate([ds[i] for i in range(b)])
    batch = {"latent": full["latent"], "text": full["text"], "t": torch.tensor([10, 500, 990]),
             "rows": torch.arange(b)}

    def part(rows):
        return {k: v[rows] for k, v in batch.items()}

    torch.manual_seed(0)
    whole, split = tiny_unet(), tiny_unet()
    split.load_state_dict(whole.state_dict())
    before = {n: p.detach().clone() for n, p in whole.named_parameters()}
    after = []
    for module, parts, d in ((whole, [[0, 1, 2]], "a"), (split, [[0, 1], [2]], "b")):
        s = _session(module, tmp_path / d, steps=1, insecure_seed=5)
        for k, rows in enumerate(parts):
            _fixed_unet_loss(module, part(torch.tensor(rows))).backward()
            if k < len(parts) - 1:
                s.accumulate()
                assert s.steps_taken == 0  # nothing noised, nothing recorded yet
            else:
                s.step()
        assert s.steps_taken == 1 and sum(e.steps for e in s.ledger.entries()) == 1
        s.close()
        after.append({n: p.detach().clone() for n, p in module.named_parameters()})
    moved = max((after[0][n] - before[n]).abs().max().item() for n in before)
    diff = max((after[0][n] - after[1][n]).abs().max().item() for n in after[0])
    assert moved > 1e-3 and diff < 1e-5 * max(1.0, moved), (moved, diff)


def test_average_copies_gives_each_record_the_mean_gradient_of_its_copies(tmp_path: Path) -> None:
    """Noise multiplicity: a part holding each record k times in a row (different t and
    noise per copy) ends with one per-sample gradient per *record*, the mean of its copies'
    per-example gradients, so that clipping bounds each record's contribution."""
    module = tiny_unet()
    ds = ToyLatents(2, seed=3)
    full = collate([ds[i] for i in range(2)])
    k = 3
    # records 0 and 1, each three times, each copy with its own timestep and noise row
    batch = {"latent": full["latent"].repeat_interleave(k, 0), "text": full["text"].repeat_interleave(k, 0),
             "t": torch.tensor([10, 500, 990, 20, 300, 700]), "rows": torch.tensor([0, 1, 2, 0, 1, 2])}
    session = _session(module, tmp_path)
    _fixed_unet_loss(module, batch).backward()
    session.average_copies(k)
    got = {n: p.grad_sample.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    session.close()
    ref = _per_example_grads(module, _fixed_unet_loss, batch, 2 * k)
    bad = []
    for n, gs in got.items():
        assert gs.shape[0] == 2, (n, gs.shape)
        for r in range(2):
            want = torch.stack([ref[r * k + j][n] for j in range(k)]).mean(0)
            if (gs[r] - want).abs().max().item() > 1e-3 * want.abs().max().item() + 1e-7:
                bad.append(n)
    assert not bad, bad[:5]


def test_average_copies_refuses_a_part_that_is_not_k_copies(tmp_path: Path) -> None:
    module = tiny_unet()
    ds = ToyLatents(3, seed=3)
    full = collate([ds[i] for i in range(3)])
    batch = {"latent": full["latent"], "text": full["text"], "t": torch.tensor([10, 500, 990]),
             "rows": torch.arange(3)}
    session = _session(module, tmp_path)
    _fixed_unet_loss(module, batch).backward()
    with pytest.raises(RuntimeError, match="2 copies"):
        session.average_copies(2)
    session.close()


@pytest.mark.parametrize(("c", "share"), [(1e-9, 1.0), (1e9, 0.0)])
def test_the_session_counts_the_per_record_gradients_it_clips(tmp_path: Path, c: float, share: float) -> None:
    module = tiny_unet()
    priv = PrivacyConfig(dp=True, noise_multiplier=1.0, max_grad_norm=c, max_epsilon=50.0, accountant="rdp")
    session = _session(module, tmp_path, privacy=priv)
    assert session.clipped_fraction != session.clipped_fraction  # NaN before any record
    ds = ToyLatents(3, seed=3)
    full = collate([ds[i] for i in range(3)])
    batch = {"latent": full["latent"], "text": full["text"], "t": torch.tensor([10, 500, 990]), "rows": torch.arange(3)}
    _fixed_unet_loss(module, batch).backward()
    session.step()
    assert session.records_seen == 3 and session.clipped_fraction == share
    session.close()
