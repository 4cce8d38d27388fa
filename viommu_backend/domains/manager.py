"""The host-side domain manager: streams -> domains -> translations -> guest RAM.

:class:`DomainManager` owns the iommufd-like object graph of :mod:`.objects`.  The SMMU
model drives it as its command sink (``stream_table_changed`` on CFGI_STE/ALL and on
SMMUEN changes, ``cd_changed`` on CFGI_CD, ``tlbi_*``, ``pri_resp``, ``resume``,
``stall_term``: see :class:`viommu_backend.smmuv3.cmdq.CommandSink`); endpoints call
``translate`` / ``translate_one`` / ``dma_read`` / ``dma_write`` / ``page_request``.

Mapping of STE configurations onto domains (as iommufd would set them up for a VMM):

- SMMU disabled: GBPA decides, identity or blocking;
- ``abort`` -> the blocking domain; ``bypass`` -> an identity HWPT_PAGING;
- ``s2`` -> a guest stage-2 HWPT_PAGING (VMID, S2TTB, ...);
- ``s1`` -> a HWPT_NESTED (the CD table) on an identity NEST_PARENT paging domain;
- ``nested`` -> a HWPT_NESTED on a stage-2 NEST_PARENT paging domain;
- an STE that cannot be fetched / decoded -> blocking, and every transaction of the stream
  reports the configuration error (C_BAD_STE, F_STE_FETCH, C_BAD_STREAMID).

Translations are cached in a :class:`~viommu_backend.smmuv3.tlb.TLB` tagged by domain id,
VMID and ASID, so TLBI commands address them by VMID/ASID as the architecture says while
freeing a domain drops exactly its entries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.cd import S1Config, fetch_cd
from viommu_backend.smmuv3.events import Event, PageRequest
from viommu_backend.smmuv3.fields import EventId, FaultClass
from viommu_backend.smmuv3.ste import ConfigFault, S2Config, StreamConfig, decode_ste, fetch_ste
from viommu_backend.smmuv3.tlb import EL2_VMID, NO_ASID, TLB
from viommu_backend.smmuv3.walker import Translation, WalkResult, walk, walk_one

from .objects import (BusyError, Device, DomainError, FaultQueue, FaultResponse, GroupError,
                      Hwpt, HwptBlocking, HwptNested, HwptPaging, IommuObject, Ioas,
                      PendingFault)

log = logging.getLogger(__name__)

# Fault code for a transaction terminated without an event (STE.Config=abort, GBPA.ABORT,
# a stream on the blocking domain): not an SMMUv3 event type.
ABORT = 0xFF
ABORT_NAME = "ABORT"
PAGE = 1 << 12
_BATCH_PAGES = 8  # DMA spanning more pages than this translates in one batch
_S1_FAULTS = frozenset({EventId.F_TRANSLATION, EventId.F_ADDR_SIZE, EventId.F_ACCESS,
                        EventId.F_PERMISSION})


def fault_name(code: int) -> str | None:
    if code == 0:
        return None
    if code == ABORT:
        return ABORT_NAME
    return EventId(code).name


class TranslationResult(WalkResult):
    """Batched result: the walker's arrays, plus the domain id that translated them."""

    domain: int | None = None

    def fault_name(self, i: int) -> str | None:  # type: ignore[override]
        return fault_name(int(self.fault[i]))

    @classmethod
    def of(cls, r: WalkResult, domain: int | None) -> "TranslationResult":
        out = cls(**{k: getattr(r, k) for k in WalkResult.__dataclass_fields__})
        out.domain = domain
        return out


class DmaFault(Exception):
    """An endpoint DMA that could not complete: the SMMU fault (event name, or ABORT for a
    silently terminated transaction, or BUS_ERROR for an output address outside guest
    RAM) at ``iova``."""

    def __init__(self, event: str, sid: int, ssid: int | None, iova: int,
                 write: bool, pending: PendingFault | None = None) -> None:
        super().__init__(f"DMA {'write' if write else 'read'} sid {sid:#x} ssid {ssid} "
                         f"iova {iova:#x}: {event}")
        self.event = event
        self.sid = sid
        self.ssid = ssid
        self.iova = iova
        self.write = write
        self.pending = pending  # a stalled transaction waiting for CMD_RESUME


@dataclass(frozen=True)
class _Ctx:
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


