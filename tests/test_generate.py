from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medisyn.config import DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INTERVAL
from medisyn.generate import generate, write_generated
from medisyn.models import build_components, save_components


def test_generation_is_deterministic_by_seed(tiny_cfg):
    c = build_components(tiny_cfg)
    prompts = ["radiology, chest X-ray, normal", "dermatology, dermoscopy, benign"]
    a = generate(c, prompts, n_per_prompt=2, seed=7, steps=3)
    b = generate(c, prompts, n_per_prompt=2, seed=7, steps=3)
    d = generate(c, prompts, n_per_prompt=2, seed=8, steps=3)
    assert [g.prompt for g in a] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(d[0].image))
    # One image is reproducible alone from its seed.
    single = generate(c, [a[3].prompt], n_per_prompt=1, seed=a[3].seed, steps=3)
    assert np.array_equal(np.asarray(single[0].image), np.asarray(a[3].image))


def test_cli_generate_writes_pngs_sidecars_grid(tmp_path: Path, tiny_cfg):
    save_components(build_components(tiny_cfg), tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "medisyn.cli", "generate", "--model", str(tmp_path / "m"), "--prompt", "a",
                        "--prompt", "b", "--n", "2", "--out", str(tmp_path / "g"), "--steps", "2", "--scheduler", "ddim"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pngs = sorted(p for p in (tmp_path / "g").glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 4 and (tmp_path / "g" / "grid.png").is_file()
    side = json.loads(pngs[0].with_suffix(".json").read_text())
    assert {"prompt", "seed", "scheduler", "steps", "guidance", "model_hash"} <= set(side)
    assert side["scheduler"] == "ddim" and side["steps"] == 2


def test_write_generated_grid_has_one_row_per_prompt(tmp_path: Path, tiny_cfg):
    c = build_components(tiny_cfg)
    items = generate(c, ["x", "y", "z"], n_per_prompt=2, steps=2)
    write_generated(items, tmp_path, model_hash="h", steps=2, guidance=3.0, guidance_interval=None, scheduler="dpm")
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 16 * 2, 3 * 16 * 2)


def test_guidance_interval_switches_guidance_per_step(tiny_cfg):
    """Guidance limited to a noise interval: covering every step is plain guidance,
    covering none is the conditional prediction alone (guidance 1), part of the steps is
    neither; a bad interval is a named error."""
    from medisyn.errors import ConfigError

    c = build_components(tiny_cfg)
    kw = {"n_per_prompt": 2, "seed": 3, "steps": 6}
    as_array = lambda items: np.stack([np.asarray(g.image, dtype=np.int16) for g in items])  # noqa: E731
    plain = as_array(generate(c, ["radiology, chest X-ray, normal"], guidance=4.0, guidance_interval=None, **kw))
    uncond1 = as_array(generate(c, ["radiology, chest X-ray, normal"], guidance=1.0, **kw))
    every = as_array(generate(c, ["radiology, chest X-ray, normal"], guidance=4.0, guidance_interval=(0.0, 1e9), **kw))
    none = as_array(generate(c, ["radiology, chest X-ray, normal"], guidance=4.0, guidance_interval=(1e8, 1e9), **kw))
    abar = c.noise_scheduler.alphas_cumprod
    mid = float(((1 - abar[500]) / abar[500]).sqrt())  # a sigma inside the schedule
    part = as_array(generate(c, ["radiology, chest X-ray, normal"], guidance=4.0, guidance_interval=(0.0, mid), **kw))
    assert np.array_equal(every, plain)
    assert np.array_equal(none, uncond1)
    assert not np.array_equal(plain, uncond1)
    assert not np.array_equal(part, plain) and not np.array_equal(part, uncond1)
    with pytest.raises(ConfigError, match="guidance interval"):
        generate(c, ["x"], guidance=4.0, guidance_interval=(2.0, 1.0), **kw)
    # the default is the interval the sampler ships with
    assert np.array_equal(as_array(generate(c, ["radiology, chest X-ray, normal"], **kw)),
                          as_array(generate(c, ["radiology, chest X-ray, normal"], guidance=DEFAULT_GUIDANCE,
                                            guidance_interval=DEFAULT_GUIDANCE_INTERVAL, **kw)))


def test_parse_interval_names_bad_values():
    from medisyn.config import parse_interval
    from medisyn.errors import ConfigError

    assert parse_interval("0.5,10") == (0.5, 10.0)
    assert parse_interval("all") is None and parse_interval(None) is None
    for bad in ("5", "a,b", "10,0.5", "-1,2", "1,2,3", "nan,1", "0,inf"):
        with pytest.raises(ConfigError, match="--guidance-interval"):
            parse_interval(bad)


def test_site_verifies_images_made_with_a_guidance_interval(tiny_cfg):
    """The release audit's regeneration check reads the interval from the query's sampler
    settings: images made with it verify; the same images claimed as guided at every step
    (interval null) are refused, as is an interval that is not [lo, hi]."""
    from medisyn.audit.site_audit import AuditRefused, verify_synthetic

    c = build_components(tiny_cfg)
    prompt = "radiology, chest X-ray, normal"
    made = generate(c, [prompt], n_per_prompt=2, seed=5, steps=4, guidance=4.0, guidance_interval=(0.5, 10.0))
    synthetic = [(f"{k:05d}", np.asarray(g.image), g.prompt) for k, g in enumerate(made)]
    meta = json.dumps([{"id": i, "prompt": p, "seed": g.seed} for (i, _, p), g in zip(synthetic, made, strict=True)])

    def gen(interval):
        return json.dumps({"steps": 4, "guidance": 4.0, "scheduler": "dpm", "guidance_interval": interval})

    checked = verify_synthetic(c, synthetic, meta, gen([0.5, 10.0]), sample=None, tolerance=0.5)
    assert checked
    with pytest.raises(AuditRefused, match="not what the model makes"):
        verify_synthetic(c, synthetic, meta, gen(None), sample=None, tolerance=0.5)
    with pytest.raises(AuditRefused, match="cannot be verified"):
        verify_synthetic(c, synthetic, meta, gen([0.5, 10.0, 3.0]), sample=None, tolerance=0.5)
    with pytest.raises(AuditRefused, match="out of range"):
        verify_synthetic(c, synthetic, meta, gen([10.0, 0.5]), sample=None, tolerance=0.5)


def test_cli_names_a_bad_guidance_interval(tmp_path: Path, tiny_cfg):
    """A bad --guidance-interval is a named config error (exit 2), not a traceback; "all"
    samples with guidance at every step and the sidecar says so."""
    save_components(build_components(tiny_cfg), tmp_path / "m")
    base = [sys.executable, "-m", "medisyn.cli", "generate", "--model", str(tmp_path / "m"), "--prompt", "a",
            "--n", "1", "--steps", "2"]
    bad = subprocess.run(base + ["--out", str(tmp_path / "g"), "--guidance-interval", "10,0.5"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--guidance-interval '10,0.5'" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "g").exists()
    ok = subprocess.run(base + ["--out", str(tmp_path / "h"), "--guidance-interval", "all"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    side = json.loads(next((tmp_path / "h").glob("00000-*.json")).read_text())
    assert side["guidance_interval"] is None and side["guidance"] == DEFAULT_GUIDANCE
