from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medisyn.config import (
    DatasetConfig,
    ModelConfig,
    PrivacyConfig,
    config_hash,
    flatten,
    load_dataset_config,
    load_site_config,
    unflatten,
)
from medisyn.errors import ConfigError


def test_unknown_key_is_named(tmp_path: Path):
    p = tmp_path / "d.toml"
    p.write_text('[dataset]\npath = "x.npz"\nspecialty = "a"\nimage_type = "b"\nlabelz = {}\n')
    with pytest.raises(ConfigError, match=r"labelz: unknown key"):
        load_dataset_config(p)


def test_paths_resolve_relative_to_toml(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "d.toml"
    p.write_text('[dataset]\npath = "data.npz"\nspecialty = "a"\nimage_type = "b"\n')
    assert load_dataset_config(p).path == (tmp_path / "sub" / "data.npz").resolve()


def test_site_config_resolves_state_dir(tmp_path: Path):
    p = tmp_path / "site.toml"
    p.write_text(
        '[site]\nid = "h1"\nstate_dir = "state"\n[dataset]\npath = "d.npz"\nspecialty = "a"\nimage_type = "b"\n'
        '[superlink]\naddress = "127.0.0.1:1"\ninsecure = true\n'
    )
    cfg = load_site_config(p)
    assert cfg.site.state_dir == (tmp_path / "state").resolve()


def test_bad_caption_field():
    with pytest.raises(ValueError, match="caption template field"):
        DatasetConfig(path=Path("x"), specialty="a", image_type="b", caption="{modality}")


def test_privacy_needs_noise_or_target():
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivacyConfig(dp=True)
    PrivacyConfig(dp=True, target_epsilon=4.0, planned_rounds=3)


def test_model_resolution_must_fit_vae():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(resolution=31)  # the default VAE downsamples by 2


def test_tls_requires_certificates(tmp_path: Path):
    p = tmp_path / "site.toml"
    p.write_text(
        '[site]\nid = "h1"\nstate_dir = "s"\n[dataset]\npath = "d.npz"\nspecialty = "a"\nimage_type = "b"\n'
        '[superlink]\naddress = "h:1"\n'
    )
    with pytest.raises(ConfigError, match="root_certificates"):
        load_site_config(p)


keys = st.text(alphabet="abcdefgh_-", min_size=1, max_size=6)
leaves = st.one_of(
    st.integers(), st.booleans(), st.text(max_size=10).filter(lambda s: not s.startswith("json:")),
    st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(), max_size=3),
)
nested = st.recursive(leaves, lambda children: st.dictionaries(keys, children, min_size=1, max_size=4), max_leaves=12)


@given(st.dictionaries(keys, nested, max_size=5))
def test_flatten_roundtrip(d):
    assert unflatten(flatten(d)) == d


def test_flatten_model_config_roundtrip():
    cfg = ModelConfig()
    flat = flatten(cfg.model_dump(mode="json"))
    assert all(isinstance(v, str | int | float | bool) for v in flat.values())
    assert ModelConfig.model_validate(unflatten(flat)) == cfg
    assert config_hash(cfg) == config_hash(ModelConfig.model_validate(unflatten(flat)))


def test_flatten_rejects_nan():
    with pytest.raises(ConfigError, match="not finite"):
        flatten({"a": float("nan")})
