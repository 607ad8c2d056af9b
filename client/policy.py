"""The site's policy, enforced from the site's own state — never from the message's word.

One :class:`SitePolicy` per site answers every question a task asks before it touches
site data: may this round train (rounds and steps the site has *actually* trained, DP
required?), is the model small enough, may this model be evaluated or audited once more,
which δ applies, how large must an audit group be before its statistics leave the site.

Limits come from ``[privacy]`` in the site TOML (:class:`medisyn.config.PrivacyConfig`).
Counts come from the site's state directory:

- ``site-counters.json``: a monotonic counter of the training rounds and local steps the
  site has answered (over all runs and stages) and of the evaluate/audit queries it has
  answered per (kind, model hash). Written atomically (``medisyn.fileio``) under an
  ``flock`` *before* the task runs: a round that fails or is killed still counts (fail
  closed; never under-counts). A message's ``round`` field is a label only.
- The privacy ledger is a floor: the counter never reports fewer rounds or steps than
  the ledger records, so deleting the counter file does not reset what DP steps prove.
  A corrupt counter file is refused (restore it from backup), as a corrupt ledger is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medisyn.config import SiteConfig
from medisyn.errors import MediSynError, PrivacyBudgetError
from medisyn.fileio import atomic_write_json

COUNTERS_NAME = "site-counters.json"
COUNTERS_LOCK = "site-counters.lock"
FORMAT = "medisyn-site-counters"
VERSION = 1

# Query kinds that run on a model the server sends (budgeted per model hash).
MODEL_QUERIES = ("evaluate", "copy-detection")


class PolicyRefused(MediSynError):
    """The site's policy refuses this task; the message names the limit and its value."""

    exit_code = 4
    code = "policy-refused"


class CountersError(MediSynError):
    """The site's counter file is unreadable: refuse rather than reset the counts."""

    exit_code = 5
    code = "ledger"


@dataclass
class Counters:
    rounds: int = 0
    steps: int = 0
    queries: dict[str, int] = field(default_factory=dict)

    def to_json(self, site_id: str) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "site_id": site_id, "rounds": self.rounds,
                "steps": self.steps, "queries": dict(sorted(self.queries.items()))}


def model_fingerprint(config: Mapping[str, Any], *arrays: Any) -> str:
    """sha256 of what defines the model a message carries: its weights (every array, in
    order; ``None`` for an absent one) and the model settings in its config."""
    h = hashlib.sha256()
    from medisyn.protocol import MODEL_KEYS

    for key in MODEL_KEYS:
        h.update(f"{key}={config.get(key)!s};".encode())
    hash_arrays(h, arrays)
    return h.hexdigest()


def hash_arrays(h: Any, arrays: Any) -> None:
    """Feed ``arrays`` (in order; ``None`` for an absent one) into the hash ``h``: dtype,
    shape and raw bytes of each, so equal hashes mean equal arrays."""
    import numpy as np

    for a in arrays:
        if a is None:
            h.update(b"none;")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.data.cast("B"))


