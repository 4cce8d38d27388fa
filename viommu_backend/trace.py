"""What the guest driver did, in order: a bounded ring of trace records.

One :class:`Tracer` per Backend (shared by its SMMU model and domain manager; a model
built on its own gets a private, disabled one).  Every record is a dict
``{seq, t, cat, ...fields}``: ``seq`` counts every record ever made (monotonic, survives
``clear``), ``t`` is monotonic seconds since the tracer was made.

Categories (each enabled separately):

- ``reg``    MMIO access of the SMMU BAR: ``op`` r/w, ``offset``, ``reg`` name, ``size``, ``value``
- ``cmd``    a command executed from the CMDQ: ``name``, ``index`` (CONS), decoded ``fields``
- ``event``  an event record produced: ``name``, its fields, ``outcome``
- ``priq``   a PRI page request record produced
- ``gerror`` a GERROR bit raised: ``name`` (+ ``cerror`` for CMDQ_ERR)
- ``irq``    interrupt delivery: ``source``, ``kind`` level / pulse / msi
- ``domain`` attach / replace / detach of a stream: ``sid``, ``from``, ``to``, ``kind``
- ``fault``  a translation fault returned to an endpoint: ``sid``, ``ssid``, ``iova``, ``fault``
- ``vfio``   a vfio-user request served, any function: ``dev`` (function name), ``cmd``
             (command name), ``region`` / ``offset`` / ``count`` for region accesses,
             ``posted`` (no reply wanted), ``us`` (server time handling it, µs; ``t`` is
             when it arrived); and an interrupt a function signalled: ``dev``, ``irq``
             (INTX / MSI / MSIX ...), ``vector``.  With ``irq`` and ``reg`` this gives the
             timeline of a guest request as the server saw it.
- ``xlat``   a translation request of an endpoint (a DMA through a translated domain):
             ``sid``, ``ssid``, ``write``, ``pages`` (the distinct 4 KiB page numbers it
             touched), ``walked`` (those not served by the TLB: walked), ``faults`` (how
             many of its addresses faulted); the data of the report's heat map.

Hot paths test one bool per category (``tracer.on_cmd`` ...) and call the recorder
only when it is set, so a disabled category costs an attribute check.
"""

from __future__ import annotations

import time
from collections import deque
from itertools import islice
from typing import Any, Callable, Iterable

CATEGORIES: tuple[str, ...] = ("reg", "cmd", "event", "priq", "gerror", "irq", "domain",
                               "fault", "vfio", "xlat", "sanitizer")
DEFAULT_SIZE = 4096
MAX_SIZE = 1 << 20
QUERY_LIMIT = 256
QUERY_MAX = 4096
STREAM_RATE = 1000  # VIOMMU_TRACE events per second at most; the excess is counted


class TraceError(ValueError):
    """Bad tracer arguments (unknown category, size out of range...)."""


def parse_categories(cats: Iterable[str] | str) -> tuple[str, ...]:
    """``"cmd,reg"`` or ``["cmd", "reg"]`` (``all`` = every category) -> checked names."""
    if isinstance(cats, str):
        cats = [c.strip() for c in cats.split(",") if c.strip()]
    out: list[str] = []
    for c in cats:
        if not isinstance(c, str):
            raise TraceError(f"trace category must be a string, not {c!r}")
        if c == "all":
            out.extend(CATEGORIES)
        elif c in CATEGORIES:
            out.append(c)
        else:
            raise TraceError(f"unknown trace category {c!r} "
                             f"(known: {', '.join(CATEGORIES)}, all)")
    return tuple(dict.fromkeys(out))


def _export(rec: dict[str, Any]) -> dict[str, Any]:
    """A record as QMP shows it: seq, t (rounded to µs), cat first, then its fields."""
    out = {"seq": rec["seq"], "t": round(rec["t"], 6), "cat": rec["cat"]}
    for k, v in rec.items():
        if k not in out:
            out[k] = dict(v) if isinstance(v, dict) else v
    return out


