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

import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
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


def _dataset_flips(dataset: Dataset) -> torch.Tensor:
    """Per record: may it be flipped horizontally ([dataset].hflip); False if unknown."""
    flips = getattr(dataset, "hflip", None)
    if flips is None:
        return torch.zeros(len(dataset), dtype=torch.bool)
    return torch.as_tensor(flips, dtype=torch.bool)


def _dataset_prompts(dataset: Dataset) -> list[str]:
    if hasattr(dataset, "prompts"):
        return list(dataset.prompts)
    return [dataset[i]["prompt"] for i in range(len(dataset))]


def _coin(b: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(b, generator=gen) < 0.5).to(device)


class VAEObjective:
    """Reconstruction MSE + a small KL term; records are (image, may-flip)."""

    def __init__(self, c: Components, dataset: Dataset, config: TrainConfig, device: torch.device):
        self.c, self.config, self.device = c, config, device
        self.records = (_dataset_images(dataset), _dataset_flips(dataset))

    def loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...], gen: torch.Generator) -> torch.Tensor:
        x, may_flip = batch[0].to(self.device), batch[1].to(self.device)
        flip = may_flip & _coin(len(x), gen, self.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        posterior = module.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen).to(self.device)
        z = posterior.mean + posterior.std * eps
        rec = module.decode(z).sample
        per_sample = (rec.float() - x).pow(2).flatten(1).mean(1)
        kl = posterior.kl().float() / x[0].numel()
        return (per_sample + self.config.kl_weight * kl).mean()


class UNetObjective:
    """Text-conditioned denoising on latents of the frozen VAE.

    Records: latent mean/std of each image and of its mirror image (both precomputed
    once with the frozen VAE), whether it may be flipped, and its prompt's index into
    a cached table of prompt embeddings. The loss is the scheduler's prediction target
    (epsilon or v) with min-SNR-gamma weighting when ``snr_gamma`` is set.
    """

    def __init__(self, c: Components, dataset: Dataset, config: TrainConfig, device: torch.device):
        self.c, self.config, self.device = c, config, device
        images = _dataset_images(dataset)
        flips = _dataset_flips(dataset)
        prompts = _dataset_prompts(dataset)
        self.vocab = sorted(set(prompts)) + [""]
        c.prompt_encoder.check_prompts(self.vocab[:-1])
        index = {p: i for i, p in enumerate(self.vocab)}
        self.uncond = len(self.vocab) - 1
        self.embeddings = c.prompt_encoder.encode(self.vocab, device=device)
        mean, std = self._encode(images)
        if bool(flips.any()):
            mean_f, std_f = self._encode(images.flip(-1))
        else:  # nothing may flip: the mirror slots are never read
            mean_f, std_f = mean, std
        self.records = (mean, std, mean_f, std_f, flips, torch.tensor([index[p] for p in prompts], dtype=torch.long))

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.c.vae.to(self.device).eval()
        means, stds = [], []
        for chunk in images.split(256):
            dist = vae.encode(chunk.to(self.device)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        return torch.cat(means), torch.cat(stds)

    @property
    def prompt_index(self) -> torch.Tensor:
        return self.records[-1]

    def noised(self, batch: tuple[torch.Tensor, ...], gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, noise, timesteps, noisy latents) of a batch: a mirrored view where
        allowed, a latent drawn from each record's posterior, noise at random timesteps."""
        mean, std, mean_f, std_f, may_flip = (t.to(self.device) for t in batch[:5])
        b = mean.shape[0]
        flip = (may_flip & _coin(b, gen, self.device))[:, None, None, None]
        mean, std = torch.where(flip, mean_f, mean), torch.where(flip, std_f, std)
        latents = (mean + std * torch.randn(mean.shape, generator=gen).to(self.device)) * self.c.scaling_factor
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        sched = self.c.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen).to(self.device)
        return latents, noise, t, sched.add_noise(latents, noise, t)

    def loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...], gen: torch.Generator) -> torch.Tensor:
        pidx = batch[5].to(self.device)
        latents, noise, t, noisy = self.noised(batch, gen)
        b = latents.shape[0]
        drop = torch.rand(b, generator=gen).to(self.device) < self.config.caption_dropout
        pidx = torch.where(drop, torch.full_like(pidx, self.uncond), pidx)
        emb = self.embeddings[pidx]
        sched = self.c.noise_scheduler
        with _autocast(self.device, self.config.mixed_precision):
            pred = module(noisy, t, encoder_hidden_states=emb).sample
        v_pred = sched.config.prediction_type == "v_prediction"
        target = sched.get_velocity(latents, noise, t) if v_pred else noise
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        gamma = self.config.snr_gamma
        if gamma is not None:
            snr = _snr(sched, t)
            clipped = torch.clamp(snr, max=gamma)
            # min-SNR-gamma (Hang et al. 2023): expressed for the v or epsilon target
            weight = clipped / (snr + 1) if v_pred else clipped / snr.clamp(min=1e-8)
            per_sample = per_sample * weight
        return per_sample.mean()


