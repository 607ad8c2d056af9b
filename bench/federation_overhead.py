"""Federation overhead benchmark: real SuperLink + SuperNodes on loopback.

Measures, per round:
- wall time of the round at the ServerApp vs the slowest site's local training time
  (``overhead = wall / slowest_train - 1``; target <= 15 % with >= 30 s local work);
- the same for a no-op Flower app (ClientApp sleeps as long as our slowest site
  trained, imports only flwr + numpy; same array size) run on the same daemons' setup:
  Flower's own floor on this machine;
- bytes per site per round (down: global weights sent; up: site weights returned);
- for the ``sd`` preset: LoRA-adapter bytes vs full-UNet bytes per round, from the real
  parameter counts of an SD 1.5 UNet built from its config on the meta device.

Usage: python bench/federation_overhead.py [--out bench/results/federation_overhead.json]
       [--sites 2] [--rounds 2] [--local-steps 400] [--skip-noop] [--sd-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

SD15_UNET_CONFIG = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

NOOP_APP = '''
import time
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict, ConfigRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

clientapp = ClientApp()

@clientapp.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    time.sleep(float(msg.content["config"]["sleep"]))
    arrays = msg.content["arrays"]
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": 1, "seconds": time.perf_counter() - t0})}), reply_to=msg)

serverapp = ServerApp()

@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    import json
    n = int(context.run_config["n-floats"])
    rounds = int(context.run_config["rounds"])
    sites = int(context.run_config["sites"])
    out = context.run_config["out"]
    arrays = ArrayRecord({"w": Array(np.zeros(n, dtype=np.float32))})
    s = FedAvg(min_train_nodes=sites, min_available_nodes=sites, fraction_evaluate=0.0)
    recs = []
    for r in range(1, rounds + 1):
        t0 = time.time()
        msgs = s.configure_train(r, arrays, ConfigRecord({"sleep": float(context.run_config["sleep"])}), grid)
        replies = list(grid.send_and_receive(msgs, timeout=600))
        arrays, _ = s.aggregate_train(r, replies)
        secs = [float(m.content["metrics"]["seconds"]) for m in replies if not m.has_error()]
        recs.append({"round": r, "seconds": time.time() - t0, "slowest_site_seconds": max(secs) if secs else None})
        with open(out, "w") as f:
            json.dump(recs, f)
'''

NOOP_PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
[project]
name = "noop-bench"
version = "0.1.0"
dependencies = []
[tool.flwr.app]
publisher = "medisyn"
[tool.flwr.app.components]
serverapp = "noop_app:serverapp"
clientapp = "noop_app:clientapp"
[tool.flwr.app.config]
n-floats = 1
rounds = 1
sites = 1
sleep = 1.0
out = ""
'''


def sd_sizes(ranks=(4, 8, 16)) -> dict:
    """Full SD 1.5 UNet vs LoRA adapter bytes per round (fp32), from real parameter counts."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    full = sum(p.numel() for p in unet.parameters())
    targets = [m for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in LORA_TARGETS)]
    out = {"unet_parameters": full, "unet_bytes_fp32": 4 * full, "lora_target_layers": len(targets),
           "lora": {}}
    for r in ranks:
        params = sum(r * (m.in_features + m.out_features) for m in targets)
        out["lora"][f"rank-{r}"] = {
            "parameters": params, "bytes_fp32": 4 * params,
            "fraction_of_unet": params / full,
            # per site per round: the adapters go down and come back up
            "bytes_per_site_per_round": 8 * params,
        }
    out["full_unet_bytes_per_site_per_round"] = 8 * full
    return out


def run_medisyn(work: Path, *, sites: list[str], rounds: int, local_steps: int) -> list[dict]:
    from medisyn.client.supervisor import SiteSupervisor
    from medisyn.server.config import FederationConfig
    from medisyn.server.demo import write_site_configs
    from medisyn.server.federation import iter_metrics
    from medisyn.server.supervisor import ServerSupervisor

    from medisyn.procs import free_port

    port = free_port()
    paths = write_site_configs(work, port, sites=sites)
    cfg = FederationConfig.model_validate(dict(
        rounds=rounds, local_steps=local_steps, stages=["unet"], min_sites=len(sites),
        round_timeout=1800, evaluate=False, sites=sites, run_dir=str(work / "run"),
        model={"resolution": 16, "vae": {"block_out_channels": [8, 16], "norm_num_groups": 4},
               "unet": {"block_out_channels": [16, 32], "norm_num_groups": 8, "cross_attention": [False, True]}},
        train={"batch_size": 16, "num_threads": 1},
        superlink={"host": "127.0.0.1", "port": port, "insecure": True},
    ))
    server = ServerSupervisor(cfg)
    sups = []
    try:
        server.prepare()
        server.start_superlink()
        sups = [SiteSupervisor(p, extra_env={"OMP_NUM_THREADS": "1"}).start() for p in paths.values()]
        server.submit()
        code = server.watch()
    finally:
        for s in sups:
            s.stop()
        server.close()
    if code != 0:
        raise RuntimeError(f"benchmark federation failed with exit code {code}")
    return list(iter_metrics(cfg.run_dir))


