"""Training throughput of ``train_local`` against a bare forward/backward/step loop.

Same UNet config, same batch, same process; runs are interleaved (ours, bare, ours,
bare, ...) and the best of each is compared, because shared machines are noisy.
Target: ours / bare >= 0.9. Also records peak RSS.

    python bench/train_throughput.py --out bench/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medisyn.config import ModelConfig, TrainConfig, load_dataset_config
from medisyn.data import load_dataset
from medisyn.models import build_components
from medisyn.train import train_local

DEMO = Path(__file__).resolve().parents[1] / "medisyn" / "assets" / "demo"


def bare_loop(unet, latents, emb, scheduler, steps: int, batch: int) -> float:
    """The minimum any trainer must do: sample, noise, forward, MSE, backward, AdamW step."""
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    n = len(latents)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,))
        x = latents[idx]
        noise = torch.randn_like(x)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        pred = unet(scheduler.add_noise(x, noise, t), t, encoder_hidden_states=emb[idx]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    mcfg = ModelConfig()
    ds = load_dataset(load_dataset_config(DEMO / "breast-us" / "dataset.toml"), resolution=mcfg.resolution, channels=3,
                      splits=["train"])
    c = build_components(mcfg)
    cfg = TrainConfig(batch_size=args.batch, num_threads=args.threads)
    # Inputs for the bare loop: the same shapes our loop trains on.
    with torch.no_grad():
        latents = torch.cat([c.vae.encode(ch).latent_dist.mean for ch in ds.images.split(256)])
        emb = c.prompt_encoder.encode(ds.prompts)
    train_local(c, ds, steps=2, config=cfg, stage="unet", progress=False)  # warm-up
    ours, bare = [], []
    for r in range(args.repeats):
        res = train_local(c, ds, steps=args.steps, config=cfg.model_copy(update={"seed": r}), stage="unet", progress=False)
        ours.append(res.metrics["images-per-s"])
        bare.append(bare_loop(c.unet, latents, emb, c.noise_scheduler, args.steps, args.batch))
        print(f"repeat {r}: ours {ours[-1]:.1f} img/s, bare {bare[-1]:.1f} img/s", flush=True)
    result = {
        "what": "train_local (stage unet) vs a bare forward/backward/AdamW loop, same UNet and batch, interleaved",
        "model": mcfg.model_dump(mode="json"),
        "unet_parameters": sum(p.numel() for p in c.unet.parameters()),
        "batch": args.batch, "steps_per_run": args.steps, "repeats": args.repeats, "threads": args.threads,
        "ours_images_per_s": ours, "bare_images_per_s": bare,
        "ratio_best": max(ours) / max(bare),
        "ratio_median": sorted(ours)[len(ours) // 2] / sorted(bare)[len(bare) // 2],
        "target_ratio": 0.9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("ratio_best", "ratio_median", "peak_rss_mb")}, indent=2))


if __name__ == "__main__":
    main()
