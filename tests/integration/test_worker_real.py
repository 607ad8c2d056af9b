"""The site-owned ClientApp worker with real daemons on loopback (``flower-superlink``,
``flower-supernode --isolation process``, ``medisyn.client.worker``, ``flwr run``).

A site runs only the medisyn ClientApp it installed: a FAB whose own ClientApp writes a
marker file is refused (a control site in Flower's default isolation shows that the same
FAB does write it there), the worker stays up and then answers a genuine medisyn run;
a SIGKILLed worker is restarted by the supervisor and answers the next round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from medisyn.server.federation import iter_metrics, read_status
from test_federation_real import cleanup, federation, site_toml, wait_for  # noqa: F401  (fixture)

from medisyn.procs import child_env, executable, free_port

pytestmark = pytest.mark.integration

MARKER = "FOREIGN-CLIENTAPP-RAN"

FOREIGN_APP = f'''
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

clientapp = ClientApp()

@clientapp.train()
def train(msg: Message, context: Context) -> Message:
    # what a dishonest coordinator could ship: code that acts at the site
    Path(str(context.node_config["state-dir"]), "{MARKER}").write_text("ran")
    return Message(RecordDict({{"metrics": MetricRecord({{"num-examples": 1}})}}), reply_to=msg)

serverapp = ServerApp()

@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["nodes"])
    while len(nodes := list(grid.get_node_ids())) < want:
        time.sleep(0.5)
    msgs = [Message(RecordDict({{"config": ConfigRecord({{"x": 1}})}}), dst_node_id=n, message_type="train")
            for n in nodes]
    out = []
    for r in grid.send_and_receive(msgs, timeout=240):
        out.append({{"error": r.has_error(), "code": r.error.code if r.has_error() else None,
                    "reason": r.error.reason if r.has_error() else None}})
    Path(str(context.run_config["out"])).write_text(json.dumps(out))
'''

FOREIGN_PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
[project]
name = "foreign-app"
version = "0.1.0"
dependencies = []
[tool.flwr.app]
publisher = "someone"
[tool.flwr.app.components]
serverapp = "foreign_app:serverapp"
clientapp = "foreign_app:clientapp"
[tool.flwr.app.config]
nodes = 1
out = ""
'''


def _acquire(port: int, secret: bytes | None):
    """One AcquireTask call on a site's Runtime API, signed with ``secret`` if given."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    inter = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret is not None:
        inter.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                  protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
    client = RuntimeHttpClient.from_server_address(f"127.0.0.1:{port}", insecure=True, root_certificates=None,
                                                   interceptors=inter, retry_invoker=None)
    try:
        return client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
    finally:
        client.close()


