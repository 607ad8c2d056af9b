"""Membership-inference probe: a loss-threshold attack on the diffusion loss.

Members are training images, non-members held-out images. A model that memorises its
training data gives members a lower denoising loss; the attack scores ``-loss`` and its
ROC AUC (0.5 = no leak) is reported with a DeLong interval and a bootstrap interval, plus
the TPR at 1 % FPR. It works with any model through ``per_sample_loss(images) -> losses``;
:func:`components_loss_fn` is the adapter for ``medisyn.models.Components`` (the
noise-prediction MSE at fixed timesteps and fixed noise seeds, so every image is scored
under the same randomness).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from medisyn.audit import augment, stats

log = logging.getLogger(__name__)

LossFn = Callable[..., np.ndarray]


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """TPR of the rule ``score > t`` with t the (1 - fpr) quantile of the negatives."""
    t = float(np.quantile(np.asarray(neg, np.float64), 1 - fpr, method="higher"))
    return float(np.mean(np.asarray(pos) > t))


def membership_probe(per_sample_loss: LossFn, members: Sequence[np.ndarray],
                     non_members: Sequence[np.ndarray], *,
                     member_prompts: Sequence[str] | None = None,
                     non_member_prompts: Sequence[str] | None = None,
                     n_max: int = 500, seed: int = 0, n_boot: int = 500,
                     batch_size: int = 64) -> dict[str, Any]:
    """Run the loss-threshold attack on (at most ``n_max`` of) each group, balanced."""
    rng = np.random.default_rng(seed)
    n = min(n_max, len(members), len(non_members))
    if n < 2:
        raise ValueError("membership probe needs at least 2 members and 2 non-members")
    mi = rng.choice(len(members), n, replace=False)
    ni = rng.choice(len(non_members), n, replace=False)

    def losses(imgs: Sequence[np.ndarray], prompts: Sequence[str] | None, idx: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(idx), batch_size):
            b = idx[s:s + batch_size]
            batch = [imgs[i] for i in b]
            if prompts is None:
                out.append(np.asarray(per_sample_loss(batch), np.float64))
            else:
                out.append(np.asarray(per_sample_loss(batch, [prompts[i] for i in b]), np.float64))
        return np.concatenate(out)

    lm = losses(members, member_prompts, mi)
    ln = losses(non_members, non_member_prompts, ni)
    if lm.shape != (n,) or ln.shape != (n,):
        raise ValueError("per_sample_loss must return one loss per image")
    a, lo, hi = stats.delong_ci(-lm, -ln)
    blo, bhi = stats.bootstrap_auc_ci(-lm, -ln, n_boot=n_boot, seed=seed)
    return {
        "attack": "loss-threshold (score = -per-sample denoising loss)",
        "auc": a,
        "auc_ci_delong": [lo, hi],
        "auc_ci_bootstrap": [blo, bhi],
        "tpr_at_1pct_fpr": tpr_at_fpr(-lm, -ln, 0.01),
        "n_members": int(n),
        "n_non_members": int(n),
        "mean_loss_members": float(lm.mean()),
        "mean_loss_non_members": float(ln.mean()),
        "significant_leak": bool(lo > 0.5),
    }


def components_loss_fn(components: Any, *, timesteps: Sequence[int] = (50, 200, 400, 600, 800),
                       seed: int = 0, default_prompt: str = "") -> LossFn:
    """``per_sample_loss(images, prompts=None)`` for ``medisyn.models.Components``.

    For each image: VAE latent (``latent_dist.mean`` × ``scaling_factor``), then for each
    timestep t a fixed noise draw (seeded by ``seed`` and t, identical for every image),
    the UNet's prediction, and the MSE to the target (ε, or v for ``v_prediction``),
    averaged over timesteps. Uses ``components.prompt_encoder.encode(prompts)`` for the
    text condition (``""`` = unconditional when no prompts are given).
    """
    vae = components.vae
    unet = components.unet
    sched = components.noise_scheduler
    mc = components.config
    res = int(mc.resolution)
    ch = int(mc.channels)
    pred_type = getattr(mc, "prediction_type", None) or getattr(sched.config, "prediction_type", "epsilon")
    scaling = float(getattr(vae.config, "scaling_factor", 1.0))

    @torch.no_grad()
    def per_sample_loss(images: Sequence[np.ndarray], prompts: Sequence[str] | None = None) -> np.ndarray:
        p = next(unet.parameters())
        x = (augment.to_tensor(images, size=res, channels=ch) * 2 - 1).to(p.device, p.dtype)
        vae_training, unet_training = vae.training, unet.training
        vae.eval()
        unet.eval()
        try:
            z = vae.encode(x).latent_dist.mean * scaling
            texts = list(prompts) if prompts is not None else [default_prompt] * len(images)
            cond = components.prompt_encoder.encode(texts).to(p.device, p.dtype)
            total = torch.zeros(z.shape[0], device=p.device)
            for t in timesteps:
                g = torch.Generator().manual_seed(seed * 100_003 + int(t))
                eps = torch.randn(z.shape[1:], generator=g).to(p.device, p.dtype).expand_as(z)
                tt = torch.full((z.shape[0],), int(t), device=p.device, dtype=torch.long)
                noisy = sched.add_noise(z, eps, tt)
                target = sched.get_velocity(z, eps, tt) if pred_type == "v_prediction" else eps
                pred = unet(noisy, tt, encoder_hidden_states=cond).sample
                total += ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
            return (total / len(timesteps)).cpu().numpy()
        finally:
            vae.train(vae_training)
            unet.train(unet_training)

    return per_sample_loss
