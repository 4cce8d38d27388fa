"""Fault reporting and fault queues, as iommufd's fault.c: configuration and translation
faults turned into SMMUv3 event records (per CD.R / S2R), stalled transactions (CD.S /
S2S) queued as :class:`PendingFault` until CMD_RESUME / CMD_STALL_TERM, and PCIe page
requests (PRI) answered by CMD_PRI_RESP.  Functions of the
:class:`~.manager.DomainManager` (the public ones bound there as its methods).  Fault
*injection* lives in :mod:`viommu_backend.faults`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from viommu_backend.smmuv3.commands import RESP_RETRY
from viommu_backend.smmuv3.events import Event, PageRequest
from viommu_backend.smmuv3.fields import EventId, FaultClass
from viommu_backend.smmuv3.ste import ConfigFault

from .objects import Device, FaultQueue, FaultResponse, PendingFault

if TYPE_CHECKING:
    from .manager import DomainManager
    from .translation import TranslationContext

log = logging.getLogger(__package__ + ".manager")  # the DomainManager's log

_S1_FAULTS = frozenset({EventId.F_TRANSLATION, EventId.F_ADDR_SIZE, EventId.F_ACCESS,
                        EventId.F_PERMISSION})
# PendingFault kinds of stalled transactions: with an event record (key = STAG) or held
# without one (key = a serial number, see StallState)
_STALL_KINDS = ("stall", "held")


# -- trace ("fault" category) -------------------------------------------------------------------
def trace_fault(mgr: DomainManager, sid: int, ssid: int | None, iova: int, write: bool,
                fault: str, **extra: object) -> None:
    """A translation fault returned to an endpoint (callers check ``mgr.trace.on_fault``)."""
    mgr.trace.record("fault", sid=sid, ssid=ssid, iova=iova, write=write, fault=fault, **extra)


# -- event records -----------------------------------------------------------------------------
def emit(mgr: DomainManager, ev: Event) -> None:
    mgr.counters.events += 1
    if mgr.on_event is not None:
        try:
            mgr.on_event(ev)
        except Exception:  # a broken consumer must not break the endpoint's DMA
            log.exception("event consumer failed on %s", ev.name)


def config_fault(mgr: DomainManager, dev: Device, ssid: int | None, iova: int, write: bool,
                 cf: ConfigFault) -> None:
    mgr.counters.faults += 1
    if mgr.trace.on_fault:
        trace_fault(mgr, dev.sid, ssid, iova, write, cf.event, config=True, recorded=True)
    if cf.stage2:  # S2 fault while fetching a CD through the guest stage 2
        ev = Event(cf.event, dev.sid, ssid, addr=iova, ipa=cf.ipa or 0, read=not write,
                   s2=True, klass=int(cf.fault_class))
    elif cf.event in ("F_STE_FETCH", "F_CD_FETCH"):
        ev = Event(cf.event, dev.sid, ssid, fetch_addr=cf.addr or 0)
    else:
        ev = Event(cf.event, dev.sid, ssid)
    emit(mgr, ev)


def translation_fault(mgr: DomainManager, dev: Device, ssid: int | None,
                      ctx: TranslationContext, iova: int, write: bool, code: int, stage2: bool,
                      klass: int, ipa: int) -> PendingFault | None:
    """A translation-related fault (or another walk fault) of one transaction: recorded
    per CD.R / STE.S2R, or stalled per CD.S / STE.S2S (the stalled transaction is
    returned; it waits for its answer)."""
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
        return stall_fault(mgr, h.fault, dev, ssid, iova, write, eid, stage2, klass, ipa)
    # a stalling configuration the domain cannot stall (no fault queue) terminates, and
    # reports with Stall=0 (as 3.12 allows an implementation to do)
    if not record and not stall:
        if mgr.trace.on_fault:
            trace_fault(mgr, dev.sid, ssid, iova, write, eid.name, stage2=stage2,
                        recorded=False, stalled=False)
        return None
    if mgr.trace.on_fault:
        trace_fault(mgr, dev.sid, ssid, iova, write, eid.name, stage2=stage2, recorded=True,
                    stalled=False)
    emit(mgr, Event(eid.name, dev.sid, ssid, addr=iova, ipa=ipa, read=not write,
                    s2=stage2, klass=klass if stage2 else int(FaultClass.IN)))
    return None


# -- stalls ------------------------------------------------------------------------------------
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


def can_record_stall(mgr: DomainManager) -> bool:
    return mgr.evtq_writable() and len(mgr.stall_state.recorded) < mgr.stall_max


def stall_fault(mgr: DomainManager, fq: FaultQueue, dev: Device, ssid: int | None,
                iova: int, write: bool, eid: EventId, stage2: bool, klass: int,
                ipa: int) -> PendingFault:
    """Stall the transaction: record the event with Stall=1 and a STAG (always recorded,
    whatever CD.R / S2R say), or hold it without a record when it cannot be recorded."""
    st = mgr.stall_state
    if not can_record_stall(mgr):
        key = st.new_hold_key()
        pf = fq.add(PendingFault("held", dev.sid, ssid, key, iova, write))
        st.held[key] = (fq, pf)
        pf.add_done_callback(lambda _: st.held.pop(key, None))
        mgr.counters.stalls_held += 1
        if mgr.trace.on_fault:
            trace_fault(mgr, dev.sid, ssid, iova, write, eid.name, stage2=stage2,
                        recorded=False, stalled=True, held=True)
        return pf
    stag = st.new_stag()
    pf = fq.add(PendingFault("stall", dev.sid, ssid, stag, iova, write))
    st.recorded[stag] = pf
    pf.add_done_callback(lambda _: stall_answered(mgr, stag))
    mgr.counters.stalls += 1
    if mgr.trace.on_fault:
        trace_fault(mgr, dev.sid, ssid, iova, write, eid.name, stage2=stage2, recorded=True,
                    stalled=True, stag=stag)
    emit(mgr, Event(eid.name, dev.sid, ssid, addr=iova, ipa=ipa, read=not write,
                    s2=stage2, klass=klass if stage2 else int(FaultClass.IN),
                    stall=True, stag=stag))
    return pf


def stall_answered(mgr: DomainManager, stag: int) -> None:
    """A recorded stall was answered: its STAG is free, a held transaction may record."""
    mgr.stall_state.recorded.pop(stag, None)
    retry_held(mgr)


def retry_held(mgr: DomainManager) -> None:
    """Retry the held stalled transactions (as though they had just arrived) when their
    event could now be recorded (also called when the SMMU's Event queue becomes writable
    again: ``SMMUv3.on_evtq_available``)."""
    st = mgr.stall_state
    if not st.held or not can_record_stall(mgr):
        return
    for key, (fq, pf) in list(st.held.items()):
        fq.respond("held", pf.sid, key, FaultResponse.SUCCESS)


def pending_stall(mgr: DomainManager, sid: int, stag: int) -> PendingFault | None:
    dev = mgr.devices.get(sid)
    if dev is None or dev.hwpt is None or dev.hwpt.fault is None:
        return None
    return dev.hwpt.fault.pending.get(("stall", sid, stag))


def stall_for(mgr: DomainManager, sid: int, iova: int) -> PendingFault | None:
    """The stalled transaction (if any) a failed DMA at ``iova`` left waiting: the most
    recent one of ``sid`` at that address, recorded or held."""
    fq = fault_queue(mgr, sid)
    if fq is None:
        return None
    for pf in reversed(list(fq)):
        if pf.kind in _STALL_KINDS and pf.sid == sid and pf.addr == iova and not pf.done:
            return pf
    return None


# -- PRI ---------------------------------------------------------------------------------------
def page_request(mgr: DomainManager, sid: int, ssid: int | None, addr: int, *,
                 prg_index: int, read: bool = True, write: bool = False, last: bool = True,
                 priv: bool = False, exec_: bool = False) -> PendingFault:
    """An endpoint's PCIe Page Request.  Goes to the fault queue of the stream's
    domain and out to the guest (PRIQ); the group is answered by CMD_PRI_RESP.  A
    stream on a domain without a fault queue is answered INVALID at once."""
    dev = mgr.device(sid)
    pf = PendingFault("pri", sid, ssid, prg_index, addr, write)
    h = dev.hwpt
    if h is None or h.fault is None:
        pf.complete(FaultResponse.INVALID)
        return pf
    existing = h.fault.pending.get(("pri", sid, prg_index))
    if existing is not None and not existing.done:
        pf = existing  # another request of the same group
    else:
        h.fault.add(pf)
    mgr.counters.page_requests += 1
    if mgr.on_page_request is not None:
        mgr.on_page_request(PageRequest(sid, prg_index, addr, ssid, read=read,
                                        write=write, exec=exec_, priv=priv, last=last))
    return pf


# -- command sink: fault responses -------------------------------------------------------------
def fault_queue(mgr: DomainManager, sid: int) -> FaultQueue | None:
    dev = mgr.devices.get(sid)
    if dev is None or dev.hwpt is None:
        return None
    return dev.hwpt.fault


def pri_resp(mgr: DomainManager, sid: int, ssid: int | None, grpid: int, resp: int) -> None:
    fq = fault_queue(mgr, sid)
    if fq is None:
        return
    code = {0: FaultResponse.INVALID, 1: FaultResponse.FAILURE,
            2: FaultResponse.SUCCESS}.get(resp, FaultResponse.INVALID)
    fq.respond("pri", sid, grpid, code)


def resume(mgr: DomainManager, sid: int, stag: int, resp: int) -> None:
    """CMD_RESUME: retry (RESP=Retry) or terminate the stalled transaction (SID, STAG);
    no effect when no such stall is outstanding.  Terminate with RAZ/WI (RESP=Term while
    IDR0.TERM_MODEL == 0) is not modelled: such a transaction is aborted."""
    fq = fault_queue(mgr, sid)
    if fq is None:
        return
    if resp == RESP_RETRY:
        if fq.respond("stall", sid, stag, FaultResponse.SUCCESS):
            mgr.counters.stall_retries += 1
    elif fq.respond("stall", sid, stag, FaultResponse.INVALID):
        mgr.counters.stall_aborts += 1


def stall_term(mgr: DomainManager, sid: int) -> None:
    """CMD_STALL_TERM: terminate every stalled transaction of the stream, recorded or
    held."""
    fq = fault_queue(mgr, sid)
    if fq is not None:
        n = sum(fq.flush(sid, kind, FaultResponse.INVALID) for kind in _STALL_KINDS)
        mgr.counters.stall_terms += n
