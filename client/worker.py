"""The site's own ClientApp worker: runs only the medisyn ClientApp this site installed.

``medisyn-client start`` runs ``flower-supernode --isolation process``: the SuperNode
then launches nothing itself; each message becomes a *task* on its Runtime API (loopback)
that some other process must claim. This long-lived process is that other process:

1. poll ``Runtime/AcquireTask``, HMAC-signed with the site's SuperExec secret (the
   SuperNode's ``--superexec-auth-secret-file``: without the secret no other local process
   can claim the site's tasks);
2. compare the task's ``fab_hash`` with the hash of the app bundle (FAB) that medisyn
   ships (``medisyn.server``'s ``fab/``), built here the way ``flwr run`` builds it;
3. a different FAB is *refused*: the task's input is pulled with its one-time token and
   answered with an error reply naming the reason and a FAILED task status; nothing of the
   FAB is installed, imported or run; the worker serves the next task;
4. medisyn's FAB: ``medisyn.client.app``'s ClientApp runs in this process (never
   ``install_from_fab``), with task heartbeats while it runs; then the reply and the task
   status are pushed. One task at a time.

Between tasks the process keeps its imports and ``medisyn.client.warm``'s cache (model
template with text encoder and prompt embeddings, decoded dataset tensors). The site
config, policy and privacy ledger are read from disk at every task.

This replaces Flower's ``flower-superexec`` + ``flwr-clientapp`` loop
(``flwr/supercore/superexec/run_superexec.py``, ``flwr/supernode/runtime/run_clientapp.py``)
with the same Flower 1.42 calls (``RuntimeHttpClient``, ``pull_task_input``,
``push_message``, ``push_task_output``, ``HeartbeatSender``): these are Flower internals,
which is why ``flwr`` is pinned to 1.42.x (tests/integration/test_worker_real.py runs the
loop against the real daemons).

Run by the supervisor as ``python -m medisyn.client.worker --site site.toml --runtime
127.0.0.1:PORT --secret-file FILE``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger("medisyn.client.worker")

TASK_TYPE = "flwr-clientapp"  # flwr.supercore.constant.TaskType.CLIENT_APP
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
# the files of the FAB template the server copies into RUN_DIR/app (ServerSupervisor)
FAB_SUFFIXES = (".toml", ".py")
STATUS_NAME = "worker.json"
DEFAULT_CLIENTAPP = "medisyn.client.app:app"


class WorkerError(RuntimeError):
    """The worker cannot serve (bad secret, no FAB template, ...); the supervisor restarts it."""


class FabRefused(PermissionError):
    """The task's app bundle is not medisyn's: the site runs nothing of it."""


# --------------------------------------------------------------------------- the FAB


def shipped_fab_dir() -> Path:
    """The FAB template installed with medisyn (what ``medisyn-server`` submits)."""
    return Path(str(resources.files("medisyn.server") / "fab"))


def fab_files(fab_dir: Path) -> dict[str, Path]:
    """The files ``medisyn-server`` copies from the template into the app it submits."""
    files = {f.name: f for f in sorted(Path(fab_dir).iterdir()) if f.is_file() and f.suffix in FAB_SUFFIXES}
    if "pyproject.toml" not in files:
        raise WorkerError(f"the FAB template {fab_dir} has no pyproject.toml")
    return files


def fab_hash(fab_dir: Path | None = None) -> str:
    """sha256 of the FAB ``flwr run`` builds from ``fab_dir`` (Flower's own builder: fixed
    zip dates, sorted files, so the same files give the same hash on every machine with
    the same Flower)."""
    from flwr.cli.build import build_fab_from_files

    fab_bytes, _ = build_fab_from_files(fab_files(fab_dir or shipped_fab_dir()))
    return hashlib.sha256(fab_bytes).hexdigest()


def refusal(task_fab_hash: str | None, expected: str, *, site_id: str, run_id: int | str) -> str | None:
    """Why this site refuses a task (None: it is medisyn's FAB, run it)."""
    if task_fab_hash and task_fab_hash == expected:
        return None
    got = f"sha256 {task_fab_hash[:16]}…" if task_fab_hash else "no FAB hash"
    return (f"site {site_id} refused run {run_id}: its app bundle ({got}) is not the medisyn FAB this site "
            f"installed (sha256 {expected[:16]}…); a medisyn site runs only the ClientApp of its own "
            "installed medisyn package")


# --------------------------------------------------------------------------- the worker


def load_clientapp(ref: str = DEFAULT_CLIENTAPP):  # noqa: ANN201
    """The installed ClientApp ``module:attribute`` that the *site* chose (never the FAB)."""
    import importlib

    from flwr.clientapp import ClientApp

    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise WorkerError(f"ClientApp reference {ref!r}: expected module:attribute")
    app = getattr(importlib.import_module(module), attr, None)
    if not isinstance(app, ClientApp):
        raise WorkerError(f"{ref} is not a flwr ClientApp")
    return app


@dataclass
class Status:
    pid: int = field(default_factory=os.getpid)
    state: str = "starting"
    task_id: int | None = None
    run_id: int | None = None
    served: int = 0
    refused: int = 0
    failed: int = 0
    expected_fab_hash: str = ""
    last_refusal: str | None = None
    since: float = field(default_factory=time.time)


def _task_retry():  # noqa: ANN202
    """Bounded retries on transport errors for one task's calls (Flower's default HTTP
    invoker retries forever and SIGINTs its own process on HTTP 401)."""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    return RetryInvoker(lambda: exponential(max_delay=5), httpx.TransportError, max_tries=None, max_time=60)


class SiteWorker:
    """Claims the site's tasks from its SuperNode's Runtime API and serves them one at a time."""

    def __init__(self, site_path: Path, runtime_address: str, secret: bytes, *,
                 status_path: Path | None = None, poll: float = 0.5, expected_fab_hash: str | None = None,
                 clientapp: str = DEFAULT_CLIENTAPP):
        from medisyn.config import load_site_config

        if not secret:
            raise WorkerError("the SuperExec auth secret is empty")
        self.site_path = Path(site_path).resolve()
        self.site = load_site_config(self.site_path)
        self.site_id = self.site.site.id
        self.address = runtime_address
        self.secret = secret
        self.poll = poll
        self.expected = expected_fab_hash or fab_hash()
        self.status = Status(expected_fab_hash=self.expected)
        self.status_path = Path(status_path) if status_path else Path(self.site.site.state_dir) / STATUS_NAME
        self.stop = threading.Event()
        self._acquirer = None
        self.clientapp_ref = clientapp
        self.clientapp = None

    # ----------------------------------------------------------------- plumbing
    def write_status(self, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self.status, k, v)
        self.status.since = time.time()
        tmp = self.status_path.with_suffix(".tmp")
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(self.status.__dict__, sort_keys=True))
        os.replace(tmp, self.status_path)

    def acquirer(self):  # noqa: ANN201
        if self._acquirer is None:
            from flwr.supercore.interceptors import (
                RuntimeVersionHttpInterceptor,
                SuperExecAuthHttpInterceptor,
            )
            from flwr.supercore.runtime import RuntimeHttpClient

            self._acquirer = RuntimeHttpClient.from_server_address(
                server_address=self.address, insecure=True, root_certificates=None,
                interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                              SuperExecAuthHttpInterceptor(master_secret=self.secret,
                                                           protected_methods={ACQUIRE_METHOD})],
                retry_invoker=None,
            )
        return self._acquirer

    def task_client(self, token: str):  # noqa: ANN201
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=_task_retry(),
        )

    def acquire(self):  # noqa: ANN201
        """(task, token) of the oldest pending ClientApp task, or None."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

        res = self.acquirer().AcquireTask(AcquireTaskRequest(supported_task_types=[TASK_TYPE]))
        if res.HasField("task") and res.token:
            return res.task, res.token
        return None

    # ----------------------------------------------------------------- main loop
    def preload(self) -> None:
        """Import the heavy modules once, before the first task."""
        t0 = time.perf_counter()
        import diffusers  # noqa: F401
        import medisyn.client.app  # noqa: F401
        import opacus  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (lazy modules)
        from transformers import AutoModel, AutoTokenizer  # noqa: F401

        import medisyn.data  # noqa: F401
        import medisyn.models  # noqa: F401
        import medisyn.train  # noqa: F401

        logger.info("site %s: imports loaded in %.1f s", self.site_id, time.perf_counter() - t0)

    def serve_forever(self) -> None:
        import httpx

        self.write_status(state="starting")
        self.preload()
        logger.info("site %s: worker ready (pid %d); runs %s for the medisyn FAB sha256 %s only; tasks from %s",
                    self.site_id, os.getpid(), self.clientapp_ref, self.expected, self.address)
        self.write_status(state="idle")
        down_since: float | None = None
        while not self.stop.is_set():
            try:
                got = self.acquire()
            except httpx.TransportError as e:  # the SuperNode is (re)starting
                if down_since is None:
                    down_since = time.monotonic()
                    logger.info("site %s: Runtime API %s not reachable (%s); retrying", self.site_id, self.address,
                                type(e).__name__)
                self.stop.wait(max(self.poll, 1.0))
                continue
            except httpx.HTTPStatusError as e:
                code = e.response.status_code
                if code in (401, 403):
                    raise WorkerError(
                        f"the SuperNode at {self.address} refused this worker's SuperExec signature "
                        f"(HTTP {code}): the secret file differs from the SuperNode's "
                        "--superexec-auth-secret-file") from None
                logger.warning("site %s: AcquireTask failed with HTTP %d; retrying", self.site_id, code)
                self.stop.wait(max(self.poll, 1.0))
                continue
            if down_since is not None:
                logger.info("site %s: Runtime API reachable again after %.0f s", self.site_id,
                            time.monotonic() - down_since)
                down_since = None
            if got is None:
                self.stop.wait(self.poll)
                continue
            task, token = got
            fab = task.fab_hash if task.HasField("fab_hash") else None
            reason = refusal(fab, self.expected, site_id=self.site_id, run_id=task.run_id)
            self.write_status(state="busy", task_id=int(task.task_id), run_id=int(task.run_id))
            try:
                if reason is not None:
                    self.refuse(token, reason)
                else:
                    self.run_task(token)
            finally:
                self.write_status(state="idle", task_id=None, run_id=None)

    # ----------------------------------------------------------------- one task
    def refuse(self, token: str, reason: str) -> None:
        """Answer a foreign FAB's task with an error reply and a FAILED status; run nothing."""
        from flwr.app import Error, Message
        from flwr.common.constant import SubStatus
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        from medisyn.protocol import encode_site_error

        logger.error("%s", reason)
        client = self.task_client(token)
        context = None
        try:
            message, context, _run, _fab = pull_task_input(client)
            code, text = encode_site_error("policy-refused", self.site_id, reason)
            push_message(client, Message(Error(code=code, reason=text), reply_to=message), context)
        except Exception as e:  # the status below still fails the task
            logger.error("site %s: could not answer the refused task: %s", self.site_id, e)
        finally:
            push_task_output(client=client, context=context, sub_status=SubStatus.FAILED, details=reason)
            client.close()
        self.write_status(refused=self.status.refused + 1, last_refusal=reason)

    def run_task(self, token: str) -> None:
        """Run medisyn's ClientApp on the task's message, in this process."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )
        from medisyn.client.app import app as client_app

        from medisyn.procs import trim_heap
        from medisyn.protocol import encode_site_error

        client = self.task_client(token)
        lost = threading.Event()
        heartbeat = HeartbeatSender(_heartbeat_fn(client, lost))
        heartbeat.start()
        context = message = reply = None
        sub_status, details = SubStatus.FAILED, "the medisyn ClientApp failed"
        t0 = time.perf_counter()
        try:
            message, context, run, fab = pull_task_input(client)
            got = hashlib.sha256(fab.content).hexdigest() if fab.content else fab.hash_str
            if got != self.expected:  # the bundle the SuperNode holds, not only the task's label
                raise FabRefused(refusal(got, self.expected, site_id=self.site_id, run_id=run.run_id))
            logger.info("site %s: run %s: %s message", self.site_id, run.run_id, message.metadata.message_type)
            client_app = self.clientapp or load_clientapp(self.clientapp_ref)
            reply = client_app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except FabRefused as e:
            logger.error("%s", e)
            details = str(e)
            code, text = encode_site_error("policy-refused", self.site_id, details)
            reply = Message(Error(code=code, reason=text), reply_to=message) if message is not None else None
        except Exception as e:
            logger.error("site %s: task failed", self.site_id, exc_info=e)
            details = f"{type(e).__name__}: {e}"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details[:2000]),
                                reply_to=message)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            if lost.is_set():
                logger.warning("site %s: the SuperNode no longer knows this task (run stopped or task "
                               "expired); its reply is dropped", self.site_id)
            else:
                try:
                    if reply is not None and context is not None:
                        push_message(client, reply, context)
                except Exception as e:
                    logger.error("site %s: could not push the reply: %s", self.site_id, e)
                    sub_status, details = SubStatus.FAILED, f"reply not delivered: {e}"
                push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            client.close()
        ok = sub_status == SubStatus.COMPLETED and not lost.is_set()
        logger.info("site %s: task %s in %.1f s", self.site_id, "done" if ok else "FAILED", time.perf_counter() - t0)
        context = message = reply = None
        trim_heap()  # the warm caches stay; the task's own tensors go back to the OS
        if ok:
            self.write_status(served=self.status.served + 1)
        else:
            self.write_status(failed=self.status.failed + 1)


def _heartbeat_fn(client, lost: threading.Event):  # noqa: ANN001, ANN202
    """Flower's ``make_task_heartbeat_fn_http``, except that a rejected heartbeat marks the
    task lost instead of SIGINTing this (long-lived) process."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    req = SendTaskHeartbeatRequest()

    def fn() -> bool:
        try:
            res = client.SendTaskHeartbeat(req)
        except httpx.TransportError:
            return False  # HeartbeatSender retries with backoff
        except httpx.HTTPStatusError as e:
            if e.response.status_code in (503, 504):
                return False
            lost.set()
            return True
        if not res.success:
            lost.set()
        return True

    return fn


