"""The audit is not a membership oracle: groups are the site's own labels, and a group's
similarity statistics leave the site only for >= k images (site policy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from medisyn.audit.settings import load_site
from medisyn.audit.site_audit import OTHER_GROUP, audit_synthetic_at_site
from test_audit_common import FAST_AUDIT, small_npz

LABELLED = """
[site]
id = "hospital-a"
state_dir = "state"

[dataset]
path = "{npz}"
specialty = "radiology"
image_type = "breast ultrasound"
labels = {{ "0" = "benign", "1" = "malignant" }}

[privacy]
max_epsilon = 8.0

[audit]
""" + FAST_AUDIT


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oracle")
    npz = small_npz("breast", tmp / "breast_small.npz", n_train=150, n_val=60, n_test=40)
    toml = tmp / "site.toml"
    toml.write_text(LABELLED.format(npz=npz))
    data = np.load(npz)
    cfg, audit = load_site(toml)
    return {"cfg": cfg, "audit": audit, "train": data["train_images"], "new": data["test_images"], "tmp": tmp}


def _released(agg: dict) -> dict:
    """Every similarity statistic the aggregate releases, per group."""
    return {m["image_type"]: (m["similarity_quantiles"], m["histograms"], m["closer_to_train"])
            for m in [*agg["image_types"], agg["overall"]]}


def _audit(site, syn, name):
    return audit_synthetic_at_site(site["cfg"], syn, None, audit_config=site["audit"],
                                   out_dir=site["tmp"] / name, validate=False)


def test_probe_image_in_a_small_group_changes_no_released_statistic(site):
    """The coordinator puts one probe image under the site's own label prompt, among 24
    other images. Whether the probe is a training image or a new one, every released
    similarity statistic is identical; only the flag count (and the flagged id) differ."""
    filler = [(f"f{i}", site["new"][i], "radiology, chest x-ray, normal") for i in range(24)]
    label = "radiology, breast ultrasound, benign"
    member = _audit(site, [*filler, ("probe", site["train"][3], label)], "member")
    outsider = _audit(site, [*filler, ("probe", site["new"][30], label)], "outsider")
    for agg in (member, outsider):
        groups = {m["image_type"]: m for m in agg["image_types"]}
        assert set(groups) == {"breast ultrasound: benign", OTHER_GROUP}
        probe = groups["breast ultrasound: benign"]
        assert probe["n_synthetic"] == 1 and probe["similarity_quantiles"] == {}
        assert probe["histograms"] == {} and probe["closer_to_train"] is None
        assert "withheld" in probe["withheld"] and "k = 20" in probe["withheld"]
        assert agg["overall"]["n_synthetic"] == 25 and "24 of 25" in agg["overall"]["withheld"]
    assert _released(member) == _released(outsider)
    assert "probe" in member["flagged_ids"] and "probe" not in outsider["flagged_ids"]


def test_one_image_groups_of_the_coordinators_prompts_get_no_per_image_values(site):
    """25 images, each with its own prompt (one probe per 'image type' under the old
    grouping by the prompt's second field): they form one group of the site's choosing."""
    syn = [(f"p{i}", site["new"][i], f"radiology, probe type {i}, x") for i in range(25)]
    agg = _audit(site, syn, "probes")
    assert [m["image_type"] for m in agg["image_types"]] == [OTHER_GROUP]
    assert agg["image_types"][0]["n_synthetic"] == 25
    for m in [*agg["image_types"], agg["overall"]]:
        assert m["n_synthetic"] >= 20 or not m["similarity_quantiles"]
    few = _audit(site, syn[:5], "few")  # a small query: no statistic at all, counts only
    for m in [*few["image_types"], few["overall"]]:
        assert m["similarity_quantiles"] == {} and m["histograms"] == {} and m["closer_to_train"] is None
        assert isinstance(m["flagged"]["count"], int)


def test_groups_come_from_the_site_vocabulary_only(site):
    from medisyn.audit.site_audit import site_groups

    ds = site["cfg"].dataset
    got = site_groups(["radiology, breast ultrasound, malignant", "radiology, breast ultrasound",
                       "x, breast ultrasound, benign, extra", "radiology, breast ultrasound, benign"], ds)
    assert got == ["breast ultrasound: malignant", OTHER_GROUP, OTHER_GROUP, "breast ultrasound: benign"]
    assert Path(site["cfg"].dataset.path).name == "breast_small.npz"
