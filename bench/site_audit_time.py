"""Time one site audit on a demo dataset, and count how often its embedders are fitted.

The site is ``medisyn/assets/demo/<dataset>`` (a temporary site TOML around it), the model
a fresh tiny preset (so the VAE-latent view runs), the synthetic set 8 exact copies of
training images and 32 held-out test images. Two audits run back to back in one state
directory: ``cold`` (no cached encoder, no cached validation) and ``warm-disk`` (the
encoder weights and the validation of the first are on disk); then ``warm-worker``, the
query a long-lived site worker answers with the prepared index it kept from
``warm-disk`` (``audit_synthetic_at_site(warm=...)``). Writes JSON to ``--out``.

Usage: python bench/site_audit_time.py [--dataset breast-us] [--out PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def count_fits() -> collections.Counter:
    """Wrap every embedder class's ``fit`` so calls are counted by class name."""
    from medisyn.audit import embedders as E

    counts: collections.Counter = collections.Counter()
    for cls in (E.PixelEmbedder, E.VAEEmbedder, E.ContrastiveEmbedder, E.LocalModelEmbedder):
        orig = cls.fit

        def fit(self, images, _orig=orig, _name=cls.__name__):  # noqa: ANN001, ANN202
            counts[_name] += 1
            return _orig(self, images)

        cls.fit = fit
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="breast-us")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from medisyn.audit.settings import AuditConfig
    from medisyn.audit.site_audit import audit_synthetic_at_site

    from medisyn.config import ModelConfig, load_site_config
    from medisyn.models import build_components

    demo = Path(__file__).resolve().parents[1] / "medisyn/assets/demo" / args.dataset
    tmp = Path(tempfile.mkdtemp(prefix="site-audit-time-"))
    toml = tmp / "site.toml"
    body = (demo / "dataset.toml").read_text().replace('path = "dataset.npz"',
                                                        f'path = "{demo / "dataset.npz"}"')
    toml.write_text(f'[site]\nid = "bench"\nstate_dir = "{tmp / "state"}"\n\n{body}\n'
                    '[privacy]\nmax_epsilon = 8.0\nallowed_audits = ["copy-detection"]\n')
    site = load_site_config(toml)
    data = np.load(demo / "dataset.npz")
    train, test = data["train_images"], data["test_images"]
    syn = [(f"mem-{i}", train[i * 11].copy(), "x") for i in range(8)]
    syn += [(f"new-{i}", test[i].copy(), "x") for i in range(32)]
    comps = build_components(ModelConfig(preset="tiny"), seed=0)
    comps.vae.eval()
    audit = AuditConfig(threads=args.threads)
    counts = count_fits()
    runs = []
    kept: dict = {}

    def keep(build):  # noqa: ANN001, ANN202  (a worker's keeper of one prepared index)
        if "index" not in kept:
            kept["index"] = build()
        return kept["index"]

    for label in ("cold", "warm-disk", "warm-worker"):
        counts.clear()
        t0 = time.perf_counter()
        agg = audit_synthetic_at_site(site, syn, comps, audit_config=audit, out_dir=tmp / label,
                                      privacy={"epsilon": 1.0, "delta": 1e-5},
                                      warm=None if label == "cold" else keep)
        runs.append({"run": label, "seconds": round(time.perf_counter() - t0, 2), "fits": dict(counts),
                     "flagged": sorted(agg["flagged_ids"]),
                     "validated": agg["validation"]["validated"] if agg["validation"] else None,
                     "detection_rate": agg["validation"]["detection_rate"] if agg["validation"] else None,
                     "false_positive_rate": agg["validation"]["false_positive_rate"]
                     if agg["validation"] else None,
                     "thresholds": {v["name"]: v["threshold"] for v in agg["views"]}})
        print(json.dumps(runs[-1]), flush=True)
    out = {"dataset": args.dataset, "threads": args.threads, "n_synthetic": len(syn),
           "n_train": int(len(train)), "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