class SitePolicy:
    """The site's limits (``[privacy]``) applied to its own counters (see module doc)."""

    def __init__(self, site: SiteConfig):
        self.site = site
        self.privacy = site.privacy
        self.site_id = site.site.id
        self.state_dir = Path(site.site.state_dir)

    # ------------------------------------------------------------------ state
    @property
    def path(self) -> Path:
        return self.state_dir / COUNTERS_NAME

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / COUNTERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def counters(self) -> Counters:
        """The site's counts: the counter file, floored by the privacy ledger."""
        c = self._read_file()
        from medisyn.privacy.ledger import open_site_ledger

        ledger = open_site_ledger(self.state_dir, self.site_id, self.privacy.model_copy(update={"delta": None}),
                                  n_records=None)
        if ledger.exists:
            c.rounds = max(c.rounds, len(ledger.rounds()))
            c.steps = max(c.steps, ledger.total_steps)
        return c

    def _read_file(self) -> Counters:
        if not self.path.exists():
            return Counters()
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ValueError("not a MediSyn site counter file")
            if data.get("site_id") != self.site_id:
                raise ValueError(f"it belongs to site {data.get('site_id')!r}, not {self.site_id!r}")
            rounds, steps = int(data["rounds"]), int(data["steps"])
            queries = {str(k): int(v) for k, v in dict(data["queries"]).items()}
            if rounds < 0 or steps < 0 or any(v < 0 for v in queries.values()):
                raise ValueError("negative count")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CountersError(
                f"{self.path}: the site's policy counters are unreadable ({e}); restore the file "
                "from backup. Refusing to reset the site's round, step and query counts."
            ) from None
        return Counters(rounds=rounds, steps=steps, queries=queries)

    def _write(self, c: Counters) -> None:
        atomic_write_json(self.path, c.to_json(self.site_id))

    # ------------------------------------------------------------------ training
    def admit_train(self, *, local_steps: int, n_parameters: int) -> Counters:
        """Check a training round against the site's limits and count it (before any step).

        Raises :class:`PrivacyBudgetError` when the site's rounds or steps would pass
        ``max_rounds`` / ``max_total_steps`` (the server stops a run that every site
        refuses for budget) and :class:`PolicyRefused` for any other limit.
        """
        p = self.privacy
        if p.require_dp and not p.dp:
            raise PolicyRefused("site policy requires DP (require_dp = true) but [privacy] dp = false")
        if local_steps < 1:
            raise PolicyRefused(f"the server asks for {local_steps} local steps; a round needs >= 1")
        if p.max_local_steps is not None and local_steps > p.max_local_steps:
            raise PolicyRefused(f"the server asks for {local_steps} local steps; the site's policy allows "
                                f"at most max_local_steps = {p.max_local_steps} per round")
        self.check_model_size(n_parameters)
        with self._locked():
            c = self.counters()
            if p.max_rounds is not None and c.rounds + 1 > p.max_rounds:
                raise PrivacyBudgetError(f"the site has trained {c.rounds} round(s); its policy allows "
                                         f"max_rounds = {p.max_rounds} in total")
            if p.max_total_steps is not None and c.steps + local_steps > p.max_total_steps:
                raise PrivacyBudgetError(
                    f"the site has trained {c.steps} local step(s); {local_steps} more would pass its "
                    f"policy's max_total_steps = {p.max_total_steps}")
            c.rounds += 1
            c.steps += local_steps
            self._write(c)
        return c

    def check_model_size(self, n_parameters: int) -> None:
        bound = self.privacy.max_model_parameters
        if bound is not None and n_parameters > bound:
            raise PolicyRefused(f"the model has {n_parameters:,} parameters; the site's policy allows at "
                                f"most max_model_parameters = {bound:,}")

    # ------------------------------------------------------------------ queries
    def admit_query(self, kind: str, model_hash: str) -> int:
        """Count one ``kind`` query (``evaluate``, ``copy-detection``) on the model with
        ``model_hash``; refuse it past ``max_queries_per_model``. Returns the count."""
        bound = self.privacy.max_queries_per_model
        key = f"{kind}:{model_hash}"
        with self._locked():
            c = self.counters()
            n = c.queries.get(key, 0)
            if bound is not None and n + 1 > bound:
                raise PolicyRefused(f"the site has answered {n} {kind} quer{'y' if n == 1 else 'ies'} on this "
                                    f"model (hash {model_hash[:12]}); its policy allows max_queries_per_model "
                                    f"= {bound}")
            c.queries[key] = n + 1
            self._write(c)
        return n + 1

    # ------------------------------------------------------------------ audit / δ
    @property
    def audit_min_group(self) -> int:
        """k: an audit group's statistics leave the site only for >= k images."""
        return int(self.privacy.audit_min_group)

    def delta(self, n_records: int) -> float:
        """The one δ rule: ``[privacy] delta``, else ``min(1e-5, 1/(10 N))`` (pinned in the
        ledger at its first write; :func:`medisyn.privacy.ledger.open_site_ledger`)."""
        from medisyn.privacy.accounting import default_delta

        return float(self.privacy.delta) if self.privacy.delta is not None else default_delta(n_records)

    def describe(self) -> dict[str, Any]:
        """The policy and the site's counts, for ``medisyn-client check`` (site-local)."""
        p = self.privacy
        c = self.counters()
        return {
            "require_dp": p.require_dp, "dp": p.dp, "max_epsilon": p.max_epsilon, "delta": p.delta,
            "max_rounds": p.max_rounds, "max_local_steps": p.max_local_steps,
            "max_total_steps": p.max_total_steps, "max_model_parameters": p.max_model_parameters,
            "max_queries_per_model": p.max_queries_per_model, "audit_min_group": p.audit_min_group,
            "allowed_audits": list(p.allowed_audits),
            "rounds_trained": c.rounds, "steps_trained": c.steps,
        }
