"""Where a guest I/O request's time goes, from the server's ``vfio`` trace records.

An endpoint serving one request at a time (a synchronous O_DIRECT ``dd``) goes through
the same cycle per request, as the server sees it:

    notify (posted REGION_WRITE to the queue's notify register)
      -> the server processes the request (descriptors, translation, data) ... INTx signalled
      -> the guest reads ISR (REGION_READ), QEMU unmasks INTx (SET_IRQS)
      -> the guest unmaps the buffers: TLBI + CMD_SYNC (posted REGION_WRITE of CMDQ_PROD)
      -> the next notify

:func:`request_cycles` cuts the records at each notify of the endpoint and splits every
cycle into *server* time (notify to interrupt, plus the handler time ``us`` of every
request the server served after that) and *other* time: the guest's own work, QEMU, and
the socket hops between them, which no server speed-up can remove.

Each cycle is also cut into its phases (:data:`PHASES`), as far as its records show them:
``process`` notify -> INTx signalled, ``irq`` INTx -> the guest's ISR read arrives (QEMU's
main loop raising the line, the vCPU taking the interrupt), ``eoi`` ISR read -> QEMU's
INTx unmask (SET_IRQS) arrives, ``guest`` unmask -> the next notify (the guest completes
the request, unmaps -- in strict mode waiting for each CMD_SYNC --, maps and submits the
next one).  Only ``process`` and the handlers inside ``guest`` are the server's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class Cycle:
    t: float  # notify arrival, seconds on the tracer's clock
    total_us: float  # to the next notify
    server_us: float
    process_us: float | None  # notify -> interrupt signalled (None: no interrupt seen)
    counts: dict[str, int] = field(default_factory=dict)  # "cmdq_prod", "reads", "unmask", ...
    phases: dict[str, float] = field(default_factory=dict)  # PHASES found, µs each

    @property
    def other_us(self) -> float:
        return self.total_us - self.server_us


@dataclass
class CycleStats:
    n: int
    total_us: float  # means over the cycles
    server_us: float
    other_us: float
    process_us: float
    median_total_us: float
    median_server_us: float
    counts: dict[str, float]  # mean per cycle
    phases: dict[str, float] = field(default_factory=dict)  # median µs, over the cycles that show it

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "total_us": round(self.total_us, 1),
                "server_us": round(self.server_us, 1), "other_us": round(self.other_us, 1),
                "process_us": round(self.process_us, 1),
                "median_total_us": round(self.median_total_us, 1),
                "median_server_us": round(self.median_server_us, 1),
                "counts": {k: round(v, 2) for k, v in self.counts.items()},
                "phases": {k: round(v, 1) for k, v in self.phases.items()}}


# a cycle's phases, in order, and how reports name them
PHASES: dict[str, str] = {"process": "notify -> INTx", "irq": "INTx -> ISR read",
                          "eoi": "ISR read -> unmask", "guest": "unmask -> next notify"}


def _is_notify(r: dict[str, Any], dev: str, region: int, offset: int) -> bool:
    return (r.get("dev") == dev and r.get("cmd") == "REGION_WRITE"
            and r.get("region") == region and r.get("offset") == offset)


def _kind(r: dict[str, Any], dev: str, iommu: str | None) -> str | None:
    cmd = r.get("cmd")
    if cmd is None:
        return None
    if r.get("dev") == iommu and cmd == "REGION_WRITE":
        return "iommu_writes"
    if cmd == "REGION_READ":
        return "reads"
    if cmd == "DEVICE_SET_IRQS":
        return "set_irqs"
    return "other_requests"


def request_cycles(records: Iterable[dict[str, Any]], *, dev: str, notify_region: int,
                   notify_offset: int, iommu: str | None = None) -> list[Cycle]:
    """Cycles between consecutive notifies of ``dev`` (the last, open one is dropped).
    ``records``: ``vfio`` trace records in ``seq`` order (other categories ignored)."""
    recs = [r for r in records if r.get("cat") == "vfio"]
    starts = [i for i, r in enumerate(recs) if _is_notify(r, dev, notify_region, notify_offset)]
    cycles: list[Cycle] = []
    for a, b in zip(starts, starts[1:]):
        notify, nxt = recs[a], recs[b]
        body = recs[a + 1:b]
        irq = next((r for r in body if r.get("dev") == dev and "irq" in r), None)
        process = None if irq is None else (irq["t"] - notify["t"]) * 1e6
        counts: dict[str, int] = {}
        server = process if process is not None else float(notify.get("us", 0.0))
        for r in body:
            k = _kind(r, dev, iommu)
            if k is None:
                continue
            counts[k] = counts.get(k, 0) + 1
            if irq is None or r["t"] >= irq["t"]:
                server += float(r.get("us", 0.0))
        cycles.append(Cycle(notify["t"], (nxt["t"] - notify["t"]) * 1e6, server, process,
                            counts, _phases(notify, irq, body, nxt, dev)))
    return cycles


def _phases(notify: dict[str, Any], irq: dict[str, Any] | None, body: list[dict[str, Any]],
            nxt: dict[str, Any], dev: str) -> dict[str, float]:
    """The cycle's :data:`PHASES` up to the first mark its records lack."""
    def after(t: float, cmd: str) -> dict[str, Any] | None:
        return next((r for r in body if r.get("dev") == dev and r.get("cmd") == cmd
                     and r["t"] >= t), None)

    isr = after(irq["t"], "REGION_READ") if irq is not None else None
    unmask = after(isr["t"], "DEVICE_SET_IRQS") if isr is not None else None
    marks = [notify, irq, isr, unmask, nxt]
    out: dict[str, float] = {}
    for name, a, b in zip(PHASES, marks, marks[1:]):
        if a is None or b is None:
            break
        out[name] = (b["t"] - a["t"]) * 1e6
    return out


def summarize(cycles: list[Cycle]) -> CycleStats | None:
    if not cycles:
        return None
    n = len(cycles)
    keys = sorted({k for c in cycles for k in c.counts})
    procs = [c.process_us for c in cycles if c.process_us is not None]
    return CycleStats(
        n=n,
        total_us=sum(c.total_us for c in cycles) / n,
        server_us=sum(c.server_us for c in cycles) / n,
        other_us=sum(c.other_us for c in cycles) / n,
        process_us=sum(procs) / len(procs) if procs else 0.0,
        median_total_us=statistics.median(c.total_us for c in cycles),
        median_server_us=statistics.median(c.server_us for c in cycles),
        counts={k: sum(c.counts.get(k, 0) for c in cycles) / n for k in keys},
        phases={k: statistics.median(c.phases[k] for c in cycles if k in c.phases)
                for k in PHASES if any(k in c.phases for c in cycles)})
