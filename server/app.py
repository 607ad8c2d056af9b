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
    if str(context.run_config.get("mode", "train")) == "audit":
        _audit(grid, context, cfg)
        return
    if str(context.run_config.get("mode", "train")) == "evaluate":
        _evaluate(grid, context, cfg)
        return
    resume = bool(context.run_config.get("resume", False))
    attempt = str(context.run_config.get("attempt", ""))
    # who runs this attempt: the supervisor resumes the run if this process dies
    from medisyn.server.supervisor import write_serverapp_record

    write_serverapp_record(cfg.run_dir, attempt)
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


def _audit(grid: Grid, context: Context, cfg) -> None:  # noqa: ANN001
    """``mode = "audit"``: the release audit of the run's final model (``medisyn.server.audit``)."""
    from medisyn.server.audit import AuditRequest, run_audit
    from medisyn.server.federation import Outcome, run_dir_lock

    req = AuditRequest.model_validate_json(Path(str(context.run_config["audit-request"])).read_text())
    attempt = str(context.run_config.get("attempt", ""))
    with run_dir_lock(cfg.run_dir):
        try:
            outcome = run_audit(grid, cfg, req, attempt=attempt)
        except BaseException as e:
            logger.exception("audit failed")
            from medisyn.server.audit import AuditProgress

            AuditProgress(req.out_dir, attempt).status(Outcome.FAILED, message=f"{type(e).__name__}: {e}")
            raise
    logger.info("audit finished: %s", outcome)


def _evaluate(grid: Grid, context: Context, cfg) -> None:  # noqa: ANN001
    """``mode = "evaluate"``: the federated evaluation of the run's final model
    (``medisyn.server.evaluate``)."""
    from medisyn.server.audit import AuditProgress
    from medisyn.server.evaluate import EvaluateRequest, run_evaluate
    from medisyn.server.federation import Outcome, run_dir_lock

    req = EvaluateRequest.model_validate_json(Path(str(context.run_config["evaluate-request"])).read_text())
    attempt = str(context.run_config.get("attempt", ""))
    with run_dir_lock(cfg.run_dir):
        try:
            outcome = run_evaluate(grid, cfg, req, attempt=attempt)
        except BaseException as e:
            logger.exception("evaluation failed")
            AuditProgress(req.out_dir, attempt).status(Outcome.FAILED, message=f"{type(e).__name__}: {e}")
            raise
    logger.info("evaluation finished: %s", outcome)
