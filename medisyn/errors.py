"""User-facing errors.

Every error a person can cause (bad config, bad data, a site over its budget) is a
``MediSynError`` whose message says what was wrong, with which value, and where.
Entry points print the message (no traceback unless ``--debug``) and exit with
``exit_code``.
"""

from __future__ import annotations

from medisyn.exitcodes import ExitCode


class MediSynError(Exception):
    """Base class of errors that are reported to people as one readable message."""

    exit_code = int(ExitCode.FAILED)


class ConfigError(MediSynError):
    """A config file or value is invalid (unknown key, wrong type, out of range)."""

    exit_code = int(ExitCode.CONFIG)


class DataError(MediSynError):
    """Site data is unreadable or inconsistent.

    Carries the file, the row (or sample index) and the reason, so that a data steward
    can find and fix the record.
    """

    exit_code = int(ExitCode.DATA)

    def __init__(self, reason: str, *, file: object | None = None, row: object | None = None):
        self.reason = reason
        self.file = None if file is None else str(file)
        self.row = row
        where = []
        if self.file is not None:
            where.append(self.file)
        if row is not None:
            where.append(f"row {row}")
        prefix = ": ".join([", ".join(where)]) + ": " if where else ""
        super().__init__(f"{prefix}{reason}")


class PrivacyBudgetError(MediSynError):
    """A site would exceed (or has exceeded) its declared privacy budget."""

    exit_code = int(ExitCode.BUDGET)


class LedgerError(MediSynError):
    """A privacy ledger is missing, corrupt or inconsistent at a site that has trained."""

    exit_code = int(ExitCode.LEDGER)
