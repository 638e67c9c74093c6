"""One logging set-up for jobs and Ray workers: INFO from this project's loggers, secrets redacted."""

from __future__ import annotations

import logging
import sys

PROJECT_LOGGERS = ("accm", "pipeline", "actors")


def setup_logging(names: tuple[str, ...] = PROJECT_LOGGERS, *, with_time: bool = True) -> None:
    """Attach one redacting stderr handler to each project logger (idempotent: safe to call per actor)."""
    from pipeline.storage import RedactingFilter

    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if with_time else "%(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    for name in names:
        logger = logging.getLogger(name)
        if logger.handlers:
            continue
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False
