"""The site's privacy ledger: a JSON file in the site state dir that makes ε cumulative.

Files in ``state_dir`` (see docs/privacy.md for the format):

- ``privacy-ledger.json``: the accountant history — one entry per (stage, run, round,
  σ, q, max_grad_norm) with its step count — plus the accountant type, δ, the site id,
  a format version and a sha256 checksum over the rest.
- ``privacy-ledger.trained``: the marker. Written right after every ledger write that
  counts steps; it records the site id and the total step count. If the marker exists,
  the site *has trained before*: a missing, corrupt or rolled-back ledger (fewer steps
  than the marker says) is a :class:`LedgerError`, never a silent reset.
- ``privacy-ledger.lock``: an ``flock`` lock taken around every read-modify-write, so
  two processes at one site (e.g. two stages) both add their steps.

Writes are atomic: temp file in the same directory, ``fsync``, ``os.replace``, ``fsync``
of the directory.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medisyn.errors import LedgerError
from medisyn.fileio import atomic_write_json  # noqa: F401  (re-exported)
from medisyn.privacy.accounting import ACCOUNTANTS, epsilon, merge_history

logger = logging.getLogger(__name__)

LEDGER_NAME = "privacy-ledger.json"
MARKER_NAME = "privacy-ledger.trained"
LOCK_NAME = "privacy-ledger.lock"
FORMAT = "medisyn-privacy-ledger"
VERSION = 1


def ledger_path(state_dir: Path) -> Path:
    return Path(state_dir) / LEDGER_NAME


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _checksum(body: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    stage: str
    run_id: str
    round: int
    sigma: float
    q: float
    steps: int
    max_grad_norm: float | None = None

    def key(self) -> tuple[Any, ...]:
        return (self.stage, self.run_id, self.round, self.sigma, self.q, self.max_grad_norm)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "run_id": self.run_id,
            "round": self.round,
            "sigma": self.sigma,
            "q": self.q,
            "steps": self.steps,
            "max_grad_norm": self.max_grad_norm,
        }

    @classmethod
    def from_json(cls, d: Any) -> LedgerEntry:
        if not isinstance(d, dict):
            raise ValueError("entry is not an object")
        e = cls(
            stage=str(d["stage"]),
            run_id=str(d["run_id"]),
            round=int(d["round"]),
            sigma=float(d["sigma"]),
            q=float(d["q"]),
            steps=int(d["steps"]),
            max_grad_norm=None if d.get("max_grad_norm") is None else float(d["max_grad_norm"]),
        )
        _check_entry_values(e.sigma, e.q, e.steps)
        return e


def _check_entry_values(sigma: float, q: float, steps: int) -> None:
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    if not (0 < q <= 1):
        raise ValueError(f"q must be in (0, 1], got {q}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")


class PrivacyLedger:
    """A site's cumulative DP-SGD history on disk. Open with :meth:`open`."""

    def __init__(
        self,
        state_dir: Path,
        *,
        site_id: str,
        accountant: str,
        delta: float | None,
        entries: list[LedgerEntry],
        created: str,
        exists: bool,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.site_id = site_id
        self.accountant = accountant
        self.delta = delta
        self._entries = entries
        self.created = created
        self._exists = exists

    # ------------------------------------------------------------------ paths
    @property
    def path(self) -> Path:
        return self.state_dir / LEDGER_NAME

    @property
    def marker_path(self) -> Path:
        return self.state_dir / MARKER_NAME

    # ------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        state_dir: Path,
        site_id: str,
        accountant: str = "prv",
        delta: float | None = None,
        *,
        default_delta: float | None = None,
        create: bool = True,
    ) -> PrivacyLedger:
        """Open (or start) the ledger in ``state_dir``.

        ``delta``: the site's configured δ. A new ledger pins it (or ``default_delta``
        when ``delta`` is None); an existing ledger keeps the δ it was created with, and a
        different explicit ``delta`` is a :class:`LedgerError` (ε values at different δ
        are not comparable). ``accountant`` (``prv``/``rdp``) is how ε is computed from
        the history; the history itself is accountant-independent.

        Raises :class:`LedgerError` when the site has trained before (marker present)
        and the ledger is missing, corrupt, rolled back or belongs to another site.
        Nothing is written until the first :meth:`record_steps`.
        """
        if accountant not in ACCOUNTANTS:
            raise LedgerError(f"unknown accountant {accountant!r}; use one of {list(ACCOUNTANTS)}")
        state_dir = Path(state_dir)
        path = state_dir / LEDGER_NAME
        marker = _read_marker(state_dir / MARKER_NAME)
        if marker is not None and marker.get("site_id") not in (None, site_id):
            raise LedgerError(
                f"{state_dir / MARKER_NAME}: this state dir belongs to site "
                f"{marker.get('site_id')!r}, not {site_id!r}"
            )
        if not path.exists():
            if marker is not None:
                raise LedgerError(
                    f"{path}: privacy ledger is missing, but site {site_id!r} has trained "
                    f"before ({state_dir / MARKER_NAME} records {marker.get('total_steps')} DP "
                    "steps). Restore the ledger from backup; refusing to reset ε to 0."
                )
            if not create:
                raise LedgerError(f"{path}: no privacy ledger (site {site_id!r} has not trained)")
            d = delta if delta is not None else default_delta
            # d is None: a reader that does not know the site's record count; the ledger
            # has no steps (ε = 0 at any δ) and δ is pinned by the first write.
            if d is not None and not 0 < d < 1:
                raise LedgerError(f"delta must be in (0, 1), got {d}")
            return cls(
                state_dir,
                site_id=site_id,
                accountant=accountant,
                delta=None if d is None else float(d),
                entries=[],
                created=_now(),
                exists=False,
            )
        data = _read_ledger(path)
        if data["site_id"] != site_id:
            raise LedgerError(
                f"{path}: ledger belongs to site {data['site_id']!r}, not {site_id!r}"
            )
        entries = data["entries"]
        total = sum(e.steps for e in entries)
        if marker is not None and total < int(marker.get("total_steps", 0)):
            raise LedgerError(
                f"{path}: ledger counts {total} DP steps but {state_dir / MARKER_NAME} "
                f"records {marker.get('total_steps')}: the ledger was rolled back or "
                "replaced. Restore the latest ledger; refusing to under-report ε."
            )
        if delta is not None and float(delta) != data["delta"]:
            raise LedgerError(
                f"{path}: the ledger was started with delta={data['delta']:g}, but "
                f"delta={float(delta):g} was requested. ε is cumulative at one δ: set "
                f"[privacy] delta = {data['delta']!r} in the site config (or leave it unset)."
            )
        if data["accountant"] != accountant:
            logger.info(
                "privacy ledger %s was written with accountant %s; computing ε with %s",
                path,
                data["accountant"],
                accountant,
            )
        return cls(
            state_dir,
            site_id=site_id,
            accountant=accountant,
            delta=data["delta"],
            entries=entries,
            created=data["created"],
            exists=True,
        )

    # ------------------------------------------------------------------ reading
    @property
    def exists(self) -> bool:
        """Whether the ledger is on disk (the site has recorded DP steps)."""
        return self._exists

    def entries(self) -> list[LedgerEntry]:
        return list(self._entries)

    def history(self) -> list[tuple[float, float, int]]:
        """The accountant history ``[(σ, q, steps)]`` (consecutive equal (σ, q) merged,
        exactly as an Opacus accountant stepped one step at a time holds it)."""
        return merge_history((e.sigma, e.q, e.steps) for e in self._entries)

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self._entries)

    def epsilon(self, accountant: str | None = None) -> float:
        """Cumulative ε at the ledger's δ over every recorded step."""
        if not self._entries:
            return 0.0
        return epsilon(self.history(), self._pinned_delta(), accountant or self.accountant)

    def epsilon_after(self, sigma: float, q: float, steps: int) -> float:
        """ε if ``steps`` more steps at (σ, q) were taken now (a dry run)."""
        return epsilon([*self.history(), (sigma, q, steps)], self._pinned_delta(), self.accountant)

    def _pinned_delta(self) -> float:
        if self.delta is None:
            raise LedgerError(
                f"{self.path}: δ is not pinned yet; open the ledger with the site's record count "
                "(medisyn.privacy.ledger.open_site_ledger(..., n_records=N))"
            )
        return self.delta

    def would_exceed(
        self, sigma: float, q: float, steps: int, max_epsilon: float
    ) -> tuple[bool, float]:
        """Dry-run ``steps`` more steps; return ``(ε_after > max_epsilon, ε_after)``."""
        after = self.epsilon_after(sigma, q, steps)
        return (not after <= max_epsilon), after

    def rounds(
        self, stage: str | None = None, run_id: str | None = None
    ) -> list[tuple[str, str, int]]:
        """Distinct (stage, run_id, round) with recorded steps, in order of first record."""
        seen: dict[tuple[str, str, int], None] = {}
        for e in self._entries:
            if (stage is None or e.stage == stage) and (run_id is None or e.run_id == run_id):
                if e.steps > 0:
                    seen.setdefault((e.stage, e.run_id, e.round), None)
        return list(seen)

    def summary(self) -> dict[str, Any]:
        """JSON-safe summary: ε in total and per stage and per (stage, run)."""
        per_stage: dict[str, list[tuple[float, float, int]]] = {}
        per_run: dict[tuple[str, str], list[LedgerEntry]] = {}
        for e in self._entries:
            per_stage.setdefault(e.stage, []).append((e.sigma, e.q, e.steps))
            per_run.setdefault((e.stage, e.run_id), []).append(e)
        runs = []
        for (stage, run_id), es in per_run.items():
            runs.append(
                {
                    "stage": stage,
                    "run_id": run_id,
                    "rounds": sorted({e.round for e in es if e.steps > 0}),
                    "steps": sum(e.steps for e in es),
                    "sigma": sorted({e.sigma for e in es}),
                    "q": sorted({e.q for e in es}),
                    # ε of this run alone (as if nothing else had been spent)
                    "epsilon_alone": _json_float(
                        epsilon([(e.sigma, e.q, e.steps) for e in es], self._pinned_delta(), self.accountant)
                    ),
                }
            )
        return {
            "site_id": self.site_id,
            "accountant": self.accountant,
            "delta": self.delta,
            "total_steps": self.total_steps,
            "epsilon": _json_float(self.epsilon()),
            "stages": {
                s: {
                    "steps": sum(h[2] for h in hist),
                    "epsilon_alone": _json_float(epsilon(hist, self._pinned_delta(), self.accountant)),
                }
                for s, hist in per_stage.items()
            },
            "runs": runs,
        }

    # ------------------------------------------------------------------ writing
    def record_steps(
        self,
        stage: str,
        run_id: str,
        round: int,
        sigma: float,
        q: float,
        steps: int = 1,
        *,
        max_grad_norm: float | None = None,
    ) -> None:
        """Add ``steps`` DP-SGD steps at (σ, q) to the ledger, atomically on disk.

        Read-modify-write under an ``flock``: the on-disk ledger is re-read (and verified),
        so steps recorded by another process at this site are kept.
        """
        _check_entry_values(float(sigma), float(q), int(steps))
        if steps == 0:
            return
        self._pinned_delta()
        new = LedgerEntry(
            stage=str(stage),
            run_id=str(run_id),
            round=int(round),
            sigma=float(sigma),
            q=float(q),
            steps=int(steps),
            max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
        )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            # Under the lock no writer is mid-write: temp files left by a killed process
            # are stale.
            for stale in self.state_dir.glob(".privacy-ledger.*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()
            if self.path.exists():
                fresh = PrivacyLedger.open(self.state_dir, self.site_id, self.accountant)
                if fresh.delta != self.delta:
                    raise LedgerError(
                        f"{self.path}: δ on disk ({fresh.delta:g}) differs from this "
                        f"session's δ ({self.delta:g})"
                    )
                entries = fresh._entries
                created = fresh.created
            else:
                marker = _read_marker(self.marker_path)
                if marker is not None or self._exists:
                    raise LedgerError(
                        f"{self.path}: privacy ledger disappeared while site "
                        f"{self.site_id!r} was training; refusing to reset ε to 0"
                    )
                entries, created = [], self.created
            if entries and entries[-1].key() == new.key():
                last = entries[-1]
                entries = [
                    *entries[:-1],
                    LedgerEntry(**{**last.to_json(), "steps": last.steps + new.steps}),
                ]
            else:
                entries = [*entries, new]
            self._write(entries, created)
            self._entries = entries
            self.created = created
            self._exists = True

    def record_non_private(self, stage: str, run_id: str, round: int, steps: int) -> None:
        """Record steps trained on site data without DP noise: ε becomes ∞ for good."""
        self.record_steps(stage, run_id, round, 0.0, 1.0, steps)

    def _write(self, entries: list[LedgerEntry], created: str) -> None:
        body: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "site_id": self.site_id,
            "accountant": self.accountant,
            "delta": self.delta,
            "created": created,
            "updated": _now(),
            "total_steps": sum(e.steps for e in entries),
            "entries": [e.to_json() for e in entries],
        }
        body["checksum"] = _checksum({k: v for k, v in body.items() if k != "checksum"})
        atomic_write_json(self.path, body)
        # Marker second: a crash in between leaves ledger >= marker, which is valid.
        atomic_write_json(
            self.marker_path,
            {
                "format": FORMAT + "-marker",
                "site_id": self.site_id,
                "total_steps": body["total_steps"],
                "updated": body["updated"],
            },
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def open_site_ledger(
    state_dir: os.PathLike[str] | str,
    site_id: str,
    privacy: Any,
    *,
    n_records: int | None,
) -> PrivacyLedger:
    """Open a site's ledger: the one opener for training, the ClientApp, ``medisyn-client
    check``, ``medisyn privacy show`` and the audit.

    ``privacy``: the site's :class:`~medisyn.config.PrivacyConfig` (accountant, δ).
    The one δ rule: an existing ledger keeps the δ it was started with (a different
    explicit ``[privacy] delta`` is a :class:`LedgerError`); a new ledger pins
    ``[privacy] delta``, else :func:`~medisyn.privacy.accounting.default_delta` of
    ``n_records`` (the site's training records). ``n_records=None`` is for readers that do
    not know N: a ledger not yet written then has no δ (``delta is None``; ε = 0) and
    cannot record steps. Raises :class:`LedgerError` when the site has trained (marker
    present) and its ledger is missing, corrupt or rolled back.
    """
    from medisyn.privacy.accounting import default_delta

    return PrivacyLedger.open(
        Path(state_dir),
        site_id,
        privacy.accountant,
        privacy.delta,
        default_delta=None if n_records is None else default_delta(n_records),
    )


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def _read_marker(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not an object")
        int(data.get("total_steps", 0))
    except (ValueError, OSError) as e:
        # A damaged marker still says the site has trained.
        logger.warning("%s: unreadable marker (%s); treating the site as having trained", path, e)
        return {"site_id": None, "total_steps": 0}
    return data


def _read_ledger(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LedgerError(f"{path}: cannot read privacy ledger: {e}") from e
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise LedgerError(f"{path}: privacy ledger is corrupt (not JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LedgerError(f"{path}: not a MediSyn privacy ledger")
    if data.get("version") != VERSION:
        raise LedgerError(
            f"{path}: privacy ledger format version {data.get('version')!r} is not supported "
            f"(this MediSyn reads version {VERSION})"
        )
    expected = data.get("checksum")
    body = {k: v for k, v in data.items() if k != "checksum"}
    try:
        actual = _checksum(body)
    except ValueError as e:
        raise LedgerError(f"{path}: privacy ledger is corrupt ({e})") from None
    if expected != actual:
        raise LedgerError(
            f"{path}: privacy ledger checksum mismatch (stored {expected}, computed {actual}); "
            "the file was edited or damaged"
        )
    try:
        entries = [LedgerEntry.from_json(e) for e in data["entries"]]
        delta = float(data["delta"])
        if not 0 < delta < 1:
            raise ValueError(f"delta {delta} not in (0, 1)")
        accountant = str(data["accountant"])
        site_id = str(data["site_id"])
        created = str(data.get("created", ""))
        if int(data.get("total_steps", -1)) != sum(e.steps for e in entries):
            raise ValueError("total_steps does not match the entries")
    except (KeyError, TypeError, ValueError) as e:
        raise LedgerError(f"{path}: privacy ledger is inconsistent: {e}") from None
    return {
        "site_id": site_id,
        "accountant": accountant,
        "delta": delta,
        "entries": entries,
        "created": created,
    }
