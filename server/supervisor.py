"""``medisyn-server start``: supervise a SuperLink, submit the run, report progress.

1. validate the config, write ``RUN_DIR/federation.resolved.json`` (+ hash);
2. start ``flower-superlink`` (own process group; SQLite ``--database`` in the run
   directory; ``--disable-runtime-dependency-installation``; loopback by default) and,
   with ``enable_supernode_auth``, register every ``[sites.<id>] public_key`` of the
   config through the Control API — at *every* start, so enrolment survives a SuperLink
   restart with in-memory state — and write ``RUN_DIR/enrolment.json`` (node id -> site
   id), which the ServerApp uses to bind each reply to its authenticated node;
3. write ``RUN_DIR/flwr-home/config.toml`` (a ``medisyn`` SuperLink connection) and
   submit the thin app bundle with ``flwr run``;
4. follow ``RUN_DIR/metrics.jsonl`` and ``status.json`` (written by the ServerApp)
   and print one block per round; stop everything it started when the run ends,
   fails, or on Ctrl-C / SIGTERM;
5. recover: if the SuperLink dies it is restarted (same port, sites enrolled again), and
   if the ServerApp process dies (``RUN_DIR/serverapp.json`` names it) the old run is
   stopped; either way the run is submitted again with ``resume``, so it continues at the
   round after its last checkpoint (the round in flight is redone). At most
   ``max_recoveries`` times in a row without a new round; a ServerApp that *fails* (an
   exception: status ``failed``) is not retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from medisyn.server.checkpoint import atomic_write_text, latest_checkpoint
from medisyn.server.config import ENROLMENT, FederationConfig, read_enrolment
from medisyn.server.federation import Outcome, read_status

from medisyn.exitcodes import ExitCode, exit_help
from medisyn.procs import (
    Daemon,
    child_env,
    executable,
    port_open,
    process_alive,
    process_start_time,
    sigterm_as_interrupt,
    write_pids,
)

logger = logging.getLogger(__name__)


EXIT_HELP = exit_help(
    ExitCode.OK, ExitCode.CONFIG, ExitCode.BUDGET, ExitCode.NO_SITES, ExitCode.INTERNAL,
    ExitCode.INTERRUPTED, OK="finished", BUDGET="privacy budget exhausted at every site",
    INTERNAL="internal error (SuperLink or ServerApp failed; see RUN_DIR/logs)",
)

OUTCOME_EXIT = {
    Outcome.DONE: ExitCode.OK,
    Outcome.NO_SITES: ExitCode.NO_SITES,
    Outcome.BUDGET: ExitCode.BUDGET,
    Outcome.FAILED: ExitCode.INTERNAL,
}


class SupervisorError(Exception):
    def __init__(self, message: str, code: ExitCode):
        super().__init__(message)
        self.code = code


def supervise(body: Callable[[], int], *, close: Callable[[], None], echo: Callable[[str], None],
              interrupted: str = "stopping every process") -> int:
    """Run ``body`` (start processes, run, report; returns an exit code) so that whatever
    happens every process it started is stopped: ``close`` always runs. SIGTERM is handled
    as Ctrl-C. A :class:`SupervisorError` is printed and becomes its code, Ctrl-C / SIGTERM
    prints ``interrupted: <interrupted>`` and becomes ``ExitCode.INTERRUPTED`` (130)."""
    with sigterm_as_interrupt():
        try:
            return int(body())
        except SupervisorError as e:
            echo(f"error: {e}")
            return int(e.code)
        except KeyboardInterrupt:
            echo(f"interrupted: {interrupted}")
            return int(ExitCode.INTERRUPTED)
        finally:
            close()


SERVERAPP_RECORD = "serverapp.json"


def write_serverapp_record(run_dir: Path, attempt: str) -> None:
    """Called by the ServerApp (train mode) first: ``RUN_DIR/serverapp.json`` names the
    process running this attempt (pid and start time), so the supervisor can tell when it
    dies without writing a final status."""
    import os

    pid = os.getpid()
    atomic_write_text(Path(run_dir) / SERVERAPP_RECORD,
                      json.dumps({"attempt": attempt, "pid": pid, "start": process_start_time(pid)}))


def read_serverapp_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((Path(run_dir) / SERVERAPP_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("pid"), int) else None


def fab_template() -> Path:
    return Path(str(resources.files("medisyn.server") / "fab"))


def flwr_home_config(cfg: FederationConfig) -> str:
    sl = cfg.superlink
    host = "127.0.0.1" if sl.host in ("0.0.0.0", "::", "") else sl.host
    lines = ["[superlink]", 'default = "medisyn"', "", "[superlink.medisyn]", f'address = "{host}:{sl.port}"']
    if sl.insecure:
        lines.append("insecure = true")
    elif sl.ssl_ca_certfile is not None:
        lines.append(f"root-certificates = {json.dumps(str(sl.ssl_ca_certfile))}")
    return "\n".join(lines) + "\n"


def superlink_argv(cfg: FederationConfig) -> list[str]:
    sl = cfg.superlink
    argv = [
        executable("flower-superlink"),
        "--host", sl.host, "--port", str(sl.port),
        "--disable-runtime-dependency-installation",
    ]
    if sl.database == "sqlite":
        argv += ["--database", str(Path(cfg.run_dir) / "superlink.db")]
    if sl.insecure:
        argv.append("--insecure")
    else:
        argv += ["--ssl-certfile", str(sl.ssl_certfile), "--ssl-keyfile", str(sl.ssl_keyfile)]
        if sl.ssl_ca_certfile is not None:
            argv += ["--ssl-ca-certfile", str(sl.ssl_ca_certfile)]
    if sl.enable_supernode_auth:
        argv.append("--enable-supernode-auth")
    return argv


def _json_field(stdout: str, key: str) -> Any:
    for line in stdout.splitlines()[::-1]:
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line).get(key)
            except json.JSONDecodeError:
                continue
    try:
        return json.loads(stdout).get(key)
    except (json.JSONDecodeError, AttributeError):
        return None


def format_round(rec: dict[str, Any]) -> str:
    """The progress block printed for one round."""
    loss = "-" if rec.get("loss") is None else f"{rec['loss']:.4f}"
    ev = "" if rec.get("eval_loss") is None else f"  eval {rec['eval_loss']:.4f}"
    head = (
        f"round {rec['round']}/{rec['total_rounds']} [{rec['stage']} {rec['stage_round']}]  "
        f"sites {rec['answered']} ok, {rec['failed']} failed  loss {loss}{ev}  {rec['seconds']:.1f} s"
    )
    lines = [head]
    for site in sorted(rec.get("sites", {})):
        m = rec["sites"][site]
        if m.get("status") != "ok":
            lines.append(f"    {site:<14} FAILED  {m.get('reason', '')[:160]}")
            continue
        eps = f"  ε {m['epsilon']:.3g}" if "epsilon" in m else "  ε -"
        if m.get("replayed"):  # a redone round the site answered with its stored reply
            eps += " (replayed: no new steps)"
        lines.append(
            f"    {site:<14} ok  loss {m.get('loss', float('nan')):.4f}{eps}  "
            f"n {int(m.get('num-examples', 0))}  up {m.get('bytes-up', 0) / 1e6:.2f} MB  "
            f"down {m.get('bytes-down', 0) / 1e6:.2f} MB  train {m.get('seconds', 0):.1f} s"
        )
    return "\n".join(lines)


class ServerSupervisor:
    """Owns the SuperLink process of one federated run."""

    # resubmit the run when the SuperLink or the ServerApp dies (audit / evaluate: no)
    recovers = True

    def __init__(self, cfg: FederationConfig, *, resume: bool = False,
                 echo: Callable[[str], None] = print, poll: float = 1.0, fab_dir: Path | None = None,
                 max_recoveries: int = 3):
        self.cfg = cfg
        self.fab_dir = Path(fab_dir) if fab_dir is not None else fab_template()
        self.resume = resume
        self.echo = echo
        self.poll = poll
        self.run_dir = Path(cfg.run_dir)
        self.status_dir = self.run_dir  # where the ServerApp writes status.json
        self.superlink: Daemon | None = None
        self.run_id: str | None = None
        self.attempt = uuid.uuid4().hex[:16]  # tags the status.json of this submission
        self._printed = 0
        self._last_round = 0  # the last round printed
        self.max_recoveries = max_recoveries
        self.recoveries: list[str] = []  # why the run was resubmitted, in order
        self._in_a_row = 0  # recoveries since the last new round

    # ----------------------------------------------------------------- setup
    def prepare(self) -> None:
        rd = self.run_dir
        rd.mkdir(parents=True, exist_ok=True)
        if not self.resume and latest_checkpoint(rd) is not None:
            raise SupervisorError(
                f"run_dir {rd} already holds checkpoints: pass --resume to continue it, "
                "or set a new run_dir", ExitCode.CONFIG,
            )
        if self.resume:
            ck = latest_checkpoint(rd)
            self.echo(f"resuming {rd}: " + (f"last checkpoint round {ck.round}" if ck else "no checkpoint; starting at round 1"))
        else:
            (rd / "metrics.jsonl").unlink(missing_ok=True)
        (rd / "status.json").unlink(missing_ok=True)  # written afresh by the ServerApp
        atomic_write_text(rd / "federation.resolved.json", self.cfg.model_dump_json(indent=1))
        atomic_write_text(rd / "federation.hash", self.cfg.hash() + "\n")
        self.write_flwr_home_and_app()

    def write_flwr_home_and_app(self) -> None:
        """``RUN_DIR/flwr-home/config.toml`` (the SuperLink connection) and ``RUN_DIR/app``
        (the thin bundle: pyproject.toml only; tests add a shim)."""
        rd = self.run_dir
        home = rd / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        atomic_write_text(home / "config.toml", flwr_home_config(self.cfg))
        app = rd / "app"
        shutil.rmtree(app, ignore_errors=True)
        app.mkdir()
        for f in self.fab_dir.iterdir():
            if f.is_file() and f.suffix in (".toml", ".py"):
                shutil.copy(f, app / f.name)

    def env(self) -> dict[str, str]:
        return {"FLWR_HOME": str(self.run_dir / "flwr-home")}

    def start_superlink(self, timeout: float = 90.0) -> None:
        sl = self.cfg.superlink
        if port_open("127.0.0.1" if sl.host in ("0.0.0.0", "::") else sl.host, sl.port):
            raise SupervisorError(f"port {sl.port} on {sl.host} is already in use", ExitCode.CONFIG)
        self.superlink = Daemon(
            "flower-superlink", superlink_argv(self.cfg),
            log_path=self.run_dir / "logs" / "superlink.log", env=self.env(), cwd=self.run_dir, relay=True,
        ).start()
        write_pids(self.run_dir / "pids.json", {"superlink": self.superlink})
        host = "127.0.0.1" if sl.host in ("0.0.0.0", "::") else sl.host
        deadline = time.monotonic() + timeout
        while not port_open(host, sl.port):
            if not self.superlink.alive():
                raise SupervisorError(
                    f"flower-superlink exited with {self.superlink.returncode}:\n{self.superlink.tail()}",
                    ExitCode.INTERNAL,
                )
            if time.monotonic() > deadline:
                raise SupervisorError(f"flower-superlink did not open port {sl.port} within {timeout:.0f} s",
                                      ExitCode.INTERNAL)
            time.sleep(0.3)
        self.echo(f"SuperLink listening on {sl.address} (logs: {self.superlink.log_path})")
        self.enrol_sites()

    def enrol_sites(self, timeout: float = 120.0) -> dict[int, str]:
        """Register each enrolled site's public key with the running SuperLink (node auth)
        and write ``RUN_DIR/enrolment.json``; return ``{node_id: site_id}``.

        A key the SuperLink already holds (SQLite state kept from an earlier start) keeps
        the node id recorded for it in the previous ``enrolment.json``.
        """
        sl = self.cfg.superlink
        keys = {s: e.public_key for s, e in self.cfg.enrolment.items() if e.public_key is not None}
        if not sl.enable_supernode_auth or not keys:
            (self.run_dir / ENROLMENT).unlink(missing_ok=True)
            return {}
        previous = read_enrolment(self.run_dir, by_key=True)
        nodes: dict[int, str] = {}
        record: dict[str, dict[str, str]] = {}
        for site, key in sorted(keys.items()):
            digest = hashlib.sha256(Path(key).read_bytes().strip()).hexdigest()
            res = subprocess.run(
                [executable("flwr"), "supernode", "register", str(key), "medisyn", "--name", site,
                 "--format", "json"],
                capture_output=True, text=True, env=child_env(self.env()), timeout=timeout,
                cwd=self.run_dir, start_new_session=True)
            node_id = _json_field(res.stdout, "node-id")
            if node_id is None and "already in use" in (res.stdout + res.stderr).lower():
                node_id = previous.get(digest, (None, None))[0]
                if node_id is None:
                    raise SupervisorError(
                        f"site {site}: its key {key} is already registered in the SuperLink's state "
                        f"but {self.run_dir / ENROLMENT} does not say as which node; remove "
                        f"{self.run_dir / 'superlink.db'} to register the sites afresh", ExitCode.CONFIG)
            if node_id is None:
                raise SupervisorError(f"site {site}: `flwr supernode register {key}` failed "
                                      f"({res.returncode}):\n{res.stdout}{res.stderr}", ExitCode.INTERNAL)
            nodes[int(node_id)] = site
            record[str(int(node_id))] = {"site": site, "key_sha256": digest}
        atomic_write_text(self.run_dir / ENROLMENT, json.dumps({"nodes": record}, indent=1, sort_keys=True))
        self.echo(f"enrolled {len(nodes)} site(s) with the SuperLink: {', '.join(sorted(nodes.values()))}")
        return nodes

    def run_config(self) -> dict[str, Any]:
        """The ``--run-config`` of the submission (keys declared in the FAB's pyproject)."""
        return {"federation-config": str(self.run_dir / "federation.resolved.json"),
                "resume": self.resume, "attempt": self.attempt}

    def describe_submission(self) -> str:
        return (f"submitted run {self.run_id}: {self.cfg.total_rounds} rounds over stages {self.cfg.stages}, "
                f"waiting for {self.cfg.min_sites} site(s)")

    def submit(self, timeout: float = 180.0) -> str:
        overrides = " ".join(
            f"{k}={'true' if v is True else 'false' if v is False else json.dumps(v)}"
            for k, v in self.run_config().items())
        argv = [executable("flwr"), "run", str(self.run_dir / "app"), "medisyn",
                "--run-config", overrides, "--format", "json"]
        res = subprocess.run(argv, capture_output=True, text=True, env=child_env(self.env()),
                             timeout=timeout, cwd=self.run_dir, start_new_session=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        (self.run_dir / "logs" / "flwr-run.log").write_text(res.stdout + res.stderr)
        run_id = None
        for line in res.stdout.splitlines()[::-1]:
            line = line.strip()
            if line.startswith("{"):
                try:
                    run_id = json.loads(line).get("run-id")
                except json.JSONDecodeError:
                    continue
                break
        if res.returncode != 0 or not run_id:
            try:
                data = json.loads(res.stdout)
                run_id = data.get("run-id")
            except json.JSONDecodeError:
                pass
        if res.returncode != 0 or not run_id:
            raise SupervisorError(f"flwr run failed ({res.returncode}):\n{res.stdout}\n{res.stderr}",
                                  ExitCode.INTERNAL)
        self.run_id = str(run_id)
        self.echo(self.describe_submission())
        return self.run_id

    # ----------------------------------------------------------------- watch
    def print_new_lines(self, path: Path, fmt: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
        """Echo the JSON lines appended to ``path`` since the last call."""
        if not path.is_file():
            return []
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        new = [json.loads(ln) for ln in lines[self._printed:]]
        self._printed = len(lines)
        for rec in new:
            self.echo(fmt(rec))
        return new

    def print_new_rounds(self) -> list[dict[str, Any]]:
        """Echo the rounds of ``metrics.jsonl`` after the last one printed (by round number:
        a resumed ServerApp rewrites the file to match its checkpoint)."""
        p = self.run_dir / "metrics.jsonl"
        if not p.is_file():
            return []
        new = []
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line being appended
                continue
            if isinstance(rec, dict) and int(rec.get("round", 0)) > self._last_round:
                new.append(rec)
        for rec in sorted(new, key=lambda r: int(r["round"])):
            self.echo(format_round(rec))
            self._last_round = int(rec["round"])
        return new

    def run_state(self) -> str | None:
        """Flower's view of the run (``flwr ls``), e.g. ``finished:failed``."""
        if self.run_id is None:
            return None
        try:
            res = subprocess.run(
                [executable("flwr"), "ls", "medisyn", "--run-id", self.run_id, "--format", "json"],
                capture_output=True, text=True, env=child_env(self.env()), timeout=60, cwd=self.run_dir,
            )
            data = json.loads(res.stdout)
        except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError):
            return None
        runs = data.get("runs") or []
        return str(runs[0].get("status")) if runs else None

    def status(self) -> dict[str, Any] | None:
        """This submission's status.json (a status left by an older ServerApp is ignored)."""
        st = read_status(self.status_dir)
        return st if st is not None and st.get("attempt") == self.attempt else None

    def final_status(self) -> dict[str, Any] | None:
        st = self.status()
        return st if st is not None and st.get("state") in OUTCOME_EXIT else None

    def serverapp_died(self) -> str | None:
        """Why this submission's ServerApp is gone without a final status (None: it runs,
        or has not started yet)."""
        rec = read_serverapp_record(self.run_dir)
        if rec is None or rec.get("attempt") != self.attempt:
            return None
        if process_alive(int(rec["pid"]), rec.get("start")):
            return None
        if self.final_status() is not None:  # it wrote its outcome and exited
            return None
        return f"the ServerApp (pid {rec['pid']}) died without finishing the run"

    def watch(self, flwr_check_every: float = 60.0) -> ExitCode:
        if self.resume:
            # the metrics of finished rounds are reprinted only if they are new
            p = self.run_dir / "metrics.jsonl"
            self._printed = len(p.read_text().splitlines()) if p.is_file() else 0
            self._last_round = max((int(r.get("round", 0)) for r in _jsonl(p)), default=0)
        last_check = time.monotonic()
        while True:
            if self.print_new_rounds():
                self._in_a_row = 0  # progress: the recovery count starts again
            status = self.final_status()
            if status is not None:
                state = status["state"]
                self.print_new_rounds()
                if status.get("message"):
                    self.echo(f"run ended: {state}: {status['message']}")
                return OUTCOME_EXIT[state]
            if self.superlink is not None and not self.superlink.alive():
                why = f"flower-superlink died ({self.superlink.returncode})"
                if not self.recovers:
                    raise SupervisorError(f"{why}:\n{self.superlink.tail()}", ExitCode.INTERNAL)
                self.recover(why, restart_superlink=True)
                last_check = time.monotonic()
                continue
            if self.superlink is not None:
                self.superlink.track()  # its superexec / ServerApp, to stop them if it dies
            died = self.serverapp_died() if self.recovers else None
            if died is not None:
                self.recover(died)
                last_check = time.monotonic()
                continue
            if time.monotonic() - last_check > flwr_check_every:
                last_check = time.monotonic()
                st = self.run_state()
                if st and st.startswith("finished") and (self.status() or {}).get("state") in (None, Outcome.RUNNING):
                    time.sleep(3)  # status.json may be written a moment after
                    if (self.status() or {}).get("state") in (None, Outcome.RUNNING):
                        why = f"the ServerApp ended ({st}) without finishing"
                        if not self.recovers:
                            raise SupervisorError(f"{why}; see `flwr log {self.run_id}`", ExitCode.INTERNAL)
                        self.recover(why)
                        continue
            time.sleep(self.poll)

    def recover(self, why: str, *, restart_superlink: bool = False) -> None:
        """Resubmit the run with ``resume`` after the SuperLink (restarted here) or the
        ServerApp died: it continues at the round after its last checkpoint."""
        self._in_a_row += 1
        self.recoveries.append(why)
        if self._in_a_row > self.max_recoveries:
            raise SupervisorError(
                f"{why}; gave up after {self.max_recoveries} recoveries without a new round "
                f"(logs: {self.run_dir / 'logs'})", ExitCode.INTERNAL)
        self.echo(f"{why}: resuming the run from its last checkpoint "
                  f"(recovery {self._in_a_row} of at most {self.max_recoveries} in a row)")
        if restart_superlink:
            assert self.superlink is not None
            self.superlink.kill()  # and what is left of its superexec / ServerApp
            self.superlink = None
            self.start_superlink()
        # the old run is gone with an in-memory SuperLink; with SQLite state it is stopped
        self.stop_run()
        self.resume = True
        self.attempt = uuid.uuid4().hex[:16]
        self.submit()

    def stop_run(self) -> None:
        """``flwr stop`` this submission's run (best effort: it may be over already), so the
        sites drop its tasks rather than finish them for nobody."""
        if self.run_id is None:
            return
        try:
            res = subprocess.run([executable("flwr"), "stop", self.run_id, "medisyn"],
                                 capture_output=True, text=True, env=child_env(self.env()), timeout=60,
                                 cwd=self.run_dir, start_new_session=True)
            if res.returncode != 0:
                logger.info("flwr stop %s: %s", self.run_id, (res.stdout + res.stderr).strip()[-300:])
        except (subprocess.TimeoutExpired, OSError) as e:
            logger.warning("flwr stop %s failed: %s", self.run_id, e)

    def close(self) -> None:
        if self.superlink is not None:
            self.superlink.stop()
            self.superlink = None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def run_server(cfg: FederationConfig, *, resume: bool = False, echo: Callable[[str], None] = print) -> int:
    """Run a federation to its end; returns an :class:`ExitCode`."""
    sup = ServerSupervisor(cfg, resume=resume, echo=echo)

    def body() -> int:
        sup.prepare()
        sup.start_superlink()
        sup.submit()
        code = sup.watch()
        echo(f"run directory: {sup.run_dir}  (metrics.jsonl, checkpoints/, model/, logs/)")
        return int(code)

    return supervise(body, close=sup.close, echo=echo, interrupted="stopping the SuperLink")
