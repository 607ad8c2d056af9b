"""What the autoencoder alone costs: `medisyn evaluate` with the generated images replaced.

``--mode autoencoder``: each prompt's "generated" images are the shipped autoencoder's
reconstructions of n real training images of that label (encode to the latent mean,
decode). ``--mode real``: the same real training images, unreconstructed. Every other
step of the evaluation is the product's own (``medisyn.evaluation.evaluate_model``: the
classifiers, the encoder, the floors), so the two runs say how close a perfect UNet on
this autoencoder could come to real images (docs/quality.md, "an autoencoder with no
patient data"):

    python bench/autoencoder_ceiling.py --mode autoencoder --out bench/results/autoencoder/reconstructions-as-synthetic.json
    python bench/autoencoder_ceiling.py --mode real --out bench/results/autoencoder/real-as-synthetic.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

import medisyn.evaluation as ev
from medisyn.config import ModelConfig, load_dataset_config
from medisyn.data import to_model_space
from medisyn.models.components import build_components

DATA = Path(__file__).resolve().parent / "data"
TYPES = ("breast-us", "chest-xray", "fundus", "dermoscopy")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("autoencoder", "real"), required=True)
    ap.add_argument("--n-per-label", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    comp = build_components(ModelConfig(preset="tiny", resolution=32))
    dsets = [load_dataset_config(DATA / f"{t}.toml") for t in TYPES]
    by_prompt: dict[str, list[np.ndarray]] = {}
    for td in ev.load_types(dsets, 32).values():
        for c, p in enumerate(td.prompts):
            imgs = [img for cls, _i, img in td.raw_train if cls == c]
            pick = np.random.default_rng(a.seed + c).choice(len(imgs), size=min(a.n_per_label, len(imgs)),
                                                             replace=False)
            by_prompt[p] = [imgs[i] for i in pick]

    def fake_generate(components, prompts, s, clock, progress):  # noqa: ARG001 (evaluate_model's hook)
        out = []
        with torch.no_grad():
            for p in prompts:
                x = torch.stack([to_model_space(im, 32, 3) for im in by_prompt[p]])
                if a.mode == "autoencoder":
                    x = components.vae.decode(components.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
                    if by_prompt[p][0].ndim == 2:  # a grey type: generated channel-equal, as the product does
                        x = x.mean(1, keepdim=True).repeat(1, 3, 1, 1)
                out += [SimpleNamespace(prompt=p, image=Image.fromarray(ev._to_uint8(im))) for im in x]
        return out

    ev._generate = fake_generate
    res = ev.evaluate_model(comp, dsets, settings={"n_per_label": a.n_per_label, "seed": a.seed})
    res["ceiling_mode"] = a.mode
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    for t, e in res["types"].items():
        m, f = e["metrics"], e["floors"]
        print(f"{t}: type {m.get('type_recognised')}, label {m.get('label_alignment')}, "
              f"TSTR {m.get('tstr_balanced_accuracy')}, KID {m.get('kid')} (floor {f.get('kid')}), "
              f"recall {m.get('recall')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
