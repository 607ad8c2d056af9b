"""``medisyn.evaluation``: metrics with known answers, the classifier recipe, ``medisyn
evaluate`` end to end on a tiny model, bad inputs, the site aggregate and the federated
``evaluate`` query over an in-process grid (real ClientApp, real site evaluations)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from medisyn.errors import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "medisyn" / "assets" / "demo"
TINY = {
    "resolution": 16,
    "vae": {"block_out_channels": [8, 16], "norm_num_groups": 4},
    "unet": {"block_out_channels": [16, 32], "norm_num_groups": 8, "cross_attention": [False, True]},
}
# budgets that make every classifier a few dozen steps: the tests check plumbing, not quality
FAST = {"n_per_label": 6, "steps": 2, "classifier_steps": 12, "encoder_steps": 16, "gallery_per_prompt": 3,
        "threads": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_components():
    from medisyn.config import ModelConfig
    from medisyn.models import build_components

    return build_components(ModelConfig.model_validate(TINY))


def demo_cfg(site: str):
    from medisyn.config import load_dataset_config

    return load_dataset_config(DEMO / site / "dataset.toml")


def one_label_dataset(tmp: Path) -> Path:
    """The breast-us sample reduced to its 'normal or benign' images: a dataset with one label."""
    d = np.load(DEMO / "breast-us" / "dataset.npz")
    imgs, labels, split = [], [], []
    for sp in ("train", "val", "test"):
        keep = d[f"{sp}_labels"].ravel() == 1
        imgs.append(d[f"{sp}_images"][keep][:60])
        labels += [1] * int(min(keep.sum(), 60))
        split += [sp] * int(min(keep.sum(), 60))
    np.savez(tmp / "benign.npz", images=np.concatenate(imgs), labels=np.array(labels), split=np.array(split))
    p = tmp / "benign.toml"
    p.write_text('[dataset]\npath = "benign.npz"\nspecialty = "radiology"\nimage_type = "benign breast ultrasound"\n'
                 'labels = { "1" = "normal or benign" }\n')
    return p


# --------------------------------------------------------------------------- metrics


def test_metrics_identical_and_disjoint_sets_have_known_answers():
    from medisyn.evaluation import fidelity, frechet_distance, kernel_distance, prdc

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8))
    same = fidelity(a, a.copy(), k=5)
    assert same["fd"] == pytest.approx(0.0, abs=1e-6)
    assert abs(same["kid"]) < 0.02  # unbiased MMD²: ~0 (slightly negative) for one set twice
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] >= 1.0  # every point sits in its own ball and in ~k others
    b = a + 100.0  # disjoint: far outside every k-NN ball
    far = fidelity(a, b, k=5)
    assert far["precision"] == far["recall"] == far["density"] == far["coverage"] == 0.0
    assert far["fd"] == pytest.approx(8 * 100.0**2, rel=1e-6)  # |mean shift|², same covariance
    assert far["kid"] > 1.0
    # two samples of one distribution: near the identical-set values; a shifted one: worse
    c = rng.normal(size=(300, 8))
    near = prdc(a, c, k=5)
    assert near["precision"] > 0.9 and near["recall"] > 0.9 and near["coverage"] > 0.9
    assert frechet_distance(a, c) < 0.5 < frechet_distance(a, c + 1.0)
    assert kernel_distance(a, c) < 0.05 < kernel_distance(a, c + 1.0)
    # half the mode: precision stays high, recall and coverage drop
    half = prdc(a, c[c[:, 0] > 0], k=5)
    assert half["precision"] > 0.8 and half["coverage"] < 0.8
    # too few samples for the k-NN balls: None, not a crash
    assert prdc(a[:5], c[:5], k=5)["precision"] is None and frechet_distance(a[:1], c) is None


def test_kid_standard_error_is_the_jackknife_and_predicts_the_spread_between_draws():
    from medisyn.evaluation import fidelity, kernel_distance_se

    rng = np.random.default_rng(1)

    def kid_mean_form(x, y):  # the all-cross-pairs form each leave-one-out value uses
        d = x.shape[1]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        n, m = len(x), len(y)
        return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.mean())

    a, b = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) + 0.5
    # the closed form equals the jackknife written out: leave each row of each set out
    loo_a = np.array([kid_mean_form(np.delete(a, i, 0), b) for i in range(len(a))])
    loo_b = np.array([kid_mean_form(a, np.delete(b, j, 0)) for j in range(len(b))])
    var = (len(a) - 1) / len(a) * ((loo_a - loo_a.mean()) ** 2).sum() \
        + (len(b) - 1) / len(b) * ((loo_b - loo_b.mean()) ** 2).sum()
    assert kernel_distance_se(a, b) == pytest.approx(np.sqrt(var), rel=1e-9)
    # what it promises: the spread of KID between independent draws of the same two
    # distributions (here 200 pairs of draws; the mean jackknife error within 30% of it)
    kids, ses = [], []
    for _ in range(200):
        x, y = rng.normal(size=(64, 6)), rng.normal(size=(64, 6)) + 0.3
        f = fidelity(x, y)
        kids.append(f["kid"])
        ses.append(f["kid_se"])
    assert np.mean(ses) == pytest.approx(np.std(kids), rel=0.3)
    # more images, a smaller error; too few rows: None
    big = kernel_distance_se(rng.normal(size=(512, 6)), rng.normal(size=(512, 6)) + 0.3)
    assert big < 0.5 * np.mean(ses)
    assert kernel_distance_se(a[:2], b) is None


def test_near_duplicates_and_balanced_accuracy():
    from medisyn.evaluation import balanced_accuracy, near_duplicate_rate

    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 3, 8, 8))
    assert near_duplicate_rate(x, 0.95) == 0.0
    x[1] = x[0] * 2 + 0.5  # same pattern, other contrast and brightness: a near-duplicate pair
    assert near_duplicate_rate(x, 0.95) == pytest.approx(0.2)
    centre = x.mean(0)
    assert near_duplicate_rate(x, 0.95, centre=centre) is not None
    assert near_duplicate_rate(x[:1], 0.95) is None
    # balanced accuracy: mean recall over the classes present
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == pytest.approx(0.5)
    assert balanced_accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == pytest.approx((1 + 0.5 + 1) / 3)


def test_classifier_recipe_is_seeded_balanced_and_learns():
    from medisyn.evaluation import embed, predict, train_classifier

    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 3, 16, 16, generator=g) * 0.3
    y = torch.zeros(120, dtype=torch.long)
    y[:12] = 1  # a rare class: label-balanced batches still learn it
    x[:12, 0] += 1.5
    m1 = train_classifier(x, y, 2, steps=60, seed=3)
    m2 = train_classifier(x, y, 2, steps=60, seed=3)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    assert (predict(m1, x) == y.numpy()).mean() > 0.95
    # trained two at a time (threads) or one after the other: the same weights
    from medisyn.evaluation import train_many

    jobs = {s: (lambda s=s: train_classifier(x, y, 2, steps=20, seed=s)) for s in (3, 4)}
    par, seq = train_many(jobs, workers=2), train_many(jobs, workers=1)
    assert torch.equal(next(par[3].parameters()), next(m1.parameters())) is False  # 20 vs 60 steps
    for s in (3, 4):
        for p1, p2 in zip(par[s].parameters(), seq[s].parameters(), strict=True):
            assert torch.equal(p1, p2)
    assert embed(m1, x).shape == (120, 64)
    rot = train_classifier(x, torch.zeros(120, dtype=torch.long), 1, steps=5, seed=0, rotations=True,
                           hflip=False)
    assert embed(rot, x[:4]).shape == (4, 64)


# --------------------------------------------------------------------------- evaluate_model / CLI


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from medisyn.models import save_components

    d = tmp_path_factory.mktemp("model") / "model"
    save_components(tiny_components(), d)
    return d


def test_evaluate_cli_end_to_end(tiny_model_dir, tmp_path):
    """`medisyn evaluate` on a tiny untrained model and two demo datasets: both files,
    every metric next to its floor, the model and data hashes, timings, inline images."""
    from typer.testing import CliRunner

    from medisyn.cli import app
    from medisyn.models import model_hash

    out = tmp_path / "eval"
    res = CliRunner().invoke(app, [
        "evaluate", "--model", str(tiny_model_dir), "--data", str(DEMO / "breast-us" / "dataset.toml"),
        "--data", str(DEMO / "dermoscopy" / "dataset.toml"), "--out", str(out), "--n-per-label", "6",
        "--steps", "2", "--classifier-steps", "12", "--seed", "7", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "breast ultrasound: type" in res.output and "dermoscopy: type" in res.output
    r = json.loads((out / "evaluation.json").read_text())
    assert r["model_hash"] == model_hash(tiny_model_dir) and r["seed"] == 7
    assert r["settings"]["n_per_label"] == 6 and r["encoder"] == "type-label"
    # the sampler's default is stated: guidance and the noise interval it applies in
    assert r["settings"]["guidance"] == 4.0 and r["settings"]["guidance_interval"] == [0.5, 10.0]
    assert len(r["datasets"]) == 2 and all(len(d["data_hashes"][0]) == 64 for d in r["datasets"])
    t = r["timings"]
    assert t["images_generated"] == 24 and t["total_seconds"] > 0 and t["generate_seconds"] > 0
    for name in ("breast ultrasound", "dermoscopy"):
        e = r["types"][name]
        m, f = e["metrics"], e["floors"]
        for k in ("type_recognised", "label_alignment", "real_balanced_accuracy", "tstr_balanced_accuracy",
                  "augmented_balanced_accuracy", "real10_balanced_accuracy"):
            assert 0.0 <= m[k] <= 1.0, (name, k)
        for k in ("fd", "kid", "precision", "recall", "density", "coverage", "near_duplicate_rate"):
            assert m[k] is not None and f[k] is not None, (name, k)
        assert 0.0 <= f["type_recognised"] <= 1.0
        assert e["n_synthetic"] == 12 and set(e["per_label"]) == set(e["labels"])
        for pl in e["per_label"].values():
            assert pl["n_synthetic"] == 6 and "label_recall" in pl["metrics"]
    page = (out / "evaluation.html").read_text()
    assert page.count("data:image/png;base64,") >= 8 and "<svg" in page
    assert "real training images" in page and "Train on synthetic" in page
    assert "guidance 4.0 at noise levels sigma in (0.5, 10]" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained


def test_one_label_and_untrained_types_are_stated_skips(tmp_path):
    """A one-label dataset: alignment/TSTR skipped with the reason, a rotation encoder for
    fidelity. A type the model's medisyn.json does not list: skipped with a warning."""
    from medisyn.config import load_dataset_config
    from medisyn.evaluation import evaluate_model

    one = load_dataset_config(one_label_dataset(tmp_path))
    comps = tiny_components()
    r = evaluate_model(comps, [one], settings=FAST, model_hash="h")
    e = r["types"]["benign breast ultrasound"]
    assert "needs at least 2 labels" in e["skipped"]["label_alignment"]
    assert "needs at least 2 labels" in e["skipped"]["tstr"]
    assert "needs at least 2 image types" in e["skipped"]["type_recognised"]
    assert e["encoder"] == "rotation" and e["metrics"]["fd"] is not None
    assert "label_alignment" not in e["metrics"]
    # the model says it learnt breast ultrasound only: dermoscopy is not evaluated
    r2 = evaluate_model(comps, [demo_cfg("breast-us"), demo_cfg("dermoscopy")], settings=FAST,
                        model_meta={"image_types": {"breast ultrasound": {"channels": 1}}})
    assert "not trained on image type 'dermoscopy'" in r2["types"]["dermoscopy"]["skipped"]["all"]
    assert any("dermoscopy" in w for w in r2["warnings"])
    assert r2["types"]["breast ultrasound"]["metrics"]["label_alignment"] is not None
    assert r2["timings"]["images_generated"] == 12
    # the HTML states the skip, it does not crash on it
    from medisyn.evaluation_report import render_html, summary_lines

    assert "not trained on image type" in render_html(r2)
    assert any(line.startswith("dermoscopy: skipped") for line in summary_lines(r2))


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`medisyn ARGS` through the real entry point (error -> message + exit code)."""
    import sys

    from medisyn.cli import main

    monkeypatch.setattr(sys, "argv", ["medisyn", *args])
    with pytest.raises(SystemExit) as e:
        main()
    cap = capsys.readouterr()
    return int(e.value.code or 0), cap.out + cap.err


def test_bad_inputs_are_named_errors(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from medisyn.evaluation import evaluate_model, make_settings

    with pytest.raises(ConfigError, match="n_per_label = 0"):
        make_settings(n_per_label=0)
    with pytest.raises(ConfigError, match="classifier_steps"):
        make_settings(classifier_steps=0)
    with pytest.raises(ConfigError, match="at least one dataset"):
        evaluate_model(None, [], settings=FAST)
    ds = str(DEMO / "breast-us" / "dataset.toml")
    base = ["evaluate", "--data", ds, "--out", str(tmp_path / "o")]
    code, text = run_main([*base, "--model", str(tiny_model_dir), "--n-per-label", "0"], monkeypatch, capsys)
    assert code == 2 and "n_per_label = 0" in text, text
    code, text = run_main([*base, "--model", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "not a MediSyn model directory" in text and str(tmp_path) in text, text
    code, text = run_main([*base, "--model", str(tmp_path / "nope")], monkeypatch, capsys)
    assert code == 2 and "no such directory" in text, text
    code, text = run_main(["evaluate", "--model", str(tiny_model_dir), "--data", str(tmp_path / "x.toml"),
                           "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert code == 2 and "x.toml" in text and "not found" in text, text
    assert not (tmp_path / "o").exists()


def test_site_evaluation_is_shareable_and_keeps_small_groups(tmp_path):
    """evaluate_site: one site's data only, no type recognition (stated), the site's label
    classifier as encoder, a shareable aggregate; the k rule keeps small label groups' real
    statistics at the site."""
    from medisyn.audit.report import assert_shareable

    from medisyn.evaluation import evaluate_site

    cfg = demo_cfg("breast-us")
    agg = evaluate_site(tiny_components(), cfg, settings=FAST, site_id="breast-us", model_hash="abc",
                        min_group=70)
    assert_shareable(agg, forbidden=[str(cfg.path), str(DEMO)])
    assert agg["kind"] == "medisyn-site-evaluation" and agg["encoder"] == "label"
    e = agg["type"]
    assert "one site's data" in e["skipped"]["type_recognised"]
    assert e["metrics"]["tstr_balanced_accuracy"] is not None and e["metrics"]["fd"] is not None
    # breast-us held-out: 'malignant' has < 70 images -> suppressed, the other label is not
    small = [lab for lab, pl in e["per_label"].items() if pl["n_holdout"] < 70]
    assert small, e["per_label"]
    for lab, pl in e["per_label"].items():
        if lab in small:
            assert "suppressed" in pl and "fd" not in pl["metrics"] and pl["floors"] == {}
            assert "label_recall" in pl["metrics"]
        else:
            assert pl["metrics"]["fd"] is not None
    text = json.dumps(agg)
    assert "dataset.npz" not in text and "/" not in text.replace("/s", "")


# --------------------------------------------------------------------------- federated, in process


class _Grid:
    """The few Grid calls the evaluate mode makes, answered by the real ClientApp in process."""

    def __init__(self, node_configs: dict[int, dict], client_app):
        from flwr.supercore.task_identity import TaskIdentity

        self.node_configs, self.client_app, self.replies = node_configs, client_app, []
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        from flwr.app import Context, Error, Message, RecordDict

        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, node_config=self.node_configs[node], state=RecordDict(),
                          run_config={})
            try:
                reply = self.client_app(msg, ctx)
            except Exception as ex:  # what flwr-clientapp does with an exception
                reply = Message(Error(code=2, reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg)
            self.replies.append(reply)
            out.append(reply)
        return out


def finished_run(tmp: Path, sites: list[str], **kw):
    """A run directory as `medisyn-server start` leaves it (resolved config + final model),
    with an untrained tiny model: evaluation needs no training."""
    from medisyn.server.config import FederationConfig

    from medisyn.models import build_components, save_components

    cfg = FederationConfig.model_validate(dict(
        rounds=1, local_steps=1, stages=["vae", "unet"], min_sites=len(sites), site_wait_timeout=60,
        evaluate=False, model=TINY, train={"batch_size": 8, "num_threads": 1}, sites=sites,
        run_dir=str(tmp / "run"), **kw))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "federation.resolved.json").write_text(cfg.model_dump_json(indent=1))
    save_components(build_components(cfg.model, seed=cfg.seed), cfg.run_dir / "model")
    return cfg


def write_site(tmp: Path, site: str, port: int = 9092, privacy: str = "") -> Path:
    d = tmp / "sites" / site
    d.mkdir(parents=True, exist_ok=True)
    ds = (DEMO / site / "dataset.toml").read_text().replace(
        'path = "dataset.npz"', f'path = "{(DEMO / site / "dataset.npz").as_posix()}"')
    p = d / "site.toml"
    p.write_text(f'[site]\nid = "{site}"\nstate_dir = "state"\n\n{ds}\n{privacy}\n'
                 f'[superlink]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    return p


def test_federated_evaluation_in_process(tmp_path):
    """The evaluate mode over an in-process grid: breast-us evaluates its own data and
    answers with a shareable aggregate; fundus's policy refuses (named in the report);
    the coordinator writes evaluation.json/html per image type, with no site path."""
    from medisyn.audit.report import assert_shareable
    from medisyn.client.app import app as client_app
    from medisyn.client.site import node_config_for
    from medisyn.server.evaluate import EvaluateRequest, run_evaluate

    sites = ["breast-us", "fundus"]
    cfg = finished_run(tmp_path, sites)
    refuse = '[privacy]\nallowed_audits = ["copy-detection"]\n'
    paths = {s: write_site(tmp_path, s, privacy=refuse if s == "fundus" else "") for s in sites}
    grid = _Grid({1000 + i: node_config_for(p, p.parent / "state") for i, p in enumerate(paths.values())},
                 client_app)
    out = tmp_path / "evaluation"
    req = EvaluateRequest(run_dir=cfg.run_dir, out_dir=out, n_per_label=6, steps=2, classifier_steps=12,
                          encoder_steps=16, gallery_per_prompt=2)
    assert run_evaluate(grid, cfg, req, attempt="a1") == "done"
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done" and status["sites_failed"] == ["fundus"]
    r = json.loads((out / "evaluation.json").read_text())
    assert r["kind"] == "medisyn-federated-evaluation" and r["sites"] == ["breast-us"]
    assert "not allowed by the site's policy" in r["site_errors"]["fundus"]
    e = r["types"]["breast ultrasound"]
    assert e["site"] == "breast-us" and e["n_synthetic"] == 12 and e["metrics"]["fd"] is not None
    assert e["metrics"]["tstr_balanced_accuracy"] is not None
    page = (out / "evaluation.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "real images stay at site breast-us" in page
    secrets = [str(tmp_path), str(DEMO)]
    for reply in grid.replies:
        if reply.has_error():
            assert not re.search(r"(/[\w.-]+){2,}", reply.error.reason)
            continue
        assert set(reply.content.keys()) == {"metrics", "result", "site"} and not reply.content.array_records
        text = reply.content.config_records["result"]["json"]
        assert not any(s in text for s in secrets)
        assert_shareable(json.loads(text))
    # the site kept a record of what it answered
    assert list((tmp_path / "sites" / "breast-us" / "state" / "evaluation").glob("answered-*.json"))


def test_join_lists_a_shared_type_once_per_site_and_names_missing_sites():
    from medisyn.evaluation import join_site_evaluations
    from medisyn.evaluation_report import render_html

    def site(t: str, fd: float) -> dict:
        return {"kind": "medisyn-site-evaluation", "image_type": t, "model_hash": "m", "data_hash": "d" * 64,
                "encoder": "label", "timings": {"total_seconds": 1.0}, "warnings": [],
                "type": {"image_type": t, "labels": ["a"], "metrics": {"fd": fd}, "floors": {"fd": 0.1},
                         "per_label": {}, "skipped": {}, "n_synthetic": 8}}

    j = join_site_evaluations({"s1": site("chest", 1.0), "s2": site("chest", 2.0), "s3": site("skin", 3.0)},
                              site_errors={"s4": "refused"}, model_hash="m", expected_sites=["s1", "s2", "s3", "s4", "s5"])
    assert set(j["types"]) == {"chest @ s1", "chest @ s2", "skin"}
    assert j["types"]["chest @ s2"]["metrics"]["fd"] == 2.0 and j["types"]["skin"]["site"] == "s3"
    assert j["site_errors"] == {"s4": "refused", "s5": "did not answer"}
    page = render_html(j)
    assert "chest @ s1" in page and "s5" in page and "did not answer" in page


def test_fidelity_floor_has_the_synthetic_label_mix():
    """A generator that draws fresh real images, prompted 16 per label, must score its floor:
    the floor set has the synthetic set's label mix, not the held-out set's (9:1 here)."""
    from medisyn.evaluation import (
        EvaluationSettings,
        SmallCNN,
        TypeData,
        _Clock,
        _fidelity_and_diversity,
        _label_matched_subset,
        _subset,
        embed,
        fidelity,
    )

    g = torch.Generator().manual_seed(0)

    def images(label: int, n: int) -> torch.Tensor:  # label 0 dark, label 1 bright, with texture
        return (torch.rand(n, 3, 8, 8, generator=g) * 0.4 - 0.8 + 1.2 * label).clamp(-1, 1)

    x_train = torch.cat([images(0, 180), images(1, 20)])
    y_train = torch.tensor([0] * 180 + [1] * 20)
    td = TypeData(image_type="t", specialty="s", labels=["a", "b"], prompts=["t, a", "t, b"],
                  x_train=x_train, y_train=y_train,
                  x_hold=torch.cat([images(0, 90), images(1, 10)]), y_hold=torch.tensor([0] * 90 + [1] * 10))
    xs, ys = torch.cat([images(0, 16), images(1, 16)]), torch.tensor([0] * 16 + [1] * 16)
    torch.manual_seed(0)
    enc = SmallCNN(2).eval()
    metrics, floors, _per_label = _fidelity_and_diversity(td, xs, ys, enc, EvaluationSettings(), _Clock())
    sub = _label_matched_subset(y_train, ys, 0)
    assert np.bincount(y_train[sub].numpy()).tolist() == [16, 16]
    assert np.bincount(y_train[_label_matched_subset(y_train, torch.tensor([0] * 4 + [1] * 30), 0)].numpy()
                       ).tolist() == [4, 20]  # a label with fewer training images: all of them
    # fresh real images with the synthetic mix score what the floor scores; a random real subset
    # (90% dark, the held-out mix) scores far less: it measured the mix, not the images
    random_floor = fidelity(embed(enc, td.x_hold), embed(enc, x_train[_subset(200, 32, 0)]))["kid"]
    assert metrics["kid"] == pytest.approx(floors["kid"], rel=0.5)
    assert abs(random_floor) < 0.2 * metrics["kid"]


def test_study_counts_a_kid_difference_only_beyond_twice_the_combined_error():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", Path(__file__).resolve().parents[1] / "bench" / "study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    x = {"A": {"metrics": {"kid": 0.10, "kid_se": 0.03}}, "B": {"metrics": {"kid": 0.10, "kid_se": 0.03}},
         "C": {"metrics": {"kid": 0.90, "kid_se": 0.10}}, "D": {"metrics": {"kid": 0.2}}}
    y = {"A": {"metrics": {"kid": 0.30, "kid_se": 0.04}},   # gap 0.20 > 2 * 0.05: x better
         "B": {"metrics": {"kid": 0.18, "kid_se": 0.04}},   # gap 0.08 < 0.10: the draws, not the models
         "C": {"metrics": {"kid": 0.50, "kid_se": 0.05}},   # 0.40 > 2 * 0.112: x worse
         "D": {"metrics": {"kid": 0.9, "kid_se": 0.01}}}    # no error for x: not judged
    assert study.kid_beyond_noise(x, y, ["A", "B", "C", "D"]) == {
        "types_better_beyond_2se": ["A"], "types_worse_beyond_2se": ["C"]}
