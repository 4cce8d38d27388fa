"""The host-side domain manager: streams -> domains -> translations -> guest RAM.

:class:`DomainManager` owns the iommufd-like object graph of :mod:`.objects`.  The SMMU
model drives it as its command sink (``stream_table_changed`` on CFGI_STE/ALL and on
SMMUEN changes, ``cd_changed`` on CFGI_CD, ``tlbi_*``, ``pri_resp``, ``resume``,
``stall_term``: see :class:`viommu_backend.smmuv3.cmdq.CommandSink`); endpoints call
``translate`` / ``translate_one`` / ``dma_read`` / ``dma_write`` / ``dma_views`` /
``page_request``.

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

Where the code lives (as iommufd's split): the object table, wiring and display here;
:mod:`.hwpt` HWPT allocation / destruction; :mod:`.devices` devices, attach / replace /
detach and group rules, STEs binding streams to HWPTs; :mod:`.translation` contexts,
``translate`` / ``translate_one`` / ``probe``, injected faults; :mod:`.fault` event
records, stalls, PRI and their responses; :mod:`.dma` endpoint DMA; :mod:`.invalidation`
TLBI / ATC_INV.  Those modules are plain functions of the manager; the public ones are
bound below as its methods (no extra call on the hot paths).
"""

from __future__ import annotations

from typing import Any, Callable

from viommu_backend.smmuv3.config import (HTTU_ACCESS_DIRTY, STALL_MODEL_STALL,
                                          STALL_MODEL_TERMINATE)
from viommu_backend.smmuv3.events import Event, PageRequest
from viommu_backend.smmuv3.ste import ConfigFault
from viommu_backend.smmuv3.tlb import TLB
from viommu_backend.smmuv3.walker import walk_one
from viommu_backend.trace import Tracer

from . import devices, dma, fault, hwpt, invalidation, translation
from .counters import Counters
from .groups import Groups
from .host import HostIoas
from .objects import (BusyError, Device, DomainError, FaultQueue, FaultResponse, GroupError,
                      Hwpt, HwptBlocking, HwptNested, HwptPaging, IommuObject, Ioas,
                      PendingFault)
