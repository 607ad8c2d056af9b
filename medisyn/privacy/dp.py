"""DP-SGD for one local round: :class:`DPSession`.

The session owns everything that makes a round differentially private, so the training
loop stays an ordinary loop::

    with DPSession(unet, opt, dataset, batch_size=32, collate_fn=collate,
                   privacy=site.privacy, state_dir=site.site.state_dir,
                   site_id=site.site.id, stage="unet", run_id=run_id, round=rnd,
                   planned_steps=steps) as dp:      # or ledger=PrivacyLedger.open(...)
        for batch in dp.batches():               # exactly planned_steps Poisson batches
            if dp.is_empty(batch):
                dp.noise_only_step()            # empty Poisson batch: noise-only step
                continue
            loss = compute_loss(unet, batch)    # mean over the batch
            loss.backward()
            dp.step()                           # clip, noise, record in ledger, update
        metrics = dp.metrics()                  # {"epsilon", "delta", ...}, cumulative

What it does:

- refuses DP with gradient checkpointing (it breaks per-sample gradients), and layers
  Opacus cannot compute per-sample gradients for;
- dry-runs the accountant for ``planned_steps`` before any step and raises
  :class:`PrivacyBudgetError` if ε would pass the site's ``max_epsilon`` (the module is
  not touched in that case);
- attaches Opacus hooks in place (``wrap_model=False``: the module keeps its class and
  call signature), wraps the optimizer in Opacus's ``DPOptimizer`` (flat per-sample
  clipping at ``max_grad_norm``, Gaussian noise σ·C, mean over the *expected* batch
  size), and samples batches by Poisson sampling (Opacus
  ``UniformWithReplacementSampler``, rate q = batch_size / N);
- records every noised step in the site's :class:`PrivacyLedger` *before* the parameters
  are updated (every ``persist_every`` steps; default 1), so a process killed mid-round
  leaves a ledger that counts every step taken (at most one more).

Randomness: the Poisson sampler and the noise use generators seeded from the OS
(``os.urandom``). Their secrecy is part of the guarantee (a known noise seed lets anyone
subtract the noise). ``insecure_seed`` makes them reproducible for tests only.
The generators are PRNGs (torch's Mersenne twister / Philox), not a CSPRNG.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medisyn.config import PrivacyConfig
from medisyn.errors import ConfigError, DataError, PrivacyBudgetError
from medisyn.privacy.accounting import derive_noise_multiplier
from medisyn.privacy.ledger import PrivacyLedger, open_site_ledger  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


class EmptyBatch:
    """What :meth:`DPSession.batches` yields for an empty Poisson batch."""

    __slots__ = ()

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "EmptyBatch()"


class _EmptyAwareCollate:
    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        from torch.utils.data import default_collate

        self.collate_fn = collate_fn or default_collate

    def __call__(self, samples: list[Any]) -> Any:
        if len(samples) == 0:
            return EmptyBatch()
        return self.collate_fn(samples)


def _contiguous_activations(fn: Callable[..., Any]) -> Callable[..., Any]:
    def grad_sampler(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor):
        acts = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in activations]
        return fn(layer, acts, backprops)

    grad_sampler._medisyn_contiguous = True  # type: ignore[attr-defined]
    grad_sampler.__wrapped__ = fn  # type: ignore[attr-defined]
    return grad_sampler


def install_opacus_fixes() -> None:
    """Work around an Opacus 1.6 bug that silently gives wrong per-sample gradients.

    ``opacus.utils.tensor_utils.unfold2d`` (used by the Conv2d grad sampler) builds its
    patches with ``as_strided`` assuming a contiguous NCHW tensor. A channels-last input
    (the diffusers VAE's mid-block attention returns one: ``transpose(...).reshape(...)``,
    and GroupNorm/SiLU keep that layout into the next ResnetBlock2D's convolutions)
    yields garbage (zeros here) for the per-sample weight gradients of every conv after
    the attention. We make conv activations contiguous before the grad sampler runs.
    Idempotent; affects the process-wide Opacus registry (a correctness fix only).
    """
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    for layer_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        fn = GradSampleHooks.GRAD_SAMPLERS.get(layer_type)
        if fn is not None and not getattr(fn, "_medisyn_contiguous", False):
            GradSampleHooks.GRAD_SAMPLERS[layer_type] = _contiguous_activations(fn)


def gradient_checkpointing_modules(module: nn.Module) -> list[str]:
    """Names of (sub)modules with gradient checkpointing on (diffusers / transformers)."""
    found = []
    if bool(getattr(module, "is_gradient_checkpointing", False)):
        found.append(type(module).__name__)
    for name, m in module.named_modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            found.append(name or type(m).__name__)
    return found


def resolve_noise_multiplier(
    privacy: PrivacyConfig, *, delta: float, sample_rate: float, planned_steps: int
) -> float:
    """σ from ``[privacy]``: ``noise_multiplier`` if set, else derived so that
    ``planned_rounds × planned_steps`` steps at ``sample_rate`` spend ``target_epsilon``
    (Opacus ``get_noise_multiplier``, with the site's accountant)."""
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    if privacy.target_epsilon is None or privacy.planned_rounds is None:
        raise ConfigError("[privacy] needs noise_multiplier, or target_epsilon with planned_rounds")
    return derive_noise_multiplier(
        target_epsilon=privacy.target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=privacy.planned_rounds * planned_steps,
        kind=privacy.accountant,
    )


def _checked_session_args(module: nn.Module, dataset: Dataset, privacy: PrivacyConfig, *, planned_steps: int,
                          persist_every: int, ledger: PrivacyLedger | None, state_dir: os.PathLike[str] | str | None,
                          site_id: str | None) -> tuple[PrivacyLedger, int]:
    """:class:`DPSession`'s arguments checked before anything is touched; returns the
    site's ledger (``ledger``, or opened from ``state_dir`` and ``site_id``) and the
    number of records."""
    if not privacy.dp:
        raise ConfigError("DPSession needs [privacy] dp = true")
    if planned_steps < 1:
        raise ValueError(f"planned_steps must be >= 1, got {planned_steps}")
    if persist_every < 1:
        raise ValueError("persist_every must be >= 1")
    n = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise DataError("the site's training set is empty; nothing to train under DP")
    gc = gradient_checkpointing_modules(module)
    if gc:
        raise ConfigError(
            "DP-SGD cannot run with gradient checkpointing: it breaks Opacus's "
            f"per-sample gradients (on in: {', '.join(gc[:5])}). Set "
            "[train] gradient_checkpointing = false (or use LoRA / a smaller batch)."
        )
    if ledger is None:
        if state_dir is None or site_id is None:
            raise ConfigError(
                "DPSession needs the site's ledger: pass ledger=, or state_dir= and site_id="
            )
        ledger = open_site_ledger(state_dir, site_id, privacy, n_records=n)
    elif site_id is not None and site_id != ledger.site_id:
        raise ConfigError(f"site_id {site_id!r} does not match the ledger's {ledger.site_id!r}")
    return ledger, n


class DPSession:
    """DP-SGD for one local round of one stage. See the module docstring."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Dataset,
        *,
        batch_size: int,
        privacy: PrivacyConfig,
        ledger: PrivacyLedger | None = None,
        stage: str,
        run_id: str,
        round: int,
        planned_steps: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        persist_every: int = 1,
        insecure_seed: int | None = None,
        state_dir: os.PathLike[str] | str | None = None,
        site_id: str | None = None,
        seed: int | None = None,
    ) -> None:
        """See the module docstring.

        The ledger: pass ``ledger`` (a :class:`PrivacyLedger`), or ``state_dir`` and
        ``site_id`` to open the site's ledger here (:func:`open_site_ledger`).
        ``seed`` is accepted for symmetry with the non-DP loop and deliberately NOT
        used: DP sampling and noise always come from ``os.urandom`` unless
        ``insecure_seed`` is given (tests only; voids the guarantee).
        """
        # Called after the noise, before the update: may add gradients of a *public* term
        # (no private data in it), e.g. medisyn.train.PromptAnchorHook on procedural inputs.
        self.after_noise: Callable[[], None] | None = None
        ledger, n = _checked_session_args(module, dataset, privacy, planned_steps=planned_steps,
                                          persist_every=persist_every, ledger=ledger, state_dir=state_dir,
                                          site_id=site_id)
        if seed is not None and insecure_seed is None:
            logger.debug("DPSession ignores seed=%s: DP randomness comes from the OS", seed)
        self.module = module
        self.privacy = privacy
        self.ledger = ledger
        self.stage = stage
        self.run_id = run_id
        self.round = int(round)
        self.planned_steps = int(planned_steps)
        self.persist_every = int(persist_every)
        self.n_records = n
        self.batch_size = int(batch_size)
        if self.batch_size > n:
            logger.warning(
                "batch_size %d > %d records: every record is sampled at every step (q = 1)",
                self.batch_size,
                n,
            )
        self.sample_rate = min(1.0, self.batch_size / n)
        self.expected_batch_size = max(1, round_half_even(n * self.sample_rate))
        if ledger.delta is None:  # a ledger opened without the record count (a reader's)
            raise ConfigError("DPSession needs a ledger with δ pinned: open it with n_records")
        self.delta: float = ledger.delta
        self.max_grad_norm = float(privacy.max_grad_norm)
        self.noise_multiplier = resolve_noise_multiplier(
            privacy,
            delta=self.delta,
            sample_rate=self.sample_rate,
            planned_steps=self.planned_steps,
        )
        self.steps_taken = 0
        # per-record gradients seen and clipped (site-local: logged, never in a reply)
        self.records_seen = 0
        self.records_clipped = 0
        self.noise_only_steps = 0
        self._pending = 0
        self._closed = False

        # Dry run before touching anything.
        self.epsilon_before, self.epsilon_planned = self.check_budget()

        self._attach_opacus(module, optimizer, dataset, n, collate_fn=collate_fn, num_workers=num_workers,
                            insecure_seed=insecure_seed)
        self._log_round()

    def _log_round(self) -> None:
        logger.info(
            "DP round: site=%s stage=%s run=%s round=%d σ=%.4f q=%.5f C=%g steps=%d "
            "ε %.3f -> %.3f (δ=%.3g, %s, cap %g)",
            self.ledger.site_id, self.stage, self.run_id, self.round, self.noise_multiplier, self.sample_rate,
            self.max_grad_norm, self.planned_steps, self.epsilon_before, self.epsilon_planned, self.delta,
            self.ledger.accountant, self.privacy.max_epsilon,
        )

    def _attach_opacus(self, module: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset, n: int, *,
                       collate_fn: Callable[[list[Any]], Any] | None, num_workers: int,
                       insecure_seed: int | None) -> None:
        """Opacus's parts, validated first for a readable error: per-sample-gradient hooks on
        ``module`` (in place), the DP optimizer (clip, noise from the OS unless
        ``insecure_seed``) and the Poisson sampler over ``dataset``."""
        from opacus.grad_sample.utils import prepare_module
        from opacus.optimizers import DPOptimizer
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(module, strict=False)
        if errors:
            raise ConfigError(
                "Opacus cannot compute per-sample gradients for this model: "
                + "; ".join(str(e) for e in errors[:5])
            )
        module_params = {id(p) for p in module.parameters()}
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not self.params:
            raise ConfigError("the optimizer has no trainable parameters")
        for p in self.params:
            if id(p) not in module_params:
                raise ConfigError("the optimizer holds parameters that are not the module's")

        if insecure_seed is not None:
            logger.warning(
                "DP session seeded with insecure_seed=%d: sampling and noise are reproducible, "
                "which voids the privacy guarantee (tests only)",
                insecure_seed,
            )
            seeds = (insecure_seed, insecure_seed + 1)
        else:
            seeds = tuple(int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(2))
        self._sample_gen = torch.Generator().manual_seed(seeds[0])
        device = self.params[0].device
        self._noise_gen = torch.Generator(device=device).manual_seed(seeds[1])

        install_opacus_fixes()
        try:
            self.hooks = prepare_module(
                module,
                "hooks",
                wrap_model=False,
                batch_first=True,
                loss_reduction="mean",
                strict=True,
            )
        except NotImplementedError as e:
            raise ConfigError(
                f"Opacus cannot compute per-sample gradients for this model: {e}"
            ) from None
        try:
            self.hooks.forbid_grad_accumulation()
            self.optimizer = DPOptimizer(
                optimizer,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=self.expected_batch_size,
                loss_reduction="mean",
                generator=self._noise_gen,
            )
            self.optimizer.attach_step_hook(self._on_noised_step)
            self.data_loader = DataLoader(
                dataset,
                batch_sampler=UniformWithReplacementSampler(
                    num_samples=n,
                    sample_rate=self.sample_rate,
                    generator=self._sample_gen,
                    steps=self.planned_steps,
                ),
                collate_fn=_EmptyAwareCollate(collate_fn),
                num_workers=num_workers,
            )
        except BaseException:
            self.hooks.cleanup()
            raise

    # ------------------------------------------------------------------ budget
    def check_budget(self, steps: int | None = None) -> tuple[float, float]:
        """Dry-run the accountant for ``steps`` (default: the planned steps still to take).

        Returns ``(ε spent, ε after)``; raises :class:`PrivacyBudgetError` naming the site,
        the spent ε, the ε after the round and the cap when the cap would be passed.
        """
        if steps is None:
            steps = self.planned_steps - getattr(self, "steps_taken", 0)
        spent = self.ledger.epsilon()
        exceed, after = self.ledger.would_exceed(
            self.noise_multiplier, self.sample_rate, steps, self.privacy.max_epsilon
        )
        if exceed:
            raise PrivacyBudgetError(
                f"site {self.ledger.site_id!r} refuses {self.stage} round {self.round} "
                f"(run {self.run_id}): it has spent ε={_fmt(spent)} and {steps} more DP steps "
                f"(σ={self.noise_multiplier:.4g}, q={self.sample_rate:.4g}) would bring it to "
                f"ε={_fmt(after)} at δ={self.delta:.3g}, over its cap max_epsilon="
                f"{self.privacy.max_epsilon:g}"
            )
        return spent, after

    # ------------------------------------------------------------------ data
    def batches(self) -> Iterator[Any]:
        """Exactly ``planned_steps`` Poisson batches (:class:`EmptyBatch` when empty)."""
        return iter(self.data_loader)

    @staticmethod
    def is_empty(batch: Any) -> bool:
        """True for an empty Poisson batch (``EmptyBatch``, or a batch whose first tensor
        has batch size 0)."""
        if isinstance(batch, EmptyBatch):
            return True
        if isinstance(batch, torch.Tensor):
            return batch.shape[0] == 0 if batch.dim() else False
        if isinstance(batch, dict):
            for v in batch.values():
                if isinstance(v, torch.Tensor) and v.dim():
                    return v.shape[0] == 0
                if isinstance(v, list | tuple):
                    return len(v) == 0
            return len(batch) == 0
        if isinstance(batch, Sequence) and not isinstance(batch, str):
            return len(batch) == 0 or DPSession.is_empty(batch[0])
        return False

    # ------------------------------------------------------------------ steps
    def accumulate(self) -> None:
        """Clip this part of a Poisson batch per record and add it to the step's sum:
        no noise, no update, nothing recorded (call :meth:`step` after the last part)."""
        self._check_missing()
        self._count_clipped()
        self.optimizer.signal_skip_step(do_skip=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def average_copies(self, k: int) -> None:
        """The part just backpropagated held each record ``k`` times in a row (record-major,
        ``repeat_interleave``): replace the per-item gradients by each record's mean over its
        copies, so that clipping bounds each *record's* contribution (noise multiplicity)."""
        if k == 1:
            return
        self._check_missing()
        for p in self.params:
            gs = p.grad_sample
            if isinstance(gs, list) or gs.shape[0] % k:
                raise RuntimeError(f"per-sample gradients of {tuple(gs.shape) if not isinstance(gs, list) else 'a list'} "
                                   f"do not hold {k} copies of each record")
            p.grad_sample = gs.view(gs.shape[0] // k, k, *gs.shape[1:]).mean(dim=1)

    def step(self) -> None:
        """Clip per-sample gradients, add noise, record the step, update, zero grads."""
        self._check_missing()
        self._count_clipped()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _check_missing(self) -> None:
        self._check_open()
        missing = [i for i, p in enumerate(self.params) if getattr(p, "grad_sample", None) is None]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {len(self.params)} trainable parameters have no per-sample "
                "gradient: call loss.backward() on the batch first, use every trainable "
                "parameter in the forward pass, and run exactly one forward pass per step (or per part, "
                "with accumulate)"
            )

    def _count_clipped(self) -> None:
        """Count the per-record gradients above C (the share clipped tells a site whether
        its ``max_grad_norm`` fits its gradients: near 1, C throws signal away against the
        same noise; near 0, C is larger than the gradients and the noise, σ·C, is larger
        than it needs to be). Kept at the site: it depends on the records, with no DP."""
        with torch.no_grad():  # per-parameter norms, as Opacus takes them: no squared copy of the grads
            norms = torch.stack([torch.linalg.vector_norm(p.grad_sample.reshape(p.grad_sample.shape[0], -1), dim=1)
                                 for p in self.params], dim=1)
            norms = torch.linalg.vector_norm(norms, dim=1)
            self.records_seen += int(norms.shape[0])
            self.records_clipped += int((norms > self.max_grad_norm).sum())

    @property
    def clipped_fraction(self) -> float:
        """Share of the per-record gradients so far whose norm was above C (NaN before any)."""
        return self.records_clipped / self.records_seen if self.records_seen else float("nan")

    def noise_only_step(self) -> None:
        """The step for an empty Poisson batch: no data, only noise (still accounted)."""
        self._check_open()
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.noise_only_steps += 1
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _on_noised_step(self, _optimizer: Any) -> None:
        # Runs inside DPOptimizer.pre_step, after noising, before the parameter update.
        if self.steps_taken >= self.planned_steps:
            raise PrivacyBudgetError(
                f"site {self.ledger.site_id!r}: {self.stage} round {self.round} planned "
                f"{self.planned_steps} DP steps and was budgeted for them; refusing step "
                f"{self.steps_taken + 1}"
            )
        self.steps_taken += 1
        self._pending += 1
        if self._pending >= self.persist_every:
            self.flush()
        if self.after_noise is not None:
            self.after_noise()

    def flush(self) -> None:
        """Persist steps not yet in the ledger."""
        if self._pending:
            self.ledger.record_steps(
                self.stage,
                self.run_id,
                self.round,
                self.noise_multiplier,
                self.sample_rate,
                self._pending,
                max_grad_norm=self.max_grad_norm,
            )
            self._pending = 0

    # ------------------------------------------------------------------ results
    @property
    def epsilon(self) -> float:
        """Cumulative ε of the site (every stage, run and round) at :attr:`delta`."""
        self.flush()
        return self.ledger.epsilon()

    def metrics(self) -> dict[str, float | int]:
        """Metrics for the reply: cumulative ``epsilon`` and ``delta`` plus this round's
        DP parameters. ε is ``inf`` only for a site that once trained without DP."""
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-sample-rate": self.sample_rate,
            "dp-max-grad-norm": self.max_grad_norm,
            "dp-steps": self.steps_taken,
            "dp-empty-batches": self.noise_only_steps,
        }

    def close(self) -> None:
        """Persist the ledger and remove the Opacus hooks (idempotent)."""
        if self._closed:
            return
        if self.records_seen:
            logger.info("DP round: %d of %d per-record gradients (%.0f%%) were clipped at C=%g (site-local)",
                        self.records_clipped, self.records_seen, 100 * self.clipped_fraction, self.max_grad_norm)
        try:
            self.flush()
        finally:
            self._closed = True
            self.hooks.cleanup()
            for p in self.params:
                for attr in ("grad_sample", "summed_grad"):
                    if hasattr(p, attr):
                        delattr(p, attr)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("DPSession is closed")

    def __enter__(self) -> DPSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def round_half_even(x: float) -> int:
    return int(round(x))


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3f}"
