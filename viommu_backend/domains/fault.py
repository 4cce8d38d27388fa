"""Fault reporting and fault queues, as iommufd's fault.c: configuration and translation
faults turned into SMMUv3 event records (per CD.R / S2R), stalled transactions (CD.S /
S2S) queued as :class:`PendingFault` until CMD_RESUME / CMD_STALL_TERM, and PCIe page
requests (PRI) answered by CMD_PRI_RESP.  Functions of the
:class:`~.manager.DomainManager` (the public ones bound there as its methods).  Fault
*injection* lives in :mod:`viommu_backend.faults`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

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
    stall = stall and mgr.stalls
    if not record and not stall:
        if mgr.trace.on_fault:
            trace_fault(mgr, dev.sid, ssid, iova, write, eid.name, stage2=stage2,
                        recorded=False, stalled=False)
        return None
    pending = None
    stag = 0
    h = dev.hwpt
    if stall and h is not None and h.fault is not None:
        stag = mgr._next_stag
        mgr._next_stag = (mgr._next_stag + 1) & 0xFFFF
        pending = h.fault.add(PendingFault("stall", dev.sid, ssid, stag, iova, write))
        mgr.counters.stalls += 1
    else:
        stall = False
    if mgr.trace.on_fault:
        trace_fault(mgr, dev.sid, ssid, iova, write, eid.name, stage2=stage2, recorded=True,
                    stalled=stall, **({"stag": stag} if stall else {}))
    emit(mgr, Event(eid.name, dev.sid, ssid, addr=iova, ipa=ipa, read=not write,
                    s2=stage2, klass=klass if stage2 else int(FaultClass.IN),
                    stall=stall, stag=stag))
    return pending


# -- stalls ------------------------------------------------------------------------------------
def pending_stall(mgr: DomainManager, sid: int, stag: int) -> PendingFault | None:
    dev = mgr.devices.get(sid)
    if dev is None or dev.hwpt is None or dev.hwpt.fault is None:
        return None
    return dev.hwpt.fault.pending.get(("stall", sid, stag))


def stall_for(mgr: DomainManager, sid: int, iova: int) -> PendingFault | None:
    """The stalled transaction (if any) a failed DMA at ``iova`` left waiting."""
    fq = fault_queue(mgr, sid)
    if fq is None:
        return None
    for pf in fq:
        if pf.kind == "stall" and pf.sid == sid and pf.addr == iova and not pf.done:
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
    fq = fault_queue(mgr, sid)
    if fq is None:
        return
    fq.respond("stall", sid, stag,
               FaultResponse.SUCCESS if resp == 1 else FaultResponse.INVALID)


def stall_term(mgr: DomainManager, sid: int) -> None:
    fq = fault_queue(mgr, sid)
    if fq is not None:
        fq.flush(sid, "stall", FaultResponse.INVALID)
