"""The demo's memory measure: RSS and PSS summed over a process tree."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from medisyn.procs import PeakRSS, tree_memory_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_tree_memory_counts_a_child_and_pss_is_at_most_rss():
    before, _ = tree_memory_bytes()
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
                              "print('ready', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with PeakRSS(interval=0.1) as peak:
            time.sleep(0.5)
        rss, pss = tree_memory_bytes(pss=True)
        assert rss - before > 190 * 2**20  # the child's 200 MiB are in the tree
        assert pss is not None and 190 * 2**20 < pss <= rss
        assert peak.peak >= rss - 50 * 2**20 and peak.peak_pss is not None
        # the breakdown at the peak names the child (python -c: its program only, no arguments)
        names = {p["name"]: p["rss_bytes"] for p in peak.peak_processes}
        assert sum(names.values()) <= peak.peak and len(peak.peak_processes) >= 2
        assert peak.peak_processes[0]["rss_bytes"] >= 190 * 2**20  # largest first: the child
        assert all("import" not in n for n in names)
    finally:
        child.kill()
        child.wait()


def test_children_get_two_malloc_arenas_unless_the_operator_says_otherwise(monkeypatch):
    from medisyn.procs import child_env, trim_heap

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert child_env()["MALLOC_ARENA_MAX"] == "2"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert child_env()["MALLOC_ARENA_MAX"] == "8"
    trim_heap()  # returns quietly (glibc: malloc_trim; elsewhere: nothing)


def test_message_relays_keep_large_blocks_in_mmap_unless_the_operator_says_otherwise(monkeypatch, tmp_path):
    from medisyn.procs import RELAY_MALLOC_ENV, Daemon

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    relay = Daemon("relay", ["true"], log_path=tmp_path / "r.log", relay=True)
    worker = Daemon("worker", ["true"], log_path=tmp_path / "w.log")
    assert relay.env["MALLOC_MMAP_THRESHOLD_"] == RELAY_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"] == str(2**20)
    assert "MALLOC_MMAP_THRESHOLD_" not in worker.env  # training keeps glibc's adaptive threshold
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert Daemon("relay", ["true"], log_path=tmp_path / "r.log", relay=True).env["MALLOC_MMAP_THRESHOLD_"] == "65536"


def test_peak_rss_is_kept_per_phase():
    with PeakRSS(interval=0.05) as rss:
        rss.phase = "one"
        time.sleep(0.3)
        rss.phase = "two"
        time.sleep(0.3)
    assert {"one", "two"} <= set(rss.by_phase)
    assert max(rss.by_phase.values()) == rss.peak and all(v > 0 for v in rss.by_phase.values())


def test_process_names_are_short_and_carry_no_arguments(tmp_path):
    from medisyn.procs import process_name

    script = tmp_path / "secret-site-path" / "tool.py"
    script.parent.mkdir()
    script.write_text("import time; print('ready', flush=True); time.sleep(30)")
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True),
             subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0", "--directory",
                               str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        assert procs[0].stdout is not None and procs[0].stdout.readline().strip() == "ready"
        py = __import__("pathlib").Path(sys.executable).name
        assert process_name(procs[0].pid) == f"{py} tool.py"
        assert process_name(procs[1].pid) == f"{py} -m http.server"
        assert process_name(2**22 + 7) == "?"  # no such process
    finally:
        for p in procs:
            p.kill()
            p.wait()
