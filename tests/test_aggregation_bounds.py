"""No single site can hijack the aggregate: capped num-examples, an absolute update-norm
bound besides the median rule, replies bound to their run and round, a finite aggregate.

The property tests run the server's own path (``check_replies`` then
``aggregate_checked`` with a real Flower FedAvg/FedProx); only the transport is left out.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from medisyn.server.checks import Candidate, check_replies
from medisyn.server.config import FederationConfig, StrategyConfig
from medisyn.server.strategy import aggregate_checked, make_strategy

from medisyn.protocol import PACKED, layout_of, pack

B = 2.0  # max_update_norm
TOKEN = "run=7;round=3;nonce=abc123"
REF = {"a": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.float32)}
LAYOUT = layout_of(REF)
G = pack(REF).astype(np.float64)


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


def _msg(flat: np.ndarray) -> tuple[Message, ArrayRecord]:
    rec = ArrayRecord({PACKED: Array(np.ascontiguousarray(flat))})
    content = RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, dst_node_id=1, message_type="train"), rec


def _unpacked(flat: np.ndarray) -> dict[str, np.ndarray]:
    from medisyn.protocol import unpack

    return unpack(flat, LAYOUT)


def run_round(cands: list[Candidate], flats: dict[str, np.ndarray], caps: dict[str, int], name: str = "fedavg"):
    """The server's check + aggregation of one round; returns (verdict, aggregate or None)."""
    v = check_replies(cands, REF, expected_sites=list(caps), max_norm_ratio=10.0, max_update_norm=B,
                      max_examples=caps, expected_token=TOKEN)
    strategy = make_strategy(StrategyConfig(name=name))
    accepted = []
    for c in v.accepted:
        msg, rec = _msg(flats[c.site])
        accepted.append((msg, rec, v.weights[c.site], 0.0))
    state, _loss, problem = aggregate_checked(strategy, 1, accepted, LAYOUT)
    assert problem is None
    return v, (None if state is None else pack(state).astype(np.float64))


def honest(i: int, direction_seed: int, frac: float, n: int) -> tuple[Candidate, np.ndarray]:
    rng = np.random.default_rng(direction_seed)
    d = rng.normal(size=G.size)
    d *= frac * B / np.linalg.norm(d)
    flat = (G + d).astype(np.float32)
    return Candidate(f"h{i}", _unpacked(flat), {"num-examples": n}, token=TOKEN), flat


attack_claims = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-10, max_value=10**15),
    st.just(1e12),
)


