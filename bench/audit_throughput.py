"""Audit throughput benchmark (issue 5): writes JSON.

* embedding images/s per embedder (pixel, contrastive encoder, a tiny VAE encoder) on 28×28
  real images (random images when the shared data is absent);
* exact search: 10k synthetic vs 100k real vectors (d = 128, IndexFlatIP, top-1);
* IVF at 1M vectors (``--quick``: 100k): build time, nprobe chosen for planted-copy
  recall ≥ 0.999, search time for 10k queries and the planted-copy recall.

Vectors are clustered unit-norm Gaussians (2,000 centres) standing in for embeddings;
planted copies are database vectors plus noise (median cosine to the source ≈ 0.97).

Usage: python bench/audit_throughput.py [--out PATH] [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("audit_throughput")


def clustered(n: int, d: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def planted(db: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    src = rng.choice(len(db), n, replace=False)
    q = db[src] + 0.25 * rng.standard_normal((n, db.shape[1]), dtype=np.float32) / np.sqrt(db.shape[1])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32), src


def bench_embedders(n_images: int) -> dict:
    import torch
    from medisyn.audit.embedders import ContrastiveEmbedder, PixelEmbedder, VAEEmbedder

    p = Path("/work/shared/data/medmnist/retinamnist.npz")
    if p.is_file():
        imgs = np.load(p)["train_images"]
        imgs = np.concatenate([imgs] * (n_images // len(imgs) + 1))[:n_images]
        source = "retinamnist train (RGB 28x28)"
    else:
        imgs = np.random.default_rng(0).integers(0, 256, (n_images, 28, 28, 3), dtype=np.uint8)
        source = "random RGB 28x28"
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                        down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4,
                        norm_num_groups=16, layers_per_block=1)
    embs = {
        "pixel": PixelEmbedder(channels=3),
        "contrastive": ContrastiveEmbedder(channels=3),
        "vae (tiny preset, 32 px)": VAEEmbedder(vae, resolution=32, channels=3),
    }
    out = {"images": source, "n": n_images}
    for name, e in embs.items():
        e.embed(imgs[:64])  # warm-up
        t0 = time.perf_counter()
        v = e.embed(imgs)
        dt = time.perf_counter() - t0
        out[name] = {"images_per_s": round(n_images / dt, 1), "seconds": round(dt, 3), "dim": int(v.shape[1])}
        log.info("embed %s: %.0f images/s", name, n_images / dt)
    # contrastive training speed (steps/s) on a short run
    e = ContrastiveEmbedder(channels=3, steps=20)
    t0 = time.perf_counter()
    e.fit(imgs[:1000])
    out["contrastive_training"] = {"steps": 20, "batch_size": 128,
                                   "seconds_per_step": round((time.perf_counter() - t0) / 20, 3)}
    return out


def bench_exact(rng: np.random.Generator, centres: np.ndarray, n_db: int, n_q: int) -> dict:
    from medisyn.audit.index import NNIndex

    db = clustered(n_db, centres.shape[1], rng, centres)
    q = clustered(n_q, centres.shape[1], rng, centres)
    idx = NNIndex(db)
    t0 = time.perf_counter()
    idx.search(q, 1)
    dt = time.perf_counter() - t0
    log.info("exact %d x %d: %.2f s", n_q, n_db, dt)
    return {"n_database": n_db, "n_queries": n_q, "d": int(centres.shape[1]), "index": "IndexFlatIP",
            "k": 1, "search_seconds": round(dt, 3), "queries_per_s": round(n_q / dt, 1)}


def bench_ivf(rng: np.random.Generator, centres: np.ndarray, n_db: int, n_q: int) -> dict:
    from medisyn.audit.index import NNIndex

    t0 = time.perf_counter()
    db = clustered(n_db, centres.shape[1], rng, centres)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx = NNIndex(db, exact_max=min(n_db - 1, 200_000))
    build = time.perf_counter() - t0
    log.info("IVF%d built on %d vectors in %.1f s", idx.nlist, n_db, build)
    tune_q, tune_src = planted(db, 2000, rng)
    t0 = time.perf_counter()
    tune_rec = idx.tune(tune_q, tune_src, recall_target=0.999)
    tune_s = time.perf_counter() - t0
    # fresh evaluation: half planted copies (new draws), half new vectors
    eq, esrc = planted(db, n_q // 2, rng)
    fresh = clustered(n_q - n_q // 2, centres.shape[1], rng, centres)
    queries = np.concatenate([eq, fresh])
    t0 = time.perf_counter()
    s, i = idx.search(queries, 1)
    search_s = time.perf_counter() - t0
    _, ei = idx.exact_search(eq, 1)
    copy_recall = float(np.mean(i[: len(eq), 0] == np.where(ei[:, 0] == esrc, esrc, ei[:, 0])))
    source_recall = float(np.mean(i[: len(eq), 0] == esrc))
    cos = np.sum(eq * db[esrc], axis=1)
    return {"n_database": n_db, "n_queries": n_q, "d": int(centres.shape[1]),
            "index": f"IVF{idx.nlist},Flat", "nprobe": idx.nprobe,
            "tuning_recall": tune_rec, "build_seconds": round(build, 2),
            "tune_seconds": round(tune_s, 2), "search_seconds": round(search_s, 3),
            "queries_per_s": round(n_q / search_s, 1),
            "planted_copy_recall": copy_recall, "planted_copy_source_top1": source_recall,
            "planted_copy_median_cosine": round(float(np.median(cos)), 4),
            "data_generation_seconds": round(gen_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audit_throughput.json")
    ap.add_argument("--quick", action="store_true", help="IVF at 100k instead of 1M vectors")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-embed", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    d = 128
    centres = rng.standard_normal((2000, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    res: dict = {"threads": args.threads, "cpu_count": os.cpu_count(), "machine": platform.machine(),
                 "faiss_version": faiss.__version__, "faiss_gpus": faiss.get_num_gpus(),
                 "quick": args.quick,
                 "note": "2 CPU cores shared with other work; numbers are lower bounds"}
    if not args.skip_embed:
        res["embedding"] = bench_embedders(4000)
    res["exact_search"] = bench_exact(rng, centres, 100_000, 10_000)
    res["ivf"] = bench_ivf(rng, centres, 100_000 if args.quick else 1_000_000, 10_000)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
