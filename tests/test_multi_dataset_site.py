"""A site that holds several datasets (``[[dataset]]`` tables, one image type each): the
config, training on all of them (one ε ledger over every record), the prompts query, the
copy-detection audit (one calibrated aggregate per dataset, checked and gated by the
coordinator) and the federated evaluation (one entry per image type). In process, with
the real ClientApp; real processes: tests/integration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medisyn import protocol as P
from medisyn.errors import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "medisyn" / "assets" / "demo"
AUDIT_FAST = "[audit]\ncontrastive_steps = 8\ncontrastive_batch = 32\nn_plant = 20\nthreads = 1\n"
DP = '[privacy]\ndp = true\nnoise_multiplier = 1.0\nmax_epsilon = 50.0\naccountant = "rdp"\n'


def multi_site(tmp: Path, site_id: str, demo_sites: list[str], extra: str = "") -> Path:
    """A site TOML with one ``[[dataset]]`` table per demo dataset."""
    d = tmp / "sites" / site_id
    d.mkdir(parents=True, exist_ok=True)
    tables = [(DEMO / s / "dataset.toml").read_text()
              .replace('path = "dataset.npz"', f'path = "{(DEMO / s / "dataset.npz").as_posix()}"')
              .replace("[dataset]", "[[dataset]]") for s in demo_sites]
    p = d / "site.toml"
    p.write_text(f'[site]\nid = "{site_id}"\nstate_dir = "state"\n\n' + "\n".join(tables)
                 + f"\n{extra}\n[superlink]\naddress = \"127.0.0.1:9092\"\ninsecure = true\n")
    return p


def n_train(demo_site: str) -> int:
    from medisyn.config import load_dataset_config
    from medisyn.data import read_raw

    ds = load_dataset_config(DEMO / demo_site / "dataset.toml")
    return len(read_raw(ds).indices(ds.split.train))


def test_config_lists_every_dataset_and_names_a_repeated_image_type(tmp_path):
    from medisyn.config import (
        DatasetConfig,
        load_dataset_config,
        load_dataset_configs,
        load_site_config,
    )

    p = multi_site(tmp_path, "general", ["breast-us", "dermoscopy"])
    site = load_site_config(p)
    assert [d.image_type for d in site.datasets] == ["breast ultrasound", "dermoscopy"]
    assert all(d.path.is_absolute() and d.path.is_file() for d in site.datasets)
    assert [s.only_dataset.image_type for s in site.per_dataset()] == ["breast ultrasound", "dermoscopy"]
    assert all(s.site == site.site and s.privacy == site.privacy for s in site.per_dataset())
    assert set(site.data_paths()) >= {str(d.path) for d in site.datasets}
    with pytest.raises(ConfigError, match="holds 2 datasets"):
        _ = site.only_dataset
    # medisyn train / evaluate / data check take every table; the one-dataset loader says why not
    assert [d.image_type for d in load_dataset_configs(p)] == ["breast ultrasound", "dermoscopy"]
    with pytest.raises(ConfigError, match=r"2 \[\[dataset\]\] tables where one dataset is expected"):
        load_dataset_config(p)
    # one [[dataset]] table is the same as a [dataset] table
    one = load_site_config(multi_site(tmp_path, "one", ["fundus"]))
    assert isinstance(one.dataset, DatasetConfig) and one.only_dataset.image_type == "fundus photograph"
    with pytest.raises(ConfigError, match="tables 1 and 2 both have image_type 'fundus photograph'"):
        load_site_config(multi_site(tmp_path, "dup", ["fundus", "fundus"]))
    with pytest.raises(ConfigError, match="image_type 'fundus photograph'"):
        load_dataset_configs(multi_site(tmp_path, "dup2", ["fundus", "fundus"]))


def test_a_bad_table_is_named_by_its_number_and_key(tmp_path):
    """An error in one [[dataset]] table names the table (counted from 1) and the key, and
    only that: not the other shape the union would also accept."""
    from medisyn.config import load_site_config

    base = '[site]\nid = "x"\nstate_dir = "s"\n'
    ok = '[[dataset]]\npath = "a.npz"\nspecialty = "r"\nimage_type = "t"\n'
    cases = {
        ok + '[[dataset]]\npath = "b.npz"\nspecialty = "r"\n': ["[[dataset]] 2.image_type: Field required"],
        ok + '[[dataset]]\npath = "b.npz"\nspecialty = "r"\nimage_type = "u"\ncolour = 1\n':
            ["[[dataset]] 2.colour: unknown key (got 1)"],
        '[dataset]\npath = "b.npz"\nspecialty = "r"\n': ["dataset.image_type: Field required"],
    }
    for i, (tables, lines) in enumerate(cases.items()):
        p = tmp_path / f"s{i}.toml"
        p.write_text(base + tables)
        with pytest.raises(ConfigError) as e:
            load_site_config(p)
        assert str(e.value).splitlines()[1:] == [f"  {line}" for line in lines], str(e.value)


def test_a_two_dataset_dp_site_trains_on_both_with_one_ledger_and_names_both_types(tmp_path):
    """Federation in process: "general" holds breast ultrasound and dermoscopy under DP-SGD,
    "chest-xray" one dataset. general's Poisson rate is over both datasets' records, its
    prompts answer lists both types, and the final model knows all three."""
    from medisyn.client.app import app as client_app
    from medisyn.client.site import node_config_for
    from medisyn.server import federation as fed
    from test_federation_units import LocalGrid, fed_cfg, write_site

    from medisyn.models import load_components

    general = multi_site(tmp_path, "general", ["breast-us", "dermoscopy"], extra=DP)
    cxr = write_site(tmp_path, "chest-xray")
    nodes = {1000: node_config_for(general, general.parent / "state"), 1001: node_config_for(cxr, cxr.parent / "state")}
    cfg = fed_cfg(tmp_path, stages=["unet"], sites=["general", "chest-xray"])
    grid = LocalGrid(nodes, client_app)
    assert fed.run_federation(grid, cfg) == fed.Outcome.DONE
    (rec,) = fed.iter_metrics(cfg.run_dir)
    assert rec["answered"] == 2 and rec["failed"] == 0
    ledger = json.loads((general.parent / "state" / "privacy-ledger.json").read_text())
    (entry,) = ledger["entries"]
    n = n_train("breast-us") + n_train("dermoscopy")
    assert entry["q"] == pytest.approx(cfg.train.batch_size / n)
    assert rec["sites"]["general"]["epsilon"] > 0
    answers = {r.content.config_records["site"]["site-id"]: json.loads(r.content.config_records[P.RESULT][P.RESULT_JSON])
               for r in grid.query_replies}
    types = answers["general"][P.PROMPTS_TYPES]
    assert set(types) == {"breast ultrasound", "dermoscopy"} and P.PROMPTS_IMAGE_TYPE not in answers["general"]
    assert types["breast ultrasound"][P.PROMPTS_CHANNELS] == 1 and types["dermoscopy"][P.PROMPTS_CHANNELS] == 3
    assert sorted(answers["general"][P.QUERY_PROMPTS]) == sorted(
        types["breast ultrasound"][P.QUERY_PROMPTS] + types["dermoscopy"][P.QUERY_PROMPTS])
    final = load_components(cfg.run_dir / "model")
    assert set(final.image_types) == {"breast ultrasound", "dermoscopy", "paediatric chest X-ray"}
    assert final.image_types["breast ultrasound"]["channels"] == 1
    assert final.image_types["dermoscopy"]["specialty"] == "dermatology"
    secrets = [str(tmp_path), str(DEMO)]
    for answer in answers.values():
        assert not any(s in json.dumps(answer) for s in secrets)


def test_answer_types_reads_both_answer_forms():
    from medisyn.server.federation import answer_types

    old = {P.QUERY_PROMPTS: ["b", "a"], P.PROMPTS_IMAGE_TYPE: "x", P.PROMPTS_SPECIALTY: "s", P.PROMPTS_CHANNELS: 1}
    assert answer_types(old) == {"x": {P.QUERY_PROMPTS: ["a", "b"], P.PROMPTS_SPECIALTY: "s", P.PROMPTS_CHANNELS: 1}}
    new = {P.QUERY_PROMPTS: ["a", "c"], P.PROMPTS_TYPES: {
        "x": {P.QUERY_PROMPTS: ["a"], P.PROMPTS_CHANNELS: 3}, "y": {P.QUERY_PROMPTS: ["c"]}, "z": "not a table"}}
    assert set(answer_types(new)) == {"x", "y"} and answer_types(new)["y"][P.PROMPTS_CHANNELS] is None
    assert answer_types({P.QUERY_PROMPTS: ["a"]}) == {}


def test_copy_detection_audits_each_dataset_and_the_coordinator_gates_each(tmp_path):
    """The audit query at a two-dataset site: one aggregate per dataset, each calibrated on
    that dataset's images; the coordinator accepts them, gates each and checks ε once;
    an answer whose part names another site is refused."""
    from medisyn.audit.gate import evaluate
    from medisyn.audit.report import assert_shareable
    from medisyn.client.site import prompts_answer, query_task
    from medisyn.server.audit import _checked_aggregates

    from medisyn.config import load_site_config

    p = multi_site(tmp_path, "general", ["breast-us", "dermoscopy"],
                   extra='[privacy]\naudit_verify_sample = 0\n' + AUDIT_FAST)
    site = load_site_config(p)
    prompts = prompts_answer(site)[P.QUERY_PROMPTS]
    rng = np.random.default_rng(0)
    synthetic = [(f"img-{i:03d}", rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), prompts[i % len(prompts)])
                 for i in range(16)]
    answer = query_task(site, {P.AUDIT: P.QUERY_COPY_DETECTION, P.MODEL_HASH: "m"}, synthetic=synthetic,
                        site_path=p)
    assert answer["kind"] == P.SITE_AUDITS_KIND and answer["site_id"] == "general"
    parts = answer[P.AUDIT_PARTS]
    assert [a["dataset"] for a in parts] == ["breast ultrasound", "dermoscopy"]
    for a in parts:  # every synthetic image checked against each dataset's own images
        assert a["site_id"] == "general" and a["n_synthetic"] == 16
        groups = {m["image_type"] for m in a["image_types"]}
        assert any(g.startswith(a["dataset"] + ": ") for g in groups)
    assert parts[0]["n_train_indexed"] != parts[1]["n_train_indexed"]
    assert_shareable(answer, forbidden=[str(tmp_path), str(DEMO)])

    errors: dict[str, str] = {}
    aggs = _checked_aggregates({"general": answer}, errors, lambda *a, **k: None)
    assert errors == {} and [a.dataset for a in aggs] == ["breast ultrasound", "dermoscopy"]
    verdict = evaluate(aggs, {}, released_ids=[], expected_sites=["general"])
    names = [c.name for c in verdict.checks]
    assert "general [breast ultrasound]: flagged images excluded" in names
    assert "general [dermoscopy]: flagged images excluded" in names
    assert sum(n.endswith("ε within cap") for n in names) == 1 and "general: ε within cap" in names

    forged = json.loads(json.dumps(answer))
    forged[P.AUDIT_PARTS][1]["site_id"] = "another"
    errors = {}
    assert _checked_aggregates({"general": forged}, errors, lambda *a, **k: None) == []
    assert errors["general"].startswith("rejected aggregate: aggregate names site")
    twice = {**answer, P.AUDIT_PARTS: [parts[0], parts[0]]}
    errors = {}
    assert _checked_aggregates({"general": twice}, errors, lambda *a, **k: None) == []
    assert "audited twice" in errors["general"]


def test_federated_evaluation_lists_each_dataset_of_a_site(tmp_path):
    """The evaluate mode in process: "general" (breast ultrasound + dermoscopy) answers one
    evaluation per dataset; the report has one entry per image type, each naming the site."""
    from medisyn.client.app import app as client_app
    from medisyn.client.site import node_config_for
    from medisyn.server.evaluate import EvaluateRequest, _check_site_answer, run_evaluate
    from test_evaluation import _Grid, finished_run

    cfg = finished_run(tmp_path, ["general"])
    p = multi_site(tmp_path, "general", ["breast-us", "dermoscopy"])
    grid = _Grid({1000: node_config_for(p, p.parent / "state")}, client_app)
    out = tmp_path / "evaluation"
    req = EvaluateRequest(run_dir=cfg.run_dir, out_dir=out, n_per_label=4, steps=2, classifier_steps=10,
                          encoder_steps=12, gallery_per_prompt=1)
    assert run_evaluate(grid, cfg, req, attempt="a1") == "done"
    r = json.loads((out / "evaluation.json").read_text())
    assert r["sites"] == ["general"] and r["site_errors"] == {}
    assert set(r["types"]) == {"breast ultrasound", "dermoscopy"}
    assert all(e["site"] == "general" and e["n_synthetic"] == 8 for e in r["types"].values())
    assert [d["image_type"] for d in r["datasets"]] == ["breast ultrasound", "dermoscopy"]
    assert set(r["timings"]["sites"]["general"]) == {"breast ultrasound", "dermoscopy"}
    # the gallery: one image per label prompt of both types, regenerated by the coordinator
    assert (out / "evaluation.html").read_text().count("data:image/png;base64,") == 4
    (reply,) = grid.replies
    answer = json.loads(reply.content.config_records["result"]["json"])
    assert answer["kind"] == P.SITE_EVALUATIONS_KIND and len(answer["evaluations"]) == 2
    assert str(tmp_path) not in json.dumps(answer)
    assert _check_site_answer("general", answer) is None
    assert _check_site_answer("other", answer) == "rejected answer: it names another site"
    same = {**answer, "evaluations": [answer["evaluations"][0]] * 2}
    assert "twice" in (_check_site_answer("general", same) or "")


def test_data_check_and_client_check_report_every_dataset(tmp_path):
    """`medisyn data check` and `medisyn-client check` read every [[dataset]] table; a bad
    one is named."""
    import subprocess
    import sys

    from medisyn.procs import executable

    p = multi_site(tmp_path, "general", ["breast-us", "dermoscopy"])
    r = subprocess.run([sys.executable, "-m", "medisyn.cli", "data", "check", str(p)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "radiology, breast ultrasound, malignant" in r.stdout and "dermatology, dermoscopy, benign" in r.stdout
    assert r.stdout.count("dataset   ") == 2
    r = subprocess.run([executable("medisyn-client"), "check", "--site", str(p)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "site general: breast ultrasound: " in r.stdout and "site general: dermoscopy: " in r.stdout
    # a bad table is named by its file (exit 3, data)
    bad = p.read_text().replace('[[dataset]]\npath = "' + (DEMO / "dermoscopy" / "dataset.npz").as_posix() + '"',
                                '[[dataset]]\nsplit = { train = ["nope"] }\npath = "'
                                + (DEMO / "dermoscopy" / "dataset.npz").as_posix() + '"')
    assert bad != p.read_text()
    p.write_text(bad)
    r = subprocess.run([executable("medisyn-client"), "check", "--site", str(p)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "dermoscopy/dataset.npz" in r.stderr and "neither training splits ['nope']" in r.stderr


def test_audit_site_cli_writes_one_report_per_dataset(tmp_path):
    """`medisyn audit site` at a two-dataset site: one audit (report folder, aggregate) per
    dataset, each named in its output line."""
    import subprocess
    import sys

    from medisyn.client.site import prompts_answer
    from PIL import Image

    from medisyn.config import load_site_config

    p = multi_site(tmp_path, "general", ["breast-us", "dermoscopy"], extra=AUDIT_FAST)
    prompts = prompts_answer(load_site_config(p))[P.QUERY_PROMPTS]
    syn = tmp_path / "synthetic"
    syn.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(syn / f"s{i}.png")
        (syn / f"s{i}.json").write_text(json.dumps({"prompt": prompts[i % len(prompts)]}))
    out = tmp_path / "audit"
    r = subprocess.run([sys.executable, "-m", "medisyn.cli", "audit", "site", "--site", str(p), "--synthetic", str(syn),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "site general (breast ultrasound): " in r.stdout and "site general (dermoscopy): " in r.stdout
    for folder, image_type in (("breast-ultrasound", "breast ultrasound"), ("dermoscopy", "dermoscopy")):
        agg = json.loads((out / folder / "aggregate.json").read_text())
        assert agg["dataset"] == image_type and agg["n_synthetic"] == 8
