"""Translation: a stream's domain resolved into a :class:`TranslationContext` (stage 1 CD,
stage 2, TLB tags VMID / ASID), then ``translate_one`` (TLB, else a scalar walk) and
``translate`` (TLB per page, misses walked in one numpy batch), side-effect-free ``probe``,
and the injected-fault hook (:mod:`viommu_backend.faults`, consulted before the TLB).
Faults go out as event records through :mod:`.fault`.  Functions of the
:class:`~.manager.DomainManager` (the public ones bound there as its methods)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.cd import S1Config, fetch_cd
from viommu_backend.smmuv3.events import Event
from viommu_backend.smmuv3.fields import EventId, FaultClass
from viommu_backend.smmuv3.ste import ConfigFault, S2Config
from viommu_backend.smmuv3.tlb import EL2_VMID, NO_ASID
from viommu_backend.smmuv3.walker import Translation, WalkResult, walk, walk_one

from .devices import read_stream_config
from .fault import config_fault, emit, trace_fault, translation_fault
from .objects import Device, HwptBlocking, HwptNested, HwptPaging
from .results import ABORT, ABORT_NAME, PAGE, TranslationResult

if TYPE_CHECKING:
    from .manager import DomainManager


@dataclass(frozen=True)
class TranslationContext:
    """What translating one (stream, substream) needs: resolved config + TLB keys."""

    domain: int
    abort: bool
    s1: S1Config | None
    s2: S2Config | None
    vmid: int
    asid: int
    stage: str  # "s1" "s2" "nested" "identity" "abort"

    @property
    def identity(self) -> bool:
        return self.s1 is None and self.s2 is None


def context(mgr: DomainManager, dev: Device, ssid: int | None
            ) -> TranslationContext | ConfigFault:
    """The context of (``dev``, ``ssid``), cached on the device until its domain or CDs
    change (CD fetched on first use)."""
    ctx = dev.ctx_cache.get(ssid)
    if ctx is not None:
        return ctx
    h = dev.hwpt
    if dev.config_fault is not None:
        return dev.config_fault
    if h is None or isinstance(h, HwptBlocking):
        ctx = TranslationContext(h.id if h else 0, True, None, None, 0, NO_ASID, "abort")
    elif isinstance(h, HwptPaging):
        if ssid is not None:
            return ConfigFault("C_BAD_SUBSTREAMID", "substream on a stream without "
                               "stage 1", sid=dev.sid, ssid=ssid)
        ctx = TranslationContext(h.id, False, None, h.s2, h.vmid, NO_ASID,
                                 "identity" if h.s2 is None else "s2")
    else:
        assert isinstance(h, HwptNested)
        if ssid in h.cds:
            s1 = h.cds[ssid]
        else:
            mem = mgr.memory
            if mem is None:
                return ConfigFault("F_CD_FETCH", "no guest memory", sid=dev.sid, ssid=ssid)
            try:
                s1 = fetch_cd(mem, h.s1, ssid, h.s2, oas=mgr.oas, sid=dev.sid,
                              stall_model=mgr.stall_model, httu=mgr.httu)
            except ConfigFault as cf:
                return cf
            h.cds[ssid] = s1
        vmid = h.parent.vmid
        if dev.ste is not None and dev.ste.strw == fl.STRW_EL2:
            vmid = EL2_VMID
        if s1 is None:  # S1DSS=bypass: stage 2 (or nothing) only
            ctx = TranslationContext(h.id, False, None, h.s2, vmid, NO_ASID,
                                     "identity" if h.s2 is None else "s2")
        else:
            ctx = TranslationContext(h.id, False, s1, h.s2, vmid, s1.asid,
                                     "s1" if h.s2 is None else "nested")
    dev.ctx_cache[ssid] = ctx
    return ctx


# -- translation -------------------------------------------------------------------------------
def translate_one(mgr: DomainManager, sid: int, ssid: int | None, iova: int,
                  write: bool = False) -> Translation:
    """Translate one address: TLB first, else a scalar walk.  Faults are reported
    (event records) and returned in ``.fault`` (``fault_name(code)`` names them).  For an
    endpoint using ATS (:meth:`DomainManager.ats_active`) its ATC answers first and keeps
    what the SMMU returned."""
    mgr.counters.translations += 1
    dev = mgr.device(sid)
    if ssid is not None:
        dev.ssids.add(ssid)
        if ssid:
            mgr.counters.ssid_translations += 1
    if mgr.ats_probes and mgr.ats_active(dev):  # the endpoint's ATC first: the SMMU
        e = dev.atc.lookup(ssid, iova)       # never sees a hit
        if e is not None and e.perm & (fl.PERM_W if write else fl.PERM_R):
            return Translation(pa=e.translate(iova), level=3, page_size=e.size, perm=e.perm)
        t = _translate_one(mgr, dev, sid, ssid, iova, write)
        if not t.fault:  # a Translation Completion the endpoint keeps
            dev.atc.insert(ssid, iova, t.pa, t.page_size or PAGE, t.perm)
        return t
    return _translate_one(mgr, dev, sid, ssid, iova, write)


def _translate_one(mgr: DomainManager, dev: Any, sid: int, ssid: int | None, iova: int,
                   write: bool) -> Translation:
    ctx = context(mgr, dev, ssid)
    if isinstance(ctx, ConfigFault):
        config_fault(mgr, dev, ssid, iova, write, ctx)
        return Translation(fault=ctx.code)
    if ctx.abort:
        mgr.counters.faults += 1
        if mgr.trace.on_fault:
            trace_fault(mgr, sid, ssid, iova, write, ABORT_NAME, recorded=False)
        return Translation(fault=ABORT)
    if mgr.injector is not None:
        code = mgr.injector.fault_for(sid, ssid, iova, write)
        if code:
            return injected_fault(mgr, dev, ssid, ctx, iova, write, code)
    if ctx.identity:
        return Translation(pa=iova, level=-1, page_size=PAGE, perm=7, global_=True)
    need = fl.PERM_W if write else fl.PERM_R
    e = mgr.tlb.lookup(ctx.domain, ctx.vmid, ctx.asid, iova)
    if e is not None and e.perm & need:
        if mgr.trace.on_xlat:
            trace_xlat(mgr, sid, ssid, write, [iova >> 12], [], 0)
        return Translation(pa=e.translate(iova), level=e.level, page_size=e.size,
                           perm=e.perm, global_=e.global_,
                           ipa=(e.ipa | (iova & (e.size - 1))) if e.ipa >= 0 else 0)
    mgr.counters.walks += 1
    t = walk_one(mgr.memory, ctx.s1, ctx.s2, iova, write=write)
    if mgr.trace.on_xlat:
        trace_xlat(mgr, sid, ssid, write, [iova >> 12], [iova >> 12], int(bool(t.fault)))
    if t.fault:
        translation_fault(mgr, dev, ssid, ctx, iova, write, t.fault, t.stage2,
                          t.fault_class, t.ipa)
        return t
    mgr.tlb.insert(ctx.domain, ctx.vmid, ctx.asid, iova, t.pa, t.page_size, t.perm,
                   t.level, t.global_, ctx.stage, t.ipa if ctx.stage == "nested" else
                   (iova if ctx.stage == "s2" else -1))
    return t


def translate(mgr: DomainManager, sid: int, ssid: int | None, iovas: Any,
              write: bool = False) -> TranslationResult:
    """Translate many addresses (numpy uint64) of one (stream, substream): TLB hits
    are served from the cache, the misses walked in one batch."""
    va = np.ascontiguousarray(np.asarray(iovas, dtype=np.uint64).reshape(-1))
    n = len(va)
    mgr.counters.translations += n
    dev = mgr.device(sid)
    if ssid is not None:
        dev.ssids.add(ssid)
        if ssid:
            mgr.counters.ssid_translations += n
    ctx = context(mgr, dev, ssid)
    if isinstance(ctx, ConfigFault):
        res = WalkResult.empty(n)
        res.fault[:] = ctx.code
        if n:
            config_fault(mgr, dev, ssid, int(va[0]), write, ctx)
        return TranslationResult.of(res, dev.hwpt.id if dev.hwpt else None)
    if ctx.abort:
        res = WalkResult.empty(n)
        res.fault[:] = ABORT
        mgr.counters.faults += n
        if n and mgr.trace.on_fault:
            trace_fault(mgr, sid, ssid, int(va[0]), write, ABORT_NAME, recorded=False, count=n)
        return TranslationResult.of(res, ctx.domain)
    inj = None if mgr.injector is None else mgr.injector.fault_codes(sid, ssid, va, write)
    if ctx.identity:
        res = walk(None, None, None, va, write=write)
        if inj is not None:
            apply_injected(mgr, dev, ssid, ctx, va, write, inj, res)
        return TranslationResult.of(res, ctx.domain)
    res = WalkResult.empty(n)
    need = fl.PERM_W if write else fl.PERM_R
    miss = np.ones(n, dtype=bool)
    # TLB: one probe per distinct 4 KiB page, results spread back with numpy
    pages, inverse = np.unique(va >> np.uint64(12), return_inverse=True)
    npg = len(pages)
    p_hit = np.zeros(npg, dtype=bool)
    p_pa = np.zeros(npg, dtype=np.uint64)
    p_size = np.zeros(npg, dtype=np.uint64)
    p_ipa = np.zeros(npg, dtype=np.uint64)
    p_has_ipa = np.zeros(npg, dtype=bool)
    p_level = np.zeros(npg, dtype=np.int8)
    p_perm = np.zeros(npg, dtype=np.uint8)
    p_glob = np.zeros(npg, dtype=bool)
    for j, pg in enumerate(pages.tolist()):
        e = mgr.tlb.lookup(ctx.domain, ctx.vmid, ctx.asid, pg << 12)
        if e is not None and e.perm & need:
            p_hit[j] = True
            p_pa[j], p_size[j], p_level[j], p_perm[j] = e.pa, e.size, e.level, e.perm
            p_glob[j] = e.global_
            if e.ipa >= 0:
                p_ipa[j], p_has_ipa[j] = e.ipa, True
    hit = p_hit[inverse]
    if hit.any():
        hi = np.flatnonzero(hit)
        jj = inverse[hi]
        off = va[hi] & (p_size[jj] - np.uint64(1))
        res.pa[hi] = p_pa[jj] | off
        res.level[hi] = p_level[jj]
        res.page_size[hi] = p_size[jj]
        res.perm[hi] = p_perm[jj]
        res.global_[hi] = p_glob[jj]
        res.ipa[hi] = np.where(p_has_ipa[jj], p_ipa[jj] | off, np.uint64(0))
        miss[hi] = False
    if inj is not None:
        miss &= inj == 0
    mi = np.flatnonzero(miss)
    if len(mi):
        mgr.counters.walks += len(mi)
        w = walk(mgr.memory, ctx.s1, ctx.s2, va[mi], write=write)
        for name in WalkResult.__dataclass_fields__:
            getattr(res, name)[mi] = getattr(w, name)
        mgr.tlb.insert_results(ctx.domain, ctx.vmid, ctx.asid, va[mi], w, stage=ctx.stage)
        bad = np.flatnonzero(w.fault != 0)
        if len(bad):
            # one event per distinct (fault, page)
            seen: set[tuple[int, int]] = set()
            for k in bad.tolist():
                i = int(mi[k])
                key = (int(w.fault[k]), int(va[i]) >> 12)
                if key in seen:
                    continue
                seen.add(key)
                translation_fault(mgr, dev, ssid, ctx, int(va[i]), write, int(w.fault[k]),
                                  bool(w.stage2[k]), int(w.fault_class[k]), int(w.ipa[k]))
    if inj is not None:
        apply_injected(mgr, dev, ssid, ctx, va, write, inj, res)
    if mgr.trace.on_xlat:
        trace_xlat(mgr, sid, ssid, write, pages.tolist(), np.unique(va[mi] >> np.uint64(12)).tolist(),
                   int(np.count_nonzero(res.fault)))
    return TranslationResult.of(res, ctx.domain)


def trace_xlat(mgr: DomainManager, sid: int, ssid: int | None, write: bool, pages: list[int],
               walked: list[int], faults: int) -> None:
    mgr.trace.record("xlat", sid=sid, ssid=ssid, write=write, pages=pages, walked=walked, faults=faults)


def probe(mgr: DomainManager, sid: int, ssid: int | None, iova: int, write: bool = False
          ) -> tuple[Translation, int | None]:
    """Translate without side effects (no event, no TLB fill, no new device): what
    the stream would get now.  Returns (translation, domain id or None)."""
    dev = mgr.devices.get(sid)
    if dev is not None:
        ctx = context(mgr, dev, ssid)
        domain = dev.hwpt.id if dev.hwpt else None
        if isinstance(ctx, ConfigFault):
            return Translation(fault=ctx.code), domain
        s1, s2, abort = ctx.s1, ctx.s2, ctx.abort
    else:
        domain = None
        sc = read_stream_config(mgr, sid)
        if isinstance(sc, ConfigFault):
            return Translation(fault=sc.code), None
        abort = sc.config == "abort"
        s2 = sc.s2
        s1 = None
        if sc.config in ("s1", "nested"):
            if mgr.memory is None:
                return Translation(fault=EventId.F_CD_FETCH), None
            try:
                s1 = fetch_cd(mgr.memory, sc.s1, ssid, s2, oas=mgr.oas, sid=sid,
                              stall_model=mgr.stall_model, httu=mgr.httu)
            except ConfigFault as cf:
                return Translation(fault=cf.code), None
        elif ssid is not None and not abort:
            return Translation(fault=EventId.C_BAD_SUBSTREAMID), None
    if abort:
        return Translation(fault=ABORT), domain
    if mgr.injector is not None:
        code = mgr.injector.fault_for(sid, ssid, iova, write, consume=False)
        if code:
            stage2 = s1 is None and s2 is not None
            return Translation(fault=code, stage2=stage2, ipa=iova if stage2 else 0), domain
    if s1 is None and s2 is None:
        return Translation(pa=iova, level=-1, page_size=PAGE, perm=7, global_=True), domain
    return walk_one(mgr.memory, s1, s2, iova, write=write), domain


# -- injected faults (viommu_backend.faults) ---------------------------------------------------
def injected_fault(mgr: DomainManager, dev: Device, ssid: int | None, ctx: TranslationContext,
                   iova: int, write: bool, code: int) -> Translation:
    """Fail one access with an injected fault, reported as the walk would report it
    (stage 2 when the stream has only a stage 2).  A bypass stream has no CD.R/S2R
    to consult: its injected faults are always recorded."""
    stage2 = ctx.s1 is None and ctx.s2 is not None
    if ctx.identity:
        mgr.counters.faults += 1
        if mgr.trace.on_fault:
            trace_fault(mgr, dev.sid, ssid, iova, write, EventId(code).name, recorded=True,
                        injected=True)
        emit(mgr, Event(EventId(code).name, dev.sid, ssid, addr=iova, read=not write))
    else:
        translation_fault(mgr, dev, ssid, ctx, iova, write, code, stage2,
                          int(FaultClass.IN), iova if stage2 else 0)
    return Translation(fault=code, stage2=stage2, ipa=iova if stage2 else 0,
                       fault_class=int(FaultClass.IN) if stage2 else 0)


def apply_injected(mgr: DomainManager, dev: Device, ssid: int | None, ctx: TranslationContext,
                   va: np.ndarray, write: bool, codes: np.ndarray, res: WalkResult) -> None:
    idx = np.flatnonzero(codes)
    blank = WalkResult.empty(len(idx))
    for name in WalkResult.__dataclass_fields__:
        getattr(res, name)[idx] = getattr(blank, name)
    seen: set[tuple[int, int]] = set()
    for i in idx.tolist():
        code, iova = int(codes[i]), int(va[i])
        t = Translation(fault=code)
        if (code, iova >> 12) not in seen:  # one event per distinct (fault, page)
            seen.add((code, iova >> 12))
            t = injected_fault(mgr, dev, ssid, ctx, iova, write, code)
        res.fault[i], res.stage2[i], res.ipa[i] = code, t.stage2, t.ipa
