"""Where faults go, as the SMMU and iommufd's fault.c deliver them.

To the guest: configuration and translation faults become SMMUv3 event records (per CD.R /
S2R); stalled transactions (CD.S / S2S) wait as :class:`PendingFault` records (Stall=1 and
a STAG, or held without a record) until CMD_RESUME / CMD_STALL_TERM; PCIe page requests
(PRI) go to the guest's PRI queue until CMD_PRI_RESP.

To the host, under a hidden stage 2: a fault of the host's stage 2 never reaches the
guest's event queue.  The host's route of a device is the first host-owned HWPT with a
fault queue among the HWPT the host bound it to, that HWPT's parent and the parent of the
nested HWPT the device uses; an endpoint's page request for a page the host's stage 2
lacks waits in that queue until ``viommu-fault-respond``.  Without a route such faults are
counted, traced and the transaction ends.

:class:`FaultRouter` owns the stall state (STAGs, held stalls) and the listeners that hear
of every record a fault queue takes (QMP ``VIOMMU_FAULT``).  Fault *injection* lives in
:mod:`viommu_backend.fault_injection`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from viommu_backend.smmuv3.commands import RESP_RETRY
from viommu_backend.smmuv3.events import Event, PageRequest
from viommu_backend.smmuv3.fields import EventId, FaultClass
from viommu_backend.smmuv3.ste import ConfigFault

from .objects import (Device, DomainError, FaultQueue, FaultResponse, Hwpt, HwptNested,
                      HwptPaging, PendingFault)

if TYPE_CHECKING:
    from .manager import DomainManager
    from .translation import TranslationContext

log = logging.getLogger(__package__ + ".manager")  # the DomainManager's log

_S1_FAULTS = frozenset({EventId.F_TRANSLATION, EventId.F_ADDR_SIZE, EventId.F_ACCESS,
                        EventId.F_PERMISSION})
# PendingFault kinds of stalled transactions: with an event record (key = STAG) or held
# without one (key = a serial number, see StallState)
_STALL_KINDS = ("stall", "held")
PRI = "pri"


class StallState:
    """The SMMU's stalled transactions (SMMUv3 architecture 3.12.2 "Stall model").

    ``recorded``: by STAG, the stalls whose event record (Stall=1) went out and that no
    CMD_RESUME / CMD_STALL_TERM (or detach) has answered yet.  A STAG is not reused while
    its stall is outstanding.  There are never more than STALL_MAX of them: per
    SMMU_IDR5.STALL_MAX the SMMU guarantees that no more stall records than that are
    outstanding in the Event queue.

    ``held``: stalled transactions that have no record: the Event queue was not writable
    (disabled, full, or an EVTQ_ABT_ERR not acknowledged: 7.2.1 "Recording of events and
    conditions for writing to the Event queue" says stall events are then not discarded,
    the transaction is retried as though it had just arrived once the queue is writable
    again), or STALL_MAX records were outstanding (the same treatment: the transaction
    waits at the SMMU without a record).  They retry when both conditions clear.
    """

    def __init__(self) -> None:
        self.recorded: dict[int, PendingFault] = {}
        self.held: dict[int, tuple[FaultQueue, PendingFault]] = {}
        self._next_stag = 0
        self._next_hold = 0

    def new_stag(self) -> int:
        """A STAG no outstanding stall uses (callers keep len(recorded) < 2^16)."""
        tag = self._next_stag
        while tag in self.recorded:
            tag = (tag + 1) & 0xFFFF
        self._next_stag = (tag + 1) & 0xFFFF
        return tag

    def new_hold_key(self) -> int:
        self._next_hold += 1
        return self._next_hold

    def describe(self) -> dict[str, Any]:
        return {"outstanding": len(self.recorded), "held": len(self.held)}


class FaultRouter:
    """Fault delivery for one :class:`~.manager.DomainManager`."""

    def __init__(self, mgr: DomainManager) -> None:
        self.mgr = mgr
        self.stall_state = StallState()
        # (queue, record) for every record any fault queue takes (QMP VIOMMU_FAULT)
        self.listeners: list[Callable[[FaultQueue, PendingFault], None]] = []

    def new_queue(self, fq: FaultQueue) -> None:
        """A new fault queue: its records are announced to the listeners."""
        fq.listeners.append(self._record)

    def _record(self, fq: FaultQueue, pf: PendingFault) -> None:
        for fn in list(self.listeners):
            fn(fq, pf)

    # -- trace ("fault" category) and event records ----------------------------------------
    def trace_fault(self, sid: int, ssid: int | None, iova: int, write: bool, fault: str,
                    **extra: object) -> None:
        """A translation fault returned to an endpoint (callers check
        ``mgr.trace.on_fault``)."""
        self.mgr.trace.record("fault", sid=sid, ssid=ssid, iova=iova, write=write,
                              fault=fault, **extra)

    def emit(self, ev: Event) -> None:
        mgr = self.mgr
        mgr.counters.events += 1
        if mgr.on_event is not None:
            try:
                mgr.on_event(ev)
            except Exception:  # a broken consumer must not break the endpoint's DMA
                log.exception("event consumer failed on %s", ev.name)

    # -- the guest's faults ----------------------------------------------------------------
    def config_fault(self, dev: Device, ssid: int | None, iova: int, write: bool,
                     cf: ConfigFault) -> None:
        self.mgr.counters.faults += 1
        if self.mgr.trace.on_fault:
            self.trace_fault(dev.sid, ssid, iova, write, cf.event, config=True, recorded=True)
        if cf.stage2:  # S2 fault while fetching a CD through the guest stage 2
            ev = Event(cf.event, dev.sid, ssid, addr=iova, ipa=cf.ipa or 0, read=not write,
                       s2=True, klass=int(cf.fault_class))
        elif cf.event in ("F_STE_FETCH", "F_CD_FETCH"):
            ev = Event(cf.event, dev.sid, ssid, fetch_addr=cf.addr or 0)
        else:
            ev = Event(cf.event, dev.sid, ssid)
        self.emit(ev)

    def translation_fault(self, dev: Device, ssid: int | None, ctx: TranslationContext,
                          iova: int, write: bool, code: int, stage2: bool, klass: int,
                          ipa: int) -> PendingFault | None:
        """A translation-related fault (or another walk fault) of one transaction:
        recorded per CD.R / STE.S2R, or stalled per CD.S / STE.S2S (the stalled
        transaction is returned; it waits for its answer)."""
        mgr = self.mgr
        mgr.counters.faults += 1
        eid = EventId(code)
        if eid in _S1_FAULTS:
            if stage2:
                record, stall = ctx.s2.s2r, ctx.s2.s2s  # type: ignore[union-attr]
            else:
                s1 = ctx.s1
                record = bool(s1 and s1.record)
                stall = bool(s1 and s1.stall) and not (dev.ste and dev.ste.s1stalld)
        else:  # F_WALK_EABT and friends: always recorded, never stalled
            record, stall = True, False
        h = dev.hwpt
        if stall and mgr.stalls and h is not None and h.fault is not None:
            return self._stall(h.fault, dev, ssid, iova, write, eid, stage2, klass, ipa)
        # a stalling configuration the domain cannot stall (no fault queue) terminates,
        # and reports with Stall=0 (as 3.12 allows an implementation to do)
        if not record and not stall:
            if mgr.trace.on_fault:
                self.trace_fault(dev.sid, ssid, iova, write, eid.name, stage2=stage2,
                                 recorded=False, stalled=False)
            return None
        if mgr.trace.on_fault:
            self.trace_fault(dev.sid, ssid, iova, write, eid.name, stage2=stage2,
                             recorded=True, stalled=False)
        self.emit(Event(eid.name, dev.sid, ssid, addr=iova, ipa=ipa, read=not write,
                        s2=stage2, klass=klass if stage2 else int(FaultClass.IN)))
        return None

    def injected_fault(self, dev: Device, ssid: int | None, iova: int, write: bool,
                       code: int) -> None:
        """An injected fault on a stream without translation (no CD.R / S2R to consult):
        always recorded."""
        self.mgr.counters.faults += 1
        if self.mgr.trace.on_fault:
            self.trace_fault(dev.sid, ssid, iova, write, EventId(code).name, recorded=True,
                             injected=True)
        self.emit(Event(EventId(code).name, dev.sid, ssid, addr=iova, read=not write))

    # -- stalls ----------------------------------------------------------------------------
    def _can_record_stall(self) -> bool:
        mgr = self.mgr
        return mgr.evtq_writable() and len(self.stall_state.recorded) < mgr.stall_max

    def _stall(self, fq: FaultQueue, dev: Device, ssid: int | None, iova: int, write: bool,
               eid: EventId, stage2: bool, klass: int, ipa: int) -> PendingFault:
        """Stall the transaction: record the event with Stall=1 and a STAG (always
        recorded, whatever CD.R / S2R say), or hold it without a record when it cannot
        be recorded."""
        mgr, st = self.mgr, self.stall_state
        if not self._can_record_stall():
            key = st.new_hold_key()
            pf = fq.add(PendingFault("held", dev.sid, ssid, key, iova, write))
            st.held[key] = (fq, pf)
            pf.add_done_callback(lambda _: st.held.pop(key, None))
            mgr.counters.stalls_held += 1
            if mgr.trace.on_fault:
                self.trace_fault(dev.sid, ssid, iova, write, eid.name, stage2=stage2,
                                 recorded=False, stalled=True, held=True)
            return pf
        stag = st.new_stag()
        pf = fq.add(PendingFault("stall", dev.sid, ssid, stag, iova, write))
        st.recorded[stag] = pf
        pf.add_done_callback(lambda _: self._stall_answered(stag))
        mgr.counters.stalls += 1
        if mgr.trace.on_fault:
            self.trace_fault(dev.sid, ssid, iova, write, eid.name, stage2=stage2,
                             recorded=True, stalled=True, stag=stag)
        self.emit(Event(eid.name, dev.sid, ssid, addr=iova, ipa=ipa, read=not write,
                        s2=stage2, klass=klass if stage2 else int(FaultClass.IN),
                        stall=True, stag=stag))
        return pf

    def _stall_answered(self, stag: int) -> None:
        """A recorded stall was answered: its STAG is free, a held transaction may
        record."""
        self.stall_state.recorded.pop(stag, None)
        self.retry_held()

    def retry_held(self) -> None:
        """Retry the held stalled transactions (as though they had just arrived) when
        their event could now be recorded (also when the SMMU's Event queue becomes
        writable again: ``SMMUv3.on_evtq_available``)."""
        st = self.stall_state
        if not st.held or not self._can_record_stall():
            return
        for key, (fq, pf) in list(st.held.items()):
            fq.respond("held", pf.sid, key, FaultResponse.SUCCESS)

    def pending_stall(self, sid: int, stag: int) -> PendingFault | None:
        fq = self.fault_queue(sid)
        return None if fq is None else fq.pending.get(("stall", sid, stag))

    def stall_for(self, sid: int, iova: int) -> PendingFault | None:
        """The stalled transaction (if any) a failed DMA at ``iova`` left waiting: the
        most recent one of ``sid`` at that address, recorded or held."""
        fq = self.fault_queue(sid)
        if fq is None:
            return None
        for pf in reversed(list(fq)):
            if pf.kind in _STALL_KINDS and pf.sid == sid and pf.addr == iova and not pf.done:
                return pf
        return None

    # -- the guest's PRI -------------------------------------------------------------------
    def page_request(self, sid: int, ssid: int | None, addr: int, *, prg_index: int,
                     read: bool = True, write: bool = False, last: bool = True,
                     priv: bool = False, exec_: bool = False) -> PendingFault:
        """A PCIe Page Request to the guest: into the fault queue of the stream's domain
        and out to the guest (PRIQ); the group is answered by CMD_PRI_RESP.  A stream on
        a domain without a fault queue is answered INVALID at once."""
        mgr = self.mgr
        dev = mgr.device(sid)
        pf = PendingFault(PRI, sid, ssid, prg_index, addr, write)
        h = dev.hwpt
        if h is None or h.fault is None:
            pf.complete(FaultResponse.INVALID)
            return pf
        existing = h.fault.pending.get((PRI, sid, prg_index))
        if existing is not None and not existing.done:
            pf = existing  # another request of the same group
        else:
            h.fault.add(pf)
        mgr.counters.page_requests += 1
        if mgr.on_page_request is not None:
            mgr.on_page_request(PageRequest(sid, prg_index, addr, ssid, read=read,
                                            write=write, exec=exec_, priv=priv, last=last))
        return pf

    # -- command sink: the guest's responses -----------------------------------------------
    def fault_queue(self, sid: int) -> FaultQueue | None:
        dev = self.mgr.devices.get(sid)
        if dev is None or dev.hwpt is None:
            return None
        return dev.hwpt.fault

    def pri_resp(self, sid: int, ssid: int | None, grpid: int, resp: int) -> None:
        fq = self.fault_queue(sid)
        if fq is None:
            return
        code = {0: FaultResponse.INVALID, 1: FaultResponse.FAILURE,
                2: FaultResponse.SUCCESS}.get(resp, FaultResponse.INVALID)
        fq.respond(PRI, sid, grpid, code)

    def resume(self, sid: int, stag: int, resp: int) -> None:
        """CMD_RESUME: retry (RESP=Retry) or terminate the stalled transaction (SID,
        STAG); no effect when no such stall is outstanding.  Terminate with RAZ/WI
        (RESP=Term while IDR0.TERM_MODEL == 0) is not modelled: such a transaction is
        aborted."""
        fq = self.fault_queue(sid)
        if fq is None:
            return
        counters = self.mgr.counters
        if resp == RESP_RETRY:
            if fq.respond("stall", sid, stag, FaultResponse.SUCCESS):
                counters.stall_retries += 1
        elif fq.respond("stall", sid, stag, FaultResponse.INVALID):
            counters.stall_aborts += 1

    def stall_term(self, sid: int) -> None:
        """CMD_STALL_TERM: terminate every stalled transaction of the stream, recorded or
        held."""
        fq = self.fault_queue(sid)
        if fq is not None:
            n = sum(fq.flush(sid, kind, FaultResponse.INVALID) for kind in _STALL_KINDS)
            self.mgr.counters.stall_terms += n

    # -- the host's route ------------------------------------------------------------------
    @staticmethod
    def host_s2_of(dev: Device) -> bool:
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

    def host_fault(self, dev: Device, ssid: int | None, iova: int, write: bool, code: int,
                   ipa: int) -> None:
        """A fault in the host's stage 2: never an event for the guest.  Counted and
        traced; the transaction ends (an endpoint with PRI may then ask for the page)."""
        counters = self.mgr.counters
        counters.faults += 1
        counters.host_faults += 1
        if self.mgr.trace.on_fault:
            self.trace_fault(dev.sid, ssid, iova, write, EventId(code).name, stage2=True,
                             ipa=ipa, host=True, recorded=False)

    def endpoint_page_request(self, sid: int, ssid: int | None, addr: int, *, write: bool,
                              prg_index: int) -> PendingFault:
        """An endpoint's Page Request after a translation fault at ``addr``.  A page the
        host's stage 2 lacks goes to the host's fault queue (answered INVALID at once
        without one); any other fault to the guest (:meth:`page_request`); an address
        that translates by now is answered SUCCESS at once."""
        mgr = self.mgr
        t, _ = mgr.translator.probe(sid, ssid, addr, write)
        pf = PendingFault(PRI, sid, ssid, prg_index, addr, write)
        if not t.fault:
            pf.complete(FaultResponse.SUCCESS)
            return pf
        dev = mgr.device(sid)
        if not (t.stage2 and self.host_s2_of(dev)):
            return self.page_request(sid, ssid, addr, prg_index=prg_index, write=write)
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

    def respond(self, queue: int, cookie: int, code: str) -> None:
        """A response written to an iommufd fault queue (viommu-fault-respond)."""
        fq = self.mgr.table.get(queue, FaultQueue)
        try:
            response = FaultResponse[code.upper()]
        except KeyError:
            raise DomainError(f"code {code!r}: success, invalid or failure") from None
        fq.respond_cookie(cookie, response)
