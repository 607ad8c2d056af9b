"""Local training: the one function a site (or a researcher) runs on its own data.

``train_local`` takes components, a dataset, a step budget and a config, trains the
stage's weights (the VAE in stage ``vae``, the UNet or its LoRA adapters in stage
``unet``) and returns them with metrics. The federation's ClientApp calls it unchanged.

Inside, each stage is an *objective*: fixed per-record tensors (images for the VAE;
latent mean/std and a prompt index for the UNet, precomputed once with the frozen VAE
and the cached text encoder) plus a loss on a batch of them. The non-DP loop samples
shuffled batches; the DP loop hands the same records to Opacus's Poisson sampler.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from medisyn.config import PrivacyConfig, Stage, TrainConfig
from medisyn.errors import ConfigError
from medisyn.models import Components, trainable_module, trainable_state

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device, mixed_precision: str):
    if device.type == "cuda" and mixed_precision != "no":
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


# --------------------------------------------------------------------------- objectives


def _dataset_images(dataset: Dataset, limit: int | None = None) -> torch.Tensor:
    """Model-space images of a dataset (our datasets hold them precomputed as ``.images``)."""
    images = getattr(dataset, "images", None)
    n = len(dataset) if limit is None else min(len(dataset), limit)
    if images is None:
        return torch.stack([dataset[i]["image"] for i in range(n)])
    return images[:n]


class VAEObjective:
    """Reconstruction MSE + a small KL term; records are model-space images."""

    def __init__(self, c: Components, dataset: Dataset, config: TrainConfig, device: torch.device):
        self.c, self.config, self.device = c, config, device
        self.records = (_dataset_images(dataset),)

    def loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...], gen: torch.Generator) -> torch.Tensor:
        x = batch[0].to(self.device)
        posterior = module.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen).to(self.device)
        z = posterior.mean + posterior.std * eps
        rec = module.decode(z).sample
        per_sample = (rec.float() - x).pow(2).flatten(1).mean(1)
        kl = posterior.kl().float() / x[0].numel()
        return (per_sample + self.config.kl_weight * kl).mean()


class UNetObjective:
    """Noise-prediction MSE on latents of the frozen VAE, text-conditioned."""

    def __init__(self, c: Components, dataset: Dataset, config: TrainConfig, device: torch.device):
        self.c, self.config, self.device = c, config, device
        images = _dataset_images(dataset)
        prompts = list(dataset.prompts) if hasattr(dataset, "prompts") else [dataset[i]["prompt"] for i in range(len(dataset))]
        self.vocab = sorted(set(prompts)) + [""]
        index = {p: i for i, p in enumerate(self.vocab)}
        self.uncond = len(self.vocab) - 1
        self.embeddings = c.prompt_encoder.encode(self.vocab, device=device)
        means, stds = [], []
        c.vae.to(device).eval()
        with torch.no_grad():
            for chunk in images.split(256):
                dist = c.vae.encode(chunk.to(device)).latent_dist
                means.append(dist.mean.float().cpu())
                stds.append(dist.std.float().cpu())
        self.records = (
            torch.cat(means),
            torch.cat(stds),
            torch.tensor([index[p] for p in prompts], dtype=torch.long),
        )

    def loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...], gen: torch.Generator) -> torch.Tensor:
        mean, std, pidx = (t.to(self.device) for t in batch)
        b = mean.shape[0]
        scale = self.c.scaling_factor
        latents = (mean + std * torch.randn(mean.shape, generator=gen).to(self.device)) * scale
        drop = torch.rand(b, generator=gen).to(self.device) < self.config.caption_dropout
        pidx = torch.where(drop, torch.full_like(pidx, self.uncond), pidx)
        emb = self.embeddings[pidx]
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        sched = self.c.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen).to(self.device)
        noisy = sched.add_noise(latents, noise, t)
        with _autocast(self.device, self.config.mixed_precision):
            pred = module(noisy, t, encoder_hidden_states=emb).sample
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        return F.mse_loss(pred.float(), target.float())


def make_objective(c: Components, dataset: Dataset, stage: Stage, config: TrainConfig, device: torch.device):
    if stage == "vae":
        return VAEObjective(c, dataset, config, device)
    if stage == "unet":
        return UNetObjective(c, dataset, config, device)
    raise ConfigError(f"unknown stage {stage!r}; use 'vae' or 'unet'")


# --------------------------------------------------------------------------- helpers


class _EMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s)


class _ShuffledBatches:
    """Epoch-wise shuffled batches, a pure function of (seed, step): resume-safe."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.per_epoch = n // self.batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + 104729 * epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


