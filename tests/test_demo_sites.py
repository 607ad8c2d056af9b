"""The demo's sites: the DP site's plan spends what server/demo.py says and stays under its
cap, in the full demo (σ = 1.6 over 10 x 36 UNet steps from 199 records: ε 5.39) and the
quick one (two stages); the sites hold the vendored samples DEMO_SITE_DATA names, the two
chest X-ray shares disjoint."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from medisyn.config import load_site_config
from medisyn.data import load_dataset
from medisyn.privacy.accounting import default_delta, epsilon
from medisyn.privacy.dp import resolve_noise_multiplier
from server.demo import (
    DEMO_DP_SITE,
    DEMO_SITES,
    demo_assets,
    demo_config,
    write_share,
    write_site_configs,
)


def _plan_epsilon(tmp_path, quick: bool) -> tuple[float, float]:
    site = load_site_config(write_site_configs(tmp_path, 9093, dp_site=DEMO_DP_SITE, quick=quick)[DEMO_DP_SITE])
    fed = demo_config(tmp_path, 9093, quick=quick)
    n = len(np.load(site.only_dataset.path)["train_labels"])
    q, delta = fed.train.batch_size / n, default_delta(n)
    history = []
    for stage in fed.stages:
        steps = fed.steps_for(stage)
        sigma = resolve_noise_multiplier(site.privacy, delta=delta, sample_rate=q, planned_steps=steps)
        history.append((sigma, q, steps * fed.rounds_for(stage)))
    return epsilon(history, delta, kind=site.privacy.accountant), site.privacy.max_epsilon


def test_the_full_demo_dp_site_spends_what_its_comment_says_under_its_cap(tmp_path):
    eps, cap = _plan_epsilon(tmp_path, quick=False)
    assert abs(eps - 5.39) < 0.01 and eps < cap, eps


def test_the_quick_demo_dp_site_stays_under_its_cap(tmp_path):
    eps, cap = _plan_epsilon(tmp_path, quick=True)
    assert 0 < eps < cap, eps


def test_the_demo_sites_hold_four_types_and_the_dp_sites_type_is_also_held_elsewhere(tmp_path):
    paths = write_site_configs(tmp_path, 9093, dp_site=DEMO_DP_SITE)
    assert list(paths) == list(DEMO_SITES)
    sites = {s: load_site_config(p) for s, p in paths.items()}
    types = {s: [d.image_type for d in c.datasets] for s, c in sites.items()}
    assert types["eye-skin"] == ["fundus photograph", "dermoscopy"]
    assert sorted(t for ts in types.values() for t in ts) == sorted(
        ["breast ultrasound", "paediatric chest X-ray", "paediatric chest X-ray", "fundus photograph", "dermoscopy"])
    dp_type = types[DEMO_DP_SITE]
    assert any(dp_type[0] in ts for s, ts in types.items() if s != DEMO_DP_SITE)
    assert sites[DEMO_DP_SITE].privacy.dp and not any(c.privacy.dp for s, c in sites.items() if s != DEMO_DP_SITE)


def test_the_two_chest_xray_shares_are_disjoint_two_to_one_and_together_the_vendored_sample(tmp_path):
    paths = write_site_configs(tmp_path, 9093)
    shares = [np.load(load_site_config(paths[s]).only_dataset.path) for s in ("chest-xray", DEMO_DP_SITE)]
    whole = np.load(demo_assets() / "chest-xray" / "dataset.npz")
    for split in ("train", "val", "test"):
        a, b = (h[f"{split}_images"] for h in shares)
        assert not {x.tobytes() for x in a} & {x.tobytes() for x in b}, split
        assert len(a) + len(b) == len(whole[f"{split}_images"])
        for v in np.unique(whole[f"{split}_labels"]):  # each label dealt 2 : 1
            na, nb = (int((h[f"{split}_labels"] == v).sum()) for h in shares)
            assert abs(na - 2 * nb) <= 2, (split, v, na, nb)
    # the site reads its share (the loader's own checks pass) and a second write reuses it
    ds = load_dataset(load_site_config(paths["chest-xray"]).only_dataset, resolution=32, channels=1, splits=["train"])
    assert len(ds) == len(shares[0]["train_labels"])
    again = write_site_configs(tmp_path, 9093)
    assert load_site_config(again["chest-xray"]).only_dataset.path == load_site_config(paths["chest-xray"]).only_dataset.path


def test_a_demo_site_with_no_vendored_sample_or_a_bad_share_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="demo site 'oncology': no vendored sample 'oncology'"):
        write_site_configs(tmp_path, 9093, sites=["oncology"])
    with pytest.raises(ValueError, match=r"share \(2, 2, 3\) of .*chest-xray"):
        write_share(demo_assets() / "chest-xray" / "dataset.npz", (2, 2, 3), tmp_path / "x.npz")


def test_a_dp_site_the_demo_does_not_run_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="dp_site 'chest-xray-dp' is not one of the demo's sites: breast-us"):
        write_site_configs(tmp_path, 9093, sites=["breast-us"], dp_site=DEMO_DP_SITE)
    assert not (tmp_path / "sites").exists()


def test_the_demo_draws_one_grid_per_image_type_once_although_two_sites_hold_chest_xrays(tmp_path):
    from PIL import Image

    from medisyn.data import label_prompts
    from server.demo import grids_from_audit

    paths = write_site_configs(tmp_path, 9093)
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    prompts = sorted({p for s in paths.values() for ds in load_site_config(s).datasets
                      for p in label_prompts(ds).values()})
    for i, prompt in enumerate(prompts * 2):  # two images per prompt, as the audit leaves them
        Image.new("RGB", (8, 8), (i * 7 % 255, 0, 0)).save(synthetic / f"{i:03d}.png")
        (synthetic / f"{i:03d}.json").write_text(json.dumps({"prompt": prompt}))
    grids = grids_from_audit(synthetic, paths, tmp_path / "out")
    samples = tmp_path / "out" / "samples"
    assert grids == {"breast ultrasound": samples / "breast-us" / "grid.png",
                     "paediatric chest X-ray": samples / "chest-xray" / "grid.png",
                     "fundus photograph": samples / "eye-skin" / "fundus-photograph" / "grid.png",
                     "dermoscopy": samples / "eye-skin" / "dermoscopy" / "grid.png"}
    assert sorted(samples.rglob("grid.png")) == sorted(grids.values())
    # rows: the type's labels (fundus: five grades), columns: the images of each prompt
    assert Image.open(grids["fundus photograph"]).size[1] > Image.open(grids["dermoscopy"]).size[1]


def test_the_demo_refuses_a_dp_site_it_does_not_have_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from medisyn.cli import app

    res = CliRunner().invoke(app, ["demo", "--dp-site", "fundus", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 2, res.output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.output).split())  # the message as one line, without rich's box
    assert "'fundus' is not one of the demo's sites: breast-us, chest-xray, eye-skin, chest-xray-dp" in text, text
    assert not (tmp_path / "demo").exists()