def run_noop(work: Path, *, sites: int, rounds: int, sleep: float, n_floats: int) -> list[dict]:
    from medisyn.procs import Daemon, child_env, executable, free_port, port_open

    port = free_port()
    app = work / "noop"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(NOOP_PYPROJECT)
    (app / "noop_app.py").write_text(NOOP_APP)
    home = work / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {"FLWR_HOME": str(home)}
    daemons = []
    out = work / "noop-rounds.json"
    try:
        link = Daemon("superlink", [executable("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                    "--port", str(port), "--disable-runtime-dependency-installation"],
                      log_path=work / "noop-superlink.log", env=env).start()
        daemons.append(link)
        while not port_open("127.0.0.1", port):
            time.sleep(0.3)
        for i in range(sites):
            daemons.append(Daemon(f"supernode{i}", [
                executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--host", "127.0.0.1", "--port", str(free_port())],
                log_path=work / f"noop-supernode{i}.log",
                env={"FLWR_HOME": str(work / f"home{i}")}).start())
        import subprocess

        cfg = f'n-floats={n_floats} rounds={rounds} sites={sites} sleep={sleep} out="{out}"'
        res = subprocess.run([executable("flwr"), "run", str(app), "bench", "--run-config", cfg, "--format", "json"],
                             env=child_env(env), check=True, capture_output=True, text=True, timeout=300)
        run_id = json.loads(res.stdout)["run-id"]
        deadline = time.time() + rounds * (sleep + 150)
        while time.time() < deadline:
            if out.is_file():
                recs = json.loads(out.read_text())
                if len(recs) == rounds:
                    return recs
            time.sleep(1)
        logs = subprocess.run([executable("flwr"), "log", str(run_id), "bench", "--show"], env=child_env(env),
                              capture_output=True, text=True, timeout=60)
        raise RuntimeError(f"no-op app did not finish:\n{logs.stdout[-3000:]}\n{logs.stderr[-2000:]}")
    finally:
        for d in daemons[::-1]:
            d.stop()


def summarize(recs: list[dict]) -> dict:
    rows = []
    for r in recs:
        slow = r.get("slowest_site_seconds")
        rows.append({
            "round": r["round"], "wall_seconds": round(r["seconds"], 2),
            "slowest_site_train_seconds": None if slow is None else round(slow, 2),
            "slowest_site_task_seconds": r.get("slowest_site_task_seconds"),
            "overhead_ratio": None if not slow else round(r["seconds"] / slow - 1, 3),
            "bytes_per_site": {s: {"up": m.get("bytes-up"), "down": m.get("bytes-down")}
                               for s, m in r.get("sites", {}).items() if m.get("status") == "ok"},
        })
    return {"rounds": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/federation_overhead.json"))
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=400)
    ap.add_argument("--skip-noop", action="store_true")
    ap.add_argument("--sd-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result: dict = {"machine": {"platform": platform.platform(), "python": platform.python_version()},
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import os

        result["machine"]["cpus"] = os.cpu_count()
        result["machine"]["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    result["sd_preset"] = sd_sizes()
    if not args.sd_only:
        sites = ["breast-us", "chest-xray", "fundus", "dermoscopy"][: args.sites]
        with tempfile.TemporaryDirectory(prefix="medisyn-bench-") as tmp:
            recs = run_medisyn(Path(tmp) / "medisyn", sites=sites, rounds=args.rounds, local_steps=args.local_steps)
            result["medisyn"] = {"sites": sites, "local_steps": args.local_steps, **summarize(recs)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))  # partial result first
            if not args.skip_noop:
                slow = max((r["slowest_site_seconds"] or 0) for r in recs)
                n = max(sum(m.get("bytes-down", 0) for m in r["sites"].values()) // max(1, len(r["sites"]))
                        for r in recs) // 4
                noop = run_noop(Path(tmp) / "noop", sites=len(sites), rounds=args.rounds, sleep=slow, n_floats=max(1, n))
                result["noop"] = {"sleep_seconds": slow, "n_floats": n, **summarize(noop)}
        ours = [r["overhead_ratio"] for r in result["medisyn"]["rounds"] if r["overhead_ratio"] is not None]
        result["medisyn"]["mean_overhead_ratio"] = sum(ours) / len(ours) if ours else None
        if "noop" in result:
            base = [r["overhead_ratio"] for r in result["noop"]["rounds"] if r["overhead_ratio"] is not None]
            result["noop"]["mean_overhead_ratio"] = sum(base) / len(base) if base else None
            # the issue-10 target: per-round overhead (wall - slowest site's training) at most
            # 1.25x the no-op app's (wall - its sleep), in the same run
            def extra(rows: list[dict]) -> list[float]:
                return [r["wall_seconds"] - r["slowest_site_train_seconds"] for r in rows
                        if r["slowest_site_train_seconds"] is not None]

            ours_s, noop_s = extra(result["medisyn"]["rounds"]), extra(result["noop"]["rounds"])
            if ours_s and noop_s:
                mean_ours, mean_noop = sum(ours_s) / len(ours_s), sum(noop_s) / len(noop_s)
                result["overhead_seconds"] = {
                    "medisyn_per_round": [round(x, 2) for x in ours_s],
                    "noop_per_round": [round(x, 2) for x in noop_s],
                    "medisyn_mean": round(mean_ours, 2), "noop_mean": round(mean_noop, 2),
                    "ratio_of_means": round(mean_ours / mean_noop, 3) if mean_noop > 0 else None,
                    "target_ratio": 1.25,
                }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