def _snr(sched, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps ``t``."""
    from diffusers.training_utils import compute_snr

    return compute_snr(sched, t.cpu()).to(t.device).float()


def make_objective(c: Components, dataset: Dataset, stage: Stage, config: TrainConfig, device: torch.device):
    if stage == "vae":
        return VAEObjective(c, dataset, config, device)
    if stage == "unet":
        return UNetObjective(c, dataset, config, device)
    raise ConfigError(f"unknown stage {stage!r}; use 'vae' or 'unet'")


# --------------------------------------------------------------------------- batch sources


class ShuffledBatches:
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


class BalancedBatches:
    """Batches drawn with P(prompt) proportional to count**power, then a record of that
    prompt uniformly: ``power = 0`` draws every prompt (label) equally often, ``1`` is the
    natural frequency. With replacement, a pure function of (seed, step): resume-safe."""

    def __init__(self, prompt_index: torch.Tensor, batch_size: int, seed: int, power: float):
        counts = torch.bincount(prompt_index).double()
        per_prompt = counts.clamp(min=1).pow(power)
        per_prompt = torch.where(counts > 0, per_prompt, torch.zeros_like(per_prompt))
        p_prompt = per_prompt / per_prompt.sum()
        self.weights = (p_prompt / counts.clamp(min=1))[prompt_index]
        self.batch_size, self.seed = min(batch_size, len(prompt_index)), seed

    def batch(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 104729 * step)
        return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)


def batch_source(objective, config: TrainConfig, seed: int):
    """The non-DP batch source: label-balanced for the UNet (``balance_power`` < 1), else
    shuffled epochs."""
    n = len(objective.records[0])
    if isinstance(objective, UNetObjective) and config.balance_power < 1:
        return BalancedBatches(objective.prompt_index, config.batch_size, seed, config.balance_power)
    return ShuffledBatches(n, config.batch_size, seed)


def _lr_lambda(config: TrainConfig, steps: int, offset: int = 0):
    """The learning-rate factor at each step: linear warmup, then constant or cosine to
    0.1 at ``steps``. ``offset``: steps already taken in the schedule (a federated round
    continues the run's schedule where the last round left it; ``steps`` is then the
    run's total)."""
    warm = config.lr_warmup_steps

    def f(local: int) -> float:
        step = offset + local
        if warm and step < warm:
            return (step + 1) / warm
        if config.lr_schedule == "cosine" and steps > warm:
            progress = min(1.0, (step - warm) / max(1, steps - warm))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return f


# --------------------------------------------------------------------------- hooks


class EMAHook:
    """diffusers' ``EMAModel`` with warm-up (decay 1 - (1+step)^-2/3, capped at
    ``ema_decay``): a 150-step federated round averages over its own last ~30 steps, a
    long central run over the last ~1/(1-decay)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.ema = EMAModel(params, decay=decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)

    def after_step(self, step: int) -> None:
        self.ema.step(self.params)

    def finish(self) -> None:
        self.ema.copy_to(self.params)

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"ema.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.ema.shadow_params)}
        out["ema.step"] = torch.tensor(self.ema.optimization_step)
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, s in enumerate(self.ema.shadow_params):
            s.copy_(tensors[f"ema.{i}"])
        self.ema.optimization_step = int(tensors["ema.step"]) if "ema.step" in tensors else 0


EMA_PREFIX = "ema."  # the run's EMA beside a stage's weights: "ema.<weight name>"


class RunEMAHook:
    """The run's EMA, carried from round to round (``[train] ema_scope = "run"``): it
    starts from the EMA the coordinator sent (``shadow``, keyed as :func:`trainable_state`)
    at the run's step ``step`` and steps through this round's steps with diffusers'
    ``EMAModel`` warm-up (decay ``1 - (1 + k)^-2/3``, capped at ``decay``), so a chain of
    rounds yields the EMA one process would have kept over all of them. Every weight of the
    stage takes part (also ones frozen at this site: their EMA moves toward their value).
    The model keeps its own weights; the EMA is returned beside them (:meth:`weights`)."""

    def __init__(self, live: Mapping[str, torch.Tensor], shadow: Mapping[str, torch.Tensor], step: int,
                 decay: float):
        missing, extra = sorted(set(live) - set(shadow)), sorted(set(shadow) - set(live))
        if missing or extra:
            raise ValueError(f"the run's EMA does not match the stage's weights: {len(missing)} missing "
                             f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})")
        if step < 0:
            raise ValueError(f"the run's EMA step must be >= 0, got {step}")
        self.live, self.decay, self.step = dict(live), decay, int(step)
        self.shadow = {}
        for k, v in live.items():
            if tuple(shadow[k].shape) != tuple(v.shape):
                raise ValueError(f"the run's EMA of {k!r} has shape {tuple(shadow[k].shape)}; the weight is "
                                 f"{tuple(v.shape)}")
            self.shadow[k] = shadow[k].detach().to(device=v.device, dtype=v.dtype).clone()
        # the float weights are lerped in one fused call per step; the rest are copied
        floats = [k for k, s in self.shadow.items() if s.is_floating_point()]
        self._float_pairs = ([self.shadow[k] for k in floats], [self.live[k].detach() for k in floats])
        self._other_keys = [k for k, s in self.shadow.items() if not s.is_floating_point()]

    def current_decay(self) -> float:
        """diffusers' ``EMAModel.get_decay`` at this step (``update_after_step`` 0)."""
        k = self.step - 1
        return 0.0 if k <= 0 else min(self.decay, 1 - (1 + k) ** (-2 / 3))

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.step += 1
        weight = 1.0 - self.current_decay()
        if self._float_pairs[0]:
            torch._foreach_lerp_(*self._float_pairs, weight)
        for k in self._other_keys:
            self.shadow[k].copy_(self.live[k])

    def finish(self) -> None:
        """Nothing: the model keeps its own weights, the EMA travels beside them."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The EMA keyed ``ema.<name>``, as detached CPU tensors (it leaves with the reply)."""
        return {EMA_PREFIX + k: s.detach().cpu().clone() for k, s in self.shadow.items()}

    def state(self) -> dict[str, torch.Tensor]:  # a local checkpoint's copy (resume)
        out = {f"ema.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadow.values())}
        out["ema.step"] = torch.tensor(self.step)
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, s in enumerate(self.shadow.values()):
            s.copy_(tensors[f"ema.{i}"])
        self.step = int(tensors["ema.step"])


def _ema_hook(c: Components, stage: Stage, params: list[torch.nn.Parameter], config: TrainConfig,
              run_ema: tuple[Mapping[str, torch.Tensor], int] | None) -> EMAHook | RunEMAHook | None:
    """The round's EMA: the run's, carried on (``run_ema`` given), else one of this round's
    steps only; none with ``ema_decay`` off."""
    if not config.ema_decay:
        return None
    if run_ema is not None:
        from medisyn.models import live_trainable_state

        return RunEMAHook(live_trainable_state(c, stage), run_ema[0], run_ema[1], config.ema_decay)
    return EMAHook(params, config.ema_decay)


def split_run_ema(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(weights, run EMA)`` of a stage state that may carry the run's EMA (``ema.<name>``
    keys, prefix removed); the EMA is empty when the state carries none."""
    weights = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    return weights, ema


class ProximalHook:
    """FedProx's proximal term ``mu/2 * ||w - w_start||^2`` (w_start: the round's global model)."""

    def __init__(self, params: list[torch.nn.Parameter], mu: float):
        self.params, self.mu = params, mu
        self.anchor = [p.detach().clone() for p in params]

    def on_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss + 0.5 * self.mu * sum((p - a).pow(2).sum() for p, a in zip(self.params, self.anchor, strict=True))


class PromptAnchorHook:
    """Prompt anchoring for federated UNet rounds: ``weight * ||f(x_t, t, c_j) - f0(x_t, t, c_j)||^2``.

    ``f0`` is the round's global model (frozen at the start of local training), ``c_j``
    a prompt of *another* site (drawn uniformly from the ones the coordinator sent, minus
    this site's own), ``x_t`` noised latents: this site's own (the first ``fraction`` of
    the batch), or under DP public ones (:meth:`public_grads`). A site whose prompt is
    constant locally otherwise moves the shared weights so that every prompt yields its
    image type, and the average of such updates loses the routing from prompt to type;
    anchoring keeps the other prompts' outputs where the global model had them, so the
    local update goes through the prompt's own pathway. This is FedNTD's not-true
    distillation (Lee et al., NeurIPS 2022) carried over from class logits to denoiser
    predictions. Measured in docs/quality.md.
    """

    def __init__(self, objective: UNetObjective, module: torch.nn.Module, prompts: list[str],
                 weight: float, fraction: float):
        import copy

        self.objective, self.weight, self.fraction = objective, weight, fraction
        own = set(objective.vocab)
        self.prompts = sorted({p for p in prompts if p and p not in own})
        self.teacher = copy.deepcopy(module).eval().requires_grad_(False) if self.prompts else None
        self.embeddings = (objective.c.prompt_encoder.encode(self.prompts, device=objective.device)
                           if self.prompts else None)
        self._public: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def for_round(cls, objective: Any, module: torch.nn.Module, prompts: Sequence[str],
                  config: TrainConfig) -> PromptAnchorHook | None:
        """The hook for a UNet round given the coordinator's prompts; None when there is
        nothing to anchor (another stage, weight 0, no prompts of other sites)."""
        if not isinstance(objective, UNetObjective) or config.anchor_weight <= 0 or not prompts:
            return None
        hook = cls(objective, module, list(prompts), config.anchor_weight, config.anchor_fraction)
        return hook if hook.prompts else None

    def _term(self, student, batch: tuple[torch.Tensor, ...], gen: torch.Generator) -> torch.Tensor:
        _, _, t, noisy = self.objective.noised(batch, gen)
        j = torch.randint(0, len(self.prompts), (len(t),), generator=gen).to(noisy.device)
        emb = self.embeddings[j]
        with torch.no_grad(), _autocast(self.objective.device, self.objective.config.mixed_precision):
            target = self.teacher(noisy, t, encoder_hidden_states=emb).sample
        with _autocast(self.objective.device, self.objective.config.mixed_precision):
            pred = student(noisy, t, encoder_hidden_states=emb).sample
        return self.weight * (pred.float() - target.float()).pow(2).mean()

    def on_loss(self, loss: torch.Tensor, module: torch.nn.Module, batch: tuple[torch.Tensor, ...],
                gen: torch.Generator) -> torch.Tensor:
        """Non-DP: the loss plus the anchor term on this site's own noised latents."""
        b = max(1, int(len(batch[0]) * self.fraction))
        return loss + self._term(module, tuple(r[:b] for r in batch), gen)

    def public_grads(self, params: list[torch.nn.Parameter], names: list[str], batch_size: int,
                     gen: torch.Generator, max_norm: float | None) -> list[torch.Tensor]:
        """DP: the anchor term's gradient on *public* inputs (latents of procedural images,
        ``medisyn.models.procedural``; no record of the site in it), clipped to
        ``max_norm``. Added after DP-SGD's noise it is post-processing: it costs no ε. The
        student runs through the teacher's module structure with the live parameters
        (``torch.func.functional_call``), so Opacus' per-sample hooks never see it."""
        from torch.func import functional_call

        if self._public is None:
            self._public = self._public_records(256)
        b = max(1, int(batch_size * self.fraction))
        idx = torch.randint(0, len(self._public[0]), (b,), generator=gen)
        batch = tuple(r[idx] for r in self._public)
        live = dict(zip(names, params, strict=True))

        def student(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.teacher, live, args, kwargs, strict=False)

        grads = torch.autograd.grad(self._term(student, batch, gen), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        if max_norm:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = min(1.0, max_norm / (float(norm) + 1e-12))
            grads = [g * scale for g in grads]
        return grads

    def add_public_grads(self, module: torch.nn.Module, config: TrainConfig, gen: torch.Generator) -> None:
        """DP: add :meth:`public_grads` to the trainable parameters' (already noised) grads."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        grads = self.public_grads(params, [n for n, _ in named], config.batch_size, gen, config.grad_clip)
        for p, g in zip(params, grads, strict=True):
            p.grad = g if p.grad is None else p.grad + g

    @torch.no_grad()
    def _public_records(self, n: int) -> tuple[torch.Tensor, ...]:
        from medisyn.models.procedural import procedural_images

        vae = self.objective.c.vae
        images = procedural_images(n, int(vae.config.sample_size), torch.Generator().manual_seed(20221))
        if int(vae.config.in_channels) == 1:
            images = images.mean(1, keepdim=True)
        mean, std = self.objective._encode(images)
        no = torch.zeros(n, dtype=torch.bool)
        return mean, std, mean, std, no, torch.zeros(n, dtype=torch.long)


class CheckpointHook:
    def __init__(self, directory: Path | None, every: int, steps: int, save: Any):
        self.directory, self.every, self.steps, self.save = directory, every, steps, save

    def after_step(self, step: int) -> None:
        if self.directory is None or not self.every:
            return
        if step % self.every == 0 or step == self.steps:
            self.save(self.directory, step)


def _seed_for(config: TrainConfig, round: int, site_id: str) -> int:
    import zlib

    return (config.seed * 1_000_003 + round * 7919 + zlib.crc32(site_id.encode())) % (2**63)


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(directory: Path, *, step: int, module: torch.nn.Module, optimizer, gen: torch.Generator,
                     ema: EMAHook | RunEMAHook | None, meta: dict[str, Any]) -> None:
    """Atomic checkpoint: weights + optimizer tensors as safetensors, the rest as JSON."""
    from safetensors.torch import save_file

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, tmp / "weights.safetensors")
        opt = optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {"rng": gen.get_state(), **_optimizer_tensors(opt)}
        if ema is not None:
            tensors.update(ema.state())
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
                     ema: EMAHook | RunEMAHook | None) -> int:
    from safetensors.torch import load_file

    info = json.loads((directory / "checkpoint.json").read_text())
    module.load_state_dict(load_file(directory / "weights.safetensors"), strict=True)
    tensors = load_file(directory / "state.safetensors")
    gen.set_state(tensors["rng"])
    optimizer.load_state_dict({"state": _optimizer_state(tensors), "param_groups": info["param_groups"]})
    if ema is not None:
        ema.load(tensors)
    return int(info["step"])


def _optimizer_tensors(opt_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as flat safetensors entries ``opt.<i>.<name>``."""
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in opt_state["state"].items():
        for name, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"opt.{pid}.{name}"] = t.detach().cpu().contiguous()
    return tensors


def _optimizer_state(tensors: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """The inverse of :func:`_optimizer_tensors` (other entries are ignored)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = val
    return state


class LocalOptimizerState:
    """A site's AdamW moments kept between the rounds of one federated run
    (``[train] keep_optimizer_state``), in its state directory: never sent anywhere.

    A fresh AdamW every round takes its first steps at full size in the sign of a few
    noisy gradients, and its moments forget what the site's data looked like; kept, the
    inner optimizer of each round continues where the last one stopped (the inner-state
    choice of DiLoCo, Douillard et al. 2023). Kept per stage and run: a new run, another
    model shape or an unreadable file starts from fresh moments (logged), never fails.
    Under DP the moments are functions of the noised gradients only (post-processing)."""

    def __init__(self, state_dir: Path, stage: str, run_id: str):
        self.path = Path(state_dir) / "optimizer" / f"{stage}.safetensors"
        self.run_id = run_id

    def load(self, optimizer: torch.optim.Optimizer) -> int:
        """Restore the moments into ``optimizer``; returns the rounds they carry (0: fresh)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not self.path.is_file():
            return 0
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("run_id") != self.run_id:
                log.info("optimizer state at %s is from another run; starting fresh", self.path)
                return 0
            state = _optimizer_state(load_file(self.path))
            params = [p for g in optimizer.param_groups for p in g["params"]]
            if sorted(state) != list(range(len(params))) or any(
                    st.get("exp_avg") is None or st["exp_avg"].shape != params[i].shape for i, st in state.items()):
                log.warning("optimizer state at %s does not fit this model; starting fresh", self.path)
                return 0
            sd = optimizer.state_dict()
            optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
            return int(meta.get("rounds", "1"))
        except Exception as e:  # a damaged file costs the moments, never the round
            log.warning("optimizer state at %s is unreadable (%s); starting fresh", self.path, e)
            return 0

    def save(self, optimizer: torch.optim.Optimizer, rounds: int) -> None:
        from safetensors.torch import save

        from medisyn.fileio import atomic_write_bytes

        atomic_write_bytes(self.path, save(_optimizer_tensors(optimizer.state_dict()),
                                           metadata={"run_id": self.run_id, "rounds": str(rounds)}))


# --------------------------------------------------------------------------- steppers


def _finite(loss: torch.Tensor, stage: str, step: int) -> torch.Tensor:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"stage {stage}: loss became {loss.item()} at step {step}")
    return loss


class PlainStepper:
    """Non-DP steps: a batch from the (balanced or shuffled) source, the loss (plus
    FedProx's proximal term and prompt anchoring, when on), backward, clip, step."""

    def __init__(self, objective, optimizer, params, config: TrainConfig, seed: int, *,
                 proximal: ProximalHook | None = None, anchor: PromptAnchorHook | None = None):
        self.objective, self.optimizer, self.params, self.config = objective, optimizer, params, config
        self.source = batch_source(objective, config, seed)
        self.proximal, self.anchor = proximal, anchor
        self.extra: dict[str, float] = {}

    def train_step(self, module: torch.nn.Module, step: int, gen: torch.Generator, stage: str
                   ) -> tuple[float | None, int]:
        """One optimizer step; returns (the batch's loss, its size)."""
        batch = self.next_batch(step)
        loss = _finite(self.objective.loss(module, batch, gen), stage, step)
        total = self.proximal.on_loss(loss) if self.proximal is not None else loss
        self.apply(self.anchor.on_loss(total, module, batch, gen) if self.anchor is not None else total)
        return float(loss.detach()), len(batch[0])

    def next_batch(self, step: int):
        idx = self.source.batch(step)
        return tuple(r[idx] for r in self.objective.records)

    def apply(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()

    def close(self) -> None:
        pass


class DPStepper:
    """DP-SGD steps through the site's privacy session (Opacus Poisson batches, per-sample
    clipping, noise, the on-disk ledger)."""

    def __init__(self, objective, module, optimizer, *, gen, start, steps, config, privacy, ledger_path, site_id,
                 run_id, round, stage):
        from medisyn.privacy.dp import DPSession

        if ledger_path is None:
            raise ConfigError("DP training needs the site's state directory for its privacy ledger")
        self.objective = objective
        self.physical = privacy.max_physical_batch
        self.copies = privacy.noise_multiplicity
        self.session = DPSession(
            module, optimizer, TensorDataset(*objective.records), batch_size=config.batch_size, privacy=privacy,
            state_dir=Path(ledger_path), site_id=site_id, stage=stage, run_id=run_id, round=round,
            planned_steps=steps - start, seed=int(gen.initial_seed()),
        )
        try:
            self.session.check_budget()
            self._batches = self.session.batches()
        except BaseException:
            self.session.close()
            raise

    def next_batch(self, step: int):
        batch = next(self._batches)
        return None if self.session.is_empty(batch) else tuple(batch)

    def train_step(self, module: torch.nn.Module, step: int, gen: torch.Generator, stage: str
                   ) -> tuple[float | None, int]:
        """One DP-SGD step; returns (the batch's mean loss, its size), or (None, 0) for an
        empty Poisson batch (a noise-only step: the accountant counts it all the same)."""
        batch = self.next_batch(step)
        if batch is None:
            self.session.noise_only_step()
            return None, 0
        return self.train_batch(module, batch, gen, step, stage), len(batch[0])

    def train_batch(self, module: torch.nn.Module, batch: tuple, gen: torch.Generator, step: int,
                    stage: str) -> float:
        """One DP-SGD step on a Poisson batch, in parts of at most ``max_physical_batch``
        records (each part's per-record gradients clipped and summed; noise once, after the
        last part). With ``noise_multiplicity`` k each record of a part is seen k times
        (independent t and noise) and its k gradients averaged before clipping. Returns the
        batch's mean loss."""
        n = len(batch[0])
        size = self.physical or n
        total = 0.0
        for i in range(0, n, size):
            part = tuple(t[i:i + size] for t in batch)
            if self.copies > 1:
                part = tuple(t.repeat_interleave(self.copies, dim=0) for t in part)
            loss = _finite(self.objective.loss(module, part, gen), stage, step)
            loss.backward()
            self.session.average_copies(self.copies)
            if i + size < n:
                self.session.accumulate()
            else:
                self.session.step()
            total += float(loss.detach()) * len(part[0]) / self.copies
        return total / n

    def close(self) -> None:
        self.session.close()

    @property
    def extra(self) -> dict[str, float]:
        s = self.session
        return {"epsilon": s.epsilon, "delta": s.delta, "noise-multiplier": s.noise_multiplier,
                "sample-rate": s.sample_rate}


# --------------------------------------------------------------------------- training


def _check_train_args(steps: int, dataset: Dataset, config: TrainConfig, privacy: PrivacyConfig | None,
                      proximal_mu: float) -> bool:
    """Named errors for a request ``train_local`` cannot honour; returns whether DP is on."""
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    if len(dataset) == 0:
        raise ConfigError("the training dataset is empty")
    if proximal_mu < 0:
        raise ConfigError(f"proximal_mu must be >= 0, got {proximal_mu}")
    dp = privacy is not None and privacy.dp
    if privacy is not None and privacy.require_dp and not dp:
        raise ConfigError("site policy requires DP (privacy.require_dp) but DP is off")
    if dp and proximal_mu > 0:
        raise ConfigError("FedProx's proximal term is not supported with DP-SGD at a site; use FedAvg")
    if dp and config.gradient_checkpointing:
        raise ConfigError(
            "DP-SGD cannot be combined with gradient checkpointing: Opacus then gets no "
            "per-sample gradients for checkpointed blocks. Set train.gradient_checkpointing = false."
        )
    return dp


DP_SUBSETS = {"attention": (".attentions.",), "cross-attention": (".attn2.", ".norm2.")}


def _freeze_outside_dp_subset(module: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """``[privacy] trainable``: freeze the UNet's weights outside the named subset for this
    round; returns the parameters frozen here (train_local unfreezes them after).
    "cross-attention": each transformer block's ``attn2`` (its queries from the image, keys
    and values from the prompt) and the norm before it."""
    if which == "all":
        return []
    marks = DP_SUBSETS[which]
    frozen = [p for n, p in module.named_parameters()
              if p.requires_grad and not (".attentions." in f".{n}" and any(m in f".{n}" for m in marks))]
    if len(frozen) == sum(1 for p in module.parameters() if p.requires_grad):
        raise ConfigError(f"[privacy] trainable = {which!r}: this model has no such weights (no cross-attention?)")
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _make_stepper(objective: Any, module: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list,
                  *, gen: torch.Generator, seed: int, start: int, steps: int, config: TrainConfig,
                  privacy: PrivacyConfig | None, anchor: PromptAnchorHook | None, proximal: ProximalHook | None,
                  ledger_path: Path | None, site_id: str, run_id: str, round: int, stage: Stage
                  ) -> PlainStepper | DPStepper:
    """The batch source and update rule: DP-SGD's Poisson batches through the site's ledger
    (``privacy`` given; an anchor adds its public gradient after the noise, so no ε), or
    label-balanced shuffled batches."""
    if privacy is not None:
        stepper = DPStepper(objective, module, optimizer, gen=gen, start=start, steps=steps, config=config,
                            privacy=privacy, ledger_path=ledger_path, site_id=site_id, run_id=run_id, round=round,
                            stage=stage)
        if anchor is not None:
            stepper.session.after_noise = functools.partial(anchor.add_public_grads, module, config, gen)
        return stepper
    return PlainStepper(objective, optimizer, params, config, seed, proximal=proximal, anchor=anchor)


def _lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int, start: int,
                  schedule: tuple[int, int] | None):
    """Warmup and the learning-rate schedule, at step ``start`` (a resumed run: the schedule
    is a pure function of the step); ``schedule`` = (offset, total) places these steps in a
    longer run's schedule (a federated round)."""
    offset, total = schedule if schedule is not None else (0, steps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total, offset), last_epoch=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(start):
            lr_sched.step()
    return lr_sched


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
    anchor_prompts: Sequence[str] = (),
    schedule: tuple[int, int] | None = None,
    optimizer_state: LocalOptimizerState | None = None,
    run_ema: tuple[Mapping[str, torch.Tensor], int] | None = None,
) -> TrainResult:
    """Train ``stage`` for ``steps`` optimizer steps on ``dataset``; see module docstring.

    The loop is built from named parts: an objective (the stage's loss), a stepper (plain
    label-balanced batches, or DP-SGD's Poisson batches through the site's ledger) and
    hooks (EMA, FedProx's proximal term, prompt anchoring, periodic checkpoints).

    ``anchor_prompts``: in a federated UNet round, the prompts of all sites (as the
    coordinator sent them); with ``config.anchor_weight > 0`` the other sites' prompts
    are anchored to the starting model (:class:`PromptAnchorHook`; under DP on public
    procedural inputs, added after the noise).

    ``schedule`` = (offset, total): these steps are steps offset+1 .. of a federated run
    of ``total`` steps, and warmup and cosine follow the run, not the round.
    ``optimizer_state``: the site's AdamW moments from its last round of this run are
    restored first and kept after (:class:`LocalOptimizerState`).
    ``run_ema`` = (EMA, the run's step count): the run's EMA as the coordinator sent it
    (``[train] ema_scope = "run"``); it steps through these steps (:class:`RunEMAHook`)
    and the returned state holds the trained weights plus the EMA under ``ema.<name>``.
    Without it, the EMA (``ema_decay``) covers these steps only and its weights are
    returned.

    With ``privacy.dp`` the steps are DP-SGD steps and the site's ledger at
    ``ledger_path`` (a state directory) is restored first, checked against
    ``max_epsilon`` (``PrivacyBudgetError`` before any step) and updated as steps are
    taken. Without DP, a site whose ledger exists records the steps as non-private
    (ε = ∞ from then on).
    """
    dp = _check_train_args(steps, dataset, config, privacy, proximal_mu)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = pick_device()
    c = components
    seed = _seed_for(config, round, site_id)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    module = trainable_module(c, stage)
    frozen = _freeze_outside_dp_subset(module, privacy.trainable if dp and stage == "unet" else "all")
    try:
        c.text_encoder.to(device)
        c.vae.to(device)
        module.to(device)
        objective = make_objective(c, dataset, stage, config, device)
        if config.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"stage {stage!r} has no trainable parameters")
        lr = config.vae_lr if stage == "vae" else config.lr
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
        ema = _ema_hook(c, stage, params, config, run_ema)
        proximal = ProximalHook(params, proximal_mu) if proximal_mu > 0 else None
        anchor = PromptAnchorHook.for_round(objective, module, anchor_prompts, config)

        start, carried, hooks = _restore_and_hooks(module, optimizer, gen, ema, config=config, stage=stage, steps=steps,
                                                   checkpoint_dir=checkpoint_dir, resume=resume,
                                                   optimizer_state=optimizer_state)

        stepper = _make_stepper(objective, module, optimizer, params, gen=gen, seed=seed, start=start, steps=steps,
                                config=config, privacy=privacy if dp else None, anchor=anchor, proximal=proximal,
                                ledger_path=ledger_path, site_id=site_id, run_id=run_id, round=round, stage=stage)
        lr_sched = _lr_scheduler(optimizer, config, steps, start, schedule)

        losses, seen, seconds = _run_steps(stepper, module, gen, lr_sched, hooks, stage=stage, start=start,
                                           steps=steps, progress=progress, log_every=config.log_every)
        if not dp and privacy is not None and ledger_path is not None and steps > start:
            _record_non_private(privacy, Path(ledger_path), site_id, stage, run_id, round, steps - start, len(dataset))
        if optimizer_state is not None:
            optimizer_state.save(optimizer, carried + 1)
        if ema is not None:
            ema.finish()
        module.eval()
        metrics = _train_metrics(losses, n_records=len(dataset), steps=steps - start, seconds=seconds, seen=seen,
                                 anchor=anchor, extra=stepper.extra)
        if stage == "vae":
            metrics["latent-std"] = latent_std(c, dataset, device=device)
        state = trainable_state(c, stage)
        if isinstance(ema, RunEMAHook):
            state.update(ema.weights())
        return TrainResult(state=state, metrics=metrics)
    finally:
        for p in frozen:  # the components are the caller's: give them back as they came
            p.requires_grad_(True)


def _restore_and_hooks(module: torch.nn.Module, optimizer: torch.optim.Optimizer, gen: torch.Generator,
                       ema: EMAHook | RunEMAHook | None, *, config: TrainConfig, stage: Stage, steps: int,
                       checkpoint_dir: Path | None, resume: bool, optimizer_state: LocalOptimizerState | None
                       ) -> tuple[int, int, list[Any]]:
    """Where the round starts: a local checkpoint to resume (``resume``), else the site's
    kept AdamW moments. Returns (first step, rounds the moments carry, the per-step hooks:
    EMA and periodic checkpoints)."""
    start = carried = 0
    ckpt = Path(checkpoint_dir) / f"{stage}-latest" if checkpoint_dir else None
    if resume and ckpt is not None and (ckpt / "checkpoint.json").is_file():
        start = _load_checkpoint(ckpt, module=module, optimizer=optimizer, gen=gen, ema=ema)
        log.info("resumed stage %s at step %d from %s", stage, start, ckpt)
    elif optimizer_state is not None:
        carried = optimizer_state.load(optimizer)
    meta = {"stage": stage, "steps": steps, "config": config.model_dump(mode="json")}
    hooks: list[Any] = [h for h in (ema, CheckpointHook(
        ckpt, config.checkpoint_every, steps,
        lambda d, s: _save_checkpoint(d, step=s, module=module, optimizer=optimizer, gen=gen, ema=ema, meta=meta),
    )) if h is not None]
    return start, carried, hooks


def _run_steps(stepper: PlainStepper | DPStepper, module: torch.nn.Module, gen: torch.Generator, lr_sched: Any,
               hooks: Sequence[Any], *, stage: Stage, start: int, steps: int, progress: bool, log_every: int
               ) -> tuple[list[float], int, float]:
    """The loop: steps ``start`` .. ``steps`` - 1, each a stepper step, the learning-rate
    schedule and the hooks; closes the stepper. Returns (losses, records seen, seconds)."""
    losses: list[float] = []
    seen = 0
    t0 = time.perf_counter()
    bar = _progress(steps, start, stage, progress)
    try:
        for step in range(start, steps):
            loss, n = stepper.train_step(module, step, gen, stage)
            if loss is not None:
                losses.append(loss)
                seen += n
            lr_sched.step()
            for h in hooks:
                h.after_step(step + 1)
            bar.update(1)
            if losses and step % log_every == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        stepper.close()
    return losses, seen, time.perf_counter() - t0


def _train_metrics(losses: list[float], *, n_records: int, steps: int, seconds: float, seen: int,
                   anchor: PromptAnchorHook | None, extra: Mapping[str, float]) -> dict[str, float]:
    """What a round reports: the mean loss of the last fifth of the steps, the first loss,
    the records held (FedAvg's num-examples), speed, and the stepper's extras (DP: ε)."""
    tail = losses[-max(1, len(losses) // 5):] if losses else []
    return {
        "loss": float(sum(tail) / len(tail)) if tail else float("nan"),
        "loss-first": losses[0] if losses else float("nan"),
        "num-examples": float(n_records),
        "steps": float(steps),
        "seconds": seconds,
        "images-per-s": seen / seconds if seconds > 0 else 0.0,
        "anchor-prompts": float(len(anchor.prompts)) if anchor is not None else 0.0,
        **extra,
    }


def _record_non_private(privacy, state_dir: Path, site_id, stage, run_id, round, steps, n_records) -> None:
    """A site whose ledger exists trained without DP: the ledger must say ε = ∞ from now on."""
    from medisyn.privacy.ledger import LEDGER_NAME

    if not (state_dir / LEDGER_NAME).is_file():
        return
    from medisyn.privacy.dp import open_site_ledger

    ledger = open_site_ledger(state_dir, site_id, privacy, n_records=n_records)
    ledger.record_non_private(stage, run_id, round, steps)
    log.warning("site %s trained %d steps without DP; its ledger now reports ε = inf", site_id, steps)


def _progress(total: int, start: int, stage: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"train {stage}", unit="step", disable=not enabled, leave=False)


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
