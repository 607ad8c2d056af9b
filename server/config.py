"""The coordinator's federation config (``federation.toml``): validated once, then trusted.

Example (see ``deploy/federation.toml``)::

    rounds = 3              # rounds per stage
    local_steps = 50        # local optimisation steps per site per round
    stages = ["vae", "unet"]
    min_sites = 3
    run_dir = "runs/fed-1"  # relative to this file
    sites = ["breast-us", "chest-xray", "fundus"]   # or one [sites.<id>] table per site:

    # [sites.breast-us]
    # max_examples = 600     # FedAvg weight cap: a larger num-examples claim counts as 600
    # public_key = "pki/site-breast-us-key.pub"   # the site's SuperNode auth key (enrolment)

    [strategy]
    name = "fedavg"         # fedavg | fedprox | fedadam
    max_update_norm = 50.0  # reject any update ||w_site - w_global|| above this

    [model]                 # medisyn.config.ModelConfig
    resolution = 32

    [train]                 # medisyn.config.TrainConfig
    batch_size = 16

    [superlink]
    host = "127.0.0.1"
    port = 9092
    insecure = true
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medisyn.config import (
    ModelConfig,
    Stage,
    TrainConfig,
    config_hash,
    is_loopback_host,
    read_toml,
    validate,
)
from medisyn.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StrategyConfig(_Frozen):
    """Server-side aggregation. ``fedprox`` needs ``proximal_mu``; ``fedadam`` the ``eta``/``beta``;
    ``fedavgm`` (FedAvg with a server learning rate and momentum) ``server_lr``/``server_momentum``."""

    # "cyclic": the sites train one after another each round, each from the model the site
    # before it trained (no averaging; medisyn.server.federation.cyclic_round). A site then
    # receives the model the previous site trained, not only an average (docs/federation.md).
    name: Literal["fedavg", "fedprox", "fedadam", "fedavgm", "cyclic"] = "fedavg"
    # Each accepted site's weight in the average: "examples" (FedAvg's: the num-examples it
    # claims, capped by its max_examples) or "equal" (every accepted site counts once). Sites
    # train the same steps per round, so "equal" averages the same amount of training from
    # each and serves every site's specialty alike; with "examples" one large site sets most
    # of the model (a 4-site study: the chest X-ray site 53%, breast 12%; docs/quality.md).
    # "equal" also makes a site's num-examples claim buy nothing.
    weighting: Literal["examples", "equal"] = "examples"
    # FedAvgM: global += server_lr * (momentum buffer of the averaged site updates). With
    # one image type per site, each site's type-specific progress reaches the average
    # diluted by its weight (~1/4 with 4 sites); server_lr > 1 restores it (docs/quality.md).
    server_lr: float = Field(default=1.0, gt=0, le=10)
    server_momentum: float = Field(default=0.0, ge=0, lt=1)
    proximal_mu: float = Field(default=0.01, ge=0)
    eta: float = Field(default=1e-2, gt=0)  # FedAdam server learning rate
    eta_l: float = Field(default=1e-2, gt=0)
    beta_1: float = Field(default=0.9, ge=0, lt=1)
    beta_2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)
    # Reply checks: an update whose L2 norm exceeds this many times the round's median
    # update norm is rejected (needs at least 3 accepted replies to be meaningful).
    max_norm_ratio: float = Field(default=10.0, gt=1)
    # Absolute bound on ||w_site - w_global|| (L2 over the stage's trainable weights), checked
    # whatever the other replies are (the median rule cannot fire with <= 2 replies).
    # None: no absolute bound (`medisyn-server check` warns).
    max_update_norm: float | None = Field(default=None, gt=0)
    # FedAvg weight cap for a site without its own [sites.<id>] max_examples.
    # None: such a site's num-examples claim is not capped (`medisyn-server check` warns).
    max_examples: int | None = Field(default=None, ge=1)


class SiteEnrolment(_Frozen):
    """What the coordinator knows about one enrolled site (``[sites.<id>]``)."""

    # The most training examples this site is enrolled with: its FedAvg weight is
    # computed from min(num-examples it claims, max_examples).
    max_examples: int | None = Field(default=None, ge=1)
    # The site's SuperNode authentication public key (OpenSSH ECDSA, ``*.pub``).
    public_key: Path | None = None


class ServerSuperLink(_Frozen):
    """Where the coordinator's SuperLink listens. Keep ``host`` on loopback and expose
    only ``/v1/fleet/*`` through a TLS reverse proxy (the Control API is unauthenticated
    in open-source Flower 1.42; see docs/federation.md)."""

    host: str = "127.0.0.1"
    port: int = Field(default=9092, ge=1, le=65535)
    insecure: bool = True
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_ca_certfile: Path | None = None
    enable_supernode_auth: bool = False
    # "memory" (default): Flower's in-memory SuperLink state. Resume never needs it (the
    # run's checkpoints hold the run's state).
    # "sqlite": SuperLink state in RUN_DIR/superlink.db (runs and nodes survive a SuperLink
    # restart). Measured here: under CPU starvation Flower 1.42's SQLite state (5 s
    # busy_timeout) fails requests with "database is locked" (a site's reply is dropped,
    # or the ServerApp's pull fails and the run ends); see docs/federation.md.
    database: Literal["sqlite", "memory"] = "memory"

    @model_validator(mode="after")
    def _tls(self) -> ServerSuperLink:
        if self.insecure and not is_loopback_host(self.host):
            raise ValueError(
                f"superlink: host {self.host!r} is not loopback, so the SuperLink needs TLS "
                "(insecure = false, ssl_certfile, ssl_keyfile); better, keep host = \"127.0.0.1\" "
                "and expose only /v1/fleet/* through the TLS reverse proxy"
            )
        if not self.insecure and (self.ssl_certfile is None or self.ssl_keyfile is None):
            raise ValueError("superlink: insecure = false needs ssl_certfile and ssl_keyfile")
        if self.enable_supernode_auth and self.insecure:
            raise ValueError("superlink: enable_supernode_auth needs TLS (insecure = false)")
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class FederationConfig(_Frozen):
    """One federated run: stages, rounds, sites, strategy, model and training settings."""

    name: str = Field(default="medisyn", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    rounds: int = Field(default=3, ge=1)  # rounds per stage
    stage_rounds: dict[Stage, int] = Field(default_factory=dict)  # per-stage override
    local_steps: int = Field(default=50, ge=1)
    stage_local_steps: dict[Stage, int] = Field(default_factory=dict)
    stages: list[Stage] = Field(default_factory=lambda: ["vae", "unet"])
    min_sites: int = Field(default=2, ge=1)
    round_timeout: float = Field(default=3600.0, gt=0)  # seconds to wait for replies
    site_wait_timeout: float = Field(default=600.0, gt=0)  # wait for min_sites to connect
    evaluate_every: int = Field(default=0, ge=0)  # 0: only after each stage's last round
    evaluate: bool = True  # False: no federated evaluation at all
    keep_checkpoints: int = Field(default=2, ge=1)
    seed: int = 0
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # at most this many sites train (or answer a query) at once; None: all. For sites that
    # share one machine (the demo): one per core holds less memory and takes about as long.
    max_parallel_sites: int | None = Field(default=None, ge=1)
    sites: list[str] = Field(default_factory=list)  # expected site ids; empty: accept any
    # Per-site enrolment, written in TOML as ``[sites.<id>]`` tables (then ``sites`` is
    # their ids); a plain ``sites = [...]`` list leaves it empty.
    enrolment: dict[str, SiteEnrolment] = Field(default_factory=dict)
    superlink: ServerSuperLink = Field(default_factory=ServerSuperLink)
    run_dir: Path = Path("runs/medisyn")

    @model_validator(mode="before")
    @classmethod
    def _site_tables(cls, data: Any) -> Any:
        """``[sites.<id>]`` tables -> ``sites`` (ids) + ``enrolment``."""
        if isinstance(data, dict) and isinstance(data.get("sites"), dict):
            if data.get("enrolment"):
                raise ValueError("give either [sites.<id>] tables or an enrolment table, not both")
            tables = data["sites"]
            data = {**data, "sites": list(tables), "enrolment": {k: (v or {}) for k, v in tables.items()}}
        return data

    def max_examples_for(self, site: str) -> int | None:
        """The FedAvg weight cap of ``site`` (its enrolment, else ``strategy.max_examples``)."""
        e = self.enrolment.get(site)
        if e is not None and e.max_examples is not None:
            return e.max_examples
        return self.strategy.max_examples

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
        unknown = sorted(set(self.enrolment) - set(self.sites))
        if unknown:
            raise ValueError(f"enrolment for {unknown}, which are not in sites {self.sites}")
        if not self.stages:
            raise ValueError("stages is empty; use e.g. [\"vae\", \"unet\"]")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages {self.stages} repeats a stage")
        if self.model.preset == "sd" and "vae" in self.stages:
            raise ValueError("preset 'sd' uses the pretrained VAE: use stages = [\"unet\"]")
        for key in (*self.stage_rounds, *self.stage_local_steps):
            if key not in self.stages:
                raise ValueError(f"per-stage setting for stage {key!r}, which is not in stages")
        if self.sites and self.min_sites > len(self.sites):
            raise ValueError(
                f"min_sites {self.min_sites} exceeds the {len(self.sites)} expected sites"
            )
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites {self.sites} repeats a site id")
        st = self.strategy
        plain = st.name in ("fedavg", "fedprox", "cyclic") or (
            st.name == "fedavgm" and st.server_lr == 1.0 and st.server_momentum == 0.0)
        if self.train.ema_scope == "run" and self.train.ema_decay and not plain:
            # the run's EMA is aggregated with the weights; a server optimizer would step it too
            raise ValueError(
                f"[train] ema_scope = \"run\" needs an averaging strategy (fedavg, fedprox, cyclic); "
                f"[strategy] name = {st.name!r} would move the EMA with its server optimizer")
        return self

    def rounds_for(self, stage: Stage) -> int:
        return self.stage_rounds.get(stage, self.rounds)

    def steps_for(self, stage: Stage) -> int:
        return self.stage_local_steps.get(stage, self.local_steps)

    @property
    def total_rounds(self) -> int:
        return sum(self.rounds_for(s) for s in self.stages)

    def round_plan(self) -> list[tuple[int, Stage, int]]:
        """``[(global_round, stage, round_within_stage), ...]``, global rounds from 1."""
        plan: list[tuple[int, Stage, int]] = []
        for stage in self.stages:
            for k in range(1, self.rounds_for(stage) + 1):
                plan.append((len(plan) + 1, stage, k))
        return plan

    def hash(self) -> str:
        return config_hash(self)


def load_federation_config(path: Path) -> FederationConfig:
    """Load ``federation.toml``; relative paths (run_dir, TLS files, site keys) resolve
    against its folder, and every TLS / key file it names must exist."""
    path = Path(path)
    cfg: FederationConfig = validate(FederationConfig, read_toml(path), str(path))
    cfg = resolve_paths(cfg, path.parent.resolve())
    missing = missing_files(cfg)
    if missing:
        raise ConfigError(f"{path}: " + "; ".join(missing))
    return cfg


def missing_files(cfg: FederationConfig) -> list[str]:
    """One message per TLS or site-key file the config names that is not a file."""
    sl = cfg.superlink
    out = []
    named = [(f"[superlink] {k}", getattr(sl, k)) for k in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certfile")]
    named += [(f"[sites.{k}] public_key", e.public_key) for k, e in cfg.enrolment.items()]
    for label, p in named:
        if p is not None and not Path(p).is_file():
            out.append(f"{label} = {p} does not exist")
    return out


def config_warnings(cfg: FederationConfig) -> list[str]:
    """Settings that are valid but leave a door open (printed by ``medisyn-server check``)."""
    sl = cfg.superlink
    out = []
    if sl.insecure:
        out.append("superlink: no TLS (allowed only on loopback); a federation across "
                   "hospitals needs TLS and enable_supernode_auth")
    elif not sl.enable_supernode_auth:
        out.append("superlink: enable_supernode_auth = false: any SuperNode that reaches the "
                   "proxy may join")
    if not is_loopback_host(sl.host):
        out.append(f"superlink: host {sl.host!r} exposes Flower's unauthenticated Control API "
                   "(job submission) beyond this machine; keep it on 127.0.0.1 behind the proxy")
    if sl.enable_supernode_auth and not any(e.public_key for e in cfg.enrolment.values()):
        out.append("superlink: enable_supernode_auth = true but no [sites.<id>] public_key: "
                   "register site keys with `flwr supernode register` before sites connect")
    cyclic = cfg.strategy.name == "cyclic"
    if cfg.strategy.max_update_norm is None:
        out.append("strategy.max_update_norm is not set: "
                   + ("with cyclic rounds every reply is checked alone, so no site's update is bounded"
                      if cyclic else "with 2 or fewer replies a round has no bound on a site's update"))
    if cyclic:
        out.append("strategy.name = 'cyclic': each site receives the model the previous site trained "
                   "(one site's update, not an average); use it only among sites that accept this")
    uncapped = [s for s in cfg.sites if cfg.max_examples_for(s) is None]
    if not cyclic and cfg.strategy.weighting == "examples" and (uncapped or not cfg.sites):
        out.append("no max_examples cap for " + (f"sites {uncapped}" if cfg.sites else "any site")
                   + ": a site's num-examples claim sets its FedAvg weight unchecked")
    if cfg.model.preset == "tiny" and "vae" not in cfg.stages:
        from medisyn.models.procedural import shipped_for

        if cfg.model.vae.init == "random" or shipped_for(cfg.model) is None:
            out.append("stages has no 'vae' and this tiny autoencoder has no pretrained weights "
                       f"([model.vae] init = {cfg.model.vae.init!r}, blocks "
                       f"{list(cfg.model.vae.block_out_channels)}): the UNet learns on an untrained "
                       "autoencoder; add stage 'vae' or keep the default architecture")
    return out


def resolve_paths(cfg: FederationConfig, base: Path) -> FederationConfig:
    def r(p: Path | None) -> Path | None:
        if p is None:
            return None
        return p if p.is_absolute() else (base / p).resolve()

    sl = cfg.superlink
    return cfg.model_copy(
        update={
            "run_dir": r(cfg.run_dir),
            "enrolment": {
                k: e.model_copy(update={"public_key": r(e.public_key)})
                for k, e in cfg.enrolment.items()
            },
            "superlink": sl.model_copy(
                update={
                    "ssl_certfile": r(sl.ssl_certfile),
                    "ssl_keyfile": r(sl.ssl_keyfile),
                    "ssl_ca_certfile": r(sl.ssl_ca_certfile),
                }
            ),
        }
    )


ENROLMENT = "enrolment.json"


def read_enrolment(run_dir: Path, *, by_key: bool = False) -> dict[Any, Any]:
    """``RUN_DIR/enrolment.json`` as ``{node_id: site}`` (``by_key``: ``{key sha256:
    (node_id, site)}``); empty when there is none or it is unreadable."""
    try:
        nodes = json.loads((Path(run_dir) / ENROLMENT).read_text())["nodes"]
        if by_key:
            return {v["key_sha256"]: (int(k), v["site"]) for k, v in nodes.items()}
        return {int(k): str(v["site"]) for k, v in nodes.items()}
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}


def federation_from_json(text: str) -> FederationConfig:
    """Read back the resolved config the supervisor writes into the run directory."""
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"resolved federation config is not valid JSON: {e}") from e
    return validate(FederationConfig, data, "federation.resolved.json")
