"""The object table, as iommufd's (one id space, hw_pagetable.c's allocation): objects by
id with typed lookup, IOMMU_HWPT_ALLOC of paging and nested domains (each with its fault
queue), IOMMU_FAULT_QUEUE_ALLOC, IOMMU_DESTROY refused while an object is referenced, and
automatic domains released once nothing uses them.  Destroying an object drops the
references it holds, by its type."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from viommu_backend.smmuv3.ste import S2Config

from .objects import (BusyError, DomainError, FaultQueue, FaultResponse, Hwpt, HwptNested,
                      HwptPaging, IommuObject, Ioas)

class ObjectTable:
    """Objects by id.  ``pinned`` objects belong to the manager (never destroyed);
    ``on_new_queue(fq)`` hears of each fault queue, ``on_free(obj)`` of each object freed
    (cached translations of a HWPT go with it)."""

    def __init__(self) -> None:
        self._objects: dict[int, IommuObject] = {}
        self._next_id = 1
        self.pinned: set[int] = set()
        self.on_new_queue: list[Callable[[FaultQueue], None]] = []
        self.on_free: list[Callable[[IommuObject], None]] = []

    # -- ids and lookup --------------------------------------------------------------------
    def add(self, obj: Any) -> Any:
        self._objects[obj.id] = obj
        return obj

    def new_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def pin(self, obj: Any) -> Any:
        """An object the manager holds for its lifetime."""
        self.add(obj)
        obj.get()
        self.pinned.add(obj.id)
        return obj

    def get(self, obj_id: int, kind: type | tuple[type, ...] = IommuObject) -> Any:
        """The object ``obj_id`` (ENOENT), of type ``kind`` (EINVAL otherwise)."""
        obj = self._objects.get(obj_id)
        if obj is None:
            raise DomainError(f"no object {obj_id}", "ENOENT")
        if not isinstance(obj, kind):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            raise DomainError(f"object {obj_id} is a {obj.kind}, not a "
                              f"{' or '.join(k.kind for k in kinds)}")
        return obj

    def __contains__(self, obj_id: int) -> bool:
        return obj_id in self._objects

    def __iter__(self) -> Iterator[IommuObject]:
        return iter(sorted(self._objects.values(), key=lambda o: o.id))

    @property
    def hwpts(self) -> list[Hwpt]:
        return [o for o in self._objects.values() if isinstance(o, Hwpt)]

    @property
    def fault_queues(self) -> list[FaultQueue]:
        return [o for o in self._objects.values() if isinstance(o, FaultQueue)]

    # -- allocation ------------------------------------------------------------------------
    def alloc_fault_queue(self) -> FaultQueue:
        fq = self.add(FaultQueue(self.new_id()))
        for fn in self.on_new_queue:
            fn(fq)
        return fq

    def _fault_queue(self, fault: bool | FaultQueue | None) -> FaultQueue | None:
        """A HWPT's fault queue: a new one of its own (``True``), a given one (shared),
        or none.  The HWPT holds a reference on it."""
        if fault is None or fault is False:
            return None
        fq = self.alloc_fault_queue() if fault is True else fault
        fq.get()
        return fq

    def alloc_paging(self, ioas: Ioas, s2: S2Config | None = None, *,
                     nest_parent: bool = False, enforce_cache_coherency: bool | None = False,
                     fault: bool | FaultQueue | None = None, auto: bool = False,
                     owner: str = "guest", host: bool = False, dirty_tracking: bool = False
                     ) -> HwptPaging:
        """A paging domain over ``ioas``: identity (``s2=None``), a guest stage 2, or
        (``host``) a host stage-2 io-pgtable filled from the IOAS (hidden stage 2 only).
        Guest stage-2 domains get a fault queue of their own unless ``fault=False``."""
        table = None
        if host:
            new_table = getattr(ioas, "new_table", None)
            if new_table is None:
                raise DomainError("no host stage 2 (SMMU option host_s2)", "EOPNOTSUPP")
            table = new_table(dirty_tracking=dirty_tracking)
        own = fault is True or (fault is None and s2 is not None)
        fq = self._fault_queue(True if own else fault)
        h = self.add(HwptPaging(self.new_id(), ioas, s2, nest_parent=nest_parent,
                                enforce_cache_coherency=enforce_cache_coherency, auto=auto,
                                fault=fq, owner=owner, table=table,
                                dirty_tracking=dirty_tracking))
        h.owns_fault = own
        ioas.get()
        return h

    def alloc_nested(self, parent: HwptPaging | int, s1: Any, *,
                     fault: bool | FaultQueue | None = True, auto: bool = False,
                     owner: str = "guest") -> HwptNested:
        """A guest stage-1 (``S1Context``: CD table) on a NEST_PARENT paging domain."""
        p = self.get(parent, HwptPaging) if isinstance(parent, int) else parent
        if not isinstance(p, HwptPaging):
            raise DomainError(f"object {p.id} is not a paging domain")
        if not p.nest_parent:
            raise DomainError(f"hwpt {p.id} is not a NEST_PARENT")
        fq = self._fault_queue(fault)
        h = self.add(HwptNested(self.new_id(), p, s1, auto=auto, fault=fq, owner=owner))
        h.owns_fault = fault is True
        p.get()
        p.children.add(h.id)
        return h

    # -- destruction -----------------------------------------------------------------------
    def destroy(self, obj_id: int) -> None:
        """IOMMU_DESTROY: refused (EBUSY) while the object is in use."""
        obj = self.get(obj_id)
        if obj_id in self.pinned:
            raise BusyError(f"{obj.kind} {obj_id} belongs to the manager")
        if obj.refcount > 0:
            raise BusyError(f"{obj.kind} {obj_id} is in use (refcount {obj.refcount})")
        self._free(obj)

    def release(self, h: Hwpt) -> None:
        """Destroy an automatic domain once nothing uses it."""
        if h.auto and h.refcount == 0 and not h.destroyed:
            self._free(h)

    def _free(self, obj: IommuObject) -> None:
        obj.destroyed = True
        self._objects.pop(obj.id, None)
        for fn in self.on_free:
            fn(obj)
        for kind, teardown in _TEARDOWN:
            if isinstance(obj, kind):
                teardown(self, obj)

    def _free_queue(self, fq: FaultQueue) -> None:
        fq.flush(response=FaultResponse.INVALID)

    def _free_hwpt(self, h: Hwpt) -> None:
        if h.fault is not None:
            h.fault.put()
            if h.owns_fault:
                self._free(h.fault)

    def _free_paging(self, h: HwptPaging) -> None:
        if h.table is not None:
            h.ioas.free_table(h.table)  # type: ignore[attr-defined]
        h.ioas.put()

    def _free_nested(self, h: HwptNested) -> None:
        h.parent.children.discard(h.id)
        h.parent.put()
        self.release(h.parent)


# what freeing an object of each type lets go of (in this order)
_TEARDOWN: tuple[tuple[type, Callable[[ObjectTable, Any], None]], ...] = (
    (FaultQueue, ObjectTable._free_queue),
    (Hwpt, ObjectTable._free_hwpt),
    (HwptPaging, ObjectTable._free_paging),
    (HwptNested, ObjectTable._free_nested),
)
