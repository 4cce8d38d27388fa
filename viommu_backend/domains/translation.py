"""Translation, as the SMMU performs it for the domain manager: a stream's domain resolved
into a :class:`TranslationContext` (stage 1 CD, stage 2, TLB tags VMID / ASID), then
``translate_one`` (the endpoint's ATC, the TLB, else a scalar walk) and ``translate``
(TLB per page, misses walked in one numpy batch), ``probe`` (the same without any side
effect: no event, no TLB / context / CD cache fill), injected faults
(:mod:`viommu_backend.fault_injection`, consulted before the TLB), and the invalidations
(CMD_TLBI_*, CMD_ATC_INV, a flush when the host's memory map changes).  Faults go to the
manager's :class:`~.fault.FaultRouter`.

:class:`Translator` owns the caches of the SMMU's caching model (:mod:`.caching`: the TLB,
tagged by domain id or StreamWorld, VMID and ASID; walk caches and a CD cache in the
aggressive model) and the translation contexts of the devices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable

import numpy as np

from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.cd import S1Config, fetch_cd
from viommu_backend.smmuv3.fields import EventId, FaultClass
from viommu_backend.smmuv3.ste import ConfigFault, S2Config
from viommu_backend.smmuv3.tlb import EL2_VMID, NO_ASID, TLB, Key, TlbEntry
from viommu_backend.smmuv3.walkcache import CachedWalkMemory
from viommu_backend.smmuv3.walker import (Translation, WalkResult, stage_params, table_path,
                                           walk, walk_one)

from .caching import CacheModel

from .objects import Device, Hwpt, HwptBlocking, HwptNested, HwptPaging, IommuObject
from .results import ABORT, ABORT_NAME, PAGE, TranslationResult, fault_name

if TYPE_CHECKING:
    from .manager import DomainManager

_U12 = np.uint64(12)


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
    host_s2: bool = False  # the stage 2 is the host's (hidden stage 2): its faults go there
    tag: Hashable = None  # the TLB / walk-cache tag (CacheModel.tag)

    @property
    def identity(self) -> bool:
        return self.s1 is None and self.s2 is None


@dataclass(frozen=True, slots=True)
class Pin:
    """A range an endpoint keeps translated (its ring memory): the physically contiguous
    output ``pa`` of ``[iova, iova + size)``, valid while the context that translated it
    is cached and every TLB entry it came from (``found``) is still in the TLB -- so any
    CMD_CFGI_* / TLBI_* / ATC_INV / flush covering it, or an eviction, ends it, exactly
    when a lookup of the same addresses would stop hitting.  See :meth:`Translator.pin`."""

    dev: Device
    ssid: int | None
    ctx: TranslationContext
    found: tuple[tuple[Key, TlbEntry], ...]  # empty for an identity context
    iova: int
    size: int
    pa: int


class Translator:
    """The SMMU's translation for one :class:`~.manager.DomainManager`."""

    def __init__(self, mgr: DomainManager, tlb: TLB | None = None) -> None:
        self.mgr = mgr
        self.caches = CacheModel("default", tlb or TLB())
        self._contexts: dict[int, dict[int | None, TranslationContext]] = {}
        # sanitizer: (sid, ssid, rule) -> CMD_SYNC count when a changed STE / CD was noted
        self._config_seen: dict[tuple[int, int | None, str], int] = {}

    @property
    def tlb(self) -> TLB:
        return self.caches.tlb

    # -- contexts --------------------------------------------------------------------------
    def forget(self, sid: int) -> None:
        """Drop the contexts of ``sid`` (its STE, domain or CDs changed) and, in the
        aggressive model, its cached CDs (CMD_CFGI_STE covers them)."""
        self._drop_contexts(sid)
        if self.caches.cds is not None:
            self.caches.cds.inv_sid(sid)

    def _drop_contexts(self, sid: int) -> None:
        gone = self._contexts.pop(sid, None)
        if gone:
            self.caches.config.invalidated += len(gone)
        for key in [k for k in self._config_seen if k[0] == sid]:
            del self._config_seen[key]

    def cd_changed(self, sid: int, ssid: int | None) -> bool:
        """CMD_CFGI_CD (``ssid``) / CFGI_CD_ALL in the aggressive model: the CDs of ``sid``
        alone (keyed by StreamID) and its contexts.  False in the default model (the
        caller drops the CDs of the stream's CD table)."""
        cds = self.caches.cds
        if cds is None:
            return False
        self._drop_contexts(sid)
        if ssid is None:
            cds.inv_sid(sid)
        else:
            cds.inv_cd(sid, ssid)
        return True

    def hwpt_freed(self, obj: IommuObject) -> None:
        """A HWPT was freed: in the default model its cached translations go with it
        (the architectural keys know no domains: their entries wait for a TLBI)."""
        if isinstance(obj, Hwpt) and not self.caches.architectural:
            self.tlb.inv_tag(obj.id)

    def cached_tags(self) -> set[tuple[int, int]]:
        """(VMID, ASID) of every cached context."""
        return {(c.vmid, c.asid) for ctxs in self._contexts.values() for c in ctxs.values()}

    def cached_contexts(self, sid: int) -> int:
        return len(self._contexts.get(sid, {}))

    def context(self, dev: Device, ssid: int | None, *, fill: bool = True
                ) -> TranslationContext | ConfigFault:
        """The context of (``dev``, ``ssid``), cached until its domain or CDs change (CD
        fetched on first use).  ``fill=False`` (probes): nothing is cached."""
        ctxs = self._contexts.get(dev.sid)
        ctx = None if ctxs is None else ctxs.get(ssid)
        if ctx is not None:
            if fill:
                self.caches.config.context_hits += 1
                if self.mgr.sanitizer is not None:
                    self._check_config(dev, ssid, ctx)
            return ctx
        if fill:
            self.caches.config.context_misses += 1
        h = dev.hwpt
        if dev.config_fault is not None:
            return dev.config_fault
        if h is None or isinstance(h, HwptBlocking):
            ctx = TranslationContext(h.id if h else 0, True, None, None, 0, NO_ASID, "abort")
        elif isinstance(h, HwptPaging):
            if ssid is not None:
                return ConfigFault("C_BAD_SUBSTREAMID", "substream on a stream without "
                                   "stage 1", sid=dev.sid, ssid=ssid)
            host = h.table is not None
            ctx = TranslationContext(h.id, False, None, h.s2, h.vmid, NO_ASID,
                                     "identity" if h.s2 is None else "s2", host,
                                     self.caches.tag(h.id, h.id if host else None))
        else:
            assert isinstance(h, HwptNested)
            ctx = self._nested_context(dev, h, ssid, fill)
            if isinstance(ctx, ConfigFault):
                return ctx
        if fill:
            self._contexts.setdefault(dev.sid, {})[ssid] = ctx
        return ctx

    def _nested_context(self, dev: Device, h: HwptNested, ssid: int | None, fill: bool
                        ) -> TranslationContext | ConfigFault:
        mgr = self.mgr
        cds = self.caches.cds
        cached = h.cds.get(ssid) if cds is None else cds.get(dev.sid, ssid, count=fill)
        if cached is not None or (cds is None and ssid in h.cds):
            s1 = cached
        else:
            try:
                s1 = self._fetch_cd(dev, h, ssid)
            except ConfigFault as cf:
                return cf
            if fill and cds is None:
                h.cds[ssid] = s1
            elif fill and s1 is not None:  # (a bypass CD: nothing decoded to keep)
                cds.put(dev.sid, ssid, s1)
            if mgr.sanitizer_rules is not None:
                mgr.sanitizer_rules.cd_fetched(dev.sid, h.s1, h.s2, ssid)
        vmid = h.parent.vmid
        if dev.ste is not None and dev.ste.strw == fl.STRW_EL2:
            vmid = EL2_VMID
        host = h.parent.table is not None
        tag = self.caches.tag(h.id, h.parent.id if host else None)
        if s1 is None:  # S1DSS=bypass: stage 2 (or nothing) only
            return TranslationContext(h.id, False, None, h.s2, vmid, NO_ASID,
                                      "identity" if h.s2 is None else "s2", host, tag)
        return TranslationContext(h.id, False, s1, h.s2, vmid, s1.asid,
                                  "s1" if h.s2 is None else "nested", host, tag)

    def _fetch_cd(self, dev: Device, h: HwptNested, ssid: int | None) -> S1Config | None:
        """The CD of (``dev``, ``ssid``) in ``h``'s CD table, as memory holds it now."""
        mgr = self.mgr
        if mgr.memory is None:
            raise ConfigFault("F_CD_FETCH", "no guest memory", sid=dev.sid, ssid=ssid)
        return fetch_cd(mgr.memory, h.s1, ssid, h.s2, oas=mgr.oas, sid=dev.sid,
                        stall_model=mgr.stall_model, httu=mgr.httu)

    def _check_config(self, dev: Device, ssid: int | None, ctx: TranslationContext) -> None:
        """Sanitizer rules ``stale-ste`` / ``stale-cd``: a cached context used while the
        STE (CD) in memory decodes to another configuration, the change having survived
        a CMD_SYNC with no CFGI covering it (a change is first noted, then reported if
        still there once a CMD_SYNC has completed: the driver's own CFGI may be on its
        way when the change is first seen)."""
        san, mgr = self.mgr.sanitizer, self.mgr
        assert san is not None
        checks: list[tuple[str, Any, Any]] = []
        if dev.ste is not None:
            checks.append(("stale-ste", dev.ste, mgr.attachments.read_stream_config(dev.sid)))
        if ctx.s1 is not None and isinstance(dev.hwpt, HwptNested):
            try:
                now = self._fetch_cd(dev, dev.hwpt, ssid)
            except ConfigFault as cf:
                now = cf
            checks.append(("stale-cd", ctx.s1, now))
        for rule, cached, now in checks:
            san.checks += 1
            key = (dev.sid, ssid, rule)
            if cached == now:
                self._config_seen.pop(key, None)
                continue
            first = self._config_seen.setdefault(key, mgr.sync_count())
            if mgr.sync_count() > first:
                del self._config_seen[key]  # reported once per change
                san.report(rule, sid=dev.sid, ssid=ssid, domain=ctx.domain,
                           cached=str(cached), now=str(now))

    # -- faults ----------------------------------------------------------------------------
    def _fault(self, dev: Device, ssid: int | None, ctx: TranslationContext, iova: int,
               write: bool, code: int, stage2: bool, klass: int, ipa: int) -> None:
        """A translation fault: the host's when its stage 2 faulted, else the guest's."""
        faults = self.mgr.faults
        if stage2 and ctx.host_s2:
            faults.host_fault(dev, ssid, iova, write, code, ipa)
        else:
            faults.translation_fault(dev, ssid, ctx, iova, write, code, stage2, klass, ipa)

    def _config_fault(self, dev: Device, ssid: int | None, iova: int, write: bool,
                      cf: ConfigFault) -> None:
        """A configuration fault; a CD fetch that faulted in the host's stage 2 is the
        host's."""
        faults = self.mgr.faults
        if cf.stage2 and faults.host_s2_of(dev):
            faults.host_fault(dev, ssid, iova, write, cf.code, cf.ipa or 0)
        else:
            faults.config_fault(dev, ssid, iova, write, cf)

    def _abort(self, sid: int, ssid: int | None, iova: int, write: bool, n: int = 1) -> None:
        mgr = self.mgr
        mgr.counters.faults += n
        if mgr.trace.on_fault:
            mgr.faults.trace_fault(sid, ssid, iova, write, ABORT_NAME, recorded=False,
                                   **({"count": n} if n > 1 else {}))

    # -- translation -----------------------------------------------------------------------
    def _device(self, sid: int, ssid: int | None, n: int) -> Device:
        mgr = self.mgr
        mgr.counters.translations += n
        dev = mgr.device(sid)
        if ssid is not None:
            dev.ssids.add(ssid)
            if ssid:
                mgr.counters.ssid_translations += n
        return dev

    def _count_nested(self, ctx: Any, n: int) -> None:
        """Addresses translated through a nested context (stage 1 on a stage-2 parent)."""
        if not isinstance(ctx, ConfigFault) and ctx.stage == "nested":
            self.mgr.counters.nested_translations += n

    def translate_one(self, sid: int, ssid: int | None, iova: int, write: bool = False
                      ) -> Translation:
        """Translate one address: TLB first, else a scalar walk.  Faults are reported and
        returned in ``.fault`` (``fault_name(code)`` names them).  For an endpoint using
        ATS (:meth:`ats_active`) its ATC answers first and keeps what the SMMU returned."""
        dev = self._device(sid, ssid, 1)
        if self.mgr.ats_probes and self.ats_active(dev):  # the endpoint's ATC first:
            e = dev.atc.lookup(ssid, iova)             # the SMMU never sees a hit
            if e is not None and e.perm & (fl.PERM_W if write else fl.PERM_R):
                return Translation(pa=e.translate(iova), level=3, page_size=e.size,
                                   perm=e.perm)
            t = self._translate_one(dev, ssid, iova, write)
            if not t.fault:  # a Translation Completion the endpoint keeps
                dev.atc.insert(ssid, iova, t.pa, t.page_size or PAGE, t.perm)
        else:
            t = self._translate_one(dev, ssid, iova, write)
        if self.mgr.sanitizer_rules is not None:
            ctx = self.context(dev, ssid, fill=False)  # the one just used (no count, no check)
            if not isinstance(ctx, ConfigFault):
                self.mgr.sanitizer_rules.translated(
                    sid, ssid, ctx, np.array([iova], dtype=np.uint64), np.array([t.fault]))
        return t

    def _translate_one(self, dev: Device, ssid: int | None, iova: int, write: bool
                       ) -> Translation:
        mgr = self.mgr
        ctx = self.context(dev, ssid)
        self._count_nested(ctx, 1)
        if isinstance(ctx, ConfigFault):
            self._config_fault(dev, ssid, iova, write, ctx)
            return Translation(fault=ctx.code, stage2=ctx.stage2, ipa=ctx.ipa or 0)
        if ctx.abort:
            self._abort(dev.sid, ssid, iova, write)
            return Translation(fault=ABORT)
        if mgr.injector is not None:
            code = mgr.injector.fault_for(dev.sid, ssid, iova, write)
            if code:
                return self._injected(dev, ssid, ctx, iova, write, code)
        if ctx.identity:
            return Translation(pa=iova, level=-1, page_size=PAGE, perm=7, global_=True)
        hit = self._tlb_hit_one(dev, ssid, ctx, iova, write)
        return hit if hit is not None else self._walk_one(dev, ssid, ctx, iova, write)

    def _tlb_hit_one(self, dev: Device, ssid: int | None, ctx: TranslationContext, iova: int,
                     write: bool) -> Translation | None:
        """The TLB's translation of ``iova`` (checked by the sanitizer), or None."""
        mgr = self.mgr
        e = self.tlb.lookup(ctx.tag, ctx.vmid, ctx.asid, iova)
        if e is None or not e.perm & (fl.PERM_W if write else fl.PERM_R):
            return None
        if mgr.trace.on_xlat:
            self._trace_xlat(dev.sid, ssid, write, [iova >> 12], [], 0)
        hit = Translation(pa=e.translate(iova), level=e.level, page_size=e.size,
                          perm=e.perm, global_=e.global_,
                          ipa=(e.ipa | (iova & (e.size - 1))) if e.ipa >= 0 else 0)
        if mgr.sanitizer is not None:
            self._check_one(dev.sid, ssid, ctx, iova, write, hit, "stale-tlb")
        return hit

    def _walk_one(self, dev: Device, ssid: int | None, ctx: TranslationContext, iova: int,
                  write: bool) -> Translation:
        """A scalar walk (through the walk caches), its fault reported or its result
        cached."""
        mgr = self.mgr
        mgr.counters.walks += 1
        mem = self._walk_memory(ctx)
        t = walk_one(mem, ctx.s1, ctx.s2, iova, write=write)
        if mgr.trace.on_xlat:
            self._trace_xlat(dev.sid, ssid, write, [iova >> 12], [iova >> 12],
                             int(bool(t.fault)))
        if t.fault:
            self._fault(dev, ssid, ctx, iova, write, t.fault, t.stage2, t.fault_class, t.ipa)
            return t
        self.tlb.insert(ctx.tag, ctx.vmid, ctx.asid, iova, t.pa, t.page_size, t.perm,
                        t.level, t.global_, ctx.stage, t.ipa if ctx.stage == "nested" else
                        (iova if ctx.stage == "s2" else -1))
        if self.caches.walks is not None:
            self._fill_walks(ctx, mem, np.array([iova], dtype=np.uint64))
            if mgr.sanitizer is not None and mem is not mgr.memory:
                self._check_one(dev.sid, ssid, ctx, iova, write, t, "stale-walk")
        return t

    def _check_one(self, sid: int, ssid: int | None, ctx: TranslationContext, iova: int,
                   write: bool, t: Translation, rule: str) -> None:
        """:meth:`_check_hits` for one translation."""
        one = WalkResult.empty(1)
        one.pa[0], one.perm[0], one.level[0], one.page_size[0] = \
            t.pa, t.perm, t.level, t.page_size
        self._check_hits(sid, ssid, ctx, np.array([iova], dtype=np.uint64), write, one,
                         np.zeros(1, dtype=np.int64), rule)

    # -- walk caches (aggressive model) ----------------------------------------------------
    def _walk_memory(self, ctx: TranslationContext) -> Any:
        """What a walk of ``ctx`` reads: guest memory, with the walk caches (aggressive
        model) answering the table descriptors they hold."""
        walks = self.caches.walks
        overlay = None if walks is None else walks.overlay(ctx.tag, ctx.vmid, ctx.asid)
        return CachedWalkMemory(self.mgr.memory, overlay) if overlay else self.mgr.memory

    def _fill_walks(self, ctx: TranslationContext, mem: Any, va: np.ndarray) -> None:
        """Cache the table descriptors of the walks of ``va`` (translated addresses; one
        path per distinct last-level table of a single-stage walk, per page if nested)."""
        walks = self.caches.walks
        assert walks is not None
        shift = _U12
        if ctx.s1 is None or ctx.s2 is None:
            p = stage_params(ctx.s1 if ctx.s1 is not None else ctx.s2)
            shift = np.uint64(p.levels[-1][1] + p.stride)
        _, first = np.unique(va >> shift, return_index=True)
        for i in first.tolist():
            walks.fill(ctx.tag, ctx.vmid, ctx.asid,
                       table_path(mem, ctx.s1, ctx.s2, int(va[i])))

    def translate(self, sid: int, ssid: int | None, iovas: Any, write: bool = False
                  ) -> TranslationResult:
        """Translate many addresses (numpy uint64) of one (stream, substream): TLB hits
        are served from the cache, the misses walked in one batch."""
        va = np.ascontiguousarray(np.asarray(iovas, dtype=np.uint64).reshape(-1))
        n = len(va)
        dev = self._device(sid, ssid, n)
        ctx = self.context(dev, ssid)
        self._count_nested(ctx, n)
        if isinstance(ctx, ConfigFault) or ctx.abort:
            return self._refused(dev, ssid, ctx, va, write)
        mgr = self.mgr
        inj = None if mgr.injector is None else mgr.injector.fault_codes(sid, ssid, va, write)
        if ctx.identity:
            res = walk(None, None, None, va, write=write)
        else:
            res = self._translate_paging(dev, ssid, ctx, va, write, inj)
        if inj is not None:
            self._apply_injected(dev, ssid, ctx, va, write, inj, res)
        return TranslationResult.of(res, ctx.domain)

    def _refused(self, dev: Device, ssid: int | None, ctx: TranslationContext | ConfigFault,
                 va: np.ndarray, write: bool) -> TranslationResult:
        """Every address of an access to a stream whose configuration is bad (the
        configuration fault, reported once) or that aborts."""
        n = len(va)
        res = WalkResult.empty(n)
        if isinstance(ctx, ConfigFault):
            res.fault[:] = ctx.code
            if n:
                self._config_fault(dev, ssid, int(va[0]), write, ctx)
            return TranslationResult.of(res, dev.hwpt.id if dev.hwpt else None)
        res.fault[:] = ABORT
        if n:
            self._abort(dev.sid, ssid, int(va[0]), write, n)
        return TranslationResult.of(res, ctx.domain)

    def _translate_paging(self, dev: Device, ssid: int | None, ctx: TranslationContext,
                          va: np.ndarray, write: bool, inj: np.ndarray | None) -> WalkResult:
        """TLB hits (checked by the sanitizer), then the misses (but injected faults)
        walked in one batch."""
        mgr = self.mgr
        res = WalkResult.empty(len(va))
        miss = self._tlb_hits(ctx, va, write, res)
        if mgr.sanitizer is not None and not miss.all():
            self._check_hits(dev.sid, ssid, ctx, va, write, res, np.flatnonzero(~miss))
        if inj is not None:
            miss &= inj == 0
        mi = np.flatnonzero(miss)
        self._walk_misses(dev, ssid, ctx, va, write, res, mi)
        if mgr.trace.on_xlat:
            self._trace_xlat(dev.sid, ssid, write, np.unique(va >> _U12).tolist(),
                             np.unique(va[mi] >> _U12).tolist(),
                             int(np.count_nonzero(res.fault)))
        if mgr.sanitizer_rules is not None:
            mgr.sanitizer_rules.translated(dev.sid, ssid, ctx, va, res.fault)
        return res

    def _trace_xlat(self, sid: int, ssid: int | None, write: bool, pages: list[int],
                    walked: list[int], faults: int) -> None:
        """An "xlat" trace record: the pages an access touched, those walked (TLB
        misses), how many translations faulted."""
        self.mgr.trace.record("xlat", sid=sid, ssid=ssid, write=write, pages=pages,
                              walked=walked, faults=faults)

    def _tlb_hits(self, ctx: TranslationContext, va: np.ndarray, write: bool,
                  res: WalkResult) -> np.ndarray:
        """Fill ``res`` where the TLB holds the page (:meth:`TLB.lookup_runs` of the distinct
        4 KiB pages: a value per run of pages with one entry, spread back with numpy);
        returns the mask of misses."""
        need = fl.PERM_W if write else fl.PERM_R
        pages, inverse = np.unique(va >> _U12, return_inverse=True)
        runs = self.tlb.lookup_runs(ctx.tag, ctx.vmid, ctx.asid, pages.tolist())
        entries = [e if e is not None and e.perm & need else None for e, _ in runs]
        if all(e is None for e in entries):
            return np.ones(len(va), dtype=bool)
        run_of_va = np.repeat(np.arange(len(runs)), [count for _, count in runs])[inverse]
        hit = np.array([e is not None for e in entries])[run_of_va]
        hi = np.flatnonzero(hit)
        run_of_hit = run_of_va[hi]

        def spread(values: list, dtype: type) -> np.ndarray:
            """One value per run -> the value of each hit."""
            return np.array(values, dtype=dtype)[run_of_hit]
        size = spread([e.size if e else 0 for e in entries], np.uint64)
        off = va[hi] & (size - np.uint64(1))
        res.pa[hi] = spread([e.pa if e else 0 for e in entries], np.uint64) | off
        res.level[hi] = spread([e.level if e else 0 for e in entries], np.int8)
        res.page_size[hi] = size
        res.perm[hi] = spread([e.perm if e else 0 for e in entries], np.uint8)
        res.global_[hi] = spread([e.global_ if e else False for e in entries], bool)
        ipa = [e.ipa if e else -1 for e in entries]
        if any(i >= 0 for i in ipa):
            res.ipa[hi] = np.where(spread([i >= 0 for i in ipa], bool),
                                   spread([max(i, 0) for i in ipa], np.uint64) | off,
                                   np.uint64(0))
        return ~hit

    def _check_hits(self, sid: int, ssid: int | None, ctx: TranslationContext,
                    va: np.ndarray, write: bool, cached: WalkResult, hi: np.ndarray,
                    rule: str = "stale-tlb") -> None:
        """Sanitizer rule ``stale-tlb`` (``stale-walk``): walk the TLB hits (translations
        through cached table descriptors) ``va[hi]`` (one per distinct page, nothing
        cached) and report those the tables in memory no longer give: a fault, another
        output address or fewer permissions than ``cached`` holds."""
        san = self.mgr.sanitizer
        assert san is not None
        _, k1 = np.unique(va[hi] >> _U12, return_index=True)
        first = hi[k1]
        w = walk(self.mgr.memory, ctx.s1, ctx.s2, va[first], write=write)
        san.checks += len(first)
        pa, perm = cached.pa[first], cached.perm[first]
        bad = (w.fault != 0) | (w.pa != pa) | ((perm & ~w.perm) != 0)
        for k in np.flatnonzero(bad).tolist():
            now = ({"now-fault": fault_name(int(w.fault[k]))} if w.fault[k]
                   else {"now-pa": int(w.pa[k]), "now-perm": int(w.perm[k])})
            san.report(rule, sid=sid, ssid=ssid, iova=int(va[first[k]]),
                       domain=ctx.domain, vmid=ctx.vmid, asid=ctx.asid, stage=ctx.stage,
                       level=int(cached.level[first[k]]),
                       size=int(cached.page_size[first[k]]), pa=int(pa[k]),
                       perm=int(perm[k]), **now)

    def _walk_misses(self, dev: Device, ssid: int | None, ctx: TranslationContext,
                     va: np.ndarray, write: bool, res: WalkResult, mi: np.ndarray) -> None:
        """Walk the misses ``mi`` in one batch, cache them, report one fault per distinct
        (fault, page)."""
        if not len(mi):
            return
        mgr = self.mgr
        mgr.counters.walks += len(mi)
        mem = self._walk_memory(ctx)
        w = walk(mem, ctx.s1, ctx.s2, va[mi], write=write)
        for name in WalkResult.__dataclass_fields__:
            getattr(res, name)[mi] = getattr(w, name)
        self.tlb.insert_results(ctx.tag, ctx.vmid, ctx.asid, va[mi], w, stage=ctx.stage)
        if self.caches.walks is not None:
            ok = mi[w.fault == 0]
            self._fill_walks(ctx, mem, va[ok])
            if mgr.sanitizer is not None and len(ok) and mem is not mgr.memory:
                self._check_hits(dev.sid, ssid, ctx, va, write, res, ok, "stale-walk")
        seen: set[tuple[int, int]] = set()
        for k in np.flatnonzero(w.fault != 0).tolist():
            i = int(mi[k])
            key = (int(w.fault[k]), int(va[i]) >> 12)
            if key not in seen:
                seen.add(key)
                self._fault(dev, ssid, ctx, int(va[i]), write, int(w.fault[k]),
                            bool(w.stage2[k]), int(w.fault_class[k]), int(w.ipa[k]))

    # -- probes ----------------------------------------------------------------------------
    def probe(self, sid: int, ssid: int | None, iova: int, write: bool = False
              ) -> tuple[Translation, int | None]:
        """Translate without side effects (no event, no TLB / context / CD cache fill, no
        new device): what the stream would get now.  Returns (translation, domain id or
        None)."""
        dev = self.mgr.devices.get(sid)
        if dev is None:
            return self._probe_unbound(sid, ssid, iova, write), None
        domain = dev.hwpt.id if dev.hwpt else None
        ctx = self.context(dev, ssid, fill=False)
        if isinstance(ctx, ConfigFault):
            return Translation(fault=ctx.code, stage2=ctx.stage2, ipa=ctx.ipa or 0), domain
        if ctx.abort:
            return Translation(fault=ABORT), domain
        inj = self._probe_injected(sid, ssid, iova, write,
                                   ctx.s1 is None and ctx.s2 is not None)
        if inj is not None:
            return inj, domain
        if ctx.identity:
            return Translation(pa=iova, level=-1, page_size=PAGE, perm=7,
                               global_=True), domain
        return walk_one(self.mgr.memory, ctx.s1, ctx.s2, iova, write=write), domain

    def _probe_injected(self, sid: int, ssid: int | None, iova: int, write: bool,
                        stage2: bool) -> Translation | None:
        inj = self.mgr.injector
        code = 0 if inj is None else inj.fault_for(sid, ssid, iova, write, consume=False)
        if not code:
            return None
        return Translation(fault=code, stage2=stage2, ipa=iova if stage2 else 0)

    def _probe_unbound(self, sid: int, ssid: int | None, iova: int, write: bool
                       ) -> Translation:
        """A stream never seen: from its STE as the guest wrote it.  Under a hidden stage
        2 its stage 1 is walked in the guest's physical space and the IPA looked up in
        the IOAS (what the host's default domain would do)."""
        mgr = self.mgr
        sc = mgr.attachments.read_stream_config(sid)
        if isinstance(sc, ConfigFault):
            return Translation(fault=sc.code)
        if sc.config == "abort":
            return Translation(fault=ABORT)
        mem = mgr.guest_memory if mgr.host_s2 else mgr.memory
        s1 = None
        if sc.config in ("s1", "nested"):
            if mem is None:
                return Translation(fault=EventId.F_CD_FETCH)
            try:
                s1 = fetch_cd(mem, sc.s1, ssid, sc.s2, oas=mgr.oas, sid=sid,
                              stall_model=mgr.stall_model, httu=mgr.httu)
            except ConfigFault as cf:
                return Translation(fault=cf.code)
        elif ssid is not None:
            return Translation(fault=EventId.C_BAD_SUBSTREAMID)
        inj = self._probe_injected(sid, ssid, iova, write, s1 is None and sc.s2 is not None)
        if inj is not None:
            return inj
        t = walk_one(mem, s1, sc.s2, iova, write=write)
        if not mgr.host_s2 or t.fault:
            return t
        pa = mgr.ioas.translate(t.pa, write)
        if pa is None:
            return Translation(fault=EventId.F_TRANSLATION, stage2=True, ipa=t.pa)
        return Translation(pa=pa, level=t.level, page_size=min(t.page_size or PAGE, PAGE),
                           perm=t.perm, ipa=t.pa, global_=t.global_)

    # -- pins (ranges an endpoint keeps translated) ----------------------------------------
    def _pins_allowed(self, dev: Device) -> bool:
        """May ``dev``'s accesses skip the per-access lookup?  Not while anything watches
        or changes single translations: the sanitizer (it checks every TLB hit against
        memory), xlat tracing, armed fault-injection rules, or the endpoint's ATC (ATS)."""
        mgr = self.mgr
        inj = mgr.injector
        return mgr.sanitizer is None and not mgr.trace.on_xlat \
            and (inj is None or not inj.rules) \
            and not (mgr.ats_probes and self.ats_active(dev))

    def pin(self, sid: int, ssid: int | None, iova: int, size: int, write: bool
            ) -> Pin | None:
        """A :class:`Pin` of ``[iova, iova + size)`` from what is cached now, with no side
        effect (no walk, no event, no fill, nothing counted): None unless the context
        is cached and translates, every page hits the TLB with the permission and the
        output is physically contiguous (or the context is an identity one).  The
        caller has just translated part of it the ordinary way."""
        dev = self.mgr.devices.get(sid)
        ctx = self._contexts.get(sid, {}).get(ssid)
        if dev is None or ctx is None or ctx.abort or size <= 0 or iova < 0 \
                or not self._pins_allowed(dev):
            return None
        if ctx.identity:
            return Pin(dev, ssid, ctx, (), iova, size, iova)
        need = fl.PERM_W if write else fl.PERM_R
        found: list[tuple[Key, TlbEntry]] = []
        pa = -1
        a, end = iova, iova + size
        while a < end:
            f = self.tlb.find(ctx.tag, ctx.vmid, ctx.asid, a)
            if f is None or not f[1].perm & need:
                return None
            e = f[1]
            if pa < 0:
                pa = e.translate(iova)
            elif e.translate(a) != pa + (a - iova):
                return None  # not physically contiguous
            found.append(f)
            a = e.va + e.size
        return Pin(dev, ssid, ctx, tuple(found), iova, size, pa)

    def pin_valid(self, pin: Pin) -> bool:
        """Does ``pin`` still give what a translation would (see :class:`Pin`)?  If so
        the access it serves is counted as a translation (its lookups as TLB hits)."""
        ctxs = self._contexts.get(pin.dev.sid)
        if ctxs is None or ctxs.get(pin.ssid) is not pin.ctx \
                or not self._pins_allowed(pin.dev) or not self.tlb.held(pin.found):
            return False
        c = self.mgr.counters
        c.translations += 1
        if pin.ssid:
            c.ssid_translations += 1
        if pin.ctx.stage == "nested":
            c.nested_translations += 1
        self.caches.config.context_hits += 1
        return True

    # -- injected faults (viommu_backend.fault_injection) ----------------------------------
    def _injected(self, dev: Device, ssid: int | None, ctx: TranslationContext, iova: int,
                  write: bool, code: int) -> Translation:
        """Fail one access with an injected fault, reported as the walk would report it
        (stage 2 when the stream has only a stage 2).  A bypass stream has no CD.R/S2R
        to consult: its injected faults are always recorded."""
        stage2 = ctx.s1 is None and ctx.s2 is not None
        if ctx.identity:
            self.mgr.faults.injected_fault(dev, ssid, iova, write, code)
        else:
            self._fault(dev, ssid, ctx, iova, write, code, stage2, int(FaultClass.IN),
                        iova if stage2 else 0)
        return Translation(fault=code, stage2=stage2, ipa=iova if stage2 else 0,
                           fault_class=int(FaultClass.IN) if stage2 else 0)

    def _apply_injected(self, dev: Device, ssid: int | None, ctx: TranslationContext,
                        va: np.ndarray, write: bool, codes: np.ndarray,
                        res: WalkResult) -> None:
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
                t = self._injected(dev, ssid, ctx, iova, write, code)
            res.fault[i], res.stage2[i], res.ipa[i] = code, t.stage2, t.ipa

    # -- ATS -------------------------------------------------------------------------------
    def ats_active(self, dev: Device) -> bool:
        """Does ``dev``'s DMA use its ATC now (ATS enabled and allowed by the STE)?  When
        the endpoint's ATS is off, whatever its ATC held is dropped (as a disable or a
        function reset does)."""
        probe = self.mgr.ats_probes.get(dev.sid)
        if probe is None:
            return False
        if probe():
            return dev.ste is not None and dev.ste.eats != 0
        if len(dev.atc):
            dev.atc.clear()
        return False

    # -- invalidation (command sink) -------------------------------------------------------
    def flush_all(self) -> None:
        """Every cached translation, table descriptor, CD, context and ATC entry goes
        (the host's memory map changed)."""
        self.tlb.inv_all()
        if self.caches.walks is not None:
            self.caches.walks.inv_all()
        if self.caches.cds is not None:
            self.caches.cds.inv_all()
        for h in self.mgr.table.hwpts:
            if isinstance(h, HwptNested):
                h.cds.clear()
        self._contexts.clear()
        for d in self.mgr.devices.values():
            d.atc.clear()

    def _walks(self, method: str, *args: Any, **kw: Any) -> None:
        """The same invalidation on the walk caches (aggressive model)."""
        if self.caches.walks is not None:
            getattr(self.caches.walks, method)(*args, **kw)

    def tlbi_nh_all(self, vmid: int) -> None:
        self.tlb.inv_nh_all(vmid)
        self._walks("inv_nh_all", vmid)

    def tlbi_nh_asid(self, vmid: int, asid: int) -> None:
        self.tlb.inv_asid(asid, vmid)
        self._walks("inv_asid", asid, vmid)

    def tlbi_nh_va(self, vmid: int, asid: int | None, addr: int, size: int, leaf: bool,
                   ttl: int) -> None:
        self.tlb.inv_va(addr, max(size, 1), vmid=vmid, asid=asid, leaf=leaf, ttl=ttl)
        self._walks("inv_va", addr, max(size, 1), vmid=vmid, asid=asid, leaf=leaf)

    def tlbi_el2_all(self) -> None:
        self.tlb.inv_el2_all()
        self._walks("inv_vmid", EL2_VMID)

    def tlbi_el2_asid(self, asid: int) -> None:
        self.tlb.inv_el2_asid(asid)
        self._walks("inv_asid", asid, EL2_VMID)

    def tlbi_el2_va(self, asid: int | None, addr: int, size: int, leaf: bool,
                    ttl: int) -> None:
        self.tlbi_nh_va(EL2_VMID, asid, addr, size, leaf, ttl)

    def tlbi_s12_vmall(self, vmid: int) -> None:
        self.tlb.inv_vmid(vmid)
        self._walks("inv_vmid", vmid)

    def tlbi_s2_ipa(self, vmid: int, addr: int, size: int, leaf: bool, ttl: int) -> None:
        self.tlb.inv_ipa(addr, max(size, 1), vmid=vmid, leaf=leaf, ttl=ttl)
        self._walks("inv_ipa", addr, max(size, 1), vmid=vmid, leaf=leaf)

    def tlbi_nsnh_all(self) -> None:
        self.tlb.inv_nsnh_all()
        self._walks("inv_nsnh_all")

    def atc_inv(self, sid: int, ssid: int | None, addr: int, size: int,
                global_: bool) -> bool | None:
        """CMD_ATC_INV: the endpoint of ``sid`` drops the range from its ATC (and answers
        at once: the invalidation always completes)."""
        dev = self.mgr.devices.get(sid)
        if dev is not None:
            inj = self.mgr.injector
            if inj is not None and inj.ignores_atc_inv(sid):
                return True  # fault injection: the endpoint keeps its stale entries
            dev.atc.invalidate(ssid, addr, size, global_)
        return True
