"""The host-side domain manager: streams -> domains -> translations -> guest RAM.

:class:`DomainManager` is the facade of the iommufd-like object graph of :mod:`.objects`.
The SMMU model drives it as its command sink (``stream_table_changed`` on CFGI_STE/ALL
and on SMMUEN changes, ``cd_changed`` on CFGI_CD, ``tlbi_*``, ``atc_inv``, ``pri_resp``,
``resume``, ``stall_term``: see :class:`viommu_backend.smmuv3.cmdq.CommandSink`);
endpoints call ``translate`` / ``translate_one`` / ``dma_read`` / ``dma_write`` /
``dma_views`` / ``page_request`` / ``endpoint_page_request``; the host (QMP, after the
iommufd uAPI) calls ``ioas_map`` / ``ioas_unmap`` / ``hwpt_alloc`` / ``attach`` /
``replace`` / ``detach`` / ``destroy`` / ``claim`` / ``release`` / ``fault_respond`` /
``iova_to_phys`` / ``coherency``.

Mapping of STE configurations onto domains (as iommufd would set them up for a VMM):

- SMMU disabled: GBPA decides, identity or blocking;
- ``abort`` -> the blocking domain; ``bypass`` -> an identity HWPT_PAGING;
- ``s2`` -> a guest stage-2 HWPT_PAGING (VMID, S2TTB, ...);
- ``s1`` -> a HWPT_NESTED (the CD table) on an identity NEST_PARENT paging domain;
- ``nested`` -> a HWPT_NESTED on a stage-2 NEST_PARENT paging domain;
- an STE that cannot be fetched / decoded -> blocking, and every transaction of the stream
  reports the configuration error (C_BAD_STE, F_STE_FETCH, C_BAD_STREAMID).

With a hidden stage 2 (``host_s2``) the guest's STEs choose stage 1 only: ``bypass`` ->
the device's host NEST_PARENT over the IOAS, ``s1`` -> a HWPT_NESTED on it (see
:mod:`.devices`, :mod:`.host`).

The components, each owning its state: :class:`~.table.ObjectTable` (ids, allocation,
typed destroy), :class:`~.devices.Attachments` (devices, bindings, groups and their
ownership, the STE-driven choice of domains, coherency), :class:`~.translation.Translator`
(TLB, contexts, translation, probes, invalidation), :class:`~.fault.FaultRouter` (event
records, stalls, page requests, the host's fault queues) and :class:`~.dma.Dma`
(endpoint DMA).  The manager holds the SMMU's parameters and hooks they share.
"""

from __future__ import annotations

from typing import Any, Callable

from viommu_backend.smmuv3.smmu_config import (HTTU_ACCESS_DIRTY, STALL_MODEL_STALL,
                                               STALL_MODEL_TERMINATE)
from viommu_backend.smmuv3.events import Event, PageRequest
from viommu_backend.smmuv3.tlb import TLB
from viommu_backend.smmuv3.walker import Translation, walk_one
from viommu_backend.trace import Tracer

from .caching import CacheModel
from .counters import DomainManagerCounters
from .devices import Attachments
from .dma import Dma, PinnedView
from .fault import FaultRouter, StallState
from .groups import Groups
from .host import HostIoas
from .objects import (BusyError, Device, DomainError, FaultQueue, GroupError, Hwpt,
                      HwptBlocking, HwptNested, HwptPaging, IommuObject, Ioas, PendingFault)
from .sanitizer import Sanitizer
from .sanitizer_rules import SanitizerRules
from .results import ABORT, ABORT_NAME, DmaFault, TranslationResult, fault_name
from .table import ObjectTable
from .translation import Translator


