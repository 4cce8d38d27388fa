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

Rules ``missing-sync``, ``torn-ste``, ``torn-cd`` (driver), ``use-after-unmap`` (device)
and the ``no-match`` counters: :mod:`.sanitizer_rules`.  Device rules are kept and
counted apart (``device``; ``by: device`` in each report) and logged as warnings even with
``sanitize_fail``: they are the endpoint's doing, not the driver's.

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
RULES += ("missing-sync", "torn-ste", "torn-cd")
DEVICE_RULES: tuple[str, ...] = ("use-after-unmap",)
NO_MATCH: tuple[str, ...] = ("cfgi-ste-beyond-table", "cfgi-ste-invalid", "cfgi-cd-no-table",
                             "cfgi-cd-beyond-table", "tlbi-asid-unused", "tlbi-vmid-unused",
                             "tlbi-range-empty")


class Sanitizer:
    """Violation bookkeeping of one domain manager."""

    def __init__(self, trace: Tracer, *, fail: bool = False) -> None:
        self.trace = trace
        self.fail = fail
        self.counts: dict[str, int] = dict.fromkeys(RULES + DEVICE_RULES, 0)
        self.no_matches: dict[str, int] = dict.fromkeys(NO_MATCH, 0)
        # what the rules of .sanitizer_rules looked at (entry updates compared, ...)
        self.observed: dict[str, int] = {}
        self.checks = 0  # cached entries checked against memory
        self.kept: deque[dict[str, Any]] = deque(maxlen=KEPT)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        trace.configure(enable="sanitizer")

    def report(self, rule: str, **data: Any) -> None:
        """One violation of ``rule`` (a name of :data:`RULES` or :data:`DEVICE_RULES`)."""
        self.counts[rule] += 1
        by = "device" if rule in DEVICE_RULES else "driver"
        info = {"rule": rule, "by": by, **data}
        self.kept.append(info)
        self.trace.record("sanitizer", **dict(info))
        (log.error if self.fail and by == "driver" else log.warning)(
            "sanitizer: %s %s", rule, " ".join(f"{k}={_show(v)}" for k, v in data.items()))
        for fn in list(self.listeners):
            try:
                fn(info)
            except Exception:  # an observer must not break the translation path
                log.exception("sanitizer listener failed")

    def no_match(self, kind: str, **data: Any) -> None:
        """An invalidation that cannot match anything live (a name of :data:`NO_MATCH`):
        counted and traced, not a violation."""
        self.no_matches[kind] += 1
        self.trace.record("sanitizer", counter=kind, **data)

    def snapshot(self) -> dict[str, Any]:
        """``query-viommu`` ``translation.sanitizer``."""
        return {"fail": self.fail, "checks": self.checks,
                "violations": {r: self.counts[r] for r in RULES},
                "device": {r: self.counts[r] for r in DEVICE_RULES},
                "no-match": dict(self.no_matches), "observed": dict(self.observed),
                "recent": list(self.kept)}


def _show(v: Any) -> str:
    return hex(v) if isinstance(v, int) and not isinstance(v, bool) else str(v)
