"""Unit tests of the federation: ServerApp logic and ClientApp handlers over an
in-process Grid (no network, no Flower daemons), plus config/checks/checkpoint units."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from medisyn.server import federation as fed
from medisyn.server.checkpoint import Checkpoint, latest_checkpoint, write_checkpoint
from medisyn.server.checks import Candidate, check_replies
from medisyn.server.config import FederationConfig, load_federation_config
from medisyn.server.strategy import export_state, make_strategy, restore_state

from medisyn import protocol as P
from medisyn.config import ModelConfig, TrainConfig, UNetConfig, VAEConfig
from medisyn.errors import ConfigError, PrivacyBudgetError

DEMO = Path(__file__).resolve().parents[1] / "medisyn" / "assets" / "demo"
SITES = ["breast-us", "chest-xray", "fundus"]

TINY_MODEL = ModelConfig(
    resolution=16,
    vae=VAEConfig(block_out_channels=(8, 16), norm_num_groups=4),
    unet=UNetConfig(block_out_channels=(16, 32), norm_num_groups=8, cross_attention=(False, True)),
)


# --------------------------------------------------------------------------- in-process grid


Tamper = Callable[[str, Message], Message]


class LocalGrid(Grid):
    """Calls the ClientApp in-process, one Context per node, as a SuperNode would."""

    def __init__(self, node_configs: dict[int, dict], client_app, tamper: dict[int, Tamper] | None = None):
        self.node_configs = node_configs
        self.client_app = client_app
        self.tamper = tamper or {}
        self.replies: list[Message] = []  # every train/evaluate reply any ClientApp produced
        self.query_replies: list[Message] = []  # and every query reply (prompts, audit)
        self.crash_after_sends: int | None = None
        self.sends = 0
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 0

    def set_run(self, run) -> None:  # noqa: ANN001
        pass

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        query = all(m.metadata.message_type == P.QUERY_MESSAGE for m in messages)
        if not query:  # rounds only: the prompts query before the first UNet round is not counted
            self.sends += 1
        if self.crash_after_sends is not None and self.sends > self.crash_after_sends:
            raise KeyboardInterrupt("simulated coordinator crash")
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, node_config=self.node_configs[node], state=RecordDict(), run_config={})
            try:
                reply = self.client_app(msg, ctx)
            except Exception as ex:  # what flwr-clientapp does with an exception
                reply = Message(Error(code=2, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=msg)
            (self.query_replies if query else self.replies).append(reply)
            if node in self.tamper and not reply.has_error():
                reply = self.tamper[node](self.node_configs[node]["site-config"], reply)
            out.append(reply)
        return out


def write_site(tmp: Path, site_id: str, *, privacy: str = "") -> Path:
    d = tmp / site_id
    d.mkdir(parents=True, exist_ok=True)
    ds = (DEMO / site_id / "dataset.toml").read_text()
    ds = ds.replace('path = "dataset.npz"', f'path = "{(DEMO / site_id / "dataset.npz").as_posix()}"')
    (d / "site.toml").write_text(
        f'[site]\nid = "{site_id}"\nstate_dir = "state"\n\n{ds}\n{privacy}\n'
        '[superlink]\naddress = "127.0.0.1:9092"\ninsecure = true\n'
    )
    return d / "site.toml"


def node_configs(tmp: Path, sites=SITES, privacy: dict[str, str] | None = None) -> dict[int, dict]:
    from medisyn.client.site import node_config_for

    out = {}
    for i, s in enumerate(sites):
        p = write_site(tmp, s, privacy=(privacy or {}).get(s, ""))
        out[1000 + i] = node_config_for(p, p.parent / "state")
    return out


def fed_cfg(tmp: Path, **kw) -> FederationConfig:
    base = dict(
        rounds=1, local_steps=2, stages=["vae", "unet"], min_sites=1, round_timeout=60,
        site_wait_timeout=2, evaluate=False, model=TINY_MODEL,
        train=TrainConfig(batch_size=8, num_threads=1), sites=SITES, run_dir=tmp / "run",
    )
    base.update(kw)
    return FederationConfig(**base)


@pytest.fixture(scope="module")
def client_app():
    from medisyn.client.app import app

    return app


# --------------------------------------------------------------------------- end to end in process


PATH_LIKE = re.compile(r"(/[\w.-]+){2,}")


def assert_reply_is_clean(reply: Message, model_sizes: set[int], secrets: list[str]) -> None:
    """No real image, no embedding, no file path: only the stage's weights, numbers and the site id."""
    if reply.has_error():
        text = reply.error.reason
        assert not PATH_LIKE.search(text), text
        for s in secrets:
            assert s not in text
        return
    content = reply.content
    assert set(content.keys()) <= {"arrays", "metrics", "site"}
    for rec in content.array_records.values():
        assert set(rec.keys()) == {"packed"}, "an array that is not the packed model weights left the site"
        flat = rec["packed"].numpy()
        assert flat.ndim == 1 and flat.dtype == np.float32
        assert flat.size in model_sizes, "the packed weights are not exactly one stage's weights"
    for rec in content.metric_records.values():
        for k, v in rec.items():
            assert isinstance(v, int | float), (k, v)
    for rec in content.config_records.values():
        assert set(rec.keys()) <= {"site-id", "reply-token"} and "site-id" in rec
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", rec["site-id"])
        # the echoed token is the server's own (run, round, nonce), nothing of the site
        assert re.fullmatch(r"run=\w+;round=\d+;nonce=[0-9a-f]+", rec.get("reply-token", "run=1;round=1;nonce=0"))


