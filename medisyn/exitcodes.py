"""The one table of exit codes every MediSyn command uses (``medisyn``, ``medisyn-server``,
``medisyn-client``, ``medisyn audit``, ``medisyn privacy``).

Each number means one thing in every command. ``MediSynError.exit_code`` (medisyn.errors)
takes its value from here, and the supervisors map how a run ended onto it.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # a check ran and said no (the release gate failed); an unclassified error
    CONFIG = 2  # invalid config (unknown key, bad value, a TLS/key file missing, run dir in use, port in use)
    DATA = 3  # site data unreadable or inconsistent
    BUDGET = 4  # privacy budget exhausted (a site's ledger at its cap; every site refused a round)
    LEDGER = 5  # a privacy ledger missing, corrupt or rolled back at a site that trained
    REFUSED = 6  # the site's policy refused the request (e.g. an audit it does not allow)
    NO_SITES = 7  # fewer than min_sites connected within site_wait_timeout
    INTERNAL = 8  # a daemon (SuperLink, ServerApp, SuperNode) or the code failed; see the logs
    INTERRUPTED = 130  # Ctrl-C / SIGTERM


MEANING = {
    ExitCode.OK: "ok",
    ExitCode.FAILED: "a check failed (the release gate)",
    ExitCode.CONFIG: "config error",
    ExitCode.DATA: "data error",
    ExitCode.BUDGET: "privacy budget exhausted",
    ExitCode.LEDGER: "privacy ledger missing, corrupt or rolled back",
    ExitCode.REFUSED: "refused by site policy",
    ExitCode.NO_SITES: "no sites (fewer than min_sites connected within site_wait_timeout)",
    ExitCode.INTERNAL: "internal error (a daemon failed; see the logs)",
    ExitCode.INTERRUPTED: "interrupted",
}


def exit_help(*codes: ExitCode, **wording: str) -> str:
    """``"Exit codes: 0 ok; 2 config error; ..."`` for the codes a command can return;
    ``wording`` overrides a code's text by name (e.g. ``OK="finished"``)."""
    parts = [f"{int(c)} {wording.get(c.name, MEANING[c])}" for c in codes]
    return "Exit codes: " + "; ".join(parts) + "."
