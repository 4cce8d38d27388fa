"""Command sink, invalidation: CMD_TLBI_* onto the TLB (tagged by domain id, VMID and
ASID), CMD_ATC_INV, and flushing every cached translation, CD and translation context
(an IOAS unmap).  Functions of the :class:`~.manager.DomainManager` (bound there as its
methods)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from viommu_backend.smmuv3.tlb import EL2_VMID

from .objects import HwptNested

if TYPE_CHECKING:
    from .manager import DomainManager


def flush_all(mgr: DomainManager) -> None:
    mgr.tlb.inv_all()
    for h in mgr.hwpts:
        if isinstance(h, HwptNested):
            h.cds.clear()
    for d in mgr.devices.values():
        d.ctx_cache.clear()
        d.atc.clear()  # (the host's memory map changed: no translation kept anywhere)


def tlbi_nh_all(mgr: DomainManager, vmid: int) -> None:
    mgr.tlb.inv_nh_all(vmid)


def tlbi_nh_asid(mgr: DomainManager, vmid: int, asid: int) -> None:
    mgr.tlb.inv_asid(asid, vmid)


def tlbi_nh_va(mgr: DomainManager, vmid: int, asid: int | None, addr: int, size: int,
               leaf: bool, ttl: int) -> None:
    mgr.tlb.inv_va(addr, max(size, 1), vmid=vmid, asid=asid, leaf=leaf)


def tlbi_el2_all(mgr: DomainManager) -> None:
    mgr.tlb.inv_el2_all()


def tlbi_el2_asid(mgr: DomainManager, asid: int) -> None:
    mgr.tlb.inv_el2_asid(asid)


def tlbi_el2_va(mgr: DomainManager, asid: int | None, addr: int, size: int, leaf: bool,
                ttl: int) -> None:
    mgr.tlb.inv_va(addr, max(size, 1), vmid=EL2_VMID, asid=asid, leaf=leaf)


def tlbi_s12_vmall(mgr: DomainManager, vmid: int) -> None:
    mgr.tlb.inv_vmid(vmid)


def tlbi_s2_ipa(mgr: DomainManager, vmid: int, addr: int, size: int, leaf: bool,
                ttl: int) -> None:
    mgr.tlb.inv_ipa(addr, max(size, 1), vmid=vmid, leaf=leaf)


def tlbi_nsnh_all(mgr: DomainManager) -> None:
    mgr.tlb.inv_nsnh_all()


def atc_inv(mgr: DomainManager, sid: int, ssid: int | None, addr: int, size: int,
            global_: bool) -> bool | None:
    """CMD_ATC_INV: the endpoint of ``sid`` drops the range from its ATC (and answers at
    once: the invalidation always completes)."""
    dev = mgr.devices.get(sid)
    if dev is not None:
        if mgr.injector is not None and mgr.injector.ignores_atc_inv(sid):
            return True  # fault injection: the endpoint keeps its stale entries
        dev.atc.invalidate(ssid, addr, size, global_)
    return True