def test_federation_in_process_trains_checkpoints_and_replies_are_clean(tmp_path, client_app):
    from medisyn.models import build_components, trainable_state

    cfg = fed_cfg(tmp_path, evaluate=True)
    nodes = node_configs(tmp_path)
    grid = LocalGrid(nodes, client_app)
    initial = {s: {k: v.numpy().copy() for k, v in trainable_state(build_components(cfg.model, seed=cfg.seed), s).items()}
               for s in ("vae", "unet")}

    assert fed.run_federation(grid, cfg) == fed.Outcome.DONE

    records = fed.iter_metrics(cfg.run_dir)
    assert [r["round"] for r in records] == [1, 2]
    assert [r["stage"] for r in records] == ["vae", "unet"]
    for r in records:
        assert r["answered"] == 3 and r["failed"] == 0
        assert set(r["sites"]) == set(SITES)
        for m in r["sites"].values():
            assert m["status"] == "ok" and m["num-examples"] > 0 and m["bytes-up"] > 0
            assert np.isfinite(m["loss"]) and "eval-loss" in m
        assert r["eval_loss"] is not None
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt is not None and ckpt.round == 2 and ckpt.stage == "unet"
    assert ckpt.config_hash == cfg.hash() and len(ckpt.metrics) == 2
    assert (ckpt.model_dir / "model_index.json").is_file()
    assert fed.read_status(cfg.run_dir)["state"] == "done"

    from medisyn.models import load_components

    final = load_components(cfg.run_dir / "model")
    for stage in ("vae", "unet"):
        now = trainable_state(final, stage)
        changed = sum(not np.allclose(now[k].numpy(), initial[stage][k]) for k in now)
        assert changed > len(now) // 2, f"stage {stage}: global weights did not change"
    # the latent scale was set from the sites' latent std after the VAE stage
    assert final.scaling_factor != 1.0

    # every reply any ClientApp produced: nothing but weights, numbers, the site id
    model_sizes = {sum(v.size for v in initial[s].values()) for s in ("vae", "unet")}
    secrets = [str(tmp_path), str(DEMO)]
    queries = grid.query_replies
    assert len(grid.replies) == 4 * 3  # 2 train + 2 evaluate rounds x 3 sites
    for reply in grid.replies:
        assert_reply_is_clean(reply, model_sizes, secrets)
    # one prompts query before the first UNet round (prompt anchoring): label prompts only
    assert len(queries) == 3
    own: dict[str, list[str]] = {}
    for reply in queries:
        answer = json.loads(reply.content.config_records[P.RESULT][P.RESULT_JSON])
        assert set(answer) == {P.QUERY_PROMPTS, P.PROMPTS_TYPES, P.PROMPTS_IMAGE_TYPE, P.PROMPTS_SPECIALTY,
                               P.PROMPTS_CHANNELS}
        assert list(answer[P.PROMPTS_TYPES]) == [answer[P.PROMPTS_IMAGE_TYPE]]
        assert not any(s in json.dumps(answer) for s in secrets)
        own[reply.content.config_records["site"]["site-id"]] = answer[P.QUERY_PROMPTS]
    everyone = {p for ps in own.values() for p in ps}
    unet = records[1]["sites"]
    # every site anchored exactly the other sites' prompts
    assert {s: m["anchor-prompts"] for s, m in unet.items()} == {s: len(everyone) - len(own[s]) for s in SITES}
    # and the saved model knows its image types: which are grey, their specialty and prompts
    assert final.image_types["breast ultrasound"]["channels"] == 1
    assert final.image_types["fundus photograph"]["channels"] == 3
    assert final.image_types["breast ultrasound"]["specialty"] == "radiology"
    assert sorted(p for t in final.image_types.values() for p in t["prompts"]) == sorted(everyone)


def test_nan_site_is_rejected_and_model_unaffected(tmp_path, client_app):
    cfg = fed_cfg(tmp_path, stages=["vae"])

    def nan_weights(_site, reply: Message) -> Message:
        rec = reply.content["arrays"]
        first = next(iter(rec))
        a = rec[first].numpy().copy()
        a.flat[0] = np.nan
        rec[first] = Array(a)
        return reply

    nodes = node_configs(tmp_path)
    honest = LocalGrid({k: v for k, v in nodes.items() if k != 1002}, client_app)
    cfg_h = fed_cfg(tmp_path / "h", stages=["vae"], sites=SITES)
    assert fed.run_federation(honest, cfg_h) == fed.Outcome.DONE

    grid = LocalGrid(nodes, client_app, tamper={1002: nan_weights})
    assert fed.run_federation(grid, cfg) == fed.Outcome.DONE
    (rec,) = fed.iter_metrics(cfg.run_dir)
    assert rec["answered"] == 2 and rec["failed"] == 1
    assert rec["sites"]["fundus"]["status"] == "failed"
    assert "non-finite" in rec["sites"]["fundus"]["reason"]

    from medisyn.models import load_components, trainable_state

    a = trainable_state(load_components(cfg.run_dir / "model"), "vae")
    b = trainable_state(load_components(cfg_h.run_dir / "model"), "vae")
    for k in a:  # same as a round without the bad site: deterministic local training
        assert np.isfinite(a[k].numpy()).all()
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6)


def test_budget_error_names_site_eps_and_cap_and_stops_run(tmp_path, client_app, monkeypatch):
    import medisyn.train

    def refuse(*_a, site_id="?", **_k):
        raise PrivacyBudgetError(
            f"planned steps would take ε from 7.91 to 8.40 > max_epsilon 8.0 (ledger /secret/{site_id}/ledger.json)"
        )

    monkeypatch.setattr(medisyn.train, "train_local", refuse)
    cfg = fed_cfg(tmp_path, stages=["unet"])
    grid = LocalGrid(node_configs(tmp_path), client_app)
    assert fed.run_federation(grid, cfg) == fed.Outcome.BUDGET
    assert fed.read_status(cfg.run_dir)["state"] == "budget-exhausted"
    assert len(grid.replies) == 3
    named = set()
    for reply in grid.replies:
        assert reply.has_error()
        reason = reply.error.reason
        assert "PrivacyBudgetError" in reason
        named |= {s for s in SITES if f"site {s}:" in reason}
        assert "7.91" in reason and "8.0" in reason
        assert "/secret" not in reason and "<path>" in reason
    assert named == set(SITES)
    (rec,) = fed.iter_metrics(cfg.run_dir)
    assert set(rec["sites"]) == set(SITES)  # the server names sites from their error replies