class Tracer:
    CATEGORIES = CATEGORIES

    def __init__(self, size: int = DEFAULT_SIZE, enable: Iterable[str] | str = (), *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.on_reg = self.on_cmd = self.on_event = self.on_priq = False
        self.on_gerror = self.on_irq = self.on_domain = self.on_fault = False
        self.on_vfio = self.on_xlat = self.on_sanitizer = False
        self._clock = clock
        self._t0 = clock()
        self._check_size(size)
        self.ring: deque[dict[str, Any]] = deque(maxlen=size)
        self.next_seq = 0  # seq of the next record = records ever made
        self.listener: Callable[[dict[str, Any]], Any] | None = None  # VIOMMU_TRACE stream
        self.stream_rate = STREAM_RATE
        self.stream_dropped = 0
        self._win_start = 0.0
        self._win_count = 0
        self.configure(enable=enable)

    # -- configuration ---------------------------------------------------------------------
    @staticmethod
    def _check_size(size: Any) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_SIZE:
            raise TraceError(f"trace size must be an integer in 1..{MAX_SIZE}, not {size!r}")

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(c for c in CATEGORIES if getattr(self, "on_" + c))

    @property
    def size(self) -> int:
        return self.ring.maxlen or 0

    @property
    def oldest(self) -> int:
        """seq of the oldest record still in the ring (== next_seq when empty)."""
        return self.next_seq - len(self.ring)

    def configure(self, *, enable: Iterable[str] | str = (), disable: Iterable[str] | str = (),
                  size: int | None = None, clear: bool = False) -> dict[str, Any]:
        """Apply the changes (disable first, then enable) and return :meth:`state`.
        Arguments are all checked before anything changes."""
        on = parse_categories(enable)
        off = parse_categories(disable)
        if size is not None:
            self._check_size(size)
        for c in off:
            setattr(self, "on_" + c, False)
        for c in on:
            setattr(self, "on_" + c, True)
        if clear:
            self.ring.clear()
        if size is not None and size != self.size:
            self.ring = deque(self.ring, maxlen=size)  # keeps the newest
        return self.state()

    def state(self) -> dict[str, Any]:
        return {"enabled": list(self.enabled), "size": self.size, "records": len(self.ring),
                "oldest": self.oldest, "next": self.next_seq,
                "stream": self.listener is not None, "stream-dropped": self.stream_dropped}

    # -- recording -----------------------------------------------------------------------------
    def record(self, cat: str, **fields: Any) -> dict[str, Any]:
        fields["seq"] = self.next_seq  # the kwargs dict becomes the record: no copy
        fields["t"] = self._clock() - self._t0
        fields["cat"] = cat
        rec = fields
        self.next_seq += 1
        self.ring.append(rec)
        if self.listener is not None:
            self._stream(rec)
        return rec

    def _stream(self, rec: dict[str, Any]) -> None:
        now = self._clock()
        if now - self._win_start >= 1.0:
            self._win_start, self._win_count = now, 0
        if self._win_count >= self.stream_rate:
            self.stream_dropped += 1
            return
        self._win_count += 1
        try:
            self.listener(_export(rec))  # type: ignore[misc]
        except Exception:  # a broken consumer must not break the device model
            self.stream_dropped += 1

    # -- reading ---------------------------------------------------------------------------------
    def query(self, since: int = 0, limit: int = QUERY_LIMIT,
              cats: Iterable[str] | None = None) -> dict[str, Any]:
        """Records with ``seq >= since`` (of ``cats`` if given), at most ``limit``.
        ``next`` is the ``since`` for the following call; ``dropped`` how many records
        from ``since`` on left the ring (overwritten or cleared) before being read."""
        if not isinstance(since, int) or isinstance(since, bool) or since < 0:
            raise TraceError(f"'since' must be a non-negative integer, not {since!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= QUERY_MAX:
            raise TraceError(f"'limit' must be an integer in 1..{QUERY_MAX}, not {limit!r}")
        want = None if cats is None else frozenset(parse_categories(cats))
        oldest = self.oldest
        dropped = max(0, min(oldest, self.next_seq) - since)
        start = max(since, oldest)
        out: list[dict[str, Any]] = []
        nxt = start
        if start < self.next_seq:
            for rec in islice(self.ring, start - oldest, None):
                nxt = rec["seq"] + 1
                if want is None or rec["cat"] in want:
                    out.append(_export(rec))
                    if len(out) >= limit:
                        break
        return {"records": out, "next": nxt, "dropped": dropped}
