"""First quality reading: the four shared datasets trained together for a fixed CPU budget.

Trains the tiny preset centrally on the pooled training splits (stage vae for
``--vae-minutes``, then stage unet for ``--unet-minutes``, both CPU minutes over all
threads: 40 CPU minutes are 20 wall minutes on 2 free cores), generates ``--n`` images per
prompt, and asks a small CNN trained on the real images (32 px) which image type each
generated image is. Writes JSON (accuracy per image type, overall) and a sample grid
per image type.

    python bench/quality.py --out bench/results/quality --vae-minutes 8 --unet-minutes 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medisyn.config import (
    DEFAULT_GUIDANCE,
    DEFAULT_GUIDANCE_INTERVAL,
    ModelConfig,
    TrainConfig,
    load_dataset_config,
)
from medisyn.data import ConcatImageDataset, label_prompts, load_dataset
from medisyn.generate import generate, make_grid
from medisyn.models import build_components, model_hash, save_components, set_latent_scale
from medisyn.train import train_local

DEMO = Path(__file__).resolve().parents[1] / "medisyn" / "assets" / "demo"
SITES = ["breast-us", "chest-xray", "fundus", "dermoscopy"]
SHARED = {  # the full shared files, when present; else the vendored demo samples
    "breast-us": "medmnist/breastmnist.npz",
    "chest-xray": "medmnist/pneumoniamnist_balanced_subset.npz",
    "fundus": "medmnist/retinamnist.npz",
    "dermoscopy": "isic_uda1/isic_uda1_28.npz",
}


def _timed_train(c, ds, stage, minutes, cfg, chunk):
    """Train in chunks of ``chunk`` steps until the CPU-time budget is spent.

    The budget is process CPU time (all threads), not wall time, so a shared machine
    gives the same amount of training, only later.
    """
    deadline = time.process_time() + minutes * 60
    steps = 0
    losses = []
    last = None
    while time.process_time() < deadline:
        r = train_local(c, ds, steps=chunk, config=cfg.model_copy(update={"seed": cfg.seed + steps}), stage=stage,
                        progress=False)
        steps += chunk
        losses.append(r.metrics["loss"])
        last = r
        print(f"  {stage}: {steps} steps, loss {r.metrics['loss']:.4f}, {r.metrics['images-per-s']:.1f} img/s", flush=True)
    return steps, losses, last


class TypeCNN(nn.Module):
    def __init__(self, n_classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, n_classes),
        )

    def forward(self, x):
        return self.net(x)


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 8, seed: int = 0) -> TypeCNN:
    torch.manual_seed(seed)
    model = TypeCNN(int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            xb = x[idx]
            if torch.rand(()) < 0.5:
                xb = xb.flip(-1)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality"))
    ap.add_argument("--vae-minutes", type=float, default=8.0, help="CPU minutes (all threads) for stage vae")
    ap.add_argument("--unet-minutes", type=float, default=32.0, help="CPU minutes (all threads) for stage unet")
    ap.add_argument("--n", type=int, default=40, help="generated images per prompt")
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    mcfg = ModelConfig()
    dcfgs = [load_dataset_config(DEMO / s / "dataset.toml") for s in SITES]
    if all((args.data_root / SHARED[s]).is_file() for s in SITES):
        dcfgs = [d.model_copy(update={"path": args.data_root / SHARED[s]}) for d, s in zip(dcfgs, SITES, strict=True)]
    print("data:", ", ".join(str(d.path) for d in dcfgs), flush=True)
    train_parts = [load_dataset(d, resolution=mcfg.resolution, channels=3, splits=["train"]) for d in dcfgs]
    test_parts = [load_dataset(d, resolution=mcfg.resolution, channels=3, splits=["val", "test"]) for d in dcfgs]
    pooled = ConcatImageDataset(train_parts)
    print(f"pooled training set: {len(pooled)} images from {len(SITES)} image types", flush=True)

    c = build_components(mcfg)
    tcfg = TrainConfig(batch_size=64, lr=5e-4, vae_lr=1e-3)
    t0, cpu0 = time.perf_counter(), time.process_time()
    vae_steps, vae_losses, vae_last = _timed_train(c, pooled, "vae", args.vae_minutes, tcfg, 20)
    set_latent_scale(c, vae_last.metrics["latent-std"])
    unet_steps, unet_losses, _ = _timed_train(c, pooled, "unet", args.unet_minutes, tcfg, 50)
    train_seconds = time.perf_counter() - t0
    train_cpu_seconds = time.process_time() - cpu0
    save_components(c, args.out / "model")

    # Classifier on real images: which image type is this?
    xs = torch.cat([p.images for p in train_parts])
    ys = torch.cat([torch.full((len(p),), k) for k, p in enumerate(train_parts)])
    clf = train_classifier(xs, ys)
    xt = torch.cat([p.images for p in test_parts])
    yt = torch.cat([torch.full((len(p),), k) for k, p in enumerate(test_parts)])
    with torch.no_grad():
        real_acc = float((clf(xt).argmax(1) == yt).float().mean())

    per_type = {}
    t1 = time.perf_counter()
    for k, (site, d) in enumerate(zip(SITES, dcfgs, strict=True)):
        prompts = list(label_prompts(d).values())
        n = max(1, args.n // len(prompts))
        items = generate(c, prompts, n_per_prompt=n, seed=1000 * k, steps=args.steps, guidance=args.guidance)
        imgs = torch.stack([torch.from_numpy(np.asarray(g.image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                            for g in items])
        with torch.no_grad():
            pred = clf(imgs).argmax(1)
        per_type[d.image_type] = {"site": site, "n": len(items), "recognised": float((pred == k).float().mean()),
                                  "predicted_counts": {SITES[j]: int((pred == j).sum()) for j in range(len(SITES))}}
        make_grid([g.image for g in items[: 8 * len(prompts)]], ncols=8, scale=3).save(args.out / f"grid-{site}.png")
    gen_seconds = time.perf_counter() - t1
    overall = float(np.mean([v["recognised"] for v in per_type.values()]))
    result = {
        "what": "image-type recognition of generated images by a CNN trained on real images (tiny preset, pooled training)",
        "vae_steps": vae_steps, "unet_steps": unet_steps, "batch_size": tcfg.batch_size,
        "train_wall_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds, "generate_seconds": gen_seconds,
        "vae_loss_last": vae_losses[-1], "unet_loss_first": unet_losses[0], "unet_loss_last": unet_losses[-1],
        "classifier_real_test_accuracy": real_acc,
        "recognised_per_type": per_type, "recognised_mean": overall,
        "guidance": args.guidance, "guidance_interval": DEFAULT_GUIDANCE_INTERVAL, "sampling_steps": args.steps, "threads": args.threads,
        "model_hash": model_hash(args.out / "model"),
    }
    (args.out / "quality.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "recognised_per_type"}, indent=2))
    for t, v in per_type.items():
        print(f"{t:28s} recognised {v['recognised']:.2f}  {v['predicted_counts']}")


if __name__ == "__main__":
    main()