def test_data_error_reply_has_no_path(tmp_path, client_app):
    nodes = node_configs(tmp_path, sites=["fundus"])
    site_toml = Path(nodes[1000]["site-config"])
    bad = tmp_path / "fundus" / "missing.npz"
    site_toml.write_text(re.sub(r'path = ".*"', f'path = "{bad.as_posix()}"', site_toml.read_text(), count=1))
    cfg = fed_cfg(tmp_path, stages=["vae"], sites=["fundus"])
    grid = LocalGrid(nodes, client_app)
    fed.run_federation(grid, cfg)
    (reply,) = grid.replies
    assert reply.has_error() and "site fundus" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason and "missing.npz" not in reply.error.reason


def test_resume_after_crash_continues_at_next_round(tmp_path, client_app):
    cfg = fed_cfg(tmp_path, stages=["vae", "unet"], sites=SITES[:2], strategy={"name": "fedadam"})
    nodes = node_configs(tmp_path, sites=SITES[:2])
    grid = LocalGrid(nodes, client_app)
    grid.crash_after_sends = 1  # round 1 completes, round 2 crashes
    with pytest.raises(KeyboardInterrupt):
        fed.run_federation(grid, cfg)
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt is not None and ckpt.round == 1
    assert ckpt.strategy["class"] == "FedAdam" and ckpt.strategy_arrays  # moments saved

    grid2 = LocalGrid(nodes, client_app)
    assert fed.run_federation(grid2, cfg, resume=True) == fed.Outcome.DONE
    assert [r["round"] for r in fed.iter_metrics(cfg.run_dir)] == [1, 2]
    assert latest_checkpoint(cfg.run_dir).round == cfg.total_rounds == 2
    assert len(grid2.replies) == 2  # only round 2 ran


def test_no_sites_times_out(tmp_path, client_app):
    cfg = fed_cfg(tmp_path, min_sites=3, site_wait_timeout=0.5)
    grid = LocalGrid(node_configs(tmp_path, sites=SITES[:1]), client_app)
    assert fed.run_federation(grid, cfg) == fed.Outcome.NO_SITES
    assert "min_sites=3" in fed.read_status(cfg.run_dir)["message"]


# --------------------------------------------------------------------------- units


def _arrays(seed: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(3, 4)).astype(np.float32) + shift, "b": rng.normal(size=(5,)).astype(np.float32)}


def test_check_replies_rejects_bad_replies_with_reasons():
    ref = _arrays(0)
    ok = [Candidate(f"s{i}", {k: v + 0.01 * (i + 1) for k, v in ref.items()}, {"num-examples": 10}) for i in range(3)]
    cases = [
        Candidate("nan", {**ref, "a": np.full((3, 4), np.nan, np.float32)}, {"num-examples": 10}),
        Candidate("shape", {**ref, "a": np.zeros((4, 3), np.float32)}, {"num-examples": 10}),
        Candidate("keys", {"a": ref["a"]}, {"num-examples": 10}),
        Candidate("zero", dict(ref), {"num-examples": 0}),
        Candidate("dtype", {**ref, "b": np.zeros(5, np.int64)}, {"num-examples": 10}),
        Candidate("huge", {k: v + 100.0 for k, v in ref.items()}, {"num-examples": 10}),
        Candidate("stranger", dict(ref), {"num-examples": 10}),
    ]
    v = check_replies(ok + cases, ref, expected_sites=[c.site for c in ok + cases if c.site != "stranger"])
    assert sorted(c.site for c in v.accepted) == ["s0", "s1", "s2"]
    reasons = dict(v.rejected)
    assert "non-finite" in reasons["nan"]
    assert "shape" in reasons["shape"]
    assert "keys" in reasons["keys"]
    assert "num-examples" in reasons["zero"]
    assert "dtype" in reasons["dtype"]
    assert "median" in reasons["huge"]
    assert "expected sites" in reasons["stranger"]


def test_check_replies_accepts_similar_updates():
    ref = _arrays(0)
    c = [Candidate(f"s{i}", {k: x + 0.1 * i for k, x in _arrays(i).items()}, {"num-examples": 5}) for i in range(1, 5)]
    v = check_replies(c, ref)
    assert len(v.accepted) == 4 and not v.rejected


def test_fedadam_state_round_trip():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    s = make_strategy(FederationConfig(strategy={"name": "fedadam"}).strategy)
    s.m_t = {"w": np.ones(3)}
    s.v_t = {"w": np.full(3, 2.0)}
    meta, arrays = export_state(s)
    s2 = make_strategy(FederationConfig(strategy={"name": "fedadam"}).strategy)
    restore_state(s2, json.loads(json.dumps(meta)), arrays)
    np.testing.assert_array_equal(s2.v_t["w"], np.full(3, 2.0))
    with pytest.raises(ValueError, match="FedAdam"):
        restore_state(make_strategy(FederationConfig().strategy), meta, arrays)


def test_fedprox_sends_proximal_mu():
    from flwr.serverapp.strategy import FedProx

    s = make_strategy(FederationConfig(strategy={"name": "fedprox", "proximal_mu": 0.5}).strategy)
    assert isinstance(s, FedProx) and s.proximal_mu == 0.5


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    def save(d: Path) -> None:
        d.mkdir(parents=True)
        (d / "w.txt").write_text("x")

    for r in (1, 2, 3):
        write_checkpoint(tmp_path, Checkpoint(r, "unet", r, [{"round": r}], {}, "h"), save, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*")) == ["round-0002", "round-0003"]

    def broken(d: Path) -> None:
        d.mkdir(parents=True)
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_checkpoint(tmp_path, Checkpoint(4, "unet", 4, [], {}, "h"), broken, keep=2)
    c = latest_checkpoint(tmp_path)
    assert c.round == 3 and c.metrics == [{"round": 3}]
    assert not list((tmp_path / "checkpoints").glob(".round-*"))


def test_federation_config_validation(tmp_path):
    cfg = FederationConfig(rounds=2, stage_rounds={"unet": 3}, stages=["vae", "unet"])
    assert cfg.total_rounds == 5
    assert cfg.round_plan()[2] == (3, "unet", 1)
    for bad, match in [
        ("stages = []", "stages"),
        ('[strategy]\nname = "krum"', "strategy"),
        ('min_sites = 3\nsites = ["a", "b"]', "min_sites"),
        ('stages = ["unet"]\n[stage_rounds]\nvae = 1', "not in stages"),
        ("[superlink]\ninsecure = false", "ssl_certfile"),
        ("roundz = 1", "roundz"),
    ]:
        p = tmp_path / "f.toml"
        p.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=match):
            load_federation_config(p)


