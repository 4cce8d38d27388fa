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
from viommu_backend.smmuv3.tlb import TLB
from viommu_backend.trace import Tracer

from . import devices, dma, fault, hwpt, invalidation, translation
from .counters import Counters
from .objects import (BusyError, Device, DomainError, FaultQueue, GroupError, Hwpt,
                      HwptBlocking, HwptNested, HwptPaging, IommuObject, Ioas)
from .results import ABORT, ABORT_NAME, DmaFault, TranslationResult, fault_name


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
    """

    def __init__(self, memory_provider: Callable[[], Any], *,
                 stream_table: Callable[[], Any] | None = None,
                 on_event: Callable[[Event], Any] | None = None,
                 on_page_request: Callable[[PageRequest], Any] | None = None,
                 oas: int = 48, ssid_bits: int = 20, stall_model: int = STALL_MODEL_STALL,
                 stall_max: int = 64, httu: int = HTTU_ACCESS_DIRTY,
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

    @property
    def stalls(self) -> bool:
        """Can transactions stall (IDR0.STALL_MODEL is not terminate-only)?"""
        return self.stall_model != STALL_MODEL_TERMINATE

    @property
    def memory(self) -> Any:
        return self.ioas.memory

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

    def get_object(self, obj_id: int) -> IommuObject:
        obj = self.objects.get(obj_id)
        if obj is None:
            raise DomainError(f"no object {obj_id}", "ENOENT")
        return obj

    @property
    def hwpts(self) -> list[Hwpt]:
        return [o for o in self.objects.values() if isinstance(o, Hwpt)]

    # -- explicit allocation (IOMMU_HWPT_ALLOC), IOMMU_DESTROY: hwpt.py ------------------------
    alloc_paging = hwpt.alloc_paging
    alloc_nested = hwpt.alloc_nested
    destroy = hwpt.destroy

    # -- devices, attach / replace / detach, STE-driven configuration: devices.py --------------
    add_device = devices.add_device
    remove_device = devices.remove_device
    device = devices.device
    group_of = devices.group_of
    attach = devices.attach
    replace = devices.replace
    detach = devices.detach
    split_groups = devices.split_groups
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
        return {"ioas": ioas, "hwpts": hwpts, "fault_queues": faults, "devices": devices,
                "attachments": attachments, "split_groups": self.split_groups(),
                "counters": self.stats()}


__all__ = ["DomainManager", "DmaFault", "TranslationResult", "ABORT", "ABORT_NAME",
           "fault_name", "BusyError", "GroupError"]
