"""One exit-code table for every command: each number means one thing."""

from __future__ import annotations

from medisyn.audit.site_audit import AuditRefused
from medisyn.client import supervisor as client_sup
from medisyn.server import supervisor as server_sup
from medisyn.server.federation import Outcome

from medisyn.errors import ConfigError, DataError, LedgerError, MediSynError, PrivacyBudgetError
from medisyn.exitcodes import MEANING, ExitCode


def test_every_number_means_one_thing():
    values = [int(c) for c in ExitCode]
    assert len(values) == len(set(values)) == len(ExitCode.__members__)  # no aliases
    assert set(MEANING) == set(ExitCode)


def test_errors_and_supervisors_use_the_core_table():
    assert client_sup.ExitCode is ExitCode and server_sup.ExitCode is ExitCode
    assert MediSynError.exit_code == ExitCode.FAILED
    assert ConfigError.exit_code == ExitCode.CONFIG and DataError.exit_code == ExitCode.DATA
    assert PrivacyBudgetError.exit_code == ExitCode.BUDGET and LedgerError.exit_code == ExitCode.LEDGER
    assert AuditRefused.exit_code == ExitCode.REFUSED
    assert server_sup.OUTCOME_EXIT == {Outcome.DONE: ExitCode.OK, Outcome.NO_SITES: ExitCode.NO_SITES,
                                       Outcome.BUDGET: ExitCode.BUDGET, Outcome.FAILED: ExitCode.INTERNAL}


def test_5_is_the_ledger_only():
    assert ExitCode(5) is ExitCode.LEDGER
    assert "5 privacy ledger" in client_sup.EXIT_HELP
    assert " 5 " not in server_sup.EXIT_HELP and "8 internal error" in server_sup.EXIT_HELP
    assert "7 no sites" in server_sup.EXIT_HELP
