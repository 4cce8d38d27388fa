"""The backend's own errors, kept so that a run can fail on them.

The server keeps serving when one of its parts fails (a handler, a command sink, a
listener): the failure is logged at ERROR level and the guest gets the architected answer
or an error reply.  :class:`ErrorLog` is a logging handler that keeps every such record
(count, and the last few with their tracebacks) for ``query-viommu-errors``; ``boot``, every
matrix run and every guest test fail when it is not empty.
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from typing import Any

RECENT = 20


class ErrorLog(logging.Handler):
    """Counts ERROR-and-above records of the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.count = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        tb = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
        self.recent.append({"logger": record.name, "level": record.levelname,
                            "message": record.getMessage(), "traceback": tb})

    def attach(self, logger: logging.Logger) -> None:
        logger.addHandler(self)
        if logger.getEffectiveLevel() > logging.ERROR:
            logger.setLevel(logging.ERROR)

    def detach(self, logger: logging.Logger) -> None:
        logger.removeHandler(self)

    def describe(self) -> dict[str, Any]:
        return {"count": self.count, "recent": list(self.recent)}
