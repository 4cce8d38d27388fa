"""HWPT lifecycle, as iommufd's hw_pagetable.c: IOMMU_HWPT_ALLOC of paging and nested
domains (each with its fault queue), IOMMU_DESTROY, and the release of automatic domains
once nothing uses them.  Functions of the :class:`~.manager.DomainManager` (bound there as
its methods), working on its object table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from viommu_backend.smmuv3.ste import S2Config

from .objects import (BusyError, DomainError, FaultQueue, FaultResponse, Hwpt, HwptNested,
                      HwptPaging, IommuObject)

if TYPE_CHECKING:
    from .manager import DomainManager

def _fault_queue(mgr: DomainManager, fault: bool | FaultQueue | None) -> FaultQueue | None:
    """A HWPT's fault queue: a new one of its own (``True``), a given one (shared), or
    none.  The HWPT holds a reference on it."""
    if fault is None or fault is False:
        return None
    fq = mgr.alloc_fault_queue() if fault is True else fault
    fq.get()
    return fq


def alloc_paging(mgr: DomainManager, s2: S2Config | None = None, *, nest_parent: bool = False,
                 enforce_cache_coherency: bool | None = False,
                 fault: bool | FaultQueue | None = None, auto: bool = False,
                 owner: str = "guest", host: bool = False, dirty_tracking: bool = False
                 ) -> HwptPaging:
    """A paging domain over the IOAS: identity (``s2=None``), a guest stage 2, or
    (``host``) a host stage-2 io-pgtable filled from the IOAS (hidden stage 2 only).
    Guest stage-2 domains get a fault queue of their own unless ``fault=False``."""
    table = None
    if host:
        new_table = getattr(mgr.ioas, "new_table", None)
        if new_table is None:
            raise DomainError("no host stage 2 (SMMU option host_s2)", "EOPNOTSUPP")
        table = new_table(dirty_tracking=dirty_tracking)
    fq = _fault_queue(mgr, fault if fault is not None else s2 is not None)
    h = mgr._add(HwptPaging(mgr._alloc_id(), mgr.ioas, s2, nest_parent=nest_parent,
                            enforce_cache_coherency=enforce_cache_coherency, auto=auto,
                            fault=fq, owner=owner, table=table,
                            dirty_tracking=dirty_tracking))
    h.owns_fault = fault is True or (fault is None and s2 is not None)
    mgr.ioas.get()
    return h


def alloc_nested(mgr: DomainManager, parent: HwptPaging | int, s1: Any, *,
                 fault: bool | FaultQueue | None = True, auto: bool = False,
                 owner: str = "guest") -> HwptNested:
    """A guest stage-1 (``S1Context``: CD table) on a NEST_PARENT paging domain."""
    p = mgr.get_object(parent) if isinstance(parent, int) else parent
    if not isinstance(p, HwptPaging):
        raise DomainError(f"object {p.id} is not a paging domain")
    if not p.nest_parent:
        raise DomainError(f"hwpt {p.id} is not a NEST_PARENT")
    fq = _fault_queue(mgr, fault)
    h = HwptNested(mgr._alloc_id(), p, s1, auto=auto, fault=fq, owner=owner)
    h.owns_fault = fault is True
    mgr._add(h)
    p.get()
    p.children.add(h.id)
    return h


def destroy(mgr: DomainManager, obj_id: int) -> None:
    """IOMMU_DESTROY: refused (EBUSY) while the object is in use."""
    obj = mgr.get_object(obj_id)
    if obj is mgr.ioas or obj is mgr.blocking:
        raise BusyError(f"{obj.kind} {obj_id} belongs to the manager")
    if obj.refcount > 0:
        raise BusyError(f"{obj.kind} {obj_id} is in use (refcount {obj.refcount})")
    free(mgr, obj)


def free(mgr: DomainManager, obj: IommuObject) -> None:
    obj.destroyed = True
    mgr.objects.pop(obj.id, None)
    if isinstance(obj, FaultQueue):
        obj.flush(response=FaultResponse.INVALID)
    if isinstance(obj, Hwpt):
        mgr.tlb.inv_tag(obj.id)
        if obj.fault is not None:
            obj.fault.put()
            if obj.owns_fault:
                free(mgr, obj.fault)
    if isinstance(obj, HwptPaging):
        if obj.table is not None:
            mgr.ioas.free_table(obj.table)
        obj.ioas.put()
    if isinstance(obj, HwptNested):
        obj.parent.children.discard(obj.id)
        obj.parent.put()
        release(mgr, obj.parent)


def release(mgr: DomainManager, h: Hwpt) -> None:
    """Destroy an automatic domain once nothing uses it."""
    if h.auto and h.refcount == 0 and not h.destroyed:
        free(mgr, h)
