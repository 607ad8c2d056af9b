"""Site-side guarantees through the real federated code path (ServerApp logic + the
ClientApp handlers over the in-process Grid of ``test_federation_units``)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from medisyn.server import federation as fed
from test_federation_units import LocalGrid, fed_cfg, node_configs

DP = '[privacy]\ndp = true\nnoise_multiplier = 1.0\nmax_epsilon = 50.0\naccountant = "rdp"\n'


@pytest.fixture(scope="module")
def client_app():
    from medisyn.client.app import app

    return app


def _set_privacy(site_toml: Path, table: str) -> None:
    text = site_toml.read_text()
    text = re.sub(r"\[privacy\]\n(?:[^\[\n][^\n]*\n)*", "", text)
    site_toml.write_text(text.replace("[superlink]", table + "\n[superlink]"))


def test_non_dp_round_after_dp_marks_epsilon_infinite(tmp_path, client_app):
    """A site with a ledger that then trains without DP in a federated round: its ledger
    (and so every ε it reports afterwards) says ε = ∞."""
    from medisyn.audit.site_audit import site_privacy
    from medisyn.client.site import site_from_node_config

    from medisyn.privacy.ledger import PrivacyLedger

    sites = ["breast-us"]
    nodes = node_configs(tmp_path, sites=sites, privacy={"breast-us": DP})
    state = tmp_path / "breast-us" / "state"
    cfg = fed_cfg(tmp_path / "r1", sites=sites, stages=["unet"], local_steps=1)
    assert fed.run_federation(LocalGrid(nodes, client_app), cfg) == fed.Outcome.DONE
    eps_dp = PrivacyLedger.open(state, "breast-us", "rdp").epsilon()
    assert 0 < eps_dp < math.inf
    (dp_rec,) = fed.iter_metrics(cfg.run_dir)  # under DP, avoidable outside-DP values stay home
    assert dp_rec["sites"]["breast-us"]["epsilon"] == pytest.approx(eps_dp)
    assert not {"loss-first", "images-per-s"} & set(dp_rec["sites"]["breast-us"])

    _set_privacy(Path(nodes[1000]["site-config"]), "")  # the site turns DP off
    cfg2 = fed_cfg(tmp_path / "r2", sites=sites, stages=["unet"], local_steps=1)
    assert fed.run_federation(LocalGrid(nodes, client_app), cfg2) == fed.Outcome.DONE
    (rec,) = fed.iter_metrics(cfg2.run_dir)
    assert rec["sites"]["breast-us"]["status"] == "ok" and "images-per-s" in rec["sites"]["breast-us"]
    led = PrivacyLedger.open(state, "breast-us", "rdp")
    assert led.epsilon() == math.inf
    assert led.entries()[-1].sigma == 0.0 and led.entries()[-1].steps == 1
    pr = site_privacy(site_from_node_config(nodes[1000]))
    assert pr.dp is False and pr.epsilon is None


def test_non_dp_round_refused_when_ledger_was_deleted(tmp_path, client_app):
    """The marker says the site trained, the ledger is gone: a non-DP round fails closed
    (it could not be recorded) instead of training silently."""
    from medisyn.privacy.ledger import LEDGER_NAME

    sites = ["breast-us"]
    nodes = node_configs(tmp_path, sites=sites, privacy={"breast-us": DP})
    cfg = fed_cfg(tmp_path / "r1", sites=sites, stages=["unet"], local_steps=1)
    assert fed.run_federation(LocalGrid(nodes, client_app), cfg) == fed.Outcome.DONE
    (tmp_path / "breast-us" / "state" / LEDGER_NAME).unlink()
    _set_privacy(Path(nodes[1000]["site-config"]), "")
    cfg2 = fed_cfg(tmp_path / "r2", sites=sites, stages=["unet"], local_steps=1)
    grid = LocalGrid(nodes, client_app)
    fed.run_federation(grid, cfg2)
    (reply,) = grid.replies
    assert reply.has_error() and "LedgerError" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason


def test_client_check_opens_the_ledger_like_training(tmp_path):
    """`medisyn-client check`: a deleted ledger whose marker says the site trained is exit
    5 with the ledger named (as `medisyn privacy show` and training say), not ok."""
    from medisyn.client.cli import app as client_cli
    from medisyn.client.supervisor import check_site
    from typer.testing import CliRunner

    from medisyn.privacy.ledger import LEDGER_NAME, PrivacyLedger

    site_toml = node_configs(tmp_path, sites=["fundus"], privacy={"fundus": DP})[1000]["site-config"]
    state = tmp_path / "fundus" / "state"
    code, report = check_site(Path(site_toml))
    assert code == 0 and "spent_epsilon" not in report["policy"], report
    PrivacyLedger.open(state, "fundus", "rdp", 1e-5).record_steps("unet", "r", 1, 1.0, 0.05, 200)
    code, report = check_site(Path(site_toml))
    assert code == 0 and 0 < report["policy"]["spent_epsilon"] < math.inf
    (state / LEDGER_NAME).unlink()
    code, report = check_site(Path(site_toml))
    assert code == 5, report
    assert "privacy ledger" in report["error"] and "missing" in report["error"] and "200" in report["error"]
    res = CliRunner().invoke(client_cli, ["check", "--site", str(site_toml)])
    assert res.exit_code == 5 and "privacy ledger" in res.output and "ok" not in res.output.split()


# --------------------------------------------------------------------------- SitePolicy


def _site(tmp_path: Path, privacy: str = "", site_id: str = "fundus"):
    from medisyn.client.site import site_from_node_config

    nodes = node_configs(tmp_path, sites=[site_id], privacy={site_id: privacy})
    return site_from_node_config(nodes[1000]), nodes


def test_max_rounds_counts_the_sites_own_rounds_not_the_message_round(tmp_path, client_app):
    """Three runs of one round each: every message says round 1. The site counts its own
    rounds and refuses the third (max_rounds = 2) as a budget refusal."""
    import json

    from medisyn.client.policy import COUNTERS_NAME

    _, nodes = _site(tmp_path, "[privacy]\nmax_rounds = 2\n")
    outcomes = []
    for i in range(3):
        # a new seed per run: an identical request would be answered with the site's stored
        # reply (client/replay.py), without a new round to count
        cfg = fed_cfg(tmp_path / f"r{i}", sites=["fundus"], stages=["unet"], local_steps=1, seed=i)
        grid = LocalGrid(nodes, client_app)
        outcomes.append(fed.run_federation(grid, cfg))
    assert outcomes == [fed.Outcome.DONE, fed.Outcome.DONE, fed.Outcome.BUDGET]
    (reply,) = grid.replies
    assert "PrivacyBudgetError" in reply.error.reason and "max_rounds = 2" in reply.error.reason
    counts = json.loads((tmp_path / "fundus" / "state" / COUNTERS_NAME).read_text())
    assert counts["rounds"] == 2 and counts["steps"] == 2


def test_policy_limits_refuse_with_the_limit_named(tmp_path, client_app):
    """Local steps per round and model size, through a federated round."""
    _, nodes = _site(tmp_path, "[privacy]\nmax_local_steps = 1\n")
    cfg = fed_cfg(tmp_path / "r", sites=["fundus"], stages=["unet"], local_steps=2)
    grid = LocalGrid(nodes, client_app)
    fed.run_federation(grid, cfg)
    (reply,) = grid.replies
    assert "PolicyRefused" in reply.error.reason and "max_local_steps = 1" in reply.error.reason

    _, nodes = _site(tmp_path / "b", "[privacy]\nmax_model_parameters = 1000\n")
    grid = LocalGrid(nodes, client_app)
    fed.run_federation(grid, fed_cfg(tmp_path / "b" / "r", sites=["fundus"], stages=["unet"], local_steps=1))
    (reply,) = grid.replies
    assert "PolicyRefused" in reply.error.reason and "max_model_parameters = 1,000" in reply.error.reason


def test_policy_counters_total_steps_queries_and_fail_closed(tmp_path):
    """Unit: total steps, the per-model query budget, the ledger floor, a corrupt file."""
    from medisyn.client.policy import COUNTERS_NAME, CountersError, PolicyRefused, SitePolicy

    from medisyn.errors import PrivacyBudgetError
    from medisyn.privacy.ledger import PrivacyLedger

    site, _ = _site(tmp_path, "[privacy]\nmax_total_steps = 5\nmax_queries_per_model = 2\n")
    pol = SitePolicy(site)
    pol.admit_train(local_steps=3, n_parameters=10)
    with pytest.raises(PrivacyBudgetError, match="max_total_steps = 5"):
        pol.admit_train(local_steps=3, n_parameters=10)
    assert pol.counters().steps == 3 and pol.counters().rounds == 1
    assert pol.admit_query("evaluate", "abc") == 1 and pol.admit_query("evaluate", "abc") == 2
    with pytest.raises(PolicyRefused, match="max_queries_per_model = 2"):
        pol.admit_query("evaluate", "abc")
    assert pol.admit_query("copy-detection", "abc") == 1 and pol.admit_query("evaluate", "def") == 1
    # deleting the counter file does not reset what the ledger proves
    state = Path(site.site.state_dir)
    PrivacyLedger.open(state, "fundus", "prv", 1e-5).record_steps("unet", "r", 1, 1.0, 0.1, 4)
    (state / COUNTERS_NAME).unlink()
    assert pol.counters().steps == 4 and pol.counters().rounds == 1
    with pytest.raises(PrivacyBudgetError):
        pol.admit_train(local_steps=2, n_parameters=10)
    (state / COUNTERS_NAME).write_text("{not json")
    with pytest.raises(CountersError, match="restore the file"):
        pol.admit_train(local_steps=1, n_parameters=10)
    assert pol.delta(1000) == 1e-5 and pol.delta(1_000_000) == pytest.approx(1e-7)


def test_evaluate_budget_per_model_through_the_clientapp(tmp_path, client_app):
    """The same model evaluated past the site's budget is refused; a new model is not."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from medisyn.server.federation import GlobalModel, stage_payload, to_record

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    _, nodes = _site(tmp_path, "[privacy]\nmax_queries_per_model = 1\n")
    cfg = fed_cfg(tmp_path / "r", sites=["fundus"], stages=["unet"])
    ctx = Context(run_id=1, node_id=5, node_config=nodes[1000], state=RecordDict(), run_config={})

    def ask(seed: int):
        model = GlobalModel(cfg.model, seed=seed)
        state, frozen, extra = stage_payload(model, cfg, "unet")
        content = RecordDict({"config": ConfigRecord({"stage": "unet", "round": 1, "seed": 0,
                                                      "model-config": cfg.model.model_dump_json(), **extra}),
                              "arrays": to_record(state)})
        return client_app(Message(content=content, message_type="evaluate", dst_node_id=5, group_id=""), ctx)

    assert not ask(0).has_error()
    code, text, site = fed.reply_error(ask(0))
    assert (code, site) == ("policy-refused", "fundus") and "max_queries_per_model = 1" in text
    assert not ask(1).has_error()