@st.composite
def attacker(draw):
    kind = draw(st.sampled_from(["scaled", "nan", "inf", "shape", "keys", "int", "stale-token", "huge-value"]))
    scale = draw(st.floats(min_value=0.0, max_value=1e6, allow_nan=False))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    d = rng.normal(size=G.size)
    d /= np.linalg.norm(d)
    flat = (G + scale * d).astype(np.float32)
    arrays = _unpacked(flat.copy())
    token = TOKEN
    if kind == "nan":
        arrays["a"] = arrays["a"].copy()
        arrays["a"].flat[0] = np.nan
    elif kind == "inf":
        arrays["b"] = np.full(5, np.inf, np.float32)
    elif kind == "shape":
        arrays["a"] = np.zeros((4, 3), np.float32)
    elif kind == "keys":
        arrays = {"a": arrays["a"]}
    elif kind == "int":
        arrays["b"] = arrays["b"].astype(np.int64)
    elif kind == "stale-token":
        token = draw(st.sampled_from([None, "run=7;round=2;nonce=abc123", "run=6;round=3;nonce=abc123"]))
    elif kind == "huge-value":
        arrays["b"] = np.full(5, 3e38, np.float32)
    claim = draw(attack_claims)
    return Candidate("x", arrays, {"num-examples": claim}, token=token), flat


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    att=attacker(),
    cap=st.integers(1, 10**6),
    ns=st.lists(st.integers(1, 10**6), min_size=1, max_size=4),
    name=st.sampled_from(["fedavg", "fedprox"]),
)
def test_one_site_moves_the_aggregate_at_most_its_capped_weight_times_the_bound(att, cap, ns, name):
    """Honest sites send the global model back (no update): whatever the attacker sends
    and claims, the aggregate moves from the global model by at most w * B, where
    w = cap / (cap + honest weight) is the attacker's capped FedAvg weight."""
    cand, flat = att
    cands = [Candidate(f"h{i}", dict(REF), {"num-examples": n}, token=TOKEN) for i, n in enumerate(ns)]
    flats = {f"h{i}": pack(REF) for i in range(len(ns))}
    caps = {f"h{i}": 10**6 for i in range(len(ns))} | {"x": cap}
    v, agg = run_round([*cands, cand], {**flats, "x": flat}, caps, name)
    assert {c.site for c in v.accepted} >= {f"h{i}" for i in range(len(ns))}
    w = cap / (cap + sum(ns))
    moved = float(np.linalg.norm(agg - G))
    assert moved <= w * B * (1 + 1e-5) + 1e-5, (moved, w, B)
    if "x" in {c.site for c in v.accepted}:
        assert v.weights["x"] <= cap


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    att=attacker(),
    cap=st.integers(1, 1000),
    honest_spec=st.lists(
        st.tuples(st.integers(0, 2**16), st.floats(0.0, 0.999), st.integers(1, 1000)), min_size=1, max_size=4),
)
def test_aggregate_stays_in_the_norm_ball_and_one_site_shifts_it_by_its_weight(att, cap, honest_spec):
    """Honest sites send any update within the bound. The aggregate stays within B of the
    global model, and differs from the (capped-)weighted mean H of the accepted honest
    replies by at most w * ||x - H|| <= w * (B + ||H - g||)."""
    cand, flat = att
    hs = [honest(i, seed, frac, n) for i, (seed, frac, n) in enumerate(honest_spec)]
    caps = {f"h{i}": 1000 for i in range(len(hs))} | {"x": cap}
    v, agg = run_round([*(c for c, _ in hs), cand], {**{c.site: f for c, f in hs}, "x": flat}, caps)
    assert agg is not None  # honest updates are inside the bound: the smallest one is always kept
    assert float(np.linalg.norm(agg - G)) <= B * (1 + 1e-5) + 1e-5
    acc = {c.site for c in v.accepted}
    honest_acc = [(c, f) for c, f in hs if c.site in acc]
    if not honest_acc:
        return  # the median rule can drop an honest site; the ball bound above still holds
    wh = np.array([float(c.metrics["num-examples"]) for c, _ in honest_acc])
    H = sum(wi * f.astype(np.float64) for wi, (_, f) in zip(wh, honest_acc, strict=True)) / wh.sum()
    shift = float(np.linalg.norm(agg - H))
    if "x" not in acc:
        assert shift <= 1e-5
    else:
        w = cap / (cap + wh.sum())
        assert shift <= w * (B + float(np.linalg.norm(H - G))) * (1 + 1e-5) + 1e-5


def test_claim_of_1e12_examples_is_weighted_as_the_enrolled_cap():
    flats = {s: (G + (i + 1) * 0.1).astype(np.float32) for i, s in enumerate(["h0", "x"])}
    cands = [Candidate("h0", _unpacked(flats["h0"]), {"num-examples": 100}, token=TOKEN),
             Candidate("x", _unpacked(flats["x"]), {"num-examples": 1e12}, token=TOKEN)]
    v, agg = run_round(cands, flats, {"h0": 1000, "x": 100})
    assert v.weights == {"h0": 100.0, "x": 100.0} and v.capped == {"x": (1e12, 100)}
    np.testing.assert_allclose(agg, (flats["h0"].astype(np.float64) + flats["x"]) / 2, atol=1e-5)


def test_absolute_norm_bound_fires_with_two_sites():
    """The median rule cannot fire with two replies; the absolute bound does."""
    small = (G + 0.01).astype(np.float32)
    huge = (G + 1000.0).astype(np.float32)
    cands = [Candidate("h0", _unpacked(small), {"num-examples": 10}, token=TOKEN),
             Candidate("x", _unpacked(huge), {"num-examples": 10}, token=TOKEN)]
    v = check_replies(cands, REF, max_update_norm=B, expected_token=TOKEN)
    assert [c.site for c in v.accepted] == ["h0"]
    assert "max_update_norm" in dict(v.rejected)["x"]
    v = check_replies(cands, REF)  # without the bound, 1000x is accepted with 2 sites
    assert len(v.accepted) == 2


