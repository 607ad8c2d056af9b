"""``medisyn-client``: validate a site, and keep its ``flower-supernode`` and its
ClientApp worker running.

The SuperNode gets the site's settings only through ``--node-config`` (the site config
path and state directory); the ClientApp reads data, state and policy from there.
``FLWR_HOME`` is the site's ``state_dir/flwr-home``; logs go to ``state_dir/logs``
(``supernode.log``, ``worker.log``).

By default (``isolation="process"``) the SuperNode runs with ``--isolation process`` and
a SuperExec auth secret (``state_dir/superexec.secret``, mode 0600, new at every start):
it launches no app itself, and only the site's own worker (``medisyn.client.worker``),
which holds the secret, claims its tasks and runs the installed medisyn ClientApp; any
other app bundle is refused. ``isolation="subprocess"`` is Flower's default (the SuperNode
runs whatever ClientApp the submitted bundle names) and is for debugging only.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
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


ISOLATIONS = ("process", "subprocess")
SECRET_NAME = "superexec.secret"


def write_secret(state_dir: Path) -> Path:
    """A fresh random SuperExec auth secret in ``state_dir/superexec.secret`` (mode 0600,
    written atomically): shared by the SuperNode and the site's worker only."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / SECRET_NAME
    tmp = state_dir / (SECRET_NAME + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def supernode_argv(site: SiteConfig, site_path: Path, runtime_port: int, *, isolation: str = "process",
                   secret_file: Path | None = None) -> list[str]:
    """``flower-supernode`` for the site. With ``isolation="process"`` the Runtime API
    (loopback) hands tasks only to a caller that signs with ``secret_file``."""
    if isolation not in ISOLATIONS:
        raise ConfigError(f"isolation {isolation!r}: use one of {list(ISOLATIONS)}")
    if isolation == "process" and secret_file is None:
        raise ConfigError("isolation 'process' needs a SuperExec secret file (else any local "
                          "process could claim the site's tasks)")
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
    if isolation == "process":
        argv += ["--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]
    return argv


def worker_argv(site_path: Path, runtime_port: int, secret_file: Path, clientapp: str | None = None) -> list[str]:
    """The site's ClientApp worker (``medisyn.client.worker``), with this interpreter."""
    argv = [sys.executable, "-m", "medisyn.client.worker", "--site", str(site_path),
            "--runtime", f"127.0.0.1:{runtime_port}", "--secret-file", str(secret_file)]
    if clientapp:
        argv += ["--clientapp", clientapp]
    return argv


def load_site(site_path: Path) -> SiteConfig:
    site = load_site_config(site_path)
    sl = site.superlink
    for label, p in (("root_certificates", sl.root_certificates), ("auth_private_key", sl.auth_private_key)):
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"{site_path}: [superlink] {label} = {p} does not exist")
    return site


class SiteSupervisor:
    """One site's SuperNode and (process isolation) its ClientApp worker, each restarted
    whenever it dies (a new SuperNode gets a new node id; state stays on disk). The
    Runtime API port is fixed for the supervisor's lifetime, so a restarted SuperNode and
    the running worker find each other again."""

    def __init__(self, site_path: Path, *, extra_env: Mapping[str, str] | None = None,
                 echo: Callable[[str], None] = print, isolation: str = "process",
                 clientapp: str | None = None):
        if isolation not in ISOLATIONS:
            raise ConfigError(f"isolation {isolation!r}: use one of {list(ISOLATIONS)}")
        self.site_path = Path(site_path).resolve()
        self.site = load_site(self.site_path)
        self.extra_env = dict(extra_env or {})
        self.echo = echo
        self.isolation = isolation
        self.clientapp = clientapp  # the installed ClientApp the worker runs (default: medisyn's)
        self.state_dir = Path(self.site.site.state_dir)
        self.runtime_port = free_port()
        self.secret_file: Path | None = None
        self.runner: Restarting | None = None
        self.worker_runner: Restarting | None = None

    def _make(self) -> Daemon:
        return Daemon(
            f"flower-supernode[{self.site.site.id}]",
            supernode_argv(self.site, self.site_path, self.runtime_port, isolation=self.isolation,
                           secret_file=self.secret_file),
            log_path=self.state_dir / "logs" / "supernode.log",
            env={"FLWR_HOME": str(self.state_dir / "flwr-home"), **self.extra_env},
            cwd=self.state_dir, relay=True,
        )

    def _make_worker(self) -> Daemon:
        assert self.secret_file is not None
        return Daemon(
            f"medisyn-worker[{self.site.site.id}]",
            worker_argv(self.site_path, self.runtime_port, self.secret_file, self.clientapp),
            log_path=self.state_dir / "logs" / "worker.log",
            env=self.extra_env,
            cwd=self.state_dir,
        )

    def start(self) -> SiteSupervisor:
        (self.state_dir / "flwr-home").mkdir(parents=True, exist_ok=True)
        sid = self.site.site.id
        if self.isolation == "process":
            self.secret_file = write_secret(self.state_dir)
        else:
            logger.warning("site %s: isolation 'subprocess': the SuperNode runs whatever ClientApp the "
                           "coordinator's app bundle names, including code shipped in it (debugging only)", sid)
        self.runner = Restarting(
            self._make, name=f"supernode {sid}",
            on_restart=lambda n: self.echo(f"site {sid}: SuperNode restarted ({n})"),
        ).start()
        if self.isolation == "process":
            self.worker_runner = Restarting(
                self._make_worker, name=f"worker {sid}",
                on_restart=lambda n: self.echo(f"site {sid}: ClientApp worker restarted ({n})"),
            ).start()
        return self

    @property
    def daemon(self) -> Daemon | None:
        return self.runner.daemon if self.runner else None

    @property
    def restarts(self) -> int:
        return self.runner.restarts if self.runner else 0

    @property
    def worker(self) -> Daemon | None:
        return self.worker_runner.daemon if self.worker_runner else None

    @property
    def worker_restarts(self) -> int:
        return self.worker_runner.restarts if self.worker_runner else 0

    @property
    def worker_status_path(self) -> Path:
        from medisyn.client.worker import STATUS_NAME

        return self.state_dir / STATUS_NAME

    def stop(self) -> None:
        if self.worker_runner is not None:
            self.worker_runner.stop()
            self.worker_runner = None
        if self.runner is not None:
            self.runner.stop()
            self.runner = None


def run_site(site_path: Path, *, echo: Callable[[str], None] = print, isolation: str = "process") -> int:
    """Supervise the site's SuperNode (and worker) until Ctrl-C / SIGTERM."""
    try:
        sup = SiteSupervisor(site_path, echo=echo, isolation=isolation)
    except MediSynError as e:
        echo(f"error: {e}")
        return int(ExitCode.CONFIG)
    stop = threading.Event()

    def _term(_sig, _frame):  # noqa: ANN001
        stop.set()

    old = signal.signal(signal.SIGTERM, _term)
    sup.start()
    logs = sup.state_dir / "logs"
    echo(f"site {sup.site.site.id}: SuperNode connecting to {sup.site.superlink.address} "
         f"(logs: {logs / 'supernode.log'}); Ctrl-C to stop")
    if isolation == "process":
        echo(f"site {sup.site.site.id}: runs only its installed medisyn ClientApp, in a warm worker "
             f"(logs: {logs / 'worker.log'}); other app bundles are refused")
    else:
        echo(f"site {sup.site.site.id}: WARNING isolation 'subprocess': the SuperNode runs whatever "
             "ClientApp the coordinator's app bundle names (debugging only)")
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

        datas = []
        for ds in site.datasets:
            data = {"image_type": ds.image_type, **check_dataset(ds).to_dict()}
            datas.append(data)
            train = sum(n for s, n in data["per_split"].items() if s in ds.split.train)
            if train == 0:
                raise DataError(f"{ds.image_type}: no records in the training splits {ds.split.train}", file=ds.path)
        report["data"] = datas[0] if len(datas) == 1 else datas
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