def test_federation_config_resolves_run_dir(tmp_path):
    p = tmp_path / "federation.toml"
    p.write_text('run_dir = "runs/x"\nsites = ["a", "b"]\n[model]\nresolution = 16\n')
    cfg = load_federation_config(p)
    assert cfg.run_dir == (tmp_path / "runs/x").resolve()
    assert cfg.model.resolution == 16


def test_client_node_config_never_from_run_config(tmp_path, client_app):
    """A train message without site node config fails; run_config is ignored."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    msg = Message(
        content=RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"stage": "vae"})}),
        message_type="train", dst_node_id=5, group_id="",
    )
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(),
                  run_config={"site-config": str(write_site(tmp_path, "fundus"))})
    reply = client_app(msg, ctx)  # a coded error reply (medisyn.protocol), not an exception
    code, text, site = fed.reply_error(reply)
    assert (code, site) == ("config", "unknown-site") and "node config" in text


def test_pack_unpack_round_trip_and_size_check():
    from medisyn.client import site as site_ops

    a = _arrays(3)
    flat = fed.pack(a)
    assert flat.dtype == np.float32 and flat.size == 17
    np.testing.assert_array_equal(site_ops.pack(a), flat)  # client and server agree
    back = site_ops.unpack(flat, fed.layout_of(a))
    for k in a:
        np.testing.assert_array_equal(back[k], a[k])
    with pytest.raises(ValueError, match="needs 17 values"):
        fed.unpack(flat[:-1], fed.layout_of(a))


def test_frozen_weight_keys_round_trip_in_the_protocol():
    from medisyn import protocol as P

    by_stage = {"vae": {"dec/w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)},
                "text": {"a": np.full((1, 2), 7, np.float32)}}
    flat = P.pack(P.frozen_arrays(by_stage))
    shapes = {s: {k: v.shape for k, v in st.items()} for s, st in by_stage.items()}
    back = P.unpack_frozen(flat, shapes)
    assert set(back) == {"vae", "text"} and set(back["vae"]) == {"dec/w", "b"}  # a name may hold "/"
    for s, st in by_stage.items():
        for k, v in st.items():
            np.testing.assert_array_equal(back[s][k], v)
    assert P.split_frozen_key(P.frozen_key("vae", "dec/w")) == ("vae", "dec/w")
    for bad in ("novae", "/x", "vae/"):
        with pytest.raises(ValueError):
            P.split_frozen_key(bad)
    with pytest.raises(ValueError):
        P.frozen_key("a/b", "w")
    assert P.decode_stages(P.encode_stages(["vae", "text"])) == ["vae", "text"]
    assert P.decode_stages(None) == ["vae"]  # an older server that did not name the stages


def test_site_loads_the_frozen_weights_the_server_writes(tmp_path):
    """The server's stage payload (weights, frozen VAE, extra config) read by the site's own
    model builder gives the coordinator's model, weight for weight."""
    import torch
    from medisyn.client.site import _components

    from medisyn import protocol as P
    from medisyn.config import load_site_config
    from medisyn.models import trainable_state

    cfg = fed_cfg(tmp_path)
    model = fed.GlobalModel(cfg.model, seed=3)
    with torch.no_grad():  # a VAE unlike the site's own fresh build
        for p in model.components.vae.parameters():
            p.add_(0.25)
    state, frozen, extra = fed.stage_payload(model, cfg, "unet")
    assert frozen and all(P.split_frozen_key(k)[0] == "vae" for k in frozen)
    assert extra[P.FROZEN_STAGES] == "vae"
    config = {P.STAGE: "unet", P.SEED: cfg.seed, P.MODEL_CONFIG: cfg.model.model_dump_json(), **extra}
    site = load_site_config(write_site(tmp_path, "breast-us"))
    comps, _, stage, _ = _components(site, config, P.pack(state), P.pack(frozen))
    assert stage == "unet"
    for s in ("vae", "unet"):
        want, got = trainable_state(model.components, s), trainable_state(comps, s)
        assert set(want) == set(got)
        for k in want:
            torch.testing.assert_close(got[k].float(), want[k].float())


# --------------------------------------------------------------------------- supervisors (no daemons)


