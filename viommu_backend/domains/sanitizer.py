"""The driver sanitizer (SMMU option ``sanitize``): checks the guest driver against the
rules it must follow and reports each violation.

Rules checked so far:

- ``stale-tlb``: a translation served from the TLB no longer matches the tables in memory
  (the walk done now faults, outputs another address, or grants less), and no
  invalidation covering the entry was issued since it changed -- the TLB drops an entry
  on every invalidation that covers it, so an entry still held has not been covered.
  The check re-walks the hit (one walk per distinct page of an access, no TLB fill); with
  hardware updates on (HTTU) that walk may set the Access flag / dirty state a driver
  cleared without invalidating, as the access would have on a TLB miss.
- ``stale-walk``: the same for a walk through cached table descriptors (the walk caches
  of the aggressive caching model, SMMU option ``cache``): the walk done now without them
  gives another translation, so a table descriptor changed with no non-leaf invalidation
  covering it.
- ``stale-ste`` / ``stale-cd``: a stream translates through its cached configuration
  while the STE (CD) in memory decodes to another one, and a CMD_SYNC has completed since
  the change was first seen with no CMD_CFGI_* covering it (the STE / CD are re-read and
  decoded on each use of a cached context).

Each violation is counted by rule, kept (the newest :data:`KEPT`), told to the
``listeners`` (QMP ``VIOMMU_SANITIZER``), recorded in the trace (category
``sanitizer``) and logged: at error level with ``sanitize_fail`` (which fails the run,
see :mod:`viommu_backend.errorlog`), else as a warning.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable

from viommu_backend.trace import Tracer

log = logging.getLogger(__name__)

KEPT = 64  # violations kept for query-viommu
RULES: tuple[str, ...] = ("stale-tlb", "stale-walk", "stale-ste", "stale-cd")


class Sanitizer:
    """Violation bookkeeping of one domain manager."""

    def __init__(self, trace: Tracer, *, fail: bool = False) -> None:
        self.trace = trace
        self.fail = fail
        self.counts: dict[str, int] = dict.fromkeys(RULES, 0)
        self.checks = 0  # cached entries checked against memory
        self.kept: deque[dict[str, Any]] = deque(maxlen=KEPT)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        trace.configure(enable="sanitizer")

    def report(self, rule: str, **data: Any) -> None:
        """One violation of ``rule`` (a name of :data:`RULES`)."""
        self.counts[rule] += 1
        info = {"rule": rule, **data}
        self.kept.append(info)
        self.trace.record("sanitizer", **dict(info))
        (log.error if self.fail else log.warning)(
            "sanitizer: %s %s", rule, " ".join(f"{k}={_show(v)}" for k, v in data.items()))
        for fn in list(self.listeners):
            try:
                fn(info)
            except Exception:  # an observer must not break the translation path
                log.exception("sanitizer listener failed")

    def snapshot(self) -> dict[str, Any]:
        """``query-viommu`` ``translation.sanitizer``."""
        return {"fail": self.fail, "checks": self.checks, "violations": dict(self.counts),
                "recent": list(self.kept)}


def _show(v: Any) -> str:
    return hex(v) if isinstance(v, int) and not isinstance(v, bool) else str(v)