def _seed_for(config: TrainConfig, round: int, site_id: str) -> int:
    import zlib

    return (config.seed * 1_000_003 + round * 7919 + zlib.crc32(site_id.encode())) % (2**63)


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(directory: Path, *, step: int, module: torch.nn.Module, optimizer, gen: torch.Generator,
                     ema: _EMA | None, meta: dict[str, Any]) -> None:
    """Atomic checkpoint: weights + optimizer tensors as safetensors, the rest as JSON."""
    from safetensors.torch import save_file

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, tmp / "weights.safetensors")
        opt = optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {"rng": gen.get_state()}
        for pid, st in opt["state"].items():
            for name, val in st.items():
                t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
                tensors[f"opt.{pid}.{name}"] = t.detach().cpu().contiguous()
        if ema is not None:
            for i, s in enumerate(ema.shadow):
                tensors[f"ema.{i}"] = s.detach().cpu().contiguous()
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "checkpoint.json").write_text(
            json.dumps({"step": step, "param_groups": opt["param_groups"], **meta}, indent=2, default=str)
        )
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_checkpoint(directory: Path, *, module: torch.nn.Module, optimizer, gen: torch.Generator,
                     ema: _EMA | None) -> int:
    from safetensors.torch import load_file

    info = json.loads((directory / "checkpoint.json").read_text())
    module.load_state_dict(load_file(directory / "weights.safetensors"), strict=True)
    tensors = load_file(directory / "state.safetensors")
    gen.set_state(tensors["rng"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = val
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    if ema is not None:
        for i, s in enumerate(ema.shadow):
            s.copy_(tensors[f"ema.{i}"])
    return int(info["step"])


# --------------------------------------------------------------------------- training


def train_local(
    components: Components,
    dataset: Dataset,
    *,
    steps: int,
    config: TrainConfig,
    stage: Stage,
    privacy: PrivacyConfig | None = None,
    ledger_path: Path | None = None,
    site_id: str = "local",
    run_id: str = "local",
    round: int = 0,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train ``stage`` for ``steps`` optimizer steps on ``dataset``; see module docstring.

    With ``privacy.dp`` the steps are DP-SGD steps (Poisson sampling, per-sample
    clipping, noise) and the site's ledger at ``ledger_path`` (a state directory) is
    restored first, checked against ``max_epsilon`` (``PrivacyBudgetError`` before any
    step) and updated as steps are taken.

    ``proximal_mu > 0`` adds FedProx's proximal term ``mu/2 * ||w - w_start||^2`` (the
    weights this call started from, i.e. the global model of the round).
    """
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    if len(dataset) == 0:
        raise ConfigError("the training dataset is empty")
    dp = privacy is not None and privacy.dp
    if privacy is not None and privacy.require_dp and not dp:
        raise ConfigError("site policy requires DP (privacy.require_dp) but DP is off")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = pick_device()
    c = components
    seed = _seed_for(config, round, site_id)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    module = trainable_module(c, stage)
    c.text_encoder.to(device)
    c.vae.to(device)
    module.to(device)
    objective = make_objective(c, dataset, stage, config, device)
    if config.gradient_checkpointing:
        if dp:
            raise ConfigError(
                "DP-SGD cannot be combined with gradient checkpointing: Opacus then gets no "
                "per-sample gradients for checkpointed blocks. Set train.gradient_checkpointing = false."
            )
        if hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"stage {stage!r} has no trainable parameters")
    lr = config.vae_lr if stage == "vae" else config.lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    ema = _EMA(params, config.ema_decay) if config.ema_decay else None
    if proximal_mu < 0:
        raise ConfigError(f"proximal_mu must be >= 0, got {proximal_mu}")
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None

    def proximal(loss: torch.Tensor) -> torch.Tensor:
        if anchor is None:
            return loss
        return loss + 0.5 * proximal_mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))

    start = 0
    ckpt = Path(checkpoint_dir) / f"{stage}-latest" if checkpoint_dir else None
    if resume and ckpt is not None and (ckpt / "checkpoint.json").is_file():
        start = _load_checkpoint(ckpt, module=module, optimizer=optimizer, gen=gen, ema=ema)
        log.info("resumed stage %s at step %d from %s", stage, start, ckpt)

    losses: list[float] = []
    seen = 0
    extra: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = _progress(steps, start, stage, progress)
    try:
        if dp:
            if anchor is not None:
                raise ConfigError("FedProx's proximal term is not supported with DP-SGD at a site; use FedAvg")
            extra = _train_dp(
                objective, module, optimizer, params, gen, start=start, steps=steps, config=config,
                privacy=privacy, ledger_path=ledger_path, site_id=site_id, run_id=run_id, round=round,
                stage=stage, losses=losses, bar=bar, ema=ema,
                on_step=lambda s: _maybe_checkpoint(ckpt, s, steps, config, module, optimizer, gen, ema, stage),
            )
            seen = int(extra.pop("_seen", 0))
        else:
            n = len(objective.records[0])
            sampler = _ShuffledBatches(n, config.batch_size, seed)
            for step in range(start, steps):
                idx = sampler.batch(step)
                batch = tuple(r[idx] for r in objective.records)
                loss = objective.loss(module, batch, gen)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"stage {stage}: loss became {loss.item()} at step {step}")
                optimizer.zero_grad(set_to_none=True)
                proximal(loss).backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update()
                losses.append(float(loss.detach()))
                seen += len(idx)
                bar.update(1)
                if step % config.log_every == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                _maybe_checkpoint(ckpt, step + 1, steps, config, module, optimizer, gen, ema, stage)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if not dp and privacy is not None and ledger_path is not None and steps > start:
        _record_non_private(privacy, Path(ledger_path), site_id, stage, run_id, round, steps - start, len(dataset))
    if ema is not None:
        ema.copy_to()
    module.eval()
    tail = losses[-max(1, len(losses) // 5):] if losses else []
    metrics: dict[str, float] = {
        "loss": float(sum(tail) / len(tail)) if tail else float("nan"),
        "loss-first": losses[0] if losses else float("nan"),
        "num-examples": float(len(dataset)),
        "steps": float(steps - start),
        "seconds": seconds,
        "images-per-s": seen / seconds if seconds > 0 else 0.0,
        **extra,
    }
    if stage == "vae":
        metrics["latent-std"] = latent_std(c, dataset, device=device)
    return TrainResult(state=trainable_state(c, stage), metrics=metrics)


def _record_non_private(privacy, state_dir: Path, site_id, stage, run_id, round, steps, n_records) -> None:
    """A site whose ledger exists trained without DP: the ledger must say ε = ∞ from now on."""
    from medisyn.privacy.ledger import LEDGER_NAME

    if not (state_dir / LEDGER_NAME).is_file():
        return
    from medisyn.privacy.dp import open_site_ledger

    ledger = open_site_ledger(state_dir, site_id, privacy, n_records=n_records)
    ledger.record_non_private(stage, run_id, round, steps)
    log.warning("site %s trained %d steps without DP; its ledger now reports ε = inf", site_id, steps)


def _maybe_checkpoint(ckpt, step, steps, config, module, optimizer, gen, ema, stage) -> None:
    if ckpt is None or not config.checkpoint_every:
        return
    if step % config.checkpoint_every == 0 or step == steps:
        _save_checkpoint(ckpt, step=step, module=module, optimizer=optimizer, gen=gen, ema=ema,
                         meta={"stage": stage, "steps": steps, "config": config.model_dump(mode="json")})


def _progress(total: int, start: int, stage: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"train {stage}", unit="step", disable=not enabled, leave=False)


def _train_dp(objective, module, optimizer, params, gen, *, start, steps, config, privacy, ledger_path, site_id,
              run_id, round, stage, losses, bar, ema, on_step) -> dict[str, float]:
    """DP-SGD steps through the site's privacy session (Opacus + the on-disk ledger)."""
    from medisyn.privacy.dp import DPSession

    if ledger_path is None:
        raise ConfigError("DP training needs the site's state directory for its privacy ledger")
    records = TensorDataset(*objective.records)
    session = DPSession(
        module, optimizer, records, batch_size=config.batch_size, privacy=privacy, state_dir=Path(ledger_path),
        site_id=site_id, stage=stage, run_id=run_id, round=round, planned_steps=steps - start, seed=int(gen.initial_seed()),
    )
    seen = 0
    try:
        session.check_budget()
        batches = session.batches()
        for step in range(start, steps):
            batch = next(batches)
            if session.is_empty(batch):
                session.noise_only_step()
            else:
                loss = objective.loss(module, tuple(batch), gen)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"stage {stage}: loss became {loss.item()} at step {step}")
                loss.backward()
                session.step()
                losses.append(float(loss.detach()))
                seen += len(batch[0])
            if ema is not None:
                ema.update()
            bar.update(1)
            on_step(step + 1)
    finally:
        session.close()
    return {"epsilon": session.epsilon, "delta": session.delta, "noise-multiplier": session.noise_multiplier,
            "sample-rate": session.sample_rate, "_seen": float(seen)}


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def latent_std(c: Components, dataset: Dataset, *, device: torch.device | None = None, max_images: int = 512) -> float:
    """Std of the (unscaled) VAE latents of up to ``max_images`` records."""
    device = device or pick_device()
    images = _dataset_images(dataset, max_images)
    c.vae.to(device).eval()
    lat = torch.cat([c.vae.encode(ch.to(device)).latent_dist.mean.float().cpu() for ch in images.split(256)])
    return float(lat.std())


@torch.no_grad()
def evaluate_loss(components: Components, dataset: Dataset, *, stage: Stage, max_batches: int = 8,
                  batch_size: int = 32, seed: int = 0) -> float:
    """Held-out loss of ``stage`` with fixed noise and timesteps (comparable across rounds)."""
    device = pick_device()
    c = components
    module = trainable_module(c, stage).to(device)
    was_training = module.training
    module.eval()
    objective = make_objective(c, dataset, stage, TrainConfig(caption_dropout=0.0), device)
    gen = torch.Generator().manual_seed(seed)
    n = len(objective.records[0])
    total, count = 0.0, 0
    for b in range(min(max_batches, math.ceil(n / batch_size))):
        batch = tuple(r[b * batch_size:(b + 1) * batch_size] for r in objective.records)
        k = len(batch[0])
        total += float(objective.loss(module, batch, gen)) * k
        count += k
    module.train(was_training)
    return total / max(count, 1)
