"""Detector validation on the shared real data (``docs/audit.md``, measured table).

    .venv/bin/python bench/audit_validation.py --data pneumonia [--seed 0] \
        [--set registration_topk=30 ...] [--out bench/results/validation_pneumonia.json]

Builds a site TOML for one of the shared datasets (training split ``train``; held-out
``val`` + ``test``), runs :func:`medisyn.audit.validate.run_validation` with the default
``[audit]`` settings (plus ``--set`` overrides) on 1 thread, and writes the JSON.
Contrastive encoders are cached in ``--cache-dir`` (default ``/tmp/audit_cache``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DATA = Path("/work/shared/data")
SITES = {
    "breast": ("medmnist/breastmnist.npz", "radiology", "breast ultrasound"),
    "pneumonia": ("medmnist/pneumoniamnist_balanced_subset.npz", "radiology", "chest x-ray"),
    "retina": ("medmnist/retinamnist.npz", "ophthalmology", "fundus photograph"),
    "isic": ("isic_uda1/isic_uda1_28.npz", "dermatology", "dermoscopy"),
}


def site_toml(tmp: Path, name: str, audit: dict) -> Path:
    rel, spec, itype = SITES[name]
    lines = [f"{k} = {json.dumps(v)}" for k, v in audit.items()]
    text = f"""[site]
id = "site-{name}"
state_dir = "state"

[dataset]
path = "{DATA / rel}"
specialty = "{spec}"
image_type = "{itype}"
split = {{ train = ["train"], holdout = ["val", "test"] }}

[privacy]
max_epsilon = 8.0

[audit]
""" + "\n".join(lines) + "\n"
    p = tmp / "site.toml"
    p.write_text(text)
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, choices=sorted(SITES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="audit field=JSON value")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/audit_cache"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    audit: dict = {"threads": a.threads, "seed": a.seed, "embedders": ["pixel", "contrastive"]}
    for kv in a.set:
        k, v = kv.split("=", 1)
        try:
            audit[k] = json.loads(v)
        except json.JSONDecodeError:
            audit[k] = v
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from medisyn.audit.data import load_site_images
    from medisyn.audit.settings import load_site
    from medisyn.audit.validate import run_validation

    with tempfile.TemporaryDirectory() as td:
        cfg, acfg = load_site(site_toml(Path(td), a.data, audit))
        t0 = time.perf_counter()
        res = run_validation(load_site_images(cfg.dataset), acfg, cache_dir=a.cache_dir,
                             breakdown=not a.no_breakdown)
        res["site_id"] = cfg.site.id
        res["bench"] = {"data": SITES[a.data][0], "audit_overrides": audit,
                        "wall_seconds": round(time.perf_counter() - t0, 2)}
    d = res["detection"]
    print(json.dumps({"data": a.data, "seed": a.seed,
                      **{f: [round(d[f]["rate"], 3), round(d[f]["ci_low"], 3), round(d[f]["ci_high"], 3)]
                         for f in ("exact", "mild", "hard")},
                      "fp": [res["false_positive"]["count"], res["false_positive"]["n"],
                             round(res["false_positive"]["rate"], 4)],
                      "thresholds": res["thresholds"], "seconds": res["seconds"],
                      "per_view": {v: {k: round(x, 3) for k, x in p["detection_rate"].items()
                                       if k in ("mild", "hard")} | {"fp": round(p["false_positive_rate"], 4)}
                                   for v, p in res["per_view"].items()}}))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
