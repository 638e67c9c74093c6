"""How a job ends: the failures it reports in one line with an exit code instead of a traceback.

0: done; 1: nothing to process; 2 (``EXIT_REJECTED``): bad input, a missing model or a permanent object-store
refusal, before anything was half-written; 3 (``EXIT_STORE_UNAVAILABLE``): a transient object-store fault
outlasted ``--retry-budget-s``, and ``--resume`` continues.
"""

from __future__ import annotations

import logging
import re

from pipeline import retry, storage
from pipeline.schema import SchemaError


def budget_exceeded(exc: BaseException) -> BaseException | None:
    """The ``RetryBudgetExceeded`` behind ``exc`` (raised here, or in a Ray worker and wrapped by Ray / Ray
    Data on its way to the driver), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, retry.RetryBudgetExceeded):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    # Ray Data re-raises a UDF's error as a UserCodeException whose original survives only as text
    found = re.search(r"RetryBudgetExceeded: ([^\n]+)", str(exc))
    return retry.RetryBudgetExceeded(_ANSI.sub("", found.group(1)).strip()) if found else None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


EXIT_REJECTED = 2  # bad input, a missing model, or a permanent object-store refusal: nothing was half-written
EXIT_STORE_UNAVAILABLE = 3  # the retry budget for a transient object-store fault ran out; --resume continues


def failure(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one log line) for the failures a job reports without a traceback, else None."""
    spent = budget_exceeded(exc)
    if spent is not None:
        return EXIT_STORE_UNAVAILABLE, str(spent)  # names the object, how long it was retried, and --resume
    if isinstance(exc, SchemaError):
        return EXIT_REJECTED, f"input rejected before anything was written: {exc}"
    if isinstance(exc, FileNotFoundError):
        return EXIT_REJECTED, str(exc)
    if isinstance(exc, storage.StorageError):  # permanent: denied, no such bucket, bad credentials (redacted)
        return EXIT_REJECTED, f"object store refused: {exc}"
    return None


def exit_code(exc: BaseException, logger: logging.Logger) -> int:
    """A job's exit code for ``exc``: the known failures get one log line, anything else re-raises."""
    known = failure(exc)
    if known is None:
        raise exc
    logger.error("%s", known[1])
    return known[0]
