"""Logging set-up for code running in Ray workers (replicas and actors)."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROJECT_LOGGERS = ("deployments", "dflash_core")


def configure_worker_logging(level: str) -> None:
    """Send project log records at `level` and above to stderr.

    Ray writes a worker's stderr to its log file under the session's logs folder and streams
    it to the driver. Without a handler here, records below WARNING would be dropped.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.propagate = False