def _status(sup) -> dict:  # noqa: ANN001
    try:
        return json.loads(sup.worker_status_path.read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.timeout(600)
def test_foreign_fab_refused_and_killed_worker_restarted(tmp_path, cleanup):  # noqa: F811
    import httpx
    from medisyn.client.supervisor import SiteSupervisor
    from medisyn.server.supervisor import ServerSupervisor

    from medisyn.protocol import decode_site_error

    port = free_port()
    cleanup.ports.append(port)
    sites = ["breast-us", "fundus"]
    # enough local steps that round 1's training outlasts the poll below (the kill must
    # land while the ClientApp runs, not between the task's claim and its input pull:
    # a task whose input was never pulled is offered again, to the restarted worker)
    cfg = federation(tmp_path, port, sites, rounds=2, local_steps=20)
    paths = {s: site_toml(tmp_path, s, port) for s in sites}
    server = ServerSupervisor(cfg, echo=print)
    env = {"OMP_NUM_THREADS": "1"}
    ours: SiteSupervisor | None = None
    control: SiteSupervisor | None = None
    try:
        server.prepare()
        server.start_superlink()
        cleanup.append(server.superlink.pid)
        ours = SiteSupervisor(paths["breast-us"], extra_env=env, echo=print).start()
        # control: Flower's default isolation runs whatever ClientApp the bundle names
        control = SiteSupervisor(paths["fundus"], extra_env=env, echo=print, isolation="subprocess").start()
        cleanup.extend([ours.daemon.pid, ours.worker.pid, control.daemon.pid])
        state = Path(ours.state_dir)
        assert (state / "superexec.secret").stat().st_mode & 0o777 == 0o600
        wait_for(lambda: _status(ours).get("state") == "idle", 180, "the worker to be ready")
        first_worker = ours.worker.pid

        # no other local process can claim the site's tasks: unsigned or wrongly signed
        for secret in (None, b"not-the-site-secret"):
            with pytest.raises(httpx.HTTPStatusError) as e:
                _acquire(ours.runtime_port, secret)
            assert e.value.response.status_code in (401, 403)

        # 1. a FAB that ships its own ClientApp
        app = tmp_path / "foreign"
        app.mkdir()
        (app / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
        (app / "foreign_app.py").write_text(FOREIGN_APP)
        out = tmp_path / "foreign-replies.json"
        res = subprocess.run([executable("flwr"), "run", str(app), "medisyn", "--run-config",
                              f'nodes=2 out="{out}"', "--format", "json"], env=child_env(server.env()),
                             capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        wait_for(out.is_file, 300, "the foreign ServerApp's replies")
        replies = json.loads(out.read_text())
        assert len(replies) == 2
        errors = [r for r in replies if r["error"]]
        assert len(errors) == 1, replies  # the control site ran it
        coded = decode_site_error(errors[0]["code"], errors[0]["reason"])
        assert coded is not None and coded["site-id"] == "breast-us" and coded["code"] == "policy-refused"
        assert "not the medisyn FAB" in coded["message"]
        assert (Path(control.state_dir) / MARKER).is_file()  # the FAB's code does act where allowed
        assert not (state / MARKER).exists()  # ... and never at a medisyn site
        log = (state / "logs" / "worker.log").read_text()
        assert "refused run" in log and "not the medisyn FAB" in log
        st = _status(ours)
        assert st["refused"] == 1 and st["pid"] == first_worker and ours.worker.alive()

        # 2. the same site then serves a genuine medisyn run; its worker is SIGKILLed in round 1
        server.submit()
        # served >= 1: past the prompts query before the first UNet round; busy, with the train
        # message's input pulled (logged): training round 1
        def training() -> bool:
            st = _status(ours)
            return (st.get("state") == "busy" and st.get("served", 0) >= 1
                    and "train message" in (state / "logs" / "worker.log").read_text())

        wait_for(training, 240, "breast-us's worker to train round 1", poll=0.1)
        os.killpg(first_worker, signal.SIGKILL)
        wait_for(lambda: ours.worker_restarts >= 1 and ours.worker.pid != first_worker, 60,
                 "the supervisor to restart the worker")
        cleanup.append(ours.worker.pid)
        code = server.watch()
    finally:
        daemons = []
        for s in (ours, control):
            if s is not None:
                daemons += [s.daemon, s.worker]
                s.stop()
        server.close()

    assert code == 0
    records = list(iter_metrics(cfg.run_dir))
    assert [r["round"] for r in records] == [1, 2]
    r1, r2 = records
    assert r1["sites"]["fundus"]["status"] == "ok"
    assert r1["answered"] == 1 and r1["failed"] == 1  # the killed worker's task failed
    assert r2["sites"]["breast-us"]["status"] == "ok", r2["sites"]  # the restarted worker answered
    assert r2["sites"]["fundus"]["status"] == "ok"
    assert read_status(cfg.run_dir)["state"] == "done"
    assert not (state / MARKER).exists()
    assert "worker ready" in (state / "logs" / "worker.log").read_text()
    for d in daemons:
        if d is not None:
            assert not d.alive()


if sys.platform != "linux":  # process groups, /proc
    pytestmark = [pytestmark, pytest.mark.skip(reason="needs Linux")]
