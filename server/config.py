"""The coordinator's federation config (``federation.toml``): validated once, then trusted.

Example (see ``deploy/federation.toml``)::

    rounds = 3              # rounds per stage
    local_steps = 50        # local optimisation steps per site per round
    stages = ["vae", "unet"]
    min_sites = 3
    run_dir = "runs/fed-1"  # relative to this file
    sites = ["breast-us", "chest-xray", "fundus"]

    [strategy]
    name = "fedavg"         # fedavg | fedprox | fedadam

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

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medisyn.config import ModelConfig, Stage, TrainConfig, config_hash, read_toml, validate
from medisyn.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StrategyConfig(_Frozen):
    """Server-side aggregation. ``fedprox`` needs ``proximal_mu``; ``fedadam`` the ``eta``/``beta``."""

    name: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = Field(default=0.01, ge=0)
    eta: float = Field(default=1e-2, gt=0)  # FedAdam server learning rate
    eta_l: float = Field(default=1e-2, gt=0)
    beta_1: float = Field(default=0.9, ge=0, lt=1)
    beta_2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)
    # Reply checks: an update whose L2 norm exceeds this many times the round's median
    # update norm is rejected (needs at least 3 accepted replies to be meaningful).
    max_norm_ratio: float = Field(default=10.0, gt=1)


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
    sites: list[str] = Field(default_factory=list)  # expected site ids; empty: accept any
    superlink: ServerSuperLink = Field(default_factory=ServerSuperLink)
    run_dir: Path = Path("runs/medisyn")

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
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
    """Load ``federation.toml``; relative paths (run_dir, TLS files) resolve against its folder."""
    path = Path(path)
    cfg: FederationConfig = validate(FederationConfig, read_toml(path), str(path))
    return resolve_paths(cfg, path.parent.resolve())


def resolve_paths(cfg: FederationConfig, base: Path) -> FederationConfig:
    def r(p: Path | None) -> Path | None:
        if p is None:
            return None
        return p if p.is_absolute() else (base / p).resolve()

    sl = cfg.superlink
    return cfg.model_copy(
        update={
            "run_dir": r(cfg.run_dir),
            "superlink": sl.model_copy(
                update={
                    "ssl_certfile": r(sl.ssl_certfile),
                    "ssl_keyfile": r(sl.ssl_keyfile),
                    "ssl_ca_certfile": r(sl.ssl_ca_certfile),
                }
            ),
        }
    )


def federation_from_json(text: str) -> FederationConfig:
    """Read back the resolved config the supervisor writes into the run directory."""
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"resolved federation config is not valid JSON: {e}") from e
    return validate(FederationConfig, data, "federation.resolved.json")