from .results import ABORT, ABORT_NAME, DmaFault, TranslationResult, fault_name
from .router import FaultRouter


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
        self._next_id = 1
        self.objects: dict[int, IommuObject] = {}
        self.host_s2 = host_s2
        self.router = FaultRouter(self)
        self.groups = Groups()
        self.smmu_enforces_cc = True  # COHACC / S2FWB of the SMMU (attach_smmu)
        # sid -> hook(on) turning the endpoint's page requests on / off (host IOPF)
        self.iopf_hooks: dict[int, Callable[[bool], None]] = {}
        ioas_id = self._alloc_id()
        self.ioas = self._add(HostIoas(ioas_id, memory_provider, host_layout) if host_s2
                              else Ioas(ioas_id, memory_provider))
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
        self.stall_model = stall_model
        self.stall_max = stall_max
        self.httu = httu
        self.evtq_writable: Callable[[], bool] = lambda: True
        self.stall_state = fault.StallState()
        self.tlb = tlb or TLB()
        self.counters = Counters()
        self.injector: Any = None  # viommu_backend.faults.FaultInjector: checked before the TLB
        # sid -> "is the endpoint's ATS enabled now" (its PCI ATS capability), for the
        # endpoints that have one; with STE.EATS != 0 their DMA goes through Device.atc
        self.ats_probes: dict[int, Callable[[], bool]] = {}
        self.trace: Tracer = Tracer()  # "domain" / "fault" records; shared with the SMMU's

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
        smmu.on_evtq_available.append(self.evtq_available)
        cfg = smmu.config
        self.oas = cfg.oas_bits
        self.ssid_bits = cfg.ssidsize
        self.stall_model = cfg.stall_model
        self.stall_max = cfg.stall_max
        self.httu = cfg.httu
        self.smmu_enforces_cc = cfg.cohacc or cfg.fwb

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

    def ats_active(self, dev: Device) -> bool:
        """Does ``dev``'s DMA use its ATC now (ATS enabled and allowed by the STE)?  When
        the endpoint's ATS is off, whatever its ATC held is dropped (as a disable or a
        function reset does)."""
        probe = self.ats_probes.get(dev.sid)
        if probe is None:
            return False
        if probe():
            return dev.ste is not None and dev.ste.eats != 0
        if len(dev.atc):
            dev.atc.clear()
        return False

    # -- object ids ----------------------------------------------------------------------------
    def _alloc_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def _add(self, obj: Any) -> Any:
        self.objects[obj.id] = obj
        return obj

    def get_object(self, obj_id: int, kind: type | tuple[type, ...] = IommuObject) -> Any:
        """The object ``obj_id`` (ENOENT), of type ``kind`` (EINVAL otherwise)."""
        obj = self.objects.get(obj_id)
        if obj is None:
            raise DomainError(f"no object {obj_id}", "ENOENT")
        if not isinstance(obj, kind):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            raise DomainError(f"object {obj_id} is a {obj.kind}, not a "
                              f"{' or '.join(k.kind for k in kinds)}")
        return obj

    @property
    def hwpts(self) -> list[Hwpt]:
        return [o for o in self.objects.values() if isinstance(o, Hwpt)]

    def alloc_fault_queue(self) -> FaultQueue:
        """IOMMU_FAULT_QUEUE_ALLOC: an empty fault queue (its records are announced to
        the router's listeners)."""
        return self._add(self.router.new_queue(FaultQueue(self._alloc_id())))

    # -- explicit allocation (IOMMU_HWPT_ALLOC), IOMMU_DESTROY: hwpt.py ------------------------
    alloc_paging = hwpt.alloc_paging
    alloc_nested = hwpt.alloc_nested
    destroy = hwpt.destroy

    # -- devices, attach / replace / detach, STE-driven configuration: devices.py --------------
    add_device = devices.add_device
    remove_device = devices.remove_device
    device = devices.device
    bound = devices.bound
    group_of = devices.group_of
    attach = devices.attach
    replace = devices.replace
    detach = devices.detach
    split_groups = devices.split_groups
    claim = devices.claim  # viommu-group-claim
    release = devices.release  # viommu-group-release
    stream_table_changed = devices.stream_table_changed  # command sink: CFGI_STE / CFGI_ALL
    cd_changed = devices.cd_changed  # command sink: CFGI_CD / CFGI_CD_ALL

    # -- translation: translation.py -----------------------------------------------------------
    translate_one = translation.translate_one
    translate = translation.translate
    probe = translation.probe

    # -- faults, stalls, PRI: fault.py ---------------------------------------------------------
    pending_stall = fault.pending_stall
    page_request = fault.page_request
    pri_resp = fault.pri_resp  # command sink: CMD_PRI_RESP
    resume = fault.resume  # command sink: CMD_RESUME
    stall_term = fault.stall_term  # command sink: CMD_STALL_TERM
    evtq_available = fault.retry_held  # the SMMU's event queue is writable again

    # -- command sink, invalidation: invalidation.py -------------------------------------------
    flush_all = invalidation.flush_all
    tlbi_nh_all = invalidation.tlbi_nh_all
    tlbi_nh_asid = invalidation.tlbi_nh_asid
    tlbi_nh_va = invalidation.tlbi_nh_va
    tlbi_el2_all = invalidation.tlbi_el2_all
    tlbi_el2_asid = invalidation.tlbi_el2_asid
    tlbi_el2_va = invalidation.tlbi_el2_va
    tlbi_s12_vmall = invalidation.tlbi_s12_vmall
    tlbi_s2_ipa = invalidation.tlbi_s2_ipa
    tlbi_nsnh_all = invalidation.tlbi_nsnh_all
    atc_inv = invalidation.atc_inv

    # -- endpoint DMA: dma.py ------------------------------------------------------------------
    dma_read = dma.dma_read
    dma_write = dma.dma_write
    dma_views = dma.dma_views

    # -- the host's uAPI (QMP viommu-*, after iommufd's ioctls) ----------------------------------
    def ioas_map(self, iova: int, length: int, pa: int | None = None,
                 prot: int = 3) -> None:
        """IOMMU_IOAS_MAP on the host stage 2."""
        self._host_ioas().map(iova, length, pa, prot)

    def ioas_unmap(self, iova: int, length: int) -> int:
        """IOMMU_IOAS_UNMAP on the host stage 2: the bytes unmapped."""
        return self._host_ioas().unmap(iova, length)

    def _host_ioas(self) -> HostIoas:
        if not isinstance(self.ioas, HostIoas):
            raise DomainError("the IOAS is the guest's RAM as vfio-user mapped it: no host "
                              "stage 2 to map (SMMU option host_s2)", "EOPNOTSUPP")
        return self.ioas

    def hwpt_alloc(self, *, parent: int | None = None, flags: Any = (),
                   fault_queue: int | None = None, sid: int | None = None) -> Hwpt:
        """IOMMU_HWPT_ALLOC: a paging domain over the IOAS (``flags`` nest-parent,
        dirty-tracking; cache coherency from device ``sid``, else from the first device
        attached), or with ``parent`` a nested HWPT carrying the guest's current stage 1
        of stream ``sid``.  ``fault_queue``: the HWPT is fault-capable."""
        bad = set(flags) - {"nest-parent", "dirty-tracking"}
        if bad:
            raise DomainError(f"unknown flags {sorted(bad)}")
        fq = None if fault_queue is None else self.get_object(fault_queue, FaultQueue)
        dev = None if sid is None else self.bound(sid)
        if parent is not None:
            if flags:
                raise DomainError("flags are for paging domains, not nested ones")
            return self._alloc_nested_for(self.get_object(parent, HwptPaging), dev, fq)
        dirty = "dirty-tracking" in flags
        if dirty and self.httu < HTTU_ACCESS_DIRTY:
            raise DomainError("dirty tracking needs HTTU with dirty state (HD)", "EOPNOTSUPP")
        cc = None if dev is None else self.smmu_enforces_cc and dev.can_enforce_coherency
        return self.alloc_paging(nest_parent="nest-parent" in flags,
                                 enforce_cache_coherency=cc, fault=False if fq is None else fq, owner="host",
                                 host=self.host_s2, dirty_tracking=dirty)

    def _alloc_nested_for(self, p: HwptPaging, dev: Device | None,
                          fq: FaultQueue | None) -> HwptNested:
        if dev is None:
            raise DomainError("a nested HWPT carries the guest's stage 1 of a stream: "
                              "give sid")
        sc = devices.read_stream_config(self, dev.sid)
        if isinstance(sc, ConfigFault) or sc.s1 is None:
            raise DomainError(f"the STE of sid {dev.sid:#x} has no stage 1")
        if sc.s2 is not None and sc.s2 != p.s2:
            raise DomainError(f"the stage 1 of sid {dev.sid:#x} sits on the guest's stage "
                              f"2: never combined with hwpt {p.id}'s")
        if not p.compatible(dev):
            raise DomainError(f"sid {dev.sid:#x} cannot enforce cache coherency "
                              f"required by hwpt {p.id}")
        return self.alloc_nested(p, sc.s1, fault=False if fq is None else fq, owner="host")

    def fault_respond(self, queue: int, cookie: int, code: str) -> None:
        """A response written to an iommufd fault queue."""
        fq = self.get_object(queue, FaultQueue)
        try:
            response = FaultResponse[code.upper()]
        except KeyError:
            raise DomainError(f"code {code!r}: success, invalid or failure") from None
        fq.respond_cookie(cookie, response)

    def iova_to_phys(self, hwpt_id: int, iova: int) -> int | None:
        """iommu_iova_to_phys(): paging domains answer (None: not mapped), blocking
        translates nothing, nested domains have no such op (EOPNOTSUPP)."""
        h = self.get_object(hwpt_id, Hwpt)
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

    def endpoint_page_request(self, sid: int, ssid: int | None, addr: int, *, write: bool,
                              prg_index: int) -> PendingFault:
        """An endpoint's PCIe Page Request after a faulting DMA (see FaultRouter)."""
        return self.router.page_request(sid, ssid, addr, write=write, prg_index=prg_index)

    def no_snoop(self, sid: int) -> bool:
        """A DMA of ``sid`` carrying No Snoop: kept (True), or performed snooped because
        its domain enforces cache coherency (False).  Counted either way."""
        if self._enforcing(self.device(sid)):
            self.counters.snoop_forced += 1
            return False
        self.counters.no_snoop += 1
        return True

    @staticmethod
    def _enforcing(dev: Device) -> bool | None:
        h = dev.hwpt
        paging = h.parent if isinstance(h, HwptNested) else h
        return paging.enforce_cache_coherency if isinstance(paging, HwptPaging) else None

    def coherency(self) -> dict[str, Any]:
        """KVM's question (kvm_arch_has_noncoherent_dma): can any device here DMA
        without snooping, i.e. does any DMA-capable domain not enforce coherency?"""
        devs = []
        for d in sorted(self.devices.values(), key=lambda d: d.sid):
            devs.append({"sid": d.sid, "name": d.name, "can-enforce": d.can_enforce_coherency,
                         "hwpt": d.hwpt.id if d.hwpt else None,
                         "enforced": self._enforcing(d)})
        return {"smmu-can-enforce": self.smmu_enforces_cc,
                "noncoherent-dma": any(d["enforced"] is False for d in devs),
                "devices": devs, "no-snoop": self.counters.no_snoop,
                "snoop-forced": self.counters.snoop_forced}

    # -- display -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out = {**self.counters.as_dict(), "tlb": self.tlb.stats(),
               "stalled": self.stall_state.describe()}
        if self.ats_probes:  # endpoints' ATCs, summed (per device: query-viommu-domains)
            atc: dict[str, int] = {}
            for d in self.devices.values():
                for k, v in d.atc.stats().items():
                    atc[k] = atc.get(k, 0) + v
            out["atc"] = atc
        return out

    def describe(self) -> dict[str, Any]:
        """The object graph (QMP query-viommu-domains)."""
        ioas = [self.ioas.describe()]
        hwpts = [h.describe() for h in sorted(self.hwpts, key=lambda h: h.id)]
        faults = [o.describe() for o in self.objects.values() if isinstance(o, FaultQueue)]
        devices = [d.describe() for d in sorted(self.devices.values(), key=lambda d: d.sid)]
        attachments = [{"sid": d.sid, "hwpt": d.hwpt.id} for d in
                       sorted(self.devices.values(), key=lambda d: d.sid) if d.hwpt]
        objects = [o.summary() for _, o in sorted(self.objects.items())]
        return {"host-s2": self.host_s2, "objects": objects, "ioas": ioas, "hwpts": hwpts,
                "fault_queues": faults, "devices": devices, "attachments": attachments,
                "groups": self.groups.describe(), "split_groups": self.split_groups(),
                "counters": self.stats()}


__all__ = ["DomainManager", "DmaFault", "TranslationResult", "ABORT", "ABORT_NAME",
           "fault_name", "BusyError", "GroupError"]
