"""DP-SGD overhead: step time and peak memory of a DP step over a non-DP step, and ε of
the demo's plan.

One process; DP and non-DP steps on two identical copies of the same model and the same
fixed batch, interleaved (non-DP, DP, non-DP, DP, ...) so that load on a shared machine
hits both alike. The DP step is what ``DPSession`` runs (Opacus hooks, per-sample clip,
noise, ledger write); the non-DP step is forward + backward + optimizer step.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per step; on CPU the process's
peak RSS per step (``VmHWM``, reset through ``/proc/self/clear_refs`` before each step),
reported as the peak over the RSS before the step.

    python bench/dp_overhead.py [--out bench/results/dp_overhead.json] [--model preset|test]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# The demo plan this bench assumes (the federation demo should use the same).
DEMO_PLAN = {
    "records_per_site": 546,
    "batch_size": 32,
    "rounds": 3,
    "local_steps_per_round": 20,
    "noise_multiplier": 1.0,
    "max_grad_norm": 1.0,
    "delta": "default: min(1e-5, 1/(10 N))",
    "stages_under_dp": ["unet"],
    "vae_stage_if_dp": {"rounds": 1, "local_steps_per_round": 20, "batch_size": 32},
}


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_unet(kind: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if kind == "test":
        from medisyn.privacy.tiny import tiny_unet

        return tiny_unet(seed), 32, 8
    # the "tiny" preset's UNet (medisyn.config.UNetConfig defaults; 32 px images -> 8x8
    # latents; MiniLM text embeddings, 384-d)
    return (
        UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            cross_attention_dim=384,
            down_block_types=("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3,
            norm_num_groups=16,
            attention_head_dim=8,
        ),
        384,
        8,
    )


class _Pair:
    """The plain and the DP model of one measurement, on one fixed batch."""

    def __init__(self, args: argparse.Namespace):
        from medisyn.config import PrivacyConfig
        from medisyn.privacy.dp import DPSession
        from medisyn.privacy.ledger import PrivacyLedger

        self.device = device = torch.device(args.device)
        self.plain, text_dim, size = build_unet(args.model)
        self.dp_model, _, _ = build_unet(args.model)
        self.dp_model.load_state_dict(self.plain.state_dict())
        self.plain.to(device).train()
        self.dp_model.to(device).train()
        b = args.batch_size
        g = torch.Generator().manual_seed(0)
        self.batch = {
            "latent": torch.randn(b, 4, size, size, generator=g).to(device),
            "noise": torch.randn(b, 4, size, size, generator=g).to(device),
            "t": torch.randint(0, 1000, (b,), generator=g).to(device),
            "text": torch.randn(b, 16, text_dim, generator=g).to(device),
        }
        self.opt_plain = torch.optim.AdamW(self.plain.parameters(), lr=1e-4)
        opt_dp = torch.optim.AdamW(self.dp_model.parameters(), lr=1e-4)
        priv = PrivacyConfig(
            dp=True, noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=1e6, accountant="rdp"
        )
        state = tempfile.mkdtemp(prefix="dp-bench-")
        ledger = PrivacyLedger.open(Path(state), "bench", "rdp", 1e-5)
        self.session = DPSession(
            self.dp_model,
            opt_dp,
            list(range(args.records)),
            batch_size=b,
            privacy=priv,
            ledger=ledger,
            stage="unet",
            run_id="bench",
            round=1,
            planned_steps=args.warmup + args.steps,
        )

    def _loss(self, m):
        b = self.batch
        pred = m(b["latent"] + b["noise"], b["t"], encoder_hidden_states=b["text"]).sample
        return ((pred - b["noise"]) ** 2).mean()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, kind: str) -> tuple[float, float, float | None]:
        """One optimizer step of `kind` ('plain' or 'dp'): wall s, thread CPU s, peak MiB."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            ok = _reset_peak_rss()
            base = _rss_kb("VmRSS") if ok else None
        self._sync()
        t0 = time.perf_counter()
        c0 = time.thread_time()
        if kind == "plain":
            self._loss(self.plain).backward()
            self.opt_plain.step()
            self.opt_plain.zero_grad(set_to_none=True)
        else:
            self._loss(self.dp_model).backward()
            self.session.step()
        self._sync()
        dt = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        if cuda:
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            hwm = _rss_kb("VmHWM")
            peak = None if base is None or hwm is None else (hwm - base) / 1024
        return dt, cpu, peak


