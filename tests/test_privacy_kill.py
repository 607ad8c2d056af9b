"""A process killed (SIGKILL) mid-round leaves a valid ledger that counts every step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from medisyn.privacy.ledger import PrivacyLedger

CHILD = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from medisyn.config import PrivacyConfig
    from medisyn.privacy.dp import DPSession, open_site_ledger
    from medisyn.privacy.tiny import ToyLatents, collate, tiny_unet, unet_loss

    state_dir = sys.argv[1]
    priv = PrivacyConfig(dp=True, noise_multiplier=1.0, max_epsilon=1000.0, accountant="rdp")
    ds = ToyLatents(32)
    ledger = open_site_ledger(state_dir, "site-k", priv, n_records=len(ds))
    unet = tiny_unet()
    opt = torch.optim.SGD(unet.parameters(), lr=0.01)
    s = DPSession(unet, opt, ds, batch_size=2, collate_fn=collate, privacy=priv,
                  ledger=ledger, stage="unet", run_id="run-k", round=int(sys.argv[2]),
                  planned_steps=500)
    print("READY", flush=True)
    for batch in s.batches():
        if s.is_empty(batch):
            s.noise_only_step()
        else:
            unet_loss(unet, batch).backward()
            s.step()
        print("STEP", s.steps_taken, flush=True)
    """
)


def _run_and_kill(state_dir: Path, rnd: int, kill_after: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state_dir), str(rnd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    printed = 0
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:
            if line.startswith("STEP"):
                printed = int(line.split()[1])
                if printed >= kill_after:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            assert time.monotonic() < deadline, "child too slow"
        proc.wait(timeout=30)
        # steps the child finished before the signal landed
        for line in proc.stdout:
            if line.startswith("STEP"):
                printed = int(line.split()[1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return printed


def test_sigkill_mid_round_leaves_a_valid_ledger_counting_every_step(tmp_path: Path) -> None:
    printed = _run_and_kill(tmp_path, 1, kill_after=4)
    assert printed >= 4
    ledger = PrivacyLedger.open(tmp_path, "site-k", "rdp")  # valid: checksum, marker agree
    # every completed step is counted; at most the one in flight is counted in addition
    assert printed <= ledger.total_steps <= printed + 1
    # the site restarts (new process state) and trains again: ε keeps growing from there
    import torch

    from medisyn.config import PrivacyConfig
    from medisyn.privacy.dp import DPSession, open_site_ledger
    from medisyn.privacy.tiny import ToyLatents, collate, tiny_unet

    eps1 = ledger.epsilon()
    priv = PrivacyConfig(dp=True, noise_multiplier=1.0, max_epsilon=1000.0, accountant="rdp")
    unet = tiny_unet()
    restored = open_site_ledger(tmp_path, "site-k", priv, n_records=32)
    assert restored.total_steps == ledger.total_steps
    with DPSession(
        unet,
        torch.optim.SGD(unet.parameters(), lr=0.01),
        ToyLatents(32),
        batch_size=2,
        collate_fn=collate,
        privacy=priv,
        ledger=restored,
        stage="unet",
        run_id="run-k",
        round=2,
        planned_steps=2,
        insecure_seed=0,
    ) as s:
        s.noise_only_step()
        s.noise_only_step()
    ledger2 = PrivacyLedger.open(tmp_path, "site-k", "rdp")
    assert ledger2.total_steps == ledger.total_steps + 2
    assert ledger2.epsilon() > eps1
    assert [r[2] for r in ledger2.rounds()] == [1, 2]