class DomainManager:
    """iommufd-like domain manager of one SMMU.

    ``memory_provider()`` returns the IOMMU function's GuestMemory (None when no client).
    ``stream_table`` returns the SMMU's stream table config (an object with ``enabled``,
    ``base``, ``fmt``, ``log2size``, ``split``, ``gbpa_abort`` like
    :class:`viommu_backend.smmuv3.device.StreamTableConfig`); None = no SMMU (all bypass).
    ``on_event(Event)`` / ``on_page_request(PageRequest)`` receive records for the guest;
    ``evtq_writable()`` says whether an event record can be written now (stalls that
    cannot record wait, see :class:`.fault.StallState`).  ``stall_model``, ``stall_max``
    and ``httu`` are the SMMU's IDR0.STALL_MODEL, IDR5.STALL_MAX and IDR0.HTTU.
    ``host_s2``: the host owns stage 2 (the guest's SMMU is stage-1-only): the IOAS is a
    :class:`~.host.HostIoas` over host memory laid out as ``host_layout`` says.
    """

    def __init__(self, memory_provider: Callable[[], Any], *,
                 stream_table: Callable[[], Any] | None = None,
                 on_event: Callable[[Event], Any] | None = None,
                 on_page_request: Callable[[PageRequest], Any] | None = None,
                 oas: int = 48, ssid_bits: int = 20, stall_model: int = STALL_MODEL_STALL,
                 stall_max: int = 64, httu: int = HTTU_ACCESS_DIRTY,
                 tlb: TLB | None = None, host_s2: bool = False,
                 host_layout: str = "identity") -> None:
        # the SMMU's parameters and hooks (attach_smmu takes them from the SMMU)
        self.stream_table = stream_table
        self.on_event = on_event
        self.on_page_request = on_page_request
        self.evtq_writable: Callable[[], bool] = lambda: True
        self.sync_count: Callable[[], int] = lambda: 0  # CMD_SYNCs completed (sanitizer)
        self.oas = oas
        self.ssid_bits = ssid_bits
        self.stall_model = stall_model
        self.stall_max = stall_max
        self.httu = httu
        self.fwb = False  # SMMU_IDR3.FWB: STE.S2FWB is allowed
        self.host_s2 = host_s2
        self.smmu_enforces_cc = True  # COHACC / S2FWB
        self.counters = DomainManagerCounters()
        self.trace: Tracer = Tracer()  # "domain" / "fault" records; shared with the SMMU's
        self.injector: Any = None  # fault_injection.FaultInjector: checked before the TLB
        self.sanitizer: Sanitizer | None = None  # SMMU option sanitize (attach_smmu)
        self.sanitizer_rules: SanitizerRules | None = None  # its ordering / update rules
        # sid -> "is the endpoint's ATS enabled now" (its PCI ATS capability), for the
        # endpoints that have one; with STE.EATS != 0 their DMA goes through Device.atc
        self.ats_probes: dict[int, Callable[[], bool]] = {}
        # sid -> hook(on) turning the endpoint's page requests on / off (host IOPF)
        self.iopf_hooks: dict[int, Callable[[bool], None]] = {}
        # the components
        self.table = ObjectTable()
        self.translator = Translator(self, tlb)
        self.faults = FaultRouter(self)
        self.attachments = Attachments(self)
        self.dma = Dma(self)
        self.table.on_new_queue.append(self.faults.new_queue)
        self.table.on_free.append(self.translator.hwpt_freed)
        ioas_id = self.table.new_id()
        self.ioas = self.table.pin(HostIoas(ioas_id, memory_provider, host_layout) if host_s2
                                   else Ioas(ioas_id, memory_provider))
        self.ioas.on_unmap.append(lambda iova, size: self.translator.flush_all())
        self.blocking = self.table.pin(HwptBlocking(self.table.new_id(), owner="host"))

    # -- wiring --------------------------------------------------------------------------------
    def attach_smmu(self, smmu: Any) -> None:
        """Wire to an :class:`~viommu_backend.smmuv3.device.SMMUv3`: become its command
        sink, read its stream table, send events / page requests to its queues."""
        smmu.sink = self
        self.trace = smmu.trace
        self.stream_table = lambda: smmu.stream_table
        self.on_event = smmu.record_event
        self.on_page_request = smmu.record_page_request
        self.evtq_writable = smmu.evtq_writable
        self.sync_count = lambda: smmu.counters.syncs
        smmu.on_evtq_available.append(self.faults.retry_held)
        cfg = smmu.config
        self.oas = cfg.oas_bits
        self.ssid_bits = cfg.ssidsize
        self.stall_model = cfg.stall_model
        self.stall_max = cfg.stall_max
        self.httu = cfg.httu
        self.fwb = cfg.fwb
        self.smmu_enforces_cc = cfg.cohacc or cfg.fwb
        if cfg.sanitize:
            self.sanitizer = Sanitizer(smmu.trace, fail=cfg.sanitize_fail)
            self.sanitizer_rules = SanitizerRules(self, self.sanitizer,
                                                  lambda: smmu.cmdq.empty())
            smmu.command_observers.append(self.sanitizer_rules.command)
        self.translator.caches = CacheModel.from_config(cfg)

    @property
    def stalls(self) -> bool:
        """Can transactions stall (IDR0.STALL_MODEL is not terminate-only)?"""
        return self.stall_model != STALL_MODEL_TERMINATE

    @property
    def memory(self) -> Any:
        """The physical address space DMA and table walks use (host memory under a
        hidden stage 2)."""
        return self.ioas.memory

    @property
    def guest_memory(self) -> Any:
        """The guest's physical address space (its STEs)."""
        return self.ioas.guest_memory

    # -- state of the components, for callers and display ---------------------------------------
    @property
    def objects(self) -> ObjectTable:
        return self.table

    @property
    def hwpts(self) -> list[Hwpt]:
        return self.table.hwpts

    @property
    def devices(self) -> dict[int, Device]:
        return self.attachments.devices

    @property
    def groups(self) -> Groups:
        return self.attachments.groups

    @property
    def tlb(self) -> TLB:
        return self.translator.tlb

    @property
    def stall_state(self) -> StallState:
        return self.faults.stall_state

    def translates(self, sid: int) -> bool | None:
        """Is ``sid`` attached to a translating domain now (nested S1, or S2 paging)?
        False: identity / bypass; None: not attached or blocked (DMA aborts)."""
        dev = self.devices.get(sid)
        h = None if dev is None else dev.hwpt
        if isinstance(h, HwptNested):
            return True
        if isinstance(h, HwptPaging):
            return h.s2 is not None
        return None

    # -- objects (IOMMU_HWPT_ALLOC / IOMMU_FAULT_QUEUE_ALLOC / IOMMU_DESTROY) -------------------
    def get_object(self, obj_id: int, kind: type | tuple[type, ...] = IommuObject) -> Any:
        return self.table.get(obj_id, kind)

    def alloc_paging(self, s2: Any = None, **kw: Any) -> HwptPaging:
        """A paging domain over the IOAS (see :meth:`ObjectTable.alloc_paging`)."""
        return self.table.alloc_paging(self.ioas, s2, **kw)

    def alloc_nested(self, parent: HwptPaging | int, s1: Any, **kw: Any) -> HwptNested:
        return self.table.alloc_nested(parent, s1, **kw)

    def alloc_fault_queue(self) -> FaultQueue:
        return self.table.alloc_fault_queue()

    def destroy(self, obj_id: int) -> None:
        self.table.destroy(obj_id)

    # -- devices, the host's attach / replace / detach, DMA ownership ------------------------
    def add_device(self, sid: int, **kw: Any) -> Device:
        return self.attachments.add_device(sid, **kw)

    def remove_device(self, sid: int) -> None:
        self.attachments.remove_device(sid)

    def device(self, sid: int) -> Device:
        return self.attachments.device(sid)

    def bound(self, sid: int) -> Device:
        return self.attachments.bound(sid)

    def group_of(self, dev: Device) -> list[Device]:
        return self.attachments.group_of(dev)

    def split_groups(self) -> list[Any]:
        return self.attachments.split_groups()

    def attach(self, sid: int, hwpt_id: int) -> None:
        self.attachments.attach(sid, hwpt_id)

    def replace(self, sid: int, hwpt_id: int) -> None:
        self.attachments.replace(sid, hwpt_id)

    def detach(self, sid: int) -> None:
        self.attachments.detach(sid)

    def claim(self, sid: int, owner: str) -> None:
        self.attachments.claim(sid, owner)

    def release(self, sid: int, owner: str) -> None:
        self.attachments.release(sid, owner)

    # -- command sink -----------------------------------------------------------------------------
    def stream_table_changed(self, sid: int | None = None) -> None:  # CFGI_STE / CFGI_ALL
        self.attachments.stream_table_changed(sid)

    def cd_changed(self, sid: int, ssid: int | None = None) -> None:  # CFGI_CD(_ALL)
        self.attachments.cd_changed(sid, ssid)

    def tlbi_nh_all(self, vmid: int) -> None:
        self.translator.tlbi_nh_all(vmid)

    def tlbi_nh_asid(self, vmid: int, asid: int) -> None:
        self.translator.tlbi_nh_asid(vmid, asid)

    def tlbi_nh_va(self, vmid: int, asid: int | None, addr: int, size: int, leaf: bool,
                   ttl: int) -> None:
        self.translator.tlbi_nh_va(vmid, asid, addr, size, leaf, ttl)

    def tlbi_el2_all(self) -> None:
        self.translator.tlbi_el2_all()

    def tlbi_el2_asid(self, asid: int) -> None:
        self.translator.tlbi_el2_asid(asid)

    def tlbi_el2_va(self, asid: int | None, addr: int, size: int, leaf: bool,
                    ttl: int) -> None:
        self.translator.tlbi_el2_va(asid, addr, size, leaf, ttl)

    def tlbi_s12_vmall(self, vmid: int) -> None:
        self.translator.tlbi_s12_vmall(vmid)

    def tlbi_s2_ipa(self, vmid: int, addr: int, size: int, leaf: bool, ttl: int) -> None:
        self.translator.tlbi_s2_ipa(vmid, addr, size, leaf, ttl)

    def tlbi_nsnh_all(self) -> None:
        self.translator.tlbi_nsnh_all()

    def atc_inv(self, sid: int, ssid: int | None, addr: int, size: int,
                global_: bool) -> bool | None:
        return self.translator.atc_inv(sid, ssid, addr, size, global_)

    def pri_resp(self, sid: int, ssid: int | None, grpid: int, resp: int) -> None:
        self.faults.pri_resp(sid, ssid, grpid, resp)

    def resume(self, sid: int, stag: int, resp: int) -> None:
        self.faults.resume(sid, stag, resp)

    def stall_term(self, sid: int) -> None:
        self.faults.stall_term(sid)

    def flush_all(self) -> None:
        self.translator.flush_all()

    # -- endpoints: translation, DMA, faults ------------------------------------------------------
    def translate_one(self, sid: int, ssid: int | None, iova: int,
                      write: bool = False) -> Translation:
        return self.translator.translate_one(sid, ssid, iova, write)

    def translate(self, sid: int, ssid: int | None, iovas: Any,
                  write: bool = False) -> TranslationResult:
        return self.translator.translate(sid, ssid, iovas, write)

    def probe(self, sid: int, ssid: int | None, iova: int,
              write: bool = False) -> tuple[Translation, int | None]:
        return self.translator.probe(sid, ssid, iova, write)

    def ats_active(self, dev: Device) -> bool:
        return self.translator.ats_active(dev)

    def dma_read(self, sid: int, ssid: int | None, iova: int, n: int) -> bytes:
        return self.dma.read(sid, ssid, iova, n)

    def dma_write(self, sid: int, ssid: int | None, iova: int,
                  data: bytes | bytearray | memoryview) -> None:
        self.dma.write(sid, ssid, iova, data)

    def dma_views(self, sid: int, ssid: int | None, ranges: Any,
                  write: bool) -> list[memoryview]:
        return self.dma.views(sid, ssid, ranges, write)

    def dma_pinned(self, sid: int, ssid: int | None, iova: int, n: int,
                   write: bool) -> PinnedView | None:
        return self.dma.pinned(sid, ssid, iova, n, write)

    def no_snoop(self, sid: int) -> bool:
        return self.attachments.no_snoop(sid)

    def pending_stall(self, sid: int, stag: int) -> PendingFault | None:
        return self.faults.pending_stall(sid, stag)

    def page_request(self, sid: int, ssid: int | None, addr: int, **kw: Any) -> PendingFault:
        """A PCIe Page Request to the guest (its PRI queue)."""
        return self.faults.page_request(sid, ssid, addr, **kw)

    def endpoint_page_request(self, sid: int, ssid: int | None, addr: int, *, write: bool,
                              prg_index: int) -> PendingFault:
        """An endpoint's Page Request after a faulting DMA: the host's or the guest's."""
        return self.faults.endpoint_page_request(sid, ssid, addr, write=write,
                                                 prg_index=prg_index)

    # -- the host's uAPI (QMP viommu-*, after iommufd's ioctls) -----------------------------------
    def _host_ioas(self) -> HostIoas:
        if not isinstance(self.ioas, HostIoas):
            raise DomainError("the IOAS is the guest's RAM as vfio-user mapped it: no host "
                              "stage 2 to map (SMMU option host_s2)", "EOPNOTSUPP")
        return self.ioas

    def ioas_map(self, iova: int, length: int, pa: int | None = None,
                 prot: int = 3) -> None:
        """IOMMU_IOAS_MAP on the host stage 2."""
        self._host_ioas().map(iova, length, pa, prot)

    def ioas_unmap(self, iova: int, length: int) -> int:
        """IOMMU_IOAS_UNMAP on the host stage 2: the bytes unmapped."""
        return self._host_ioas().unmap(iova, length)

    def hwpt_alloc(self, *, parent: int | None = None, flags: Any = (),
                   fault_queue: int | None = None, sid: int | None = None) -> Hwpt:
        """IOMMU_HWPT_ALLOC: a paging domain over the IOAS (``flags`` nest-parent,
        dirty-tracking; cache coherency from device ``sid``, else from the first device
        attached), or with ``parent`` a nested HWPT carrying the guest's current stage 1
        of stream ``sid``.  ``fault_queue``: the HWPT is fault-capable."""
        bad = set(flags) - {"nest-parent", "dirty-tracking"}
        if bad:
            raise DomainError(f"unknown flags {sorted(bad)}")
        fq = None if fault_queue is None else self.table.get(fault_queue, FaultQueue)
        dev = None if sid is None else self.bound(sid)
        if parent is not None:
            if flags:
                raise DomainError("flags are for paging domains, not nested ones")
            if dev is None:
                raise DomainError("a nested HWPT carries the guest's stage 1 of a stream: "
                                  "give sid")
            return self.attachments.nested_for(self.table.get(parent, HwptPaging), dev, fq)
        dirty = "dirty-tracking" in flags
        if dirty and self.httu < HTTU_ACCESS_DIRTY:
            raise DomainError("dirty tracking needs HTTU with dirty state (HD)", "EOPNOTSUPP")
        cc = None if dev is None else self.smmu_enforces_cc and dev.can_enforce_coherency
        return self.alloc_paging(nest_parent="nest-parent" in flags,
                                 enforce_cache_coherency=cc,
                                 fault=False if fq is None else fq, owner="host",
                                 host=self.host_s2, dirty_tracking=dirty)

    def fault_respond(self, queue: int, cookie: int, code: str) -> None:
        """A response written to an iommufd fault queue."""
        self.faults.respond(queue, cookie, code)

    def iova_to_phys(self, hwpt_id: int, iova: int) -> int | None:
        """iommu_iova_to_phys(): paging domains answer (None: not mapped), blocking
        translates nothing, nested domains have no such op (EOPNOTSUPP)."""
        h = self.table.get(hwpt_id, Hwpt)
        if isinstance(h, HwptNested):
            raise DomainError(f"hwpt {h.id} is nested: no iova_to_phys", "EOPNOTSUPP")
        if not isinstance(h, HwptPaging):
            return None
        if h.table is not None:
            self.ioas.sync()  # (follow the client's DMA regions first)
            return h.table.iova_to_phys(iova)
        if h.s2 is None:
            return iova
        t = walk_one(self.memory, None, h.s2, iova, write=False)
        return None if t.fault else t.pa

    def coherency(self) -> dict[str, Any]:
        return self.attachments.coherency()

    # -- display -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out = {**self.counters.as_dict(), "tlb": self.tlb.stats(),
               "caches": self.translator.caches.stats(),
               "stalled": self.stall_state.describe()}
        if self.ats_probes:  # endpoints' ATCs, summed (per device: query-viommu-domains)
            atc: dict[str, int] = {}
            for d in self.devices.values():
                for k, v in d.atc.stats().items():
                    atc[k] = atc.get(k, 0) + v
            out["atc"] = atc
        if self.sanitizer is not None:
            out["sanitizer"] = self.sanitizer.snapshot()
        return out

    def describe(self) -> dict[str, Any]:
        """The object graph (QMP query-viommu-domains)."""
        by_sid = sorted(self.devices.values(), key=lambda d: d.sid)
        return {"host-s2": self.host_s2,
                "objects": [o.summary() for o in self.table],
                "ioas": [self.ioas.describe()],
                "hwpts": [h.describe() for h in sorted(self.hwpts, key=lambda h: h.id)],
                "fault_queues": [fq.describe() for fq in self.table.fault_queues],
                "devices": [d.describe() for d in by_sid],
                "attachments": [{"sid": d.sid, "hwpt": d.hwpt.id} for d in by_sid if d.hwpt],
                "groups": self.groups.describe(), "split_groups": self.split_groups(),
                "counters": self.stats()}


__all__ = ["DomainManager", "DmaFault", "TranslationResult", "ABORT", "ABORT_NAME",
           "fault_name", "BusyError", "GroupError"]