def test_server_reads_the_error_code_and_site_not_the_text(tmp_path):
    """A coded error counts as a budget refusal by its code and names its site by its
    field; a Flower error whose text says 'site x: PrivacyBudgetError' is neither."""
    from flwr.app import Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from medisyn.protocol import encode_site_error

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    req = Message(RecordDict(), dst_node_id=7, message_type="train")

    def err(code: int, reason: str) -> Message:
        return Message(Error(code=code, reason=reason), reply_to=req)  # from node 7

    coded = err(*encode_site_error("privacy-budget", "site-b", "cap reached (ε=8.1 > 8)"))
    assert fed.reply_error(coded) == ("privacy-budget", "cap reached (ε=8.1 > 8)", "site-b")
    assert fed.reply_site(coded, {}) == "site-b"
    text = err(2, "<class 'medisyn.errors.PrivacyBudgetError'>:<'site evil: PrivacyBudgetError'>")
    assert fed.reply_error(text)[0] == "flower-2" and fed.reply_site(text, {}) == "node-7"
    forged = err(1004, '{"code": "ledger", "site-id": "x", "message": "m"}')  # code and field disagree
    assert fed.reply_error(forged)[0] == "flower-1004"


# --------------------------------------------------------------------------- audit verification


class SlippingGrid(LocalGrid):
    """A dishonest coordinator: swaps one generated image of the copy-detection query for a
    real training image of the site (keeping its id, prompt and claimed seed)."""

    def __init__(self, *a, real_image: np.ndarray, **kw):
        super().__init__(*a, **kw)
        self.real_image = real_image

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Array

        from medisyn.protocol import IMAGES

        for m in messages:
            rec = m.content.array_records.get("synthetic")
            if rec is not None:
                imgs = rec[IMAGES].numpy().copy()
                imgs[1] = self.real_image.reshape(imgs.shape[1:])
                rec[IMAGES] = Array(imgs)
        return super().send_and_receive(messages, timeout=timeout)


