"""The Flower ServerApp: translates the Flower run into a ``run_federation`` call.

``run_config`` carries only ``federation-config`` (the path of the resolved config the
supervisor wrote into the run directory) and ``resume``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from medisyn.server.config import federation_from_json
    from medisyn.server.federation import Outcome, run_dir_lock, run_federation, write_status

    cfg_path = Path(str(context.run_config["federation-config"]))
    cfg = federation_from_json(cfg_path.read_text())
    resume = bool(context.run_config.get("resume", False))
    attempt = str(context.run_config.get("attempt", ""))
    # One ServerApp per run directory: a ServerApp orphaned by a crashed coordinator
    # must be gone before a resumed one touches the checkpoints.
    with run_dir_lock(cfg.run_dir):
        try:
            outcome = run_federation(grid, cfg, resume=resume, attempt=attempt)
        except BaseException as e:
            logger.exception("federation failed")
            write_status(cfg.run_dir, Outcome.FAILED, attempt=attempt, message=f"{type(e).__name__}: {e}")
            raise
    logger.info("federation finished: %s", outcome)