def test_two_replies_claiming_one_site_are_both_rejected():
    c = [Candidate("a", dict(REF), {"num-examples": 1}, token=TOKEN) for _ in range(2)]
    v = check_replies([*c, Candidate("b", dict(REF), {"num-examples": 1}, token=TOKEN)], REF)
    assert [x.site for x in v.accepted] == ["b"]
    assert all("claim site 'a'" in r for s, r in v.rejected if s == "a") and len(v.rejected) == 2


@pytest.mark.parametrize("token", [None, "run=7;round=2;nonce=abc123", "run=8;round=3;nonce=abc123", ""])
def test_reply_not_bound_to_this_run_and_round_is_rejected(token):
    v = check_replies([Candidate("a", dict(REF), {"num-examples": 1}, token=token)], REF, expected_token=TOKEN)
    assert not v.accepted and "not bound to this run and round" in v.rejected[0][1]


def test_non_finite_aggregate_is_refused():
    class Broken:
        def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN202
            bad = pack(REF).copy()
            bad[3] = np.inf
            return ArrayRecord({PACKED: Array(bad)}), MetricRecord({"loss": 1.0})

    msg, rec = _msg(pack(REF))
    state, loss, problem = aggregate_checked(Broken(), 1, [(msg, rec, 1.0, 0.0)], LAYOUT)
    assert state is None and loss == 1.0 and "non-finite" in problem


def test_config_caps_resolve_per_site_then_default():
    cfg = FederationConfig(sites=["a", "b"], enrolment={"a": {"max_examples": 5}},
                           strategy={"max_examples": 50, "max_update_norm": 3.0})
    assert cfg.max_examples_for("a") == 5 and cfg.max_examples_for("b") == 50
    assert cfg.strategy.max_update_norm == 3.0


@pytest.mark.parametrize("weighting", ["examples", "equal"])
def test_in_process_round_rejects_a_stale_token_and_caps_a_claim(tmp_path, weighting):
    """Through run_federation and the real ClientApp: a site whose reply carries an old
    token is rejected; a site claiming 1e12 examples is weighted as its cap (reported as
    ``weight-examples``; with equal weighting the claim weighs nothing and nothing is
    reported as its weight)."""
    from medisyn.client.app import app as client_app
    from medisyn.server import federation as fed
    from test_federation_units import LocalGrid, fed_cfg, node_configs

    def stale(_site, reply: Message) -> Message:
        reply.content["site"] = ConfigRecord({"site-id": reply.content["site"]["site-id"],
                                              "reply-token": "run=local;round=0;nonce=00"})
        return reply

    def inflate(_site, reply: Message) -> Message:
        m = reply.content["metrics"]
        m["num-examples"] = 10**12
        return reply

    nodes = node_configs(tmp_path)
    cfg = fed_cfg(tmp_path, stages=["vae"], enrolment={"chest-xray": {"max_examples": 7}},
                  strategy={"max_update_norm": 1e6, "weighting": weighting})
    grid = LocalGrid(nodes, client_app, tamper={1000: stale, 1001: inflate})
    assert fed.run_federation(grid, cfg) == fed.Outcome.DONE
    (rec,) = fed.iter_metrics(cfg.run_dir)
    assert rec["sites"]["breast-us"]["status"] == "failed"
    assert "not bound to this run and round" in rec["sites"]["breast-us"]["reason"]
    assert rec["sites"]["chest-xray"]["status"] == "ok"
    assert rec["sites"]["chest-xray"].get("weight-examples") == (7 if weighting == "examples" else None)
    fundus_n = rec["sites"]["fundus"]["num-examples"]
    assert rec["sites"]["chest-xray"]["weight-share"] == pytest.approx(0.5 if weighting == "equal"
                                                                       else 7 / (7 + fundus_n))
    assert rec["sites"]["fundus"]["status"] == "ok" and rec["aggregate_problem"] is None


