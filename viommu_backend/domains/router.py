"""Where faults go: to the guest (event records, stalls, its PRI queue) or, under a
hidden stage 2, to the host (the host's fault queues, QMP ``VIOMMU_FAULT``).

The host's route of a device is the first host-owned HWPT with a fault queue among the
HWPT the host bound it to, that HWPT's parent and the parent of the nested HWPT the
device uses: a stage-2 fault there is the host's to answer (a page request from an
endpoint with PRI waits in that queue until ``viommu-fault-respond``).  Stage-2 faults
never reach the guest's event queue; without a host route they are counted, traced and
the transaction is terminated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from viommu_backend.smmuv3.fields import EventId

from .fault import trace_fault
from .objects import Device, FaultQueue, FaultResponse, Hwpt, HwptNested, HwptPaging, \
    PendingFault

if TYPE_CHECKING:
    from .manager import DomainManager

PRI = "pri"


class FaultRouter:
    """The host's half of fault delivery for one :class:`~.manager.DomainManager`."""

    def __init__(self, mgr: DomainManager) -> None:
        self.mgr = mgr
        # (queue, record) for every record any fault queue takes (QMP VIOMMU_FAULT)
        self.listeners: list[Callable[[FaultQueue, PendingFault], None]] = []

    # -- fault queues ----------------------------------------------------------------------
    def new_queue(self, fq: FaultQueue) -> FaultQueue:
        """Hook a new fault queue to the listeners."""
        fq.listeners.append(self._record)
        return fq

    def _record(self, fq: FaultQueue, pf: PendingFault) -> None:
        for fn in list(self.listeners):
            fn(fq, pf)

    # -- the host's route ------------------------------------------------------------------
    def host_s2_of(self, dev: Device) -> bool:
        """Does ``dev``'s DMA go through the host's stage 2 now?"""
        h = dev.hwpt
        paging = h.parent if isinstance(h, HwptNested) else h
        return isinstance(paging, HwptPaging) and paging.table is not None

    def host_queue(self, dev: Device) -> FaultQueue | None:
        """The fault queue of the host's route of ``dev`` (hidden stage 2 only)."""
        if not self.mgr.host_s2:
            return None
        cands: list[Hwpt] = []
        for h in (dev.binding, dev.hwpt):
            if isinstance(h, Hwpt):
                cands.append(h)
                if isinstance(h, HwptNested):
                    cands.append(h.parent)
        for h in cands:
            if h.owner == "host" and h.fault is not None:
                return h.fault
        return None

    def update_iopf(self, dev: Device) -> None:
        """Turn the endpoint's page requests on while it has a host route (as iommufd
        enables IOPF when a device attaches to a fault-capable HWPT), off when not."""
        want = self.host_queue(dev) is not None
        if want == dev.iopf:
            return
        dev.iopf = want
        hook = self.mgr.iopf_hooks.get(dev.sid)
        if hook is not None:
            hook(want)

    # -- faults of the host's stage 2 ------------------------------------------------------
    def host_fault(self, dev: Device, ssid: int | None, iova: int, write: bool, code: int,
                   ipa: int) -> None:
        """A fault in the host's stage 2: never an event for the guest.  Counted and
        traced; the transaction ends (an endpoint with PRI may then ask for the page)."""
        mgr = self.mgr
        mgr.counters.faults += 1
        mgr.counters.host_faults += 1
        if mgr.trace.on_fault:
            trace_fault(mgr, dev.sid, ssid, iova, write, EventId(code).name, stage2=True,
                        ipa=ipa, host=True, recorded=False)

    def page_request(self, sid: int, ssid: int | None, addr: int, *, write: bool,
                     prg_index: int) -> PendingFault:
        """An endpoint's Page Request after a translation fault at ``addr``.  A page the
        host's stage 2 lacks goes to the host's fault queue (answered INVALID at once
        without one); any other fault to the guest (its PRI queue, as
        :meth:`DomainManager.page_request`); an address that translates by now is
        answered SUCCESS at once."""
        mgr = self.mgr
        t, _ = mgr.probe(sid, ssid, addr, write)
        pf = PendingFault(PRI, sid, ssid, prg_index, addr, write)
        if not t.fault:
            pf.complete(FaultResponse.SUCCESS)
            return pf
        dev = mgr.device(sid)
        if not (t.stage2 and self.host_s2_of(dev)):
            return mgr.page_request(sid, ssid, addr, prg_index=prg_index, write=write)
        fq = self.host_queue(dev)
        if fq is None:
            pf.complete(FaultResponse.INVALID)
            return pf
        existing = fq.pending.get((PRI, sid, prg_index))
        if existing is not None and not existing.done:
            return existing  # another request of the same group
        mgr.counters.page_requests += 1
        mgr.counters.host_page_requests += 1
        return fq.add(pf)
