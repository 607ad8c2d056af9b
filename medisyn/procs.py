"""Start, watch and stop the Flower daemons (``flower-superlink``, ``flower-supernode``,
``flwr``) as child processes, each in its own process group.

Every child gets ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1`` and
``HF_HUB_OFFLINE=1``. Stopping sends SIGTERM to the whole group (the daemon and the
``flower-superexec`` / app processes it started), waits, then SIGKILLs what is left.
On Linux a child also gets SIGTERM if its supervisor dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

PRIVACY_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


# For the processes that relay Flower messages (SuperLink, SuperNode, SuperExec and the
# ServerApp they start): a model message is tens of MB. glibc serves a freed large block's
# size from the heap next time (its mmap threshold rises to 32 MB on every free), and
# those heaps then keep the peak of every round; a fixed threshold keeps blocks over
# 1 MiB in mmap, returned to the system when freed. Measured in the demo: the SuperLink
# grew 135 -> 329 MB and each SuperNode 131 -> 220 MB over 10 rounds without it. The
# cost, measured: generating (the ServerApp's audit and evaluation images) ~15-20% slower
# (44 images on 1 thread: 19-20 s -> 23 s); training workers do not get it (a DP step was
# ~40% slower with it).
RELAY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def child_env(extra: Mapping[str, str] | None = None, *,
              defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: this one's, the privacy settings, unbuffered
    output, two malloc arenas, this environment's scripts first on PATH, then ``extra``;
    ``defaults`` apply where neither the operator's environment nor ``extra`` set them."""
    env = dict(os.environ)
    env.update(PRIVACY_ENV)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # glibc gives every thread that allocates its own heap arena (up to 8 per core); gRPC
    # and torch threads then keep freed memory spread over many arenas. Two arenas keep
    # a long-lived worker's RSS close to what it uses (the operator's own value wins).
    env.setdefault("MALLOC_ARENA_MAX", "2")
    # Flower's daemons start their helpers (flower-superexec, flwr-clientapp, ...) by name:
    # put this environment's scripts first on PATH, also when the venv is not activated.
    scripts = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if scripts not in path.split(os.pathsep):
        env["PATH"] = scripts + (os.pathsep + path if path else "")
    if extra:
        env.update(extra)
    for k, v in (defaults or {}).items():
        env.setdefault(k, v)
    return env