@pytest.mark.parametrize("weighting", ["examples", "equal"])
def test_equal_weighting_averages_sites_alike_whatever_they_claim(tmp_path, weighting):
    """Through run_federation and the real ClientApp: with ``weighting = "equal"`` the new
    global model is the plain mean of the accepted replies and a site claiming 1e12
    examples buys nothing; with "examples" that claim sets the model. The round's
    metrics give each site's share."""
    from medisyn.client.app import app as client_app
    from medisyn.server import federation as fed
    from medisyn.server.checkpoint import latest_checkpoint
    from safetensors.numpy import load_file
    from test_federation_units import TINY_MODEL, LocalGrid, fed_cfg, node_configs

    from medisyn.models import build_components, trainable_state

    sent: dict[int, np.ndarray] = {}

    def keeper(node: int, claim: int | None = None):
        def keep(_site, reply: Message) -> Message:
            sent[node] = np.asarray(reply.content["arrays"][PACKED].numpy()).copy()
            if claim is not None:
                reply.content["metrics"]["num-examples"] = claim
            return reply
        return keep

    # nodes 1000, 1001, 1002 are breast-us, chest-xray, fundus; chest-xray claims 1e12
    cfg = fed_cfg(tmp_path, stages=["vae"], strategy={"weighting": weighting})
    grid = LocalGrid(node_configs(tmp_path), client_app,
                     tamper={1000: keeper(1000), 1001: keeper(1001, 10**12), 1002: keeper(1002)})
    assert fed.run_federation(grid, cfg) == fed.Outcome.DONE
    (rec,) = fed.iter_metrics(cfg.run_dir)
    shares = {s: rec["sites"][s]["weight-share"] for s in ("breast-us", "chest-xray", "fundus")}
    assert len(sent) == 3 and not np.allclose(sent[1000], sent[1001])
    if weighting == "equal":
        assert shares == pytest.approx({s: 1 / 3 for s in shares})
        expected = np.mean([sent[n] for n in sorted(sent)], axis=0, dtype=np.float64)
    else:
        assert shares["chest-xray"] == pytest.approx(1.0, abs=1e-6)
        expected = sent[1001].astype(np.float64)
    layout = layout_of({k: v.numpy() for k, v in trainable_state(build_components(TINY_MODEL), "vae").items()})
    saved = load_file(str(latest_checkpoint(cfg.run_dir).model_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    got = np.concatenate([saved[k].astype(np.float64).ravel() for k, _ in layout])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_reply_bound_to_its_enrolled_node(tmp_path):
    """Under node auth, RUN_DIR/enrolment.json maps node id -> site: a node that claims
    another site's id is rejected (and does not get the real site rejected with it)."""
    from medisyn.client.app import app as client_app
    from medisyn.server import federation as fed
    from test_federation_units import LocalGrid, fed_cfg, node_configs

    from medisyn.fileio import atomic_write_text

    def impersonate(_site, reply: Message) -> Message:
        reply.content["site"] = ConfigRecord({**dict(reply.content["site"]), "site-id": "breast-us"})
        return reply

    nodes = node_configs(tmp_path)  # 1000 breast-us, 1001 chest-xray, 1002 fundus
    cfg = fed_cfg(tmp_path, stages=["vae"])
    enrolled = {"1000": {"site": "breast-us", "key_sha256": "a"}, "1002": {"site": "fundus", "key_sha256": "c"}}
    atomic_write_text(cfg.run_dir / "enrolment.json", json.dumps({"nodes": enrolled}))
    grid = LocalGrid(nodes, client_app, tamper={1002: impersonate})
    assert fed.run_federation(grid, cfg) == fed.Outcome.DONE
    (rec,) = fed.iter_metrics(cfg.run_dir)
    assert rec["sites"]["breast-us"]["status"] == "ok"  # the real one still counts
    assert "enrolled as 'fundus'" in rec["sites"]["fundus"]["reason"]
    assert "node 1001 is not enrolled" in rec["sites"]["node-1001"]["reason"]
    assert rec["answered"] == 1


def test_check_warns_about_cyclic_rounds_and_uncapped_claims_only_where_they_count():
    from medisyn.server.config import config_warnings

    def warned(**strategy) -> str:
        return "\n".join(config_warnings(FederationConfig(sites=["a", "b"], strategy=strategy)))

    assert "num-examples claim" in warned()
    assert "num-examples claim" not in warned(weighting="equal")  # a claim buys nothing
    cyclic = warned(name="cyclic")
    assert "previous site trained" in cyclic and "checked alone" in cyclic
    assert "num-examples claim" not in cyclic
    assert "previous site trained" not in warned(name="fedavg", max_update_norm=5.0)