# --------------------------------------------------------------------------- entry point


def read_secret(path: Path) -> bytes:
    p = Path(path)
    try:
        secret = p.read_bytes()
    except OSError as e:
        raise WorkerError(f"cannot read the SuperExec secret file {p}: {e}") from None
    if not secret:
        raise WorkerError(f"the SuperExec secret file {p} is empty")
    return secret


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medisyn.client.worker", description=__doc__.split("\n")[0])
    ap.add_argument("--site", type=Path, required=True)
    ap.add_argument("--runtime", required=True, help="the SuperNode's Runtime API, host:port")
    ap.add_argument("--secret-file", type=Path, required=True)
    ap.add_argument("--poll", type=float, default=0.5)
    ap.add_argument("--clientapp", default=DEFAULT_CLIENTAPP,
                    help="the installed ClientApp to run, module:attribute (the site's choice; default %(default)s)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per poll
    try:
        worker = SiteWorker(args.site, args.runtime, read_secret(args.secret_file), poll=args.poll,
                            clientapp=args.clientapp)
    except Exception as e:
        logger.error("worker cannot start: %s", e)
        return 2

    def _term(_sig, _frame):  # noqa: ANN001
        logger.info("site %s: worker stopping (finishes the task in hand first)", worker.site_id)
        worker.stop.set()

    signal.signal(signal.SIGTERM, _term)
    try:
        worker.serve_forever()
    except WorkerError as e:
        logger.error("%s", e)
        return 3
    except KeyboardInterrupt:
        return 130
    worker.write_status(state="stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