def executable(name: str) -> str:
    """A console script of this environment (next to the running interpreter), else PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH; is flwr installed?")
    return found


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; a
    no-op elsewhere): a long-lived worker then does not keep one task's peak for the next."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the supervisor's own cleanup still applies
        pass


class Daemon:
    """One child process in its own session/process group, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None, relay: bool = False):
        """``relay``: a process that relays Flower messages (:data:`RELAY_MALLOC_ENV`)."""
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = child_env(env, defaults=RELAY_MALLOC_ENV if relay else None)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True,
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
            )
        finally:
            log.close()
        logger.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def track(self) -> set[int]:
        """Remember the process groups of the daemon and all its descendants (flower-superlink
        starts flower-superexec, and it the ServerApp, in sessions of their own). Call it while
        the daemon runs: once it is dead its descendants are orphans no longer found under it,
        and :meth:`kill` / :meth:`stop` still reach them through the groups remembered here."""
        if self.proc is None:
            return set()
        groups = {self.proc.pid}
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                groups.add(os.getpgid(pid))
        groups.discard(os.getpgrp())  # never our own group
        self._groups = getattr(self, "_groups", set()) | groups
        return self._groups

    def signal_group(self, sig: int) -> None:
        """Signal the daemon's process group and the groups of all its descendants, also
        those remembered by :meth:`track`."""
        if self.proc is None:
            return
        self.track()
        for g in self._groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, wait up to ``timeout``, then SIGKILL the group."""
        if self.proc is None:
            return
        self.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        # the groups may outlive their leader (e.g. flower-superexec): wait for them too
        while any(_group_alive(g) for g in getattr(self, "_groups", {self.proc.pid})) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def _parent_map() -> dict[int, int]:
    parent: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            parent[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parent


def descendants(pid: int) -> list[int]:
    """All descendant pids of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for child, ppid in _parent_map().items():
        children.setdefault(ppid, []).append(child)
    out, stack = [], list(children.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22);
    None if there is no such process (or no /proc). With the pid it names one process
    even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether process ``pid`` runs (not a zombie) and, given ``start_time``
    (:func:`process_start_time`), is still the process that had that start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped
        return False
    return start_time is None or int(fields[19]) == int(start_time)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Restarting:
    """Keep a daemon running: restart it (with backoff) whenever it exits, until stopped."""

    def __init__(self, make: Callable[[], Daemon], *, name: str, backoff: float = 1.0,
                 max_backoff: float = 30.0, on_restart: Callable[[int], None] | None = None):
        self.make = make
        self.name = name
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.on_restart = on_restart
        self.daemon: Daemon | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Restarting:
        self.daemon = self.make().start()
        self._thread = threading.Thread(target=self._watch, name=f"watch-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        delay = self.backoff
        started = time.monotonic()
        while not self._stop.is_set():
            assert self.daemon is not None
            if self.daemon.alive():
                if time.monotonic() - started > 60:
                    delay = self.backoff  # ran a while: reset the backoff
                self._stop.wait(0.5)
                continue
            logger.warning("%s exited with %s; restarting in %.0f s:\n%s", self.name,
                           self.daemon.returncode, delay, self.daemon.tail(5))
            self.daemon.kill()  # reap whatever is left of its group
            if self._stop.wait(delay):
                break
            self.restarts += 1
            self.daemon = self.make().start()
            started = time.monotonic()
            delay = min(delay * 2, self.max_backoff)
            if self.on_restart:
                self.on_restart(self.restarts)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.daemon is not None:
            self.daemon.stop(timeout=timeout)


def write_pids(path: Path, daemons: Mapping[str, Daemon | None]) -> None:
    """Record process-group ids (for operators and tests that must clean up)."""
    data = {k: d.pid for k, d in daemons.items() if d is not None and d.pid is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _pss_bytes(pid: int) -> int | None:
    """Proportional set size (shared pages split among the processes mapping them)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _tree_rss(root_pid: int | None = None) -> dict[int, int]:
    """RSS bytes of a process and each of its live descendants, by pid (Linux /proc)."""
    root = os.getpid() if root_pid is None else root_pid
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            pid = int(entry.name)
            parent[pid] = int(fields[1])
            rss[pid] = int((entry / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, int] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in rss:
            out[pid] = rss[pid]
        stack.extend(children.get(pid, []))
    return out


def process_name(pid: int) -> str:
    """A short name for a process: its program's base name, and for ``python -m X`` the
    module (``python -m medisyn.client.worker``); never its arguments (paths stay out of
    reports)."""
    try:
        argv = [a for a in (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    name = Path(argv[0]).name
    if name.startswith("python") and len(argv) > 1:
        if "-m" in argv[1:-1]:
            return f"{name} -m {argv[argv.index('-m', 1) + 1]}"
        if not argv[1].startswith("-"):
            return f"{name} {Path(argv[1]).name}"
    return name


def tree_memory_bytes(root_pid: int | None = None, *, pss: bool = False) -> tuple[int, int | None]:
    """(RSS, PSS) summed over a process and all its descendants (Linux /proc; 0 elsewhere).

    The RSS sum counts a shared page (torch's libraries, mapped by every Python process
    that imports torch) once per process; the PSS sum splits it among them, so it is the
    memory the tree really holds. ``pss``: also read PSS (None when unreadable)."""
    rss = _tree_rss(root_pid)
    return sum(rss.values()), (_pss_sum(rss) if pss else None)


def _pss_sum(pids: Iterable[int]) -> int | None:
    """PSS summed over ``pids``; None when any is unreadable (no smaps_rollup)."""
    shares = [_pss_bytes(pid) for pid in pids]
    return sum(shares) if shares and all(x is not None for x in shares) else None  # type: ignore[misc]


def tree_rss_bytes(root_pid: int | None = None) -> int:
    """Resident memory (RSS sum) of a process and all its descendants."""
    return tree_memory_bytes(root_pid)[0]


class PeakRSS:
    """Sample the memory of this process tree in a thread: ``peak`` is the largest RSS sum
    seen, ``peak_pss`` the largest PSS sum (None where /proc has no smaps_rollup),
    ``by_phase`` the largest RSS sum while :attr:`phase` (set by the caller) had each value,
    and ``peak_processes`` the tree at the peak, one ``{"name", "rss_bytes"}`` per process,
    largest first (which process to slim)."""

    def __init__(self, interval: float = 1.0, root_pid: int | None = None):
        self.interval = interval
        self.root_pid = root_pid
        self.peak = 0
        self.peak_pss: int | None = None
        self.peak_processes: list[dict[str, object]] = []
        self.phase = "start"
        self.by_phase: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def sample(self) -> None:
        """One reading (the thread calls this every ``interval`` seconds)."""
        per_pid = _tree_rss(self.root_pid)
        rss = sum(per_pid.values())
        if rss > self.peak:
            self.peak = rss
            self.peak_processes = sorted(({"name": process_name(pid), "rss_bytes": b} for pid, b in per_pid.items()),
                                         key=lambda p: -int(p["rss_bytes"]))  # type: ignore[call-overload]
        self.by_phase[self.phase] = max(self.by_phase.get(self.phase, 0), rss)
        pss = _pss_sum(per_pid)
        if pss is not None:
            self.peak_pss = max(self.peak_pss or 0, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises ``KeyboardInterrupt``, so a service stop and Ctrl-C
    take the same clean-up path; the previous handler is restored after. A no-op off the
    main thread (where signal handlers cannot be set)."""

    def _term(_sig, _frame):  # noqa: ANN001
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, _term)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