@dataclass
class Counters:
    translations: int = 0  # addresses translated
    walks: int = 0  # addresses walked (TLB misses)
    faults: int = 0
    events: int = 0
    page_requests: int = 0
    stalls: int = 0
    dma_reads: int = 0
    dma_writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    attaches: int = 0
    replaces: int = 0
    detaches: int = 0
    group_conflicts: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class DomainManager:
    """iommufd-like domain manager of one SMMU.

    ``memory_provider()`` returns the IOMMU function's GuestMemory (None when no client).
    ``stream_table`` returns the SMMU's stream table config (an object with ``enabled``,
    ``base``, ``fmt``, ``log2size``, ``split``, ``gbpa_abort`` like
    :class:`viommu_backend.smmuv3.device.StreamTableConfig`); None = no SMMU (all bypass).
    ``on_event(Event)`` / ``on_page_request(PageRequest)`` receive records for the guest.
    """

    def __init__(self, memory_provider: Callable[[], Any], *,
                 stream_table: Callable[[], Any] | None = None,
                 on_event: Callable[[Event], Any] | None = None,
                 on_page_request: Callable[[PageRequest], Any] | None = None,
                 oas: int = 48, ssid_bits: int = 20, stalls: bool = True,
                 tlb: TLB | None = None) -> None:
        self._next_id = 1
        self.objects: dict[int, IommuObject] = {}
        self.ioas = self._add(Ioas(self._alloc_id(), memory_provider))
        self.ioas.get()  # held by the manager for its lifetime
        self.ioas.on_unmap.append(lambda iova, size: self.flush_all())
        self.blocking = self._add(HwptBlocking(self._alloc_id()))
        self.blocking.get()  # never destroyed
        self.devices: dict[int, Device] = {}
        self.stream_table = stream_table
        self.on_event = on_event
        self.on_page_request = on_page_request
        self.oas = oas
        self.ssid_bits = ssid_bits
        self.stalls = stalls
        self.tlb = tlb or TLB()
        self.counters = Counters()
        self._next_stag = 0
        self.injector: Any = None  # viommu_backend.faults.FaultInjector: checked before the TLB

    # -- wiring ----------------------------------------------------------------------------
    def attach_smmu(self, smmu: Any) -> None:
        """Wire to an :class:`~viommu_backend.smmuv3.device.SMMUv3`: become its command
        sink, read its stream table, send events / page requests to its queues."""
        smmu.sink = self
        self.stream_table = lambda: smmu.stream_table
        self.on_event = smmu.record_event
        self.on_page_request = smmu.record_page_request
        cfg = smmu.config
        self.oas = cfg.oas_bits
        self.ssid_bits = cfg.ssidsize
        self.stalls = cfg.stall_model != 1  # STALL_MODEL_TERMINATE

    @property
    def memory(self) -> Any:
        return self.ioas.memory

    # -- object ids ------------------------------------------------------------------------
    def _alloc_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def _add(self, obj: Any) -> Any:
        self.objects[obj.id] = obj
        return obj

    def get_object(self, obj_id: int) -> IommuObject:
        obj = self.objects.get(obj_id)
        if obj is None:
            raise DomainError(f"no object {obj_id}", "ENOENT")
        return obj

    @property
    def hwpts(self) -> list[Hwpt]:
        return [o for o in self.objects.values() if isinstance(o, Hwpt)]

    # -- explicit allocation (IOMMU_HWPT_ALLOC) ----------------------------------------------
    def alloc_paging(self, s2: S2Config | None = None, *, nest_parent: bool = False,
                     enforce_cache_coherency: bool = False, fault: bool | None = None,
                     auto: bool = False) -> HwptPaging:
        """A paging domain over the IOAS: identity (``s2=None``) or a guest stage 2.
        Stage-2 domains get a fault queue unless ``fault=False``."""
        fq = None
        if fault if fault is not None else s2 is not None:
            fq = self._add(FaultQueue(self._alloc_id()))
            fq.get()
        h = self._add(HwptPaging(self._alloc_id(), self.ioas, s2, nest_parent=nest_parent,
                                 enforce_cache_coherency=enforce_cache_coherency, auto=auto,
                                 fault=fq))
        self.ioas.get()
        return h

    def alloc_nested(self, parent: HwptPaging | int, s1: Any, *, fault: bool = True,
                     auto: bool = False) -> HwptNested:
        """A guest stage-1 (``S1Context``: CD table) on a NEST_PARENT paging domain."""
        p = self.get_object(parent) if isinstance(parent, int) else parent
        if not isinstance(p, HwptPaging):
            raise DomainError(f"object {p.id} is not a paging domain")
        fq = None
        if fault:
            fq = self._add(FaultQueue(self._alloc_id()))
            fq.get()
        h = HwptNested(self._alloc_id(), p, s1, auto=auto, fault=fq)  # checks NEST_PARENT
        self._add(h)
        p.get()
        p.children.add(h.id)
        return h

    def destroy(self, obj_id: int) -> None:
        """IOMMU_DESTROY: refused (EBUSY) while the object is in use."""
        obj = self.get_object(obj_id)
        if obj is self.ioas or obj is self.blocking:
            raise BusyError(f"{obj.kind} {obj_id} belongs to the manager")
        if obj.refcount > 0:
            raise BusyError(f"{obj.kind} {obj_id} is in use (refcount {obj.refcount})")
        self._free(obj)

    def _free(self, obj: IommuObject) -> None:
        obj.destroyed = True
        self.objects.pop(obj.id, None)
        if isinstance(obj, Hwpt):
            self.tlb.inv_tag(obj.id)
            if obj.fault is not None:
                obj.fault.flush(response=FaultResponse.INVALID)
                obj.fault.put()
                self._free(obj.fault)
        if isinstance(obj, HwptPaging):
            obj.ioas.put()
        if isinstance(obj, HwptNested):
            obj.parent.children.discard(obj.id)
            obj.parent.put()
            self._release(obj.parent)

    def _release(self, h: Hwpt) -> None:
        """Destroy an automatic domain once nothing uses it."""
        if h.auto and h.refcount == 0 and not h.destroyed:
            self._free(h)

    # -- devices -----------------------------------------------------------------------------
    def add_device(self, sid: int, *, name: str = "", group: int | str | None = None,
                   can_enforce_coherency: bool = True) -> Device:
        if sid in self.devices:
            raise DomainError(f"sid {sid:#x} already bound", "EEXIST")
        dev = Device(sid, name, group, can_enforce_coherency)
        self.devices[sid] = dev
        self._resolve_stream(dev)
        return dev

    def remove_device(self, sid: int) -> None:
        dev = self.devices.get(sid)
        if dev is None:
            return
        self._set_domain(dev, None)
        del self.devices[sid]

    def device(self, sid: int) -> Device:
        """The device of ``sid``; a stream never seen before is bound on first use."""
        dev = self.devices.get(sid)
        if dev is None:
            dev = self.add_device(sid)
        return dev

    def group_of(self, dev: Device) -> list[Device]:
        if dev.group is None:
            return [dev]
        return [d for d in self.devices.values() if d.group == dev.group]

    # -- attach / replace / detach -------------------------------------------------------------
    def attach(self, sid: int, hwpt_id: int) -> None:
        """Attach a detached device's whole group to ``hwpt_id`` (all or nothing)."""
        devs = self.group_of(self.device(sid))
        if any(d.hwpt is not None for d in devs):
            raise BusyError(f"group of sid {sid:#x} is attached: use replace")
        self._attach_group(devs, hwpt_id)

    def replace(self, sid: int, hwpt_id: int) -> None:
        """Move an attached device's whole group to ``hwpt_id``."""
        devs = self.group_of(self.device(sid))
        if any(d.hwpt is None for d in devs):
            raise DomainError(f"group of sid {sid:#x} is not attached: use attach")
        self._attach_group(devs, hwpt_id)

    def detach(self, sid: int) -> None:
        for d in self.group_of(self.device(sid)):
            self._set_domain(d, None)

    def _attach_group(self, devs: list[Device], hwpt_id: int) -> None:
        h = self.get_object(hwpt_id)
        if not isinstance(h, Hwpt):
            raise DomainError(f"object {hwpt_id} is not a HWPT")
        for d in devs:
            if isinstance(h, (HwptPaging, HwptNested)) and not h.compatible(d):
                raise DomainError(f"sid {d.sid:#x} cannot enforce cache coherency "
                                  f"required by hwpt {h.id}")
        for d in devs:
            self._set_domain(d, h)

    def _set_domain(self, dev: Device, new: Hwpt | None) -> None:
        old = dev.hwpt
        dev.ctx_cache.clear()
        if old is new:
            return
        if new is not None:
            new.get()
            new.devices.add(dev.sid)
        dev.hwpt = new
        if old is None:
            self.counters.attaches += 1
        elif new is None:
            self.counters.detaches += 1
        else:
            self.counters.replaces += 1
        if old is not None:
            old.devices.discard(dev.sid)
            if old.fault is not None:  # answer what this device left pending
                old.fault.flush(dev.sid, response=FaultResponse.INVALID)
            old.put()
            self._release(old)

    # -- STE-driven configuration ------------------------------------------------------------
    def stream_table_changed(self, sid: int | None = None) -> None:
        """CFGI_STE / CFGI_STE_RANGE / CFGI_ALL, or SMMUEN / STRTAB changes: re-read the
        STE(s) of bound streams and attach / replace / detach accordingly."""
        if sid is None:
            targets = list(self.devices.values())
        else:
            dev = self.devices.get(sid)
            targets = [dev] if dev is not None else []  # unseen streams resolve on use
        for dev in targets:
            self._resolve_stream(dev)
        self._check_groups(targets)

    def _check_groups(self, devs: Iterable[Device]) -> None:
        seen = set()
        for dev in devs:
            if dev.group is None or dev.group in seen:
                continue
            seen.add(dev.group)
            if len({id(d.hwpt) for d in self.group_of(dev)}) > 1:
                self.counters.group_conflicts += 1
                log.warning("group %s split across domains (guest STEs differ)", dev.group)

    def split_groups(self) -> list[Any]:
        groups: dict[Any, set[int]] = {}
        for d in self.devices.values():
            if d.group is not None:
                groups.setdefault(d.group, set()).add(d.hwpt.id if d.hwpt else 0)
        return sorted((g for g, ids in groups.items() if len(ids) > 1), key=str)

    def _read_stream_config(self, sid: int) -> StreamConfig | ConfigFault:
        st = self.stream_table() if self.stream_table is not None else None
        if st is None:
            return StreamConfig("bypass")
        if not st.enabled:
            return StreamConfig("abort" if st.gbpa_abort else "bypass")
        mem = self.memory
        if mem is None:
            return ConfigFault("F_STE_FETCH", "no guest memory", sid=sid)
        cfg = {"FMT": st.fmt, "LOG2SIZE": st.log2size, "SPLIT": st.split}
        try:
            words = fetch_ste(mem, st.base, cfg, sid)
            return decode_ste(words, oas=self.oas, ssid_bits=self.ssid_bits, sid=sid)
        except ConfigFault as cf:
            return cf

    def _resolve_stream(self, dev: Device) -> None:
        sc = self._read_stream_config(dev.sid)
        if isinstance(sc, ConfigFault):
            dev.ste, dev.config_fault = None, sc
            self._set_domain(dev, self.blocking)
            return
        dev.ste, dev.config_fault = sc, None
        self._set_domain(dev, self._domain_for(dev, sc))

    def _domain_for(self, dev: Device, sc: StreamConfig) -> Hwpt:
        if sc.config == "abort":
            return self.blocking
        if sc.config == "bypass":
            return self._find_paging(dev, None, nest_parent=False)
        if sc.config == "s2":
            return self._find_paging(dev, sc.s2, nest_parent=False)
        parent = self._find_paging(dev, sc.s2 if sc.config == "nested" else None,
                                   nest_parent=True)
        for h in self.hwpts:
            if isinstance(h, HwptNested) and h.parent is parent and h.s1 == sc.s1:
                return h
        return self.alloc_nested(parent, sc.s1, auto=True, fault=True)

    def _find_paging(self, dev: Device, s2: S2Config | None, *, nest_parent: bool) -> HwptPaging:
        # prefer the domain the device already has (no needless replace), then any
        # compatible one; else allocate, with coherency taken from this (first) device
        cands = [h for h in self.hwpts if isinstance(h, HwptPaging) and h.s2 == s2
                 and (h.nest_parent or not nest_parent) and h.compatible(dev)]
        cur = dev.hwpt.parent if isinstance(dev.hwpt, HwptNested) else dev.hwpt
        for h in cands:
            if h is cur:
                return h
        if cands:
            return cands[0]
        return self.alloc_paging(s2, nest_parent=nest_parent,
                                 enforce_cache_coherency=dev.can_enforce_coherency,
                                 fault=s2 is not None, auto=True)

    def cd_changed(self, sid: int, ssid: int | None = None) -> None:
        """CFGI_CD (``ssid`` given) / CFGI_CD_ALL: drop the cached CD(s) of the stream's
        stage-1 domain (shared by every stream using that CD table)."""
        dev = self.devices.get(sid)
        if dev is None or not isinstance(dev.hwpt, HwptNested):
            return
        h = dev.hwpt
        if ssid is None:
            h.cds.clear()
        else:
            h.cds.pop(ssid, None)
            if ssid == 0:
                h.cds.pop(None, None)  # non-PASID traffic may use CD 0
        for s in h.devices:
            d = self.devices.get(s)
            if d is not None:
                d.ctx_cache.clear()

    # -- translation context -------------------------------------------------------------------
    def _context(self, dev: Device, ssid: int | None) -> _Ctx | ConfigFault:
        ctx = dev.ctx_cache.get(ssid)
        if ctx is not None:
            return ctx
        h = dev.hwpt
        if dev.config_fault is not None:
            return dev.config_fault
        if h is None or isinstance(h, HwptBlocking):
            ctx = _Ctx(h.id if h else 0, True, None, None, 0, NO_ASID, "abort")
        elif isinstance(h, HwptPaging):
            if ssid is not None:
                return ConfigFault("C_BAD_SUBSTREAMID", "substream on a stream without "
                                   "stage 1", sid=dev.sid, ssid=ssid)
            ctx = _Ctx(h.id, False, None, h.s2, h.vmid, NO_ASID,
                       "identity" if h.s2 is None else "s2")
        else:
            assert isinstance(h, HwptNested)
            if ssid in h.cds:
                s1 = h.cds[ssid]
            else:
                mem = self.memory
                if mem is None:
                    return ConfigFault("F_CD_FETCH", "no guest memory", sid=dev.sid, ssid=ssid)
                try:
                    s1 = fetch_cd(mem, h.s1, ssid, h.s2, oas=self.oas, sid=dev.sid)
                except ConfigFault as cf:
                    return cf
                h.cds[ssid] = s1
            vmid = h.parent.vmid
            if dev.ste is not None and dev.ste.strw == fl.STRW_EL2:
                vmid = EL2_VMID
            if s1 is None:  # S1DSS=bypass: stage 2 (or nothing) only
                ctx = _Ctx(h.id, False, None, h.s2, vmid, NO_ASID,
                           "identity" if h.s2 is None else "s2")
            else:
                ctx = _Ctx(h.id, False, s1, h.s2, vmid, s1.asid,
                           "s1" if h.s2 is None else "nested")
        dev.ctx_cache[ssid] = ctx
        return ctx

    # -- translation -------------------------------------------------------------------------------
    def translate_one(self, sid: int, ssid: int | None, iova: int, write: bool = False
                      ) -> Translation:
        """Translate one address: TLB first, else a scalar walk.  Faults are reported
        (event records) and returned in ``.fault`` (``fault_name(code)`` names them)."""
        self.counters.translations += 1
        dev = self.device(sid)
        if ssid is not None:
            dev.ssids.add(ssid)
        ctx = self._context(dev, ssid)
        if isinstance(ctx, ConfigFault):
            self._config_fault(dev, ssid, iova, write, ctx)
            return Translation(fault=ctx.code)
        if ctx.abort:
            self.counters.faults += 1
            return Translation(fault=ABORT)
        if self.injector is not None:
            code = self.injector.fault_for(sid, ssid, iova, write)
            if code:
                return self._injected_fault(dev, ssid, ctx, iova, write, code)
        if ctx.identity:
            return Translation(pa=iova, level=-1, page_size=PAGE, perm=7, global_=True)
        need = fl.PERM_W if write else fl.PERM_R
        e = self.tlb.lookup(ctx.domain, ctx.vmid, ctx.asid, iova)
        if e is not None and e.perm & need:
            return Translation(pa=e.translate(iova), level=e.level, page_size=e.size,
                               perm=e.perm, global_=e.global_,
                               ipa=(e.ipa | (iova & (e.size - 1))) if e.ipa >= 0 else 0)
        self.counters.walks += 1
        t = walk_one(self.memory, ctx.s1, ctx.s2, iova, write=write)
        if t.fault:
            self._translation_fault(dev, ssid, ctx, iova, write, t.fault, t.stage2,
                                    t.fault_class, t.ipa)
            return t
        self.tlb.insert(ctx.domain, ctx.vmid, ctx.asid, iova, t.pa, t.page_size, t.perm,
                        t.level, t.global_, ctx.stage, t.ipa if ctx.stage == "nested" else
                        (iova if ctx.stage == "s2" else -1))
        return t

    def translate(self, sid: int, ssid: int | None, iovas: Any, write: bool = False
                  ) -> TranslationResult:
        """Translate many addresses (numpy uint64) of one (stream, substream): TLB hits
        are served from the cache, the misses walked in one batch."""
        va = np.ascontiguousarray(np.asarray(iovas, dtype=np.uint64).reshape(-1))
        n = len(va)
        self.counters.translations += n
        dev = self.device(sid)
        if ssid is not None:
            dev.ssids.add(ssid)
        ctx = self._context(dev, ssid)
        if isinstance(ctx, ConfigFault):
            res = WalkResult.empty(n)
            res.fault[:] = ctx.code
            if n:
                self._config_fault(dev, ssid, int(va[0]), write, ctx)
            return TranslationResult.of(res, dev.hwpt.id if dev.hwpt else None)
        if ctx.abort:
            res = WalkResult.empty(n)
            res.fault[:] = ABORT
            self.counters.faults += n
            return TranslationResult.of(res, ctx.domain)
        inj = None if self.injector is None else self.injector.fault_codes(sid, ssid, va, write)
        if ctx.identity:
            res = walk(None, None, None, va, write=write)
            if inj is not None:
                self._apply_injected(dev, ssid, ctx, va, write, inj, res)
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
            e = self.tlb.lookup(ctx.domain, ctx.vmid, ctx.asid, pg << 12)
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
            self.counters.walks += len(mi)
            w = walk(self.memory, ctx.s1, ctx.s2, va[mi], write=write)
            for name in WalkResult.__dataclass_fields__:
                getattr(res, name)[mi] = getattr(w, name)
            self.tlb.insert_results(ctx.domain, ctx.vmid, ctx.asid, va[mi], w,
                                    stage=ctx.stage)
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
                    self._translation_fault(dev, ssid, ctx, int(va[i]), write, int(w.fault[k]),
                                            bool(w.stage2[k]), int(w.fault_class[k]),
                                            int(w.ipa[k]))
        if inj is not None:
            self._apply_injected(dev, ssid, ctx, va, write, inj, res)
        return TranslationResult.of(res, ctx.domain)

    # -- injected faults (viommu_backend.faults) ---------------------------------------------------
    def _injected_fault(self, dev: Device, ssid: int | None, ctx: _Ctx, iova: int,
                        write: bool, code: int) -> Translation:
        """Fail one access with an injected fault, reported as the walk would report it
        (stage 2 when the stream has only a stage 2).  A bypass stream has no CD.R/S2R
        to consult: its injected faults are always recorded."""
        stage2 = ctx.s1 is None and ctx.s2 is not None
        if ctx.identity:
            self.counters.faults += 1
            self._emit(Event(EventId(code).name, dev.sid, ssid, addr=iova, read=not write))
        else:
            self._translation_fault(dev, ssid, ctx, iova, write, code, stage2,
                                    int(FaultClass.IN), iova if stage2 else 0)
        return Translation(fault=code, stage2=stage2, ipa=iova if stage2 else 0,
                           fault_class=int(FaultClass.IN) if stage2 else 0)

    def _apply_injected(self, dev: Device, ssid: int | None, ctx: _Ctx, va: np.ndarray,
                        write: bool, codes: np.ndarray, res: WalkResult) -> None:
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
                t = self._injected_fault(dev, ssid, ctx, iova, write, code)
            res.fault[i], res.stage2[i], res.ipa[i] = code, t.stage2, t.ipa

    # -- fault reporting ---------------------------------------------------------------------------
    def _emit(self, ev: Event) -> None:
        self.counters.events += 1
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # a broken consumer must not break the endpoint's DMA
                log.exception("event consumer failed on %s", ev.name)

    def _config_fault(self, dev: Device, ssid: int | None, iova: int, write: bool,
                      cf: ConfigFault) -> None:
        self.counters.faults += 1
        if cf.stage2:  # S2 fault while fetching a CD through the guest stage 2
            ev = Event(cf.event, dev.sid, ssid, addr=iova, ipa=cf.ipa or 0, read=not write,
                       s2=True, klass=int(cf.fault_class))
        elif cf.event in ("F_STE_FETCH", "F_CD_FETCH"):
            ev = Event(cf.event, dev.sid, ssid, fetch_addr=cf.addr or 0)
        else:
            ev = Event(cf.event, dev.sid, ssid)
        self._emit(ev)

    def _translation_fault(self, dev: Device, ssid: int | None, ctx: _Ctx, iova: int,
                           write: bool, code: int, stage2: bool, klass: int,
                           ipa: int) -> PendingFault | None:
        self.counters.faults += 1
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
        stall = stall and self.stalls
        if not record and not stall:
            return None
        pending = None
        stag = 0
        h = dev.hwpt
        if stall and h is not None and h.fault is not None:
            stag = self._next_stag
            self._next_stag = (self._next_stag + 1) & 0xFFFF
            pending = h.fault.add(PendingFault("stall", dev.sid, ssid, stag, iova, write))
            self.counters.stalls += 1
        else:
            stall = False
        self._emit(Event(eid.name, dev.sid, ssid, addr=iova, ipa=ipa, read=not write,
                         s2=stage2, klass=klass if stage2 else int(FaultClass.IN),
                         stall=stall, stag=stag))
        return pending

    def pending_stall(self, sid: int, stag: int) -> PendingFault | None:
        dev = self.devices.get(sid)
        if dev is None or dev.hwpt is None or dev.hwpt.fault is None:
            return None
        return dev.hwpt.fault.pending.get(("stall", sid, stag))

    def probe(self, sid: int, ssid: int | None, iova: int, write: bool = False
              ) -> tuple[Translation, int | None]:
        """Translate without side effects (no event, no TLB fill, no new device): what
        the stream would get now.  Returns (translation, domain id or None)."""
        dev = self.devices.get(sid)
        if dev is not None:
            ctx = self._context(dev, ssid)
            domain = dev.hwpt.id if dev.hwpt else None
            if isinstance(ctx, ConfigFault):
                return Translation(fault=ctx.code), domain
            s1, s2, abort = ctx.s1, ctx.s2, ctx.abort
        else:
            domain = None
            sc = self._read_stream_config(sid)
            if isinstance(sc, ConfigFault):
                return Translation(fault=sc.code), None
            abort = sc.config == "abort"
            s2 = sc.s2
            s1 = None
            if sc.config in ("s1", "nested"):
                if self.memory is None:
                    return Translation(fault=EventId.F_CD_FETCH), None
                try:
                    s1 = fetch_cd(self.memory, sc.s1, ssid, s2, oas=self.oas, sid=sid)
                except ConfigFault as cf:
                    return Translation(fault=cf.code), None
            elif ssid is not None and not abort:
                return Translation(fault=EventId.C_BAD_SUBSTREAMID), None
        if abort:
            return Translation(fault=ABORT), domain
        if self.injector is not None:
            code = self.injector.fault_for(sid, ssid, iova, write, consume=False)
            if code:
                stage2 = s1 is None and s2 is not None
                return Translation(fault=code, stage2=stage2, ipa=iova if stage2 else 0), domain
        if s1 is None and s2 is None:
            return Translation(pa=iova, level=-1, page_size=PAGE, perm=7, global_=True), domain
        return walk_one(self.memory, s1, s2, iova, write=write), domain

    # -- PRI ---------------------------------------------------------------------------------------
    def page_request(self, sid: int, ssid: int | None, addr: int, *, prg_index: int,
                     read: bool = True, write: bool = False, last: bool = True,
                     priv: bool = False, exec_: bool = False) -> PendingFault:
        """An endpoint's PCIe Page Request.  Goes to the fault queue of the stream's
        domain and out to the guest (PRIQ); the group is answered by CMD_PRI_RESP.  A
        stream on a domain without a fault queue is answered INVALID at once."""
        dev = self.device(sid)
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
        self.counters.page_requests += 1
        if self.on_page_request is not None:
            self.on_page_request(PageRequest(sid, prg_index, addr, ssid, read=read,
                                             write=write, exec=exec_, priv=priv, last=last))
        return pf

    # -- command sink: invalidation ----------------------------------------------------------------
    def flush_all(self) -> None:
        self.tlb.inv_all()
        for h in self.hwpts:
            if isinstance(h, HwptNested):
                h.cds.clear()
        for d in self.devices.values():
            d.ctx_cache.clear()

    def tlbi_nh_all(self, vmid: int) -> None:
        self.tlb.inv_nh_all(vmid)

    def tlbi_nh_asid(self, vmid: int, asid: int) -> None:
        self.tlb.inv_asid(asid, vmid)

    def tlbi_nh_va(self, vmid: int, asid: int | None, addr: int, size: int, leaf: bool,
                   ttl: int) -> None:
        self.tlb.inv_va(addr, max(size, 1), vmid=vmid, asid=asid, leaf=leaf)

    def tlbi_el2_all(self) -> None:
        self.tlb.inv_el2_all()

    def tlbi_el2_asid(self, asid: int) -> None:
        self.tlb.inv_el2_asid(asid)

    def tlbi_el2_va(self, asid: int | None, addr: int, size: int, leaf: bool,
                    ttl: int) -> None:
        self.tlb.inv_va(addr, max(size, 1), vmid=EL2_VMID, asid=asid, leaf=leaf)

    def tlbi_s12_vmall(self, vmid: int) -> None:
        self.tlb.inv_vmid(vmid)

    def tlbi_s2_ipa(self, vmid: int, addr: int, size: int, leaf: bool, ttl: int) -> None:
        self.tlb.inv_ipa(addr, max(size, 1), vmid=vmid, leaf=leaf)

    def tlbi_nsnh_all(self) -> None:
        self.tlb.inv_nsnh_all()

    def atc_inv(self, sid: int, ssid: int | None, addr: int, size: int,
                global_: bool) -> bool | None:
        return True  # endpoints keep no ATC: nothing to invalidate

    # -- command sink: fault responses --------------------------------------------------------------
    def _fault_queue(self, sid: int) -> FaultQueue | None:
        dev = self.devices.get(sid)
        if dev is None or dev.hwpt is None:
            return None
        return dev.hwpt.fault

    def pri_resp(self, sid: int, ssid: int | None, grpid: int, resp: int) -> None:
        fq = self._fault_queue(sid)
        if fq is None:
            return
        code = {0: FaultResponse.INVALID, 1: FaultResponse.FAILURE,
                2: FaultResponse.SUCCESS}.get(resp, FaultResponse.INVALID)
        fq.respond("pri", sid, grpid, code)

    def resume(self, sid: int, stag: int, resp: int) -> None:
        fq = self._fault_queue(sid)
        if fq is None:
            return
        fq.respond("stall", sid, stag,
                   FaultResponse.SUCCESS if resp == 1 else FaultResponse.INVALID)

    def stall_term(self, sid: int) -> None:
        fq = self._fault_queue(sid)
        if fq is not None:
            fq.flush(sid, "stall", FaultResponse.INVALID)

    # -- endpoint DMA ----------------------------------------------------------------------------------
    def _dma_runs(self, sid: int, ssid: int | None, iova: int, n: int,
                  write: bool) -> list[tuple[int, int]]:
        """Translate [iova, iova+n) into runs (pa, length), or raise DmaFault."""
        if n <= 0:
            return []
        if iova < 0 or iova + n > 1 << 64:
            raise DmaFault("F_TRANSLATION", sid, ssid, iova, write)
        first, last = iova >> 12, (iova + n - 1) >> 12
        pieces: list[tuple[int, int, int]] = []  # (iova, pa, length)
        if last - first + 1 > _BATCH_PAGES:
            starts = np.arange(first, last + 1, dtype=np.uint64) << np.uint64(12)
            starts[0] = iova
            r = self.translate(sid, ssid, starts, write)
            bad = np.flatnonzero(r.fault != 0)
            if len(bad):
                i = int(bad[0])
                raise DmaFault(r.fault_name(i) or "", sid, ssid, int(starts[i]), write,
                               self._stall_for(sid, int(starts[i])))
            end = iova + n
            for i, (a, pa) in enumerate(zip(starts.tolist(), r.pa.tolist())):
                nxt = min((a | (PAGE - 1)) + 1, end)
                pieces.append((a, pa, nxt - a))
        else:
            a, end = iova, iova + n
            while a < end:
                t = self.translate_one(sid, ssid, a, write)
                if t.fault:
                    raise DmaFault(fault_name(t.fault) or "", sid, ssid, a, write,
                                   self._stall_for(sid, a))
                size = t.page_size or PAGE
                nxt = min((a | (size - 1)) + 1, end)
                pieces.append((a, t.pa, nxt - a))
                a = nxt
        runs: list[tuple[int, int]] = []
        for _, pa, ln in pieces:
            if runs and runs[-1][0] + runs[-1][1] == pa:
                runs[-1] = (runs[-1][0], runs[-1][1] + ln)
            else:
                runs.append((pa, ln))
        return runs

    def _stall_for(self, sid: int, iova: int) -> PendingFault | None:
        fq = self._fault_queue(sid)
        if fq is None:
            return None
        for pf in fq:
            if pf.kind == "stall" and pf.sid == sid and pf.addr == iova and not pf.done:
                return pf
        return None

    def dma_read(self, sid: int, ssid: int | None, iova: int, n: int) -> bytes:
        runs = self._dma_runs(sid, ssid, iova, n, False)
        mem = self.memory
        try:
            if len(runs) == 1:  # the common case: one page, or physically contiguous pages
                data = bytes(mem.read(*runs[0]))
            else:
                data = b"".join(bytes(mem.read(pa, ln)) for pa, ln in runs)
        except Exception as e:  # GuestMemoryError: output address not guest RAM
            raise DmaFault("BUS_ERROR", sid, ssid, iova, False) from e
        self.counters.dma_reads += 1
        self.counters.bytes_read += len(data)
        return data

    def dma_write(self, sid: int, ssid: int | None, iova: int, data: bytes | bytearray |
                  memoryview) -> None:
        buf = memoryview(data).cast("B")
        runs = self._dma_runs(sid, ssid, iova, len(buf), True)
        mem = self.memory
        if len(runs) == 1:  # one run: a failed write leaves memory untouched
            try:
                mem.write(runs[0][0], buf)
            except Exception as e:  # GuestMemoryError: output address not guest RAM
                raise DmaFault("BUS_ERROR", sid, ssid, iova, True) from e
            self.counters.dma_writes += 1
            self.counters.bytes_written += len(buf)
            return
        for pa, ln in runs:  # all runs translated before any byte is written
            if mem is None or not mem.contains(pa, ln):
                raise DmaFault("BUS_ERROR", sid, ssid, iova, True)
        off = 0
        for pa, ln in runs:
            mem.write(pa, buf[off:off + ln])
            off += ln
        self.counters.dma_writes += 1
        self.counters.bytes_written += len(buf)

    # -- display ---------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {**self.counters.as_dict(), "tlb": self.tlb.stats()}

    def describe(self) -> dict[str, Any]:
        """The object graph (QMP query-viommu-domains)."""
        ioas = [self.ioas.describe()]
        hwpts = [h.describe() for h in sorted(self.hwpts, key=lambda h: h.id)]
        faults = [o.describe() for o in self.objects.values() if isinstance(o, FaultQueue)]
        devices = [d.describe() for d in sorted(self.devices.values(), key=lambda d: d.sid)]
        attachments = [{"sid": d.sid, "hwpt": d.hwpt.id} for d in
                       sorted(self.devices.values(), key=lambda d: d.sid) if d.hwpt]
        return {"ioas": ioas, "hwpts": hwpts, "fault_queues": faults, "devices": devices,
                "attachments": attachments, "split_groups": self.split_groups(),
                "counters": self.stats()}


__all__ = ["DomainManager", "DmaFault", "TranslationResult", "ABORT", "ABORT_NAME",
           "fault_name", "BusyError", "GroupError"]