def _run_steps(pair: _Pair, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Alternate plain and DP steps (order swapped every step); keep those after warmup."""
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    cpus: dict[str, list[float]] = {"plain": [], "dp": []}
    peaks: dict[str, list[float]] = {"plain": [], "dp": []}
    for i in range(args.warmup + args.steps):
        order = ("plain", "dp") if i % 2 == 0 else ("dp", "plain")
        if args.memory_probe:
            order = (args.memory_probe,)
        for kind in order:
            dt, cpu, peak = pair.step(kind)
            if i >= args.warmup:
                times[kind].append(dt)
                cpus[kind].append(cpu)
                if peak is not None:
                    peaks[kind].append(peak)
    pair.session.close()
    return times, cpus, peaks


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    pair = _Pair(args)
    times, cpus, peaks = _run_steps(pair, args)
    if args.memory_probe:
        return {
            "peak_step_mib": max(peaks[args.memory_probe]) if peaks[args.memory_probe] else None
        }
    return _result(args, pair, times, cpus, peaks)


def _result(args: argparse.Namespace, pair: _Pair, times: dict, cpus: dict, peaks: dict) -> dict:
    device = pair.device
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpus.items()}
    pair_ratios = [d / p for d, p in zip(times["dp"], times["plain"], strict=True)]
    result = {
        "model": args.model,
        "model_note": (
            "the UNet of medisyn.models.build_tiny(ModelConfig()) (the 'tiny' preset: "
            "blocks 64/128/128, all cross-attention, 384-d MiniLM text, 8x8 latents)"
            if args.model == "preset"
            else "the 2-block test UNet of medisyn.privacy.tiny"
        ),
        "text_tokens": 16,
        "dp_settings": {
            "noise_multiplier": 1.0,
            "max_grad_norm": 1.0,
            "mode": "opacus hooks, flat clipping, ledger write per step",
        },
        "parameters": sum(p.numel() for p in pair.plain.parameters()),
        "batch_size": args.batch_size,
        "device": str(device),
        "threads": args.threads,
        "steps_measured": args.steps,
        "warmup_steps": args.warmup,
        "step_seconds": {k: v for k, v in times.items()},
        "median_step_seconds": med,
        "time_ratio_dp_over_plain": med["dp"] / med["plain"],
        "time_ratio_median_of_pairs": statistics.median(pair_ratios),
        "step_cpu_seconds": cpus,
        "median_step_cpu_seconds": med_cpu,
        "cpu_time_ratio_dp_over_plain": med_cpu["dp"] / med_cpu["plain"],
        "target_time_ratio": 2.5,
        "meets_target": med["dp"] / med["plain"] <= 2.5,
        "note": "wall times on a shared machine are noisy; with one thread, the thread "
        "CPU time ratio is the better measure of the DP cost",
    }
    if device.type == "cuda" and peaks["plain"] and peaks["dp"]:
        pm = {k: max(v) for k, v in peaks.items()}
        result["peak_step_memory_mib"] = pm
        result["memory_ratio_dp_over_plain"] = pm["dp"] / pm["plain"] if pm["plain"] > 0 else None
        result["memory_measure"] = "cuda max_memory_allocated over the step"
    return result


def memory_probes(args: argparse.Namespace) -> dict:
    """Peak RSS growth of a step, each mode in a fresh process (CPU: an allocator keeps
    freed memory, so one process cannot compare two modes)."""
    import subprocess

    out = {}
    for kind in ("plain", "dp"):
        cmd = [
            sys.executable,
            __file__,
            "--memory-probe",
            kind,
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--records",
            str(args.records),
            "--steps",
            "2",
            "--warmup",
            "0",
            "--threads",
            str(args.threads),
            "--device",
            "cpu",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])["peak_step_mib"]
    return {
        "peak_step_memory_mib": out,
        "memory_ratio_dp_over_plain": out["dp"] / out["plain"] if out["plain"] else None,
        "memory_measure": "CPU: peak RSS (VmHWM) growth over the RSS after building the "
        "model and batch, during 2 steps (the first step included), one fresh process per mode",
    }


def demo_epsilon() -> dict:
    from medisyn.privacy import accounting

    n = DEMO_PLAN["records_per_site"]
    q = DEMO_PLAN["batch_size"] / n
    steps = DEMO_PLAN["local_steps_per_round"]
    sigma = DEMO_PLAN["noise_multiplier"]
    delta = accounting.default_delta(n)
    out: dict = {"delta": delta, "sample_rate": q}
    for kind in ("prv", "rdp"):
        per_round = [
            accounting.epsilon([(sigma, q, steps * r)], delta, kind)
            for r in range(1, DEMO_PLAN["rounds"] + 1)
        ]
        vae = DEMO_PLAN["vae_stage_if_dp"]
        qv = vae["batch_size"] / n
        with_vae = accounting.epsilon(
            [
                (sigma, qv, vae["rounds"] * vae["local_steps_per_round"]),
                (sigma, q, steps * DEMO_PLAN["rounds"]),
            ],
            delta,
            kind,
        )
        out[kind] = {
            "epsilon_after_each_round": per_round,
            "epsilon_after_plan": per_round[-1],
            "epsilon_after_plan_with_dp_vae_stage": with_vae,
            "sigma_for_target_epsilon_8": accounting.derive_noise_multiplier(
                target_epsilon=8.0,
                delta=delta,
                sample_rate=q,
                steps=steps * DEMO_PLAN["rounds"],
                kind=kind,
            ),
        }
    out["group_privacy_patient_with_4_images_prv"] = dict(
        zip(
            ("epsilon", "delta"),
            accounting.group_epsilon(out["prv"]["epsilon_after_plan"], delta, 4),
            strict=True,
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "dp_overhead.json"
    )
    ap.add_argument("--model", choices=["preset", "test"], default="preset")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--records", type=int, default=546)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-probe", choices=["plain", "dp"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_probe:
        print(json.dumps(measure(args)))
        return 0
    t0 = time.time()
    result = {
        "bench": "dp_overhead",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_before": os.getloadavg(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "overhead": measure(args),
        "demo_plan_assumed": DEMO_PLAN,
        "demo_epsilon": demo_epsilon(),
    }
    if args.device == "cpu":
        result["overhead"].update(memory_probes(args))
    result["host"]["loadavg_after"] = os.getloadavg()
    result["wall_seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    o = result["overhead"]
    print(
        f"DP/non-DP step time {o['time_ratio_dp_over_plain']:.2f}x wall, "
        f"{o['cpu_time_ratio_dp_over_plain']:.2f}x CPU "
        f"({o['median_step_seconds']['dp']:.3f}s vs {o['median_step_seconds']['plain']:.3f}s); "
        f"memory {o.get('memory_ratio_dp_over_plain')}; "
        f"demo ε (prv) {result['demo_epsilon']['prv']['epsilon_after_plan']:.3f} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