def test_audit_query_with_a_real_image_slipped_in_is_refused(tmp_path, client_app):
    """The site regenerates the query's images from the model and their seeds: a real
    training image among generated ones makes it refuse the whole query (nothing audited)."""
    from medisyn.audit.report import ReleaseReport
    from medisyn.server.audit import AuditRequest, run_audit

    from medisyn.data import load_dataset

    sites = ["fundus"]
    nodes = node_configs(tmp_path, sites=sites)
    cfg = fed_cfg(tmp_path, sites=sites, stages=["unet"], local_steps=1)
    assert fed.run_federation(LocalGrid(nodes, client_app), cfg) == fed.Outcome.DONE
    from medisyn.client.site import site_from_node_config

    site = site_from_node_config(nodes[1000])
    ds = load_dataset(site.dataset, resolution=cfg.model.resolution, channels=cfg.model.channels, splits=["train"])
    real = ((ds.images[0].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    grid = SlippingGrid(nodes, client_app, real_image=real)
    out = tmp_path / "audit"
    req = AuditRequest(run_dir=cfg.run_dir, out_dir=out, n_per_prompt=3, steps=2,
                       prompts=["ophthalmology, fundus photograph, grade 0"])
    assert run_audit(grid, cfg, req) == fed.Outcome.DONE
    rep = ReleaseReport.model_validate_json((out / "release_report.json").read_text())
    assert rep.sites == [] and not rep.gate.passed
    reason = rep.site_errors["fundus"]
    assert "refused" in reason and "is not what the model makes" in reason and "00001" in reason, reason
    (reply,) = grid.query_replies
    assert fed.reply_error(reply)[0] == "policy-refused"


def test_audit_table_is_typed_in_one_place(tmp_path):
    """[audit] is read with the site config (one TOML parse) and typed by one function."""
    from medisyn.audit.settings import audit_config, load_site

    from medisyn.errors import ConfigError

    site, nodes = _site(tmp_path, "[audit]\nn_plant = 20\nlocal_embedders = [\"enc\"]\n")
    toml = Path(nodes[1000]["site-config"])
    got = audit_config(site, toml.parent)
    assert got == load_site(toml)[1] and got.n_plant == 20
    assert got.local_embedders == [(toml.parent / "enc").resolve()]
    bad, _ = _site(tmp_path / "bad", "[audit]\nn_plants = 20\n")
    with pytest.raises(ConfigError, match="n_plants"):
        audit_config(bad)
