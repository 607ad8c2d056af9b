"""Why the federated chain trails pooled training: the same recipe in one process, fed in
the federation's order.

The study (``bench/study.py``, docs/quality.md) found the federated generalist below the
sites' specialists at an equal budget while pooled training beats them. This script asks
whether that gap comes from the federation's mechanics (per-site AdamW moments, a fresh
EMA each visit, prompt anchoring, Flower) or from the order of the data alone: it trains
the study's recipe (``bench/federated.toml``) in this process with ONE optimizer, ONE EMA
and one learning-rate schedule over the four shared datasets, and only the batches change:

- ``pooled``: the central recipe (label-balanced batches over all four types).
- ``blocks``: the cyclic chain's order: every round, ``--alloc`` steps of one site after
  another (default 6 each: the study's cyclic 32 x 6), the order rotating by one site
  each round; a site holds one image type (``--sites 0,1,2,3``) or several
  (``--sites 0+1,2+3``: two sites of two types, ``--alloc 12,12``); batches
  label-balanced within the site's types, or with each of the site's types given an equal
  share (``--type-mix equal``; ``blocks`` and ``scaffold`` only). ``--visit-ema`` gives
  the chain the Flower sites' EMA: a fresh one per visit, whose weights the next visit
  starts from. ``--site-moments`` gives each site its own AdamW moments (kept between its
  visits, as ``[train] keep_optimizer_state``), ``--anchor`` the sites' prompt anchoring
  (at each visit the other sites' prompts held to the model the visit started from,
  ``[train] anchor_weight`` / ``anchor_fraction``).
- ``scaffold``: ``blocks`` plus a SCAFFOLD-style drift correction (Karimireddy et al. 2020):
  each step's gradient gets ``mean_j c_j - c_i``, where ``c_j`` is type j's mean gradient
  over its last block.
- ``replay``: ``blocks`` plus generative replay: every round the live model draws
  ``--replay-per-prompt`` images of every prompt (``--replay-steps`` sampler steps,
  ``--replay-guidance``), and each batch holds ``--replay-per-batch`` of them from the
  other types beside the block type's real records (the batch stays ``batch_size``).

Every model is judged by ``medisyn evaluate``'s code (``--n-per-label`` images per label)
and the counts against the specialists of a study result (``--specialists``: a
``study.json`` with arm c) go to ``--results``. The batch orders replace
``medisyn.train.batch_source`` / ``PlainStepper`` methods in this process only.

    python bench/chain_order.py --mode blocks --out runs/chain/blocks \
        --results bench/results/chain-order/blocks.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import medisyn.train as T  # noqa: E402
from medisyn.cli import _load_model_train_config  # noqa: E402
from medisyn.config import load_dataset_config  # noqa: E402
from medisyn.data import ConcatImageDataset, image_type_info, load_dataset  # noqa: E402
from medisyn.models import build_components, save_components  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from study import kid_beyond_noise  # noqa: E402

SITES = ("breast-us", "chest-xray", "fundus", "dermoscopy")


def _shown(path: Path) -> str:
    """A path as the summary records it: relative to the repository where it lies inside."""
    p = path.resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


MODES = ("pooled", "blocks", "scaffold", "replay")
BLOCK_BATCHES = ("blocks", "scaffold")  # modes whose batches come from block_source
COMPARED = ("label_alignment", "tstr_balanced_accuracy", "kid")


class Order:
    """Which site a step trains on: rounds of ``alloc[g]`` steps per site g, one site after
    another, the order rotating by one site each round. A site holds the image types
    ``groups[g]`` (default: one type each, as in the study)."""

    def __init__(self, alloc: list[int], groups: list[list[int]]):
        self.alloc, self.groups, self.n = alloc, groups, len(alloc)

    def site_of(self, step: int) -> int:
        """The site (group of image types) of ``step``."""
        rnd, pos = divmod(step, sum(self.alloc))
        for k in range(self.n):
            t = (k + rnd) % self.n
            if pos < self.alloc[t]:
                return t
            pos -= self.alloc[t]
        raise AssertionError("unreachable")

    def round_of(self, step: int) -> int:
        return step // sum(self.alloc)


def block_source(order: Order, bounds: torch.Tensor, cut: int = 0, type_mix: str = "prompt"):
    """A batch source like ``BalancedBatches`` but drawing only the step's site's image
    types (``cut`` records fewer per batch, for replay). ``type_mix``: ``prompt`` keeps
    ``BalancedBatches``' per-prompt weights within the site; ``equal`` gives each of the
    site's image types the same share of its batches."""

    class BlockBatches(T.BalancedBatches):
        def __init__(self, prompt_index: torch.Tensor, batch_size: int, seed: int, power: float):
            super().__init__(prompt_index, batch_size - cut, seed, power)
            rec_type = torch.bucketize(torch.arange(len(prompt_index)), bounds, right=True)
            self.per_type = []
            for g in order.groups:
                w = torch.where(torch.isin(rec_type, torch.tensor(g)), self.weights, torch.zeros_like(self.weights))
                if type_mix == "equal":
                    for t in g:
                        w = torch.where(rec_type == t, w / w[rec_type == t].sum(), w)
                self.per_type.append(w / w.sum())

        def batch(self, step: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(self.seed + 104729 * step)
            return torch.multinomial(self.per_type[order.site_of(step)], self.batch_size, replacement=True,
                                     generator=g)

    return lambda objective, config, seed: BlockBatches(objective.prompt_index, config.batch_size, seed,
                                                        config.balance_power)


def install_scaffold(order: Order) -> None:
    """Each step: grad += mean_j c_j - c_i once every type has a control variate."""
    st: dict[str, Any] = {"step": 0, "c": {}, "acc": None, "n": 0, "cur": None}

    def apply(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t = order.site_of(st["step"])
        if st["cur"] is not None and t != st["cur"]:
            st["c"][st["cur"]] = [a / st["n"] for a in st["acc"]]
            st["acc"], st["n"] = None, 0
        st["cur"] = t
        grads = [p.grad.detach().clone() for p in self.params]
        st["acc"] = grads if st["acc"] is None else [a + g for a, g in zip(st["acc"], grads, strict=True)]
        st["n"] += 1
        cs = st["c"]
        if len(cs) == order.n:
            for j, p in enumerate(self.params):
                p.grad.add_(sum(cs[k][j] for k in cs) / len(cs) - cs[t][j])
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        st["step"] += 1

    T.PlainStepper.apply = apply


def _visit_starts(order: Order, step: int) -> bool:
    """Whether ``step`` starts a visit: the first step, another site, or a new round."""
    return step == 0 or (order.site_of(step), order.round_of(step)) != (order.site_of(step - 1),
                                                                         order.round_of(step - 1))


def install_visit_ema(order: Order) -> None:
    """The federated chain's EMA in one process: at every change of site the EMA's weights
    become the model's (as a site returns them and the next site starts from them) and a
    fresh EMA with warm-up starts, so the model released is the last visit's average."""

    class VisitEMA(T.EMAHook):
        def after_step(self, step: int) -> None:
            super().after_step(step)
            if _visit_starts(order, step):  # ``step`` (the next one) starts another visit
                self.ema.copy_to(self.params)
                for shadow, p in zip(self.ema.shadow_params, self.params, strict=True):
                    shadow.copy_(p.detach())
                self.ema.optimization_step = 0

    T.EMAHook = VisitEMA


def install_site_moments(order: Order) -> None:
    """Per-site AdamW moments: at each visit the optimizer's state becomes the one this
    site left at the end of its last visit (fresh at its first), as a Flower site with
    ``keep_optimizer_state`` restores it from its state directory."""
    from collections import defaultdict

    kept: dict[int, Any] = {}
    st = {"step": 0, "site": None}
    plain_apply = T.PlainStepper.apply

    def apply(self, loss: torch.Tensor) -> None:
        step, site = st["step"], order.site_of(st["step"])
        if _visit_starts(order, step):
            if st["site"] is not None:
                kept[st["site"]] = self.optimizer.state
            self.optimizer.state = kept.pop(site, None) or defaultdict(dict)
            st["site"] = site
        plain_apply(self, loss)
        st["step"] += 1

    T.PlainStepper.apply = apply


def install_anchor(order: Order, bounds: torch.Tensor) -> None:
    """Prompt anchoring as the Flower sites do it: each visit, the prompts of the other
    sites' image types are held (``anchor_weight``, on ``anchor_fraction`` of the batch)
    to what the model predicted for them when the visit started."""
    import copy

    class VisitAnchor(T.PromptAnchorHook):
        def __init__(self, objective: Any, module: torch.nn.Module, prompts: list[str], weight: float,
                     fraction: float):  # the parent drops prompts in the objective's vocab: here that is all
            self.objective, self.weight, self.fraction, self.prompts = objective, weight, fraction, prompts
            self.teacher = copy.deepcopy(module).eval().requires_grad_(False)
            self.embeddings = objective.c.prompt_encoder.encode(prompts, device=objective.device)
            self._public = None

    plain_step = T.PlainStepper.train_step

    def train_step(self, module: torch.nn.Module, step: int, gen: torch.Generator, stage: str):
        if _visit_starts(order, step):
            obj = self.objective
            rec_type = torch.bucketize(torch.arange(len(obj.prompt_index)), bounds, right=True)
            own = torch.tensor(order.groups[order.site_of(step)])
            others = obj.prompt_index[~torch.isin(rec_type, own)].unique().tolist()
            self.anchor = VisitAnchor(obj, module, sorted(obj.vocab[i] for i in others),
                                      self.config.anchor_weight, self.config.anchor_fraction)
        return plain_step(self, module, step, gen, stage)

    T.PlainStepper.train_step = train_step


def install_replay(order: Order, bounds: torch.Tensor, args: argparse.Namespace) -> None:
    """Each round the live model draws images of every prompt; a batch then holds
    ``replay_per_batch`` of those of the other types."""
    from medisyn.generate import generate

    r = args.replay_per_batch
    st: dict[str, Any] = {"round": -1}
    plain_next = T.PlainStepper.next_batch

    def refill(obj: Any, rnd: int) -> None:
        unet = obj.c.unet
        was = unet.training
        unet.eval()
        prompts = obj.vocab[:-1]
        g = args.replay_guidance
        with torch.no_grad():
            made = generate(obj.c, prompts, n_per_prompt=args.replay_per_prompt, seed=1000 + 7919 * rnd,
                            steps=args.replay_steps, guidance=g, guidance_interval=None if g <= 1 else (0.5, 10.0),
                            batch_size=64)
        unet.train(was)
        imgs = torch.stack([torch.from_numpy(np.asarray(m.image.convert("RGB"), dtype=np.float32) / 127.5 - 1)
                            .permute(2, 0, 1) for m in made])
        mean, std = obj._encode(imgs)
        pidx = torch.tensor([prompts.index(m.prompt) for m in made])
        st["pool"] = (mean, std, mean, std, torch.zeros(len(made), dtype=torch.bool), pidx)
        rec_type = torch.bucketize(torch.arange(len(obj.prompt_index)), bounds, right=True)
        ptype: dict[int, int] = {}
        for i, pi in enumerate(obj.prompt_index.tolist()):
            ptype.setdefault(pi, int(rec_type[i]))
        st["ptype"] = torch.tensor([ptype[int(i)] for i in pidx])
        st["round"] = rnd

    def next_batch(self, step: int):
        if order.round_of(step) != st["round"]:
            refill(self.objective, order.round_of(step))
        own = plain_next(self, step)
        own_types = torch.tensor(order.groups[order.site_of(step)])
        others = torch.nonzero(~torch.isin(st["ptype"], own_types)).flatten()
        pick = others[torch.randint(0, len(others), (r,), generator=torch.Generator().manual_seed(555 + step))]
        return tuple(torch.cat([a, b[pick].to(a.dtype)]) for a, b in zip(own, st["pool"], strict=True))

    T.PlainStepper.next_batch = next_batch
    T.batch_source = block_source(order, bounds, cut=r)


def against_specialists(types: dict[str, Any], specialists: dict[str, Any]) -> dict[str, Any]:
    """Per compared metric, the image types where this model is at least as good as the
    type's specialist (KID: lower is better)."""
    out: dict[str, Any] = {}
    for k in COMPARED:
        good = [t for t in types if t in specialists and (
            types[t]["metrics"][k] <= specialists[t]["metrics"][k] if k == "kid"
            else types[t]["metrics"][k] >= specialists[t]["metrics"][k])]
        out[k] = {"types_at_least_as_good": good, "count": len(good)}
    # KID beyond twice the combined jackknife error: the study's own rule
    out["kid"].update(kid_beyond_noise(types, specialists, list(types)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--out", type=Path, required=True, help="model and evaluation go here")
    ap.add_argument("--results", type=Path, help="summary JSON (with the evaluation's per-type metrics)")
    ap.add_argument("--config", type=Path, default=ROOT / "bench" / "federated.toml")
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "data", help="folder of <site>.toml")
    ap.add_argument("--steps", type=int, default=768)
    ap.add_argument("--alloc", default="6,6,6,6", help="steps per site per round")
    ap.add_argument("--sites", default="0,1,2,3",
                    help="image types per site: 0 breast, 1 CXR, 2 fundus, 3 derm; '0+1,2+3' = two sites of two")
    ap.add_argument("--type-mix", choices=("prompt", "equal"), default="prompt",
                    help="blocks: a site's types weighted per prompt (count**balance_power) or equally")
    ap.add_argument("--visit-ema", action="store_true",
                    help="a fresh EMA per visit, whose weights the next visit starts from (as in Flower)")
    ap.add_argument("--site-moments", action="store_true",
                    help="each site its own AdamW moments, kept between its visits (keep_optimizer_state)")
    ap.add_argument("--anchor", action="store_true",
                    help="each visit, the other sites' prompts anchored to the visit's starting model")
    ap.add_argument("--threads", type=int, help="torch threads for training (default: the config's)")
    ap.add_argument("--replay-per-batch", type=int, default=16)
    ap.add_argument("--replay-per-prompt", type=int, default=16)
    ap.add_argument("--replay-steps", type=int, default=10)
    ap.add_argument("--replay-guidance", type=float, default=1.0)
    ap.add_argument("--n-per-label", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--specialists", type=Path,
                    default=ROOT / "bench" / "results" / "study-32-rounds-cyclic-interval-kid-se" / "study.json")
    args = ap.parse_args(argv)
    if args.type_mix != "prompt" and args.mode not in BLOCK_BATCHES:
        ap.error(f"--type-mix {args.type_mix!r}: only with --mode blocks or scaffold (not {args.mode!r})")
    for flag in ("visit_ema", "site_moments", "anchor"):
        if getattr(args, flag) and args.mode == "pooled":
            ap.error(f"--{flag.replace('_', '-')}: pooled training has no visits (use --mode blocks, scaffold or replay)")
    if args.site_moments and args.mode == "scaffold":
        ap.error("--site-moments: scaffold replaces the optimizer step itself; use --mode blocks or replay")

    model_cfg, train_cfg = _load_model_train_config(args.config, "tiny", args.seed)
    if args.threads:
        train_cfg = train_cfg.model_copy(update={"num_threads": args.threads})
    dcfgs = [load_dataset_config(args.data / f"{s}.toml") for s in SITES]
    parts = [load_dataset(d, resolution=model_cfg.resolution, channels=model_cfg.channels, splits=d.split.train)
             for d in dcfgs]
    bounds = torch.cumsum(torch.tensor([len(p) for p in parts]), 0)
    groups = [[int(t) for t in g.split("+")] for g in args.sites.split(",")]
    if sorted(t for g in groups for t in g) != list(range(len(SITES))):
        ap.error(f"--sites {args.sites!r}: every image type 0-{len(SITES) - 1} at exactly one site")
    order = Order([int(x) for x in args.alloc.split(",")], groups)
    if len(order.alloc) != len(groups) or min(order.alloc) < 1:
        ap.error(f"--alloc {args.alloc!r}: needs {len(groups)} positive step counts (one per site)")
    if args.mode in BLOCK_BATCHES:
        T.batch_source = block_source(order, bounds, type_mix=args.type_mix)
    if args.visit_ema:
        install_visit_ema(order)
    if args.site_moments:
        install_site_moments(order)
    if args.anchor:
        install_anchor(order, bounds)
    if args.mode == "scaffold":
        install_scaffold(order)
    if args.mode == "replay":
        install_replay(order, bounds, args)

    c = build_components(model_cfg, seed=train_cfg.seed)
    c.image_types = {**c.image_types, **image_type_info(parts)}
    t0 = time.time()
    r = T.train_local(c, ConcatImageDataset(parts), steps=args.steps, config=train_cfg, stage="unet",
                      site_id="central", progress=False)
    train_s = time.time() - t0
    print(f"{args.mode}: {args.steps} steps in {train_s:.0f} s, loss {r.metrics['loss']:.4f}", flush=True)
    save_components(c, args.out / "model", extra={"config_hash": f"chain-order-{args.mode}"})

    # judged exactly as a user would: `medisyn evaluate` on the saved model
    import subprocess

    cmd = [sys.executable, "-m", "medisyn.cli", "evaluate", "--model", str(args.out / "model"),
           "--n-per-label", str(args.n_per_label), "--out", str(args.out / "evaluation")]
    for s in SITES:
        cmd += ["--data", str(args.data / f"{s}.toml")]
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = json.loads((args.out / "evaluation" / "evaluation.json").read_text())
    if args.results:
        spec = {}
        if args.specialists.is_file():
            spec = json.loads(args.specialists.read_text())["arms"]["c"]["evaluation"]["types"]
        summary = {
            "kind": "medisyn-chain-order", "mode": args.mode, "steps": args.steps, "alloc": order.alloc,
            "sites": [[SITES[t] for t in g] for g in groups],
            "type_mix": args.type_mix if args.mode in BLOCK_BATCHES else None,
            "visit_ema": args.visit_ema, "site_moments": args.site_moments,
            "anchor": ({"weight": train_cfg.anchor_weight, "fraction": train_cfg.anchor_fraction}
                       if args.anchor else None),
            "replay": ({k: getattr(args, k) for k in ("replay_per_batch", "replay_per_prompt", "replay_steps",
                                                      "replay_guidance")} if args.mode == "replay" else None),
            "config": _shown(args.config),
            "seed": args.seed, "train_seconds": round(train_s, 1), "final_loss": r.metrics["loss"],
            "threads": torch.get_num_threads(), "specialists": _shown(args.specialists) if spec else None,
            "against_specialists": against_specialists(result["types"], spec) if spec else None,
            "types": {t: {"metrics": e.get("metrics"), "floors": e.get("floors")} for t, e in result["types"].items()},
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(summary, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
