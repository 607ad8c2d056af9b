"""The training recipe's parts: balanced batches, min-SNR weighting, flips, EMA, prompt
length, grey output for grey image types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medisyn.config import DatasetConfig, TrainConfig
from medisyn.errors import ConfigError
from medisyn.generate import generate, is_grey_prompt
from medisyn.models import build_components, load_components, save_components
from medisyn.train import BalancedBatches, ShuffledBatches, UNetObjective, _snr, train_local


def test_balanced_batches_follow_count_power():
    # prompt 0: 900 records, prompt 1: 100 records
    pidx = torch.tensor([0] * 900 + [1] * 100)
    for power, want in ((1.0, 0.1), (0.5, 0.25), (0.0, 0.5)):
        src = BalancedBatches(pidx, 64, seed=3, power=power)
        drawn = torch.cat([src.batch(s) for s in range(200)])
        share = float((pidx[drawn] == 1).float().mean())
        assert share == pytest.approx(want, abs=0.03), (power, share)
    # a pure function of (seed, step): resume-safe
    a, b = BalancedBatches(pidx, 16, 1, 0.5), BalancedBatches(pidx, 16, 1, 0.5)
    assert torch.equal(a.batch(5), b.batch(5)) and not torch.equal(a.batch(5), a.batch(6))


def test_shuffled_batches_cover_an_epoch_once():
    src = ShuffledBatches(10, 5, seed=0)
    seen = torch.cat([src.batch(0), src.batch(1)])
    assert sorted(seen.tolist()) == list(range(10))


def test_min_snr_weight_down_weights_low_noise_steps(tiny_cfg):
    c = build_components(tiny_cfg)
    sched = c.noise_scheduler
    snr = _snr(sched, torch.tensor([10, 500, 990]))
    assert snr[0] > 5 > snr[2]  # low t: high SNR, clipped at gamma by the weight
    w = torch.clamp(snr, max=5.0) / (snr + 1)
    assert w[0] < w[1] and float(w[0]) == pytest.approx(5.0 / (float(snr[0]) + 1))


class _Data(torch.utils.data.Dataset):
    def __init__(self, images, prompts, flips):
        self.images, self.prompts, self.hflip = images, prompts, torch.tensor(flips)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "prompt": self.prompts[i]}


def test_unet_records_hold_mirror_latents_only_where_flips_are_allowed(tiny_cfg):
    c = build_components(tiny_cfg)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    obj = UNetObjective(c, _Data(x, ["a", "a", "b", "b"], [True, False, True, False]), TrainConfig(), torch.device("cpu"))
    mean, _, mean_f, _, flips, pidx = obj.records
    assert flips.tolist() == [True, False, True, False]
    assert not torch.allclose(mean, mean_f)  # the mirror image was encoded
    assert pidx.tolist() == [0, 0, 1, 1]
    none = UNetObjective(c, _Data(x, ["a"] * 4, [False] * 4), TrainConfig(), torch.device("cpu"))
    assert none.records[0] is none.records[2]  # no mirror pass when nothing may flip


def test_prompts_cut_to_the_same_tokens_are_refused(tiny_cfg):
    c = build_components(tiny_cfg.model_copy(update={"max_tokens": 16}))
    grades = [f"ophthalmology, fundus photograph, diabetic retinopathy grade {g}" for g in range(5)]
    with pytest.raises(ConfigError, match="max_tokens"):
        UNetObjective(c, _Data(torch.zeros(5, 3, 16, 16), grades, [False] * 5), TrainConfig(), torch.device("cpu"))
    ok = build_components(tiny_cfg.model_copy(update={"max_tokens": 32}))
    UNetObjective(ok, _Data(torch.zeros(5, 3, 16, 16), grades, [False] * 5), TrainConfig(), torch.device("cpu"))


def test_ema_weights_are_returned_and_differ_from_raw(tiny_cfg):
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    data = _Data(x, ["p"] * 8, [True] * 8)
    runs = {}
    for decay in (None, 0.0, 0.99):  # 0 (what TOML can say) is off, as None is
        c = build_components(tiny_cfg, seed=0)
        cfg = TrainConfig(batch_size=4, ema_decay=decay, lr=1e-2)
        runs[decay] = train_local(c, data, steps=6, config=cfg, stage="unet", progress=False).state
    k = next(iter(runs[None]))
    assert not torch.allclose(runs[None][k], runs[0.99][k])
    assert all(torch.equal(runs[None][n], runs[0.0][n]) for n in runs[None])


def test_grey_types_generate_channel_equal_images(tiny_cfg, tmp_path: Path):
    c = build_components(tiny_cfg)
    c.image_types = {"chest X-ray": {"channels": 1}, "dermoscopy": {"channels": 3}}
    save_components(c, tmp_path / "m")
    loaded = load_components(tmp_path / "m")
    assert loaded.image_types["chest X-ray"]["channels"] == 1
    grey, colour = generate(loaded, ["radiology, chest X-ray, normal", "dermatology, dermoscopy, benign"],
                            n_per_prompt=1, steps=2)
    g = np.asarray(grey.image)
    assert g.shape[-1] == 3 and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    col = np.asarray(colour.image).astype(int)
    assert np.abs(col[..., 0] - col[..., 1]).max() > 0  # a colour type keeps its colours


def test_grey_prompt_matching_is_by_whole_phrase():
    assert is_grey_prompt("radiology, chest X-ray, normal", {"chest x-ray"})
    assert not is_grey_prompt("radiology, chest X-rays of dogs", {"chest x-ray"})
    assert not is_grey_prompt("dermatology, dermoscopy, benign", set())


def test_dataset_hflip_defaults_off():
    assert DatasetConfig(path=Path("x.npz"), specialty="s", image_type="t").hflip is False