def test_clientapp_module_is_light():
    import subprocess
    import sys

    code = ("import sys, medisyn.client.app; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'opacus', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_superlink_argv_and_flwr_home(tmp_path):
    from medisyn.server.supervisor import flwr_home_config, superlink_argv

    cfg = fed_cfg(tmp_path, superlink={"port": 9555})
    argv = superlink_argv(cfg)
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "9555"
    assert "--disable-runtime-dependency-installation" in argv and "--insecure" in argv
    assert "--database" not in argv  # in-memory SuperLink state by default
    argv = superlink_argv(fed_cfg(tmp_path, superlink={"database": "sqlite"}))
    assert argv[argv.index("--database") + 1] == str(cfg.run_dir / "superlink.db")
    assert 'address = "127.0.0.1:9555"' in flwr_home_config(cfg) and "insecure = true" in flwr_home_config(cfg)
    tls = fed_cfg(tmp_path, superlink={"insecure": False, "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem",
                                       "ssl_ca_certfile": "/ca.pem", "enable_supernode_auth": True})
    argv = superlink_argv(tls)
    assert "--insecure" not in argv and "--enable-supernode-auth" in argv and "/c.pem" in argv
    assert 'root-certificates = "/ca.pem"' in flwr_home_config(tls)


def test_supervisor_refuses_used_run_dir_without_resume(tmp_path):
    from medisyn.server.supervisor import ExitCode, ServerSupervisor, SupervisorError

    cfg = fed_cfg(tmp_path)
    write_checkpoint(cfg.run_dir, Checkpoint(1, "vae", 1, [], {}, "h"), lambda d: d.mkdir(parents=True))
    with pytest.raises(SupervisorError) as e:
        ServerSupervisor(cfg, echo=lambda _m: None).prepare()
    assert e.value.code == ExitCode.CONFIG and "--resume" in str(e.value)
    sup = ServerSupervisor(cfg, resume=True, echo=lambda _m: None)
    sup.prepare()
    app = cfg.run_dir / "app" / "pyproject.toml"
    assert 'clientapp = "medisyn.client.app:app"' in app.read_text()
    assert [p.name for p in app.parent.iterdir()] == ["pyproject.toml"]  # the thin bundle
    assert json.loads((cfg.run_dir / "federation.resolved.json").read_text())["rounds"] == cfg.rounds


def test_format_round_shows_sites_eps_and_bytes():
    from medisyn.server.supervisor import format_round

    text = format_round({
        "round": 2, "total_rounds": 4, "stage": "unet", "stage_round": 1, "answered": 1, "failed": 1,
        "loss": 0.5, "eval_loss": None, "seconds": 12.0,
        "sites": {"a": {"status": "ok", "loss": 0.5, "epsilon": 1.25, "num-examples": 10, "bytes-up": 2e6,
                        "bytes-down": 2e6, "seconds": 3.0},
                  "b": {"status": "failed", "reason": "rejected: weight 'x' has 1 non-finite values"}},
    })
    assert "round 2/4 [unet 1]" in text and "1 ok, 1 failed" in text
    assert "ε 1.25" in text and "up 2.00 MB" in text and "FAILED" in text and "non-finite" in text


def test_supernode_argv_and_node_config(tmp_path):
    from medisyn.client.supervisor import load_site, node_config_arg, supernode_argv

    p = write_site(tmp_path, "fundus")
    site = load_site(p)
    argv = supernode_argv(site, p, 9999, secret_file=tmp_path / "s")
    assert argv[argv.index("--superlink") + 1] == "127.0.0.1:9092" and "--insecure" in argv
    nc = argv[argv.index("--node-config") + 1]
    from flwr.common.config import parse_config_args

    parsed = parse_config_args([nc])
    assert parsed == {"site-config": str(p.resolve()), "state-dir": str((p.parent / "state").resolve())}
    with pytest.raises(ConfigError):
        node_config_arg({"site-config": 'a"b'})


def test_client_check_reports_data_and_policy(tmp_path):
    from medisyn.client.supervisor import check_site

    code, report = check_site(write_site(tmp_path, "breast-us", privacy="[privacy]\nmax_epsilon = 3.0\n"))
    assert code == 0, report
    assert report["data"]["n_images"] > 0 and report["policy"]["max_epsilon"] == 3.0
    code, report = check_site(tmp_path / "nope.toml")
    assert code == 2 and "not found" in report["error"]
    bad = write_site(tmp_path / "x", "fundus")
    bad.write_text(re.sub(r'path = ".*"', 'path = "/nonexistent/data.npz"', bad.read_text(), count=1))
    code, report = check_site(bad)
    assert code == 3, report


def test_query_hook_enforces_site_policy(tmp_path, client_app):
    """The audit query: an unknown query, or one the site's policy does not allow, is
    refused with a clear message; a copy-detection query without images is an error."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    p = write_site(tmp_path, "fundus", privacy='[privacy]\nallowed_audits = ["membership"]\n')
    q = write_site(tmp_path / "ok", "fundus")
    from medisyn.client.site import node_config_for

    def ctx(path: Path) -> Context:
        return Context(run_id=1, node_id=5, node_config=node_config_for(path, path.parent / "state"),
                       state=RecordDict(), run_config={})

    def ask(audit: str) -> Message:
        return Message(content=RecordDict({"config": ConfigRecord({"audit": audit})}),
                       message_type="query", dst_node_id=5, group_id="")

    def refused(reply: Message, code: str, text: str) -> None:  # a coded error reply (medisyn.protocol)
        assert reply.has_error() and fed.reply_error(reply) == (code, fed.reply_error(reply)[1], "fundus")
        assert text in fed.reply_error(reply)[1]

    refused(client_app(ask("reconstruction"), ctx(q)), "policy-refused", "unknown audit query 'reconstruction'")
    refused(client_app(ask("prompts"), ctx(p)), "policy-refused", "not allowed by the site's policy")
    refused(client_app(ask("copy-detection"), ctx(q)), "config", "carries no synthetic images")
    reply = client_app(ask("prompts"), ctx(q))
    got = json.loads(reply.content.config_records["result"]["json"])
    assert got["prompts"] and all(pr.startswith("ophthalmology") for pr in got["prompts"]), got


AUDIT_FAST = "[audit]\ncontrastive_steps = 8\ncontrastive_batch = 32\nn_plant = 20\nthreads = 1\n"


def test_release_audit_in_process(tmp_path, client_app):
    """The federated audit end to end in process (real ClientApp, real site audits):
    prompts come from the sites, K images per prompt go to every site, each answers with a
    shareable aggregate only; the report carries ε from the DP site's ledger, names the
    site that refused, and the gate fails for the refusing and the non-DP site."""
    from medisyn.audit.report import ReleaseReport, assert_shareable
    from medisyn.server.audit import AuditRequest, run_audit

    from medisyn.privacy.ledger import PrivacyLedger

    dp = '[privacy]\ndp = true\nnoise_multiplier = 1.0\nmax_epsilon = 50.0\naccountant = "rdp"\n'
    refuse = '[privacy]\nallowed_audits = ["membership"]\n'
    sites = ["breast-us", "fundus", "chest-xray"]
    nodes = node_configs(tmp_path, sites=sites, privacy={"breast-us": dp + AUDIT_FAST,
                                                         "fundus": AUDIT_FAST, "chest-xray": refuse})
    grid = LocalGrid(nodes, client_app)
    cfg = fed_cfg(tmp_path, sites=sites, min_sites=3)
    assert fed.run_federation(grid, cfg) == fed.Outcome.DONE
    grid.replies.clear()
    out = tmp_path / "audit"
    req = AuditRequest(run_dir=cfg.run_dir, out_dir=out, n_per_prompt=2, steps=2)
    assert run_audit(grid, cfg, req, attempt="t1") == fed.Outcome.DONE

    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done" and status["attempt"] == "t1" and status["gate"] is False
    rep = ReleaseReport.model_validate_json((out / "release_report.json").read_text())
    # prompts: breast-us 2 labels + fundus 5 grades (chest-xray refused to answer)
    prompts = set(rep.prompts.values())
    assert len(prompts) == 7 and len(rep.synthetic_ids) == 14
    assert {a.site_id for a in rep.sites} == {"breast-us", "fundus"}
    assert rep.expected_sites == sorted(sites)
    assert "not allowed by the site's policy" in rep.site_errors["chest-xray"]
    # ε from breast-us's own ledger; fundus trained without DP
    led = PrivacyLedger.open(tmp_path / "breast-us" / "state", "breast-us", "rdp")
    assert rep.privacy["breast-us"].epsilon == pytest.approx(led.epsilon(), rel=1e-9) and led.epsilon() > 0
    assert rep.privacy["breast-us"].dp is True and rep.privacy["fundus"].dp is False
    reasons = " | ".join(rep.gate.reasons)
    assert "chest-xray: site audited" in reasons and "fundus: ε within cap" in reasons
    assert "trained without DP" in reasons
    assert not any(r.startswith("breast-us: ε") for r in rep.gate.reasons)
    # every site saw the model: VAE view and membership probe ran
    for a in rep.sites:
        assert {v.name for v in a.views} >= {"pixel", "vae"} and a.membership is not None
        assert a.n_synthetic == 14
    # what left the sites: one JSON aggregate each, shareable, no site path or value
    secrets = [str(tmp_path / s) for s in sites] + [str(DEMO)]
    for reply in grid.replies:
        if reply.has_error():
            assert not PATH_LIKE.search(reply.error.reason)
            continue
        assert set(reply.content.keys()) == {"metrics", "result", "site"}
        assert not reply.content.array_records
        text = reply.content.config_records["result"]["json"]
        assert not any(s in text for s in secrets)
        assert_shareable(json.loads(text))
    # released images on disk; the HTML is self-contained
    released = sorted(p.stem for p in (out / "released").glob("*.png"))
    assert released == sorted(rep.released_ids) and len(released) + len(rep.excluded_ids) == 14
    html = (out / "release_report.html").read_text()
    assert 'id="gate"' in html and 'id="missing"' in html and "chest-xray" in html
    assert "src=\"http" not in html


def test_site_keeps_the_audit_index_warm_per_model_and_data(tmp_path, client_app):
    """A long-lived site worker builds the audit's index (fitted encoders, views,
    thresholds) once for a model and its data: a second audit query of the same model is
    answered from it, fitting nothing, with the same flags; another model builds anew."""
    from medisyn.audit import embedders as E
    from medisyn.client.warm import WARM
    from medisyn.server.audit import AuditRequest, run_audit
    from safetensors.torch import load_file, save_file

    WARM.clear()
    sites = ["fundus"]
    nodes = node_configs(tmp_path, sites=sites, privacy={"fundus": AUDIT_FAST})
    grid = LocalGrid(nodes, client_app)
    cfg = fed_cfg(tmp_path, sites=sites, stages=["unet"], local_steps=1)
    assert fed.run_federation(grid, cfg) == fed.Outcome.DONE
    fits = []
    orig = E.PixelEmbedder.fit
    E.PixelEmbedder.fit = lambda self, images: (fits.append(1), orig(self, images))[1]
    try:
        def audit(out: str) -> dict:
            req = AuditRequest(run_dir=cfg.run_dir, out_dir=tmp_path / out, n_per_prompt=2, steps=2,
                               prompts=["ophthalmology, fundus photograph, grade 0"])
            assert run_audit(grid, cfg, req) == fed.Outcome.DONE
            return json.loads((tmp_path / out / "release_report.json").read_text())

        first = audit("a1")
        assert len(fits) == 1 and len(WARM.keys("audit-index:fundus photograph")) == 1
        second = audit("a2")
        assert len(fits) == 1 and len(WARM.keys("audit-index:fundus photograph")) == 1  # the kept index served it
        assert [s["flagged_ids"] for s in first["sites"]] == [s["flagged_ids"] for s in second["sites"]]
        assert first["sites"][0]["views"] == second["sites"][0]["views"]
        model_file = next((cfg.run_dir / "model" / "unet").glob("*.safetensors"))
        state = load_file(str(model_file))
        save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, str(model_file))
        audit("a3")  # another model: its VAE view differs, a new index is built
        assert len(fits) == 2 and len(WARM.keys("audit-index:fundus photograph")) == 2
    finally:
        E.PixelEmbedder.fit = orig
        WARM.clear()


def test_audit_rejects_unshareable_aggregate(tmp_path, client_app):
    """A site whose aggregate carries a path is refused (and so fails the gate)."""
    from medisyn.audit.report import ReleaseReport
    from medisyn.server.audit import AuditRequest, run_audit

    sites = ["fundus"]  # no model in the query, so the site does not verify the images
    nodes = node_configs(tmp_path, sites=sites, privacy={"fundus": "[privacy]\naudit_verify_sample = 0\n" + AUDIT_FAST})

    def leak(_site_path: str, reply: Message) -> Message:
        rec = reply.content.config_records.get("result")
        if rec is not None and "flagged_ids" in rec["json"]:
            data = json.loads(rec["json"])
            data["flagged_ids"] = ["/data/hospital/patient-17.png"]
            rec["json"] = json.dumps(data)
        return reply

    grid = LocalGrid(nodes, client_app, tamper={1000: leak})
    cfg = fed_cfg(tmp_path, sites=sites, stages=["unet"])
    assert fed.run_federation(grid, cfg) == fed.Outcome.DONE
    out = tmp_path / "audit"
    assert run_audit(grid, cfg, AuditRequest(run_dir=cfg.run_dir, out_dir=out, n_per_prompt=1, steps=2,
                                             prompts=["ophthalmology, fundus photograph, grade 0"],
                                             send_model=False)) == fed.Outcome.DONE
    rep = ReleaseReport.model_validate_json((out / "release_report.json").read_text())
    assert rep.sites == [] and "rejected aggregate" in rep.site_errors["fundus"]
    assert not rep.gate.passed
    assert "/data/hospital" not in (out / "release_report.json").read_text()


def test_audit_needs_a_finished_run(tmp_path):
    from medisyn.server.audit import AuditRequest, run_audit_command

    lines: list[str] = []
    code = run_audit_command(AuditRequest(run_dir=tmp_path / "nope", out_dir=tmp_path / "o"), echo=lines.append)
    assert code == 2 and "not a MediSyn run directory" in lines[-1]
    cfg = fed_cfg(tmp_path)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "federation.resolved.json").write_text(cfg.model_dump_json())
    code = run_audit_command(AuditRequest(run_dir=cfg.run_dir, out_dir=tmp_path / "o"), echo=lines.append)
    assert code == 2 and "no final model" in lines[-1]


def test_sigterm_as_interrupt_raises_and_restores():
    import os
    import signal

    from medisyn.procs import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        import time

        time.sleep(5)  # the handler interrupts this
    assert signal.getsignal(signal.SIGTERM) is before


def test_fedavgm_state_round_trip():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    cfg = FederationConfig(strategy={"name": "fedavgm", "server_lr": 2.0, "server_momentum": 0.5}).strategy
    s = make_strategy(cfg)
    assert (s.server_learning_rate, s.server_momentum) == (2.0, 0.5)
    s.momentum_vector = [np.ones(3, np.float32), np.full(2, 3.0, np.float32)]
    meta, arrays = export_state(s)
    s2 = make_strategy(cfg)
    restore_state(s2, json.loads(json.dumps(meta)), arrays)
    np.testing.assert_array_equal(s2.momentum_vector[1], np.full(2, 3.0))


def test_fedavgm_server_lr_scales_the_averaged_update(tmp_path, client_app):
    """Same sites, same seeds: FedAvgM with server_lr 2 moves the global model twice as far as FedAvg."""
    from safetensors.numpy import load_file

    def final_vae(tag: str, **strategy) -> dict[str, np.ndarray]:
        cfg = fed_cfg(tmp_path / tag, stages=["vae"], sites=SITES[:2], strategy=strategy)
        grid = LocalGrid(node_configs(tmp_path / tag, sites=SITES[:2]), client_app)
        assert fed.run_federation(grid, cfg) == fed.Outcome.DONE
        return load_file(str(latest_checkpoint(cfg.run_dir).model_dir / "vae" / "diffusion_pytorch_model.safetensors"))

    from medisyn.models import build_components, trainable_state

    init = {k: v.numpy() for k, v in trainable_state(build_components(TINY_MODEL), "vae").items()}
    avg = final_vae("avg", name="fedavg")
    avgm = final_vae("avgm", name="fedavgm", server_lr=2.0)
    keys = [k for k in init if k in avg and init[k].dtype.kind == "f"]
    d1 = np.concatenate([(avg[k] - init[k]).ravel() for k in keys])
    d2 = np.concatenate([(avgm[k] - init[k]).ravel() for k in keys])
    assert np.linalg.norm(d1) > 0
    np.testing.assert_allclose(d2, 2.0 * d1, rtol=1e-3, atol=1e-5)


def test_at_most_max_parallel_sites_are_asked_at_once(monkeypatch):
    """Sites sharing one machine: a message goes out when an earlier one is answered; every
    site is asked and answers; a site that never answers is dropped after its own timeout."""
    monkeypatch.setattr(fed, "POLL_SECONDS", 0.0)

    class Pool(LocalGrid):
        def __init__(self, silent=()):
            super().__init__({}, None)
            self.out: dict[str, Message] = {}
            self.most = 0
            self.order: list[int] = []
            self.silent = set(silent)

        def push_messages(self, messages):  # noqa: ANN001, ANN201
            ids = []
            for m in messages:
                mid = f"m{m.metadata.dst_node_id}"
                m.metadata.__dict__["_message_id"] = mid
                self.out[mid] = m
                self.order.append(m.metadata.dst_node_id)
                ids.append(mid)
            self.most = max(self.most, len(self.out))
            return ids

        def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
            talking = [i for i in sorted(message_ids) if self.out[i].metadata.dst_node_id not in self.silent]
            if not talking:
                return []
            m = self.out.pop(talking[0])  # one answer per poll
            n = m.metadata.dst_node_id
            return [Message(RecordDict({P.RESULT: ConfigRecord({P.RESULT_JSON: json.dumps({"n": n})}),
                                        "site": ConfigRecord({"site-id": f"s{n}"})}), reply_to=m)]

    def content():
        return RecordDict({P.CONFIG: ConfigRecord({P.AUDIT: P.QUERY_PROMPTS})})

    grid = Pool()
    results, errors = fed.query_sites(grid, [1, 2, 3, 4, 5], content, 10.0, {}, max_parallel=2)
    assert grid.most == 2 and sorted(grid.order) == [1, 2, 3, 4, 5] and not errors
    assert {s: r["n"] for s, r in results.items()} == {f"s{i}": i for i in range(1, 6)}

    grid = Pool(silent={1})
    results, _ = fed.query_sites(grid, [1, 2, 3], content, 0.05, {}, max_parallel=2)
    assert sorted(results) == ["s2", "s3"]


def test_pool_asks_the_slowest_site_first(tmp_path, client_app):
    """With max_parallel_sites, a round pushes its sites slowest-first (their last task
    times), so the round waits for the slowest beside the others, not after them."""

    class PushPull(LocalGrid):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.pushed: list[list[int]] = []
            self.ready: dict[str, Message] = {}

        def push_messages(self, messages):  # noqa: ANN001, ANN201
            ids = []
            for m in messages:
                mid = f"m{len(self.ready)}-{m.metadata.dst_node_id}"
                m.metadata.__dict__["_message_id"] = mid
                if m.metadata.message_type != P.QUERY_MESSAGE:
                    if not self.pushed or len(self.pushed[-1]) == len(self.node_configs):
                        self.pushed.append([])
                    self.pushed[-1].append(m.metadata.dst_node_id)
                (reply,) = LocalGrid.send_and_receive(self, [m])
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                self.ready[mid] = reply
                ids.append(mid)
            return ids

        def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
            return [self.ready.pop(i) for i in list(message_ids) if i in self.ready]

    sites = SITES[:3]
    cfg = fed_cfg(tmp_path, stages=["unet"], rounds=2, local_steps=1, sites=sites, min_sites=3, max_parallel_sites=1)
    nodes = node_configs(tmp_path, sites=sites)
    grid = PushPull(nodes, client_app)
    assert fed.run_federation(grid, cfg) == fed.Outcome.DONE
    assert len(grid.pushed) == 2 and sorted(grid.pushed[0]) == sorted(nodes)
    first = fed.iter_metrics(cfg.run_dir)[0]["sites"]
    node_of = {next(s for s in sites if f"/{s}/" in str(nodes[n]["site-config"])): n for n in nodes}
    slowest_first = sorted(sites, key=lambda s: -first[s]["site-seconds"])
    assert grid.pushed[1] == [node_of[s] for s in slowest_first], (first, grid.pushed)


def test_cyclic_rounds_chain_the_sites_in_a_rotating_order(tmp_path, client_app):
    """``[strategy] name = "cyclic"``: each site starts from the model the site before it
    trained, the round's model is the last site's reply, and the next round starts one
    site further on (no site is always last)."""
    from safetensors.numpy import load_file

    from medisyn.models import build_components, trainable_state

    received: list[tuple[int, np.ndarray]] = []
    sent: list[tuple[int, np.ndarray]] = []

    class Recording(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
            messages = list(messages)
            for m in messages:
                if m.metadata.message_type != P.QUERY_MESSAGE:
                    received.append((m.metadata.dst_node_id, np.asarray(m.content["arrays"][P.PACKED].numpy()).copy()))
            return super().send_and_receive(messages, timeout=timeout)

    def keep(node: int):
        def f(_site, reply: Message) -> Message:
            sent.append((node, np.asarray(reply.content["arrays"][P.PACKED].numpy()).copy()))
            return reply
        return f

    nodes = node_configs(tmp_path)
    cfg = fed_cfg(tmp_path, stages=["vae"], rounds=2, strategy={"name": "cyclic"})
    grid = Recording(nodes, client_app, tamper={n: keep(n) for n in nodes})
    assert fed.run_federation(grid, cfg) == fed.Outcome.DONE
    assert [n for n, _ in received] == [1000, 1001, 1002, 1001, 1002, 1000]
    assert [n for n, _ in sent] == [n for n, _ in received]
    init = P.pack({k: v.numpy() for k, v in trainable_state(build_components(TINY_MODEL), "vae").items()})
    np.testing.assert_array_equal(received[0][1], init)
    for i in range(1, 6):  # every site starts from the previous site's model
        np.testing.assert_array_equal(received[i][1], sent[i - 1][1])
        assert not np.array_equal(sent[i][1], sent[i - 1][1])
    saved = load_file(str(latest_checkpoint(cfg.run_dir).model_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    np.testing.assert_array_equal(P.pack({k: saved[k] for k in trainable_state(build_components(TINY_MODEL), "vae")}),
                                  sent[-1][1])
    rec = fed.iter_metrics(cfg.run_dir)[-1]
    assert sorted(rec["sites"]) == ["breast-us", "chest-xray", "fundus"]
    assert all(rec["sites"][s]["status"] == "ok" for s in rec["sites"])


def test_replies_from_flowers_grid_are_pulled_soon_then_less_often(monkeypatch):
    """On Flower's real grid (whose own send_and_receive pulls every 3 s) the round pulls
    the replies itself: first after 0.1 s, each wait 1.5x the last, never above
    POLL_SECONDS; every message pushed at once when there is no limit."""
    monkeypatch.setattr(fed, "_flower_grid", lambda grid: True)
    sleeps: list[float] = []
    monkeypatch.setattr(fed.time, "sleep", sleeps.append)

    class Slow(LocalGrid):
        def __init__(self, answer_at: int):
            super().__init__({}, None)
            self.answer_at, self.pulls, self.out = answer_at, 0, {}

        def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
            raise AssertionError("Flower's own send_and_receive polls every 3 s")

        def push_messages(self, messages):  # noqa: ANN001, ANN201
            for m in messages:
                m.metadata.__dict__["_message_id"] = f"m{m.metadata.dst_node_id}"
                self.out[m.metadata.message_id] = m
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
            self.pulls += 1
            if self.pulls < self.answer_at:
                return []
            return [Message(RecordDict({"site": ConfigRecord({"site-id": f"s{self.out[i].metadata.dst_node_id}"})}),
                            reply_to=self.out.pop(i)) for i in message_ids]

    msgs = [Message(RecordDict(), dst_node_id=n, message_type=P.QUERY_MESSAGE) for n in (1, 2)]
    grid = Slow(answer_at=9)
    replies = fed.send_and_receive(grid, msgs, timeout=60.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2"]
    assert sleeps == pytest.approx([0.1, 0.15, 0.225, 0.3375, 0.50625, 0.759375, 1.0, 1.0])


def test_resume_refuses_a_checkpoint_whose_autoencoder_the_sites_would_not_build(tmp_path, client_app):
    """Without a vae stage every site builds the autoencoder from [model] and the run's
    seed. Resuming with a config under which they would build another one (here: another
    seed for the tiny preset's random autoencoder; in the field: another MediSyn version's
    shipped weights) is refused; the same config resumes."""
    cfg = fed_cfg(tmp_path, stages=["unet"], sites=SITES[:2], stage_rounds={"unet": 2})
    nodes = node_configs(tmp_path, sites=SITES[:2])
    grid = LocalGrid(nodes, client_app)
    grid.crash_after_sends = 1
    with pytest.raises(KeyboardInterrupt):
        fed.run_federation(grid, cfg)
    assert latest_checkpoint(cfg.run_dir).round == 1
    other = cfg.model_copy(update={"seed": cfg.seed + 1})
    with pytest.raises(ValueError, match="checkpoint's autoencoder"):
        fed.run_federation(LocalGrid(nodes, client_app), other, resume=True)
    assert fed.run_federation(LocalGrid(nodes, client_app), cfg, resume=True) == fed.Outcome.DONE
    assert [r["round"] for r in fed.iter_metrics(cfg.run_dir)] == [1, 2]
