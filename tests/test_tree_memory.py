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
    finally:
        child.kill()
        child.wait()
