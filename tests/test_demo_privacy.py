"""The demo's DP site: its plan spends what server/demo.py says and stays under its cap, in
the full demo (σ = 1 over 10 x 40 UNet steps: ε 4.22) and the quick one (two stages)."""

from __future__ import annotations

import numpy as np

from medisyn.config import load_site_config
from medisyn.privacy.accounting import default_delta, epsilon
from medisyn.privacy.dp import resolve_noise_multiplier
from server.demo import demo_assets, demo_config, write_site_configs


def _plan_epsilon(tmp_path, quick: bool) -> tuple[float, float]:
    site = load_site_config(write_site_configs(tmp_path, 9093, dp_site="breast-us", quick=quick)["breast-us"])
    fed = demo_config(tmp_path, 9093, quick=quick)
    n = len(np.load(demo_assets() / "breast-us" / "dataset.npz")["train_labels"])
    q, delta = fed.train.batch_size / n, default_delta(n)
    history = []
    for stage in fed.stages:
        steps = fed.steps_for(stage)
        sigma = resolve_noise_multiplier(site.privacy, delta=delta, sample_rate=q, planned_steps=steps)
        history.append((sigma, q, steps * fed.rounds_for(stage)))
    return epsilon(history, delta, kind=site.privacy.accountant), site.privacy.max_epsilon


def test_the_full_demo_dp_site_spends_what_its_comment_says_under_its_cap(tmp_path):
    eps, cap = _plan_epsilon(tmp_path, quick=False)
    assert abs(eps - 4.22) < 0.01 and eps < cap, eps


def test_the_quick_demo_dp_site_stays_under_its_cap(tmp_path):
    eps, cap = _plan_epsilon(tmp_path, quick=True)
    assert 0 < eps < cap, eps
