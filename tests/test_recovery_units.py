"""Recovery without real daemons: a redone round is answered from the site's stored
reply (no second DP charge), the supervisor's ServerApp liveness check and recovery
limit, the one ``supervise`` helper, and naming the site of a lost node."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from medisyn.server import federation as fed
from medisyn.server.checkpoint import latest_checkpoint
from test_federation_units import LocalGrid, fed_cfg, node_configs

from medisyn.exitcodes import ExitCode
from medisyn.procs import process_alive, process_start_time

DP = '[privacy]\ndp = true\nnoise_multiplier = 1.0\nmax_epsilon = 50.0\naccountant = "rdp"\n'


class DiesAfterSitesTrain(LocalGrid):
    """The coordinator dies in round ``die_in`` after the sites trained and answered
    (their replies never reach it)."""

    def __init__(self, *a, die_in: int, **kw):
        super().__init__(*a, **kw)
        self.die_in = die_in

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        out = super().send_and_receive(messages, timeout=timeout)
        if self.sends == self.die_in:
            raise KeyboardInterrupt("the ServerApp died with the round's replies in flight")
        return out


@pytest.fixture(scope="module")
def client_app():
    from medisyn.client.app import app

    return app


def test_redone_round_is_replayed_and_charged_once(tmp_path, client_app):
    from medisyn.privacy.ledger import LEDGER_NAME

    sites = ["breast-us", "fundus"]
    cfg = fed_cfg(tmp_path, stages=["unet"], rounds=3, local_steps=2, sites=sites, min_sites=2)
    nodes = node_configs(tmp_path, sites=sites, privacy={"breast-us": DP})
    first = DiesAfterSitesTrain(nodes, client_app, die_in=2)
    with pytest.raises(KeyboardInterrupt):
        fed.run_federation(first, cfg)
    assert latest_checkpoint(cfg.run_dir).round == 1
    state = tmp_path / "breast-us" / "state"
    entries = json.loads((state / LEDGER_NAME).read_text())["entries"]
    assert [(e["round"], e["steps"]) for e in entries] == [(1, 2), (2, 2)]  # round 2 was trained

    again = LocalGrid(nodes, client_app)
    assert fed.run_federation(again, cfg, resume=True) == fed.Outcome.DONE
    records = list(fed.iter_metrics(cfg.run_dir))
    assert [r["round"] for r in records] == [1, 2, 3]
    # the redone round 2: both sites answered with the reply they computed before the crash
    assert len(again.replies) == 4
    for site in sites:
        assert records[1]["sites"][site]["replayed"] == 1, records[1]["sites"][site]
        assert "replayed" not in records[2]["sites"][site]
    entries = json.loads((state / LEDGER_NAME).read_text())["entries"]
    assert [(e["round"], e["steps"]) for e in entries] == [(1, 2), (2, 2), (3, 2)]  # round 2 once
    # ε reported for the redone round is the ε its steps cost (unchanged by the replay)
    assert records[1]["sites"]["breast-us"]["epsilon"] < records[2]["sites"]["breast-us"]["epsilon"]


def test_request_key_ignores_only_the_reply_token(tmp_path):
    from medisyn.client.replay import request_key
    from medisyn.client.supervisor import load_site
    from test_federation_units import write_site

    site = load_site(write_site(tmp_path, "fundus"))
    dp_site = load_site(write_site(tmp_path / "dp", "fundus", privacy=DP))
    w = np.arange(10, dtype=np.float32)
    cfg = {"stage": "unet", "round": 2, "local-steps": 3, "reply-token": "run=1;round=2;nonce=aa"}
    key = request_key(site, cfg, w, None)
    assert request_key(site, {**cfg, "reply-token": "run=9;round=2;nonce=bb"}, w.copy(), None) == key
    other = [
        request_key(site, {**cfg, "round": 3}, w, None),
        request_key(site, {**cfg, "local-steps": 4}, w, None),
        request_key(site, cfg, w + np.float32(1e-7), None),  # one ulp-scale change of the weights
        request_key(site, cfg, w, np.zeros(1, np.float32)),  # frozen weights added
        request_key(dp_site, cfg, w, None),  # the site's privacy settings changed
    ]
    assert key not in other and len(set(other)) == len(other)


def test_stored_reply_round_trip_and_unreadable_store(tmp_path):
    from medisyn.client.replay import REPLY_NAME, load_reply, store_reply

    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    store_reply(tmp_path, "k1", state, {"loss": 0.5, "num-examples": 7})
    got = load_reply(tmp_path, "k1")
    assert got is not None
    arrays, metrics = got
    assert set(arrays) == {"a", "b"} and np.array_equal(arrays["a"], state["a"])
    assert metrics == {"loss": 0.5, "num-examples": 7}
    assert load_reply(tmp_path, "k2") is None  # another request trains
    store_reply(tmp_path, "k2", state, {"loss": 0.1})
    assert load_reply(tmp_path, "k1") is None  # only the newest reply is kept
    (tmp_path / REPLY_NAME).write_bytes(b"torn")
    assert load_reply(tmp_path, "k2") is None


def test_supervise_maps_errors_to_exit_codes_and_always_closes():
    from medisyn.server.supervisor import SupervisorError, supervise

    closed, said = [], []

    def run(body):  # noqa: ANN001, ANN202
        return supervise(body, close=lambda: closed.append(1), echo=said.append, interrupted="stopping X")

    assert run(lambda: 0) == 0 and run(lambda: ExitCode.BUDGET) == 4

    def config_error():  # noqa: ANN202
        raise SupervisorError("port 1 in use", ExitCode.CONFIG)

    def ctrl_c():  # noqa: ANN202
        raise KeyboardInterrupt

    def bug():  # noqa: ANN202
        raise ValueError("a bug")

    assert run(config_error) == 2 and said[-1] == "error: port 1 in use"
    assert run(ctrl_c) == 130 and said[-1] == "interrupted: stopping X"
    with pytest.raises(ValueError):  # not swallowed: a bug keeps its traceback
        run(bug)
    assert len(closed) == 5


def test_process_alive_and_start_time():
    import os

    me = os.getpid()
    assert process_alive(me) and process_alive(me, process_start_time(me))
    assert not process_alive(me, (process_start_time(me) or 0) + 1)  # a reused pid
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_alive(child.pid)


def test_supervisor_sees_its_serverapp_die_and_gives_up_after_max_recoveries(tmp_path):
    from medisyn.server.supervisor import SERVERAPP_RECORD, ServerSupervisor, SupervisorError

    cfg = fed_cfg(tmp_path)
    cfg.run_dir.mkdir(parents=True)
    sup = ServerSupervisor(cfg, echo=lambda _m: None, max_recoveries=2)
    rec = cfg.run_dir / SERVERAPP_RECORD
    assert sup.serverapp_died() is None  # not started yet
    import os

    rec.write_text(json.dumps({"attempt": sup.attempt, "pid": os.getpid(), "start": process_start_time(os.getpid())}))
    assert sup.serverapp_died() is None  # running
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec.write_text(json.dumps({"attempt": "older", "pid": dead.pid, "start": None}))
    assert sup.serverapp_died() is None  # another submission's ServerApp
    rec.write_text(json.dumps({"attempt": sup.attempt, "pid": dead.pid, "start": None}))
    assert f"pid {dead.pid}" in sup.serverapp_died()
    fed.write_status(cfg.run_dir, fed.Outcome.DONE, attempt=sup.attempt)
    assert sup.serverapp_died() is None  # it finished, then exited

    submitted = []
    sup.submit = lambda: submitted.append((sup.resume, sup.attempt))  # type: ignore[method-assign]
    sup.stop_run = lambda: None  # type: ignore[method-assign]
    sup.recover("the ServerApp died")
    sup.recover("the ServerApp died")
    assert [r for r, _ in submitted] == [True, True] and len({a for _, a in submitted}) == 2
    with pytest.raises(SupervisorError) as e:
        sup.recover("the ServerApp died")
    assert e.value.code == ExitCode.INTERNAL and "gave up after 2 recoveries" in str(e.value)


def test_error_written_for_a_lost_node_names_its_site(client_app):
    from flwr.app import ConfigRecord

    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=77, message_type="train")
    sent.metadata.__dict__["_message_id"] = "m1"
    err = Message(Error(code=0, reason="Node Unavailable"), reply_to=sent)
    err.metadata.__dict__["_src_node_id"] = 1  # written by the SuperLink, not the node
    node_sites = {77: "breast-us"}
    assert fed.reply_site(err, node_sites, {"m1": 77}) == "breast-us"
    assert fed.reply_site(err, node_sites) == "node-1"
