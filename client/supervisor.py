"""``medisyn-client``: validate a site, and keep its ``flower-supernode`` running.

The SuperNode gets the site's settings only through ``--node-config`` (the site config
path and state directory); the ClientApp reads data, state and policy from there.
``FLWR_HOME`` is the site's ``state_dir/flwr-home``; logs go to ``state_dir/logs``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medisyn.client.site import node_config_for

from medisyn.config import SiteConfig, load_site_config
from medisyn.errors import ConfigError, DataError, LedgerError, MediSynError
from medisyn.exitcodes import ExitCode, exit_help
from medisyn.procs import Daemon, Restarting, executable, free_port

logger = logging.getLogger(__name__)


EXIT_HELP = exit_help(ExitCode.OK, ExitCode.CONFIG, ExitCode.DATA, ExitCode.BUDGET,
                      ExitCode.LEDGER, ExitCode.INTERRUPTED)


def node_config_arg(entries: Mapping[str, str]) -> str:
    """``--node-config`` value: space-separated TOML ``key="value"`` pairs."""
    for k, v in entries.items():
        if '"' in v or "\\" in v:
            raise ConfigError(f"node config {k} = {v!r}: paths may not contain quotes or backslashes")
    return " ".join(f"{k}={json.dumps(v)}" for k, v in entries.items())


def supernode_argv(site: SiteConfig, site_path: Path, runtime_port: int) -> list[str]:
    sl = site.superlink
    argv = [executable("flower-supernode"), "--superlink", sl.address]
    if sl.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(sl.root_certificates)]
    if sl.auth_private_key is not None:
        argv += ["--auth-supernode-private-key", str(sl.auth_private_key)]
    argv += [
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--node-config", node_config_arg(node_config_for(site_path, Path(site.site.state_dir))),
    ]
    return argv


def load_site(site_path: Path) -> SiteConfig:
    site = load_site_config(site_path)
    sl = site.superlink
    for label, p in (("root_certificates", sl.root_certificates), ("auth_private_key", sl.auth_private_key)):
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"{site_path}: [superlink] {label} = {p} does not exist")
    return site


class SiteSupervisor:
    """One site's SuperNode, restarted whenever it dies (new node id; state stays on disk)."""

    def __init__(self, site_path: Path, *, extra_env: Mapping[str, str] | None = None,
                 echo: Callable[[str], None] = print):
        self.site_path = Path(site_path).resolve()
        self.site = load_site(self.site_path)
        self.extra_env = dict(extra_env or {})
        self.echo = echo
        self.state_dir = Path(self.site.site.state_dir)
        self.runner: Restarting | None = None

    def _make(self) -> Daemon:
        port = free_port()
        return Daemon(
            f"flower-supernode[{self.site.site.id}]",
            supernode_argv(self.site, self.site_path, port),
            log_path=self.state_dir / "logs" / "supernode.log",
            env={"FLWR_HOME": str(self.state_dir / "flwr-home"), **self.extra_env},
            cwd=self.state_dir,
        )

    def start(self) -> SiteSupervisor:
        (self.state_dir / "flwr-home").mkdir(parents=True, exist_ok=True)
        self.runner = Restarting(
            self._make, name=f"supernode {self.site.site.id}",
            on_restart=lambda n: self.echo(f"site {self.site.site.id}: SuperNode restarted ({n})"),
        ).start()
        return self

    @property
    def daemon(self) -> Daemon | None:
        return self.runner.daemon if self.runner else None

    @property
    def restarts(self) -> int:
        return self.runner.restarts if self.runner else 0

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None


def run_site(site_path: Path, *, echo: Callable[[str], None] = print) -> int:
    """Supervise the site's SuperNode until Ctrl-C / SIGTERM."""
    try:
        sup = SiteSupervisor(site_path, echo=echo)
    except MediSynError as e:
        echo(f"error: {e}")
        return int(ExitCode.CONFIG)
    stop = threading.Event()

    def _term(_sig, _frame):  # noqa: ANN001
        stop.set()

    old = signal.signal(signal.SIGTERM, _term)
    sup.start()
    echo(f"site {sup.site.site.id}: SuperNode connecting to {sup.site.superlink.address} "
         f"(logs: {sup.state_dir / 'logs' / 'supernode.log'}); Ctrl-C to stop")
    try:
        while not stop.wait(1.0):
            pass
        return int(ExitCode.OK)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    finally:
        sup.stop()
        signal.signal(signal.SIGTERM, old)


def check_site(site_path: Path) -> tuple[int, dict[str, Any]]:
    """Data and policy check without connecting: (exit code, report)."""
    report: dict[str, Any] = {"site": str(site_path)}
    try:
        site = load_site(Path(site_path))
    except ConfigError as e:
        report["error"] = str(e)
        return int(ExitCode.CONFIG), report
    report["site_id"] = site.site.id
    try:
        from medisyn.data import check_dataset

        data = check_dataset(site.dataset).to_dict()
        report["data"] = data
        train = sum(n for s, n in data["per_split"].items() if s in site.dataset.split.train)
        if train == 0:
            raise DataError(f"no records in the training splits {site.dataset.split.train}")
    except (DataError, ConfigError) as e:
        report["error"] = str(e)
        return int(ExitCode.DATA), report
    p = site.privacy
    report["policy"] = {
        "dp": p.dp, "require_dp": p.require_dp, "max_epsilon": p.max_epsilon, "delta": p.delta,
        "max_rounds": p.max_rounds, "allowed_audits": list(p.allowed_audits),
    }
    state = Path(site.site.state_dir)
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        report["error"] = f"state_dir {state} is not writable: {e}"
        return int(ExitCode.CONFIG), report
    try:
        spent = ledger_epsilon(site, n_records=train)
        # the limits and the site's own counts, as every task sees them (client/policy.py)
        from medisyn.client.policy import SitePolicy

        report["policy"].update(SitePolicy(site).describe())
    except LedgerError as e:  # missing/corrupt/rolled-back ledger at a site that trained
        report["error"] = f"privacy ledger: {e}"
        return int(ExitCode.LEDGER), report
    except MediSynError as e:  # an unreadable policy counter file
        report["error"] = str(e)
        return int(getattr(e, "exit_code", ExitCode.LEDGER)), report
    if spent is not None:
        report["policy"]["spent_epsilon"] = spent
        if spent >= p.max_epsilon:
            report["error"] = f"privacy budget exhausted: spent ε={spent:.4g} >= max_epsilon {p.max_epsilon}"
            return int(ExitCode.BUDGET), report
    report["superlink"] = {"address": site.superlink.address, "tls": not site.superlink.insecure,
                           "authenticated": site.superlink.auth_private_key is not None}
    if site.superlink.insecure:  # the config refuses insecure outside loopback
        report["superlink"]["warning"] = ("no TLS: allowed only because the address is loopback "
                                          "(a [superlink] table with TLS is needed for a real federation)")
    return int(ExitCode.OK), report


def ledger_epsilon(site: SiteConfig, n_records: int | None = None) -> float | None:
    """ε spent so far according to the site's on-disk privacy ledger (None: no ledger yet).

    Opened with the training code's own opener, so a site that has trained (its marker
    is on disk) with a missing, corrupt or rolled-back ledger is a ``LedgerError`` (exit 5).
    """
    from medisyn.privacy.ledger import open_site_ledger

    led = open_site_ledger(Path(site.site.state_dir), site.site.id, site.privacy, n_records=n_records)
    return float(led.epsilon()) if led.exists else None
