"""iommufd-like objects with explicit lifetimes: IOAS, HWPTs, devices, fault queues.

Modelled on Linux iommufd (ioas.c, hw_pagetable.c, device.c, fault.c):

- :class:`Ioas` — the guest-physical space, i.e. the DMA regions a vfio-user client mapped
  (``DMA_MAP``/``DMA_UNMAP`` with permissions) on the IOMMU function's :class:`GuestMemory`.
- :class:`HwptPaging` — a paging domain over an IOAS: ``identity`` (IPA == PA) or a guest
  stage-2 table (``s2``, with its VMID).  ``nest_parent`` and ``enforce_cache_coherency``
  are fixed at allocation.
- :class:`HwptNested` — a guest stage-1 (CD table pointer + format) on one NEST_PARENT
  paging parent, fixed at allocation.
- :class:`HwptBlocking` — the domain of aborting streams.
- :class:`Device` — one stream (StreamID) with its SubstreamIDs, in a group.
- :class:`FaultQueue` — page requests (PRI) and stalled transactions waiting for an answer.

Objects hold references the way iommufd does: a device attached to a HWPT holds one, a
nested HWPT holds one on its parent; an object in use cannot be destroyed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from viommu_backend.smmuv3.cd import S1Config
from viommu_backend.smmuv3.ste import ConfigFault, S1Context, S2Config, StreamConfig

from .atc import ATC


class DomainError(Exception):
    """A refused domain operation (the errno iommufd would return is in ``errno``)."""

    def __init__(self, message: str, errno: str = "EINVAL") -> None:
        super().__init__(message)
        self.errno = errno


class BusyError(DomainError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "EBUSY")


class GroupError(DomainError):
    """Streams of one group must share a domain."""


class FaultResponse(enum.IntEnum):
    """Answer to a page request or a stalled transaction (iommufd's page response codes,
    plus FAILURE for PCIe's Response Failure)."""

    SUCCESS = 0
    INVALID = 1
    FAILURE = 2


# -- objects ----------------------------------------------------------------------------------
class IommuObject:
    """Base: an id in the manager's single id space, a kind, a refcount."""

    kind = "object"

    def __init__(self, obj_id: int) -> None:
        self.id = obj_id
        self.refcount = 0
        self.destroyed = False

    def get(self) -> None:
        if self.destroyed:
            raise DomainError(f"{self.kind} {self.id} is destroyed", "ENOENT")
        self.refcount += 1

    def put(self) -> None:
        if self.refcount <= 0:
            raise AssertionError(f"{self.kind} {self.id}: refcount underflow")
        self.refcount -= 1

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "refcount": self.refcount}

    def summary(self) -> dict[str, Any]:
        """One line of the object list: type, parent, refcount, devices, flags, queue."""
        return {"id": self.id, "type": self.kind, "parent": None, "refcount": self.refcount,
                "devices": [], "flags": [], "fault-queue": None}


class Ioas(IommuObject):
    """Guest-physical address space: the DMA regions mapped into the IOMMU function.

    ``memory_provider()`` returns the current :class:`GuestMemory` (None while no client is
    connected).  :meth:`map` / :meth:`unmap` are the DMA_MAP / DMA_UNMAP operations; the
    vfio-user server may also change the GuestMemory directly, the IOAS always reads it."""

    kind = "ioas"

    def __init__(self, obj_id: int, memory_provider: Callable[[], Any]) -> None:
        super().__init__(obj_id)
        self._memory_provider = memory_provider
        self.on_unmap: list[Callable[[int, int], None]] = []

    @property
    def memory(self) -> Any:
        return self._memory_provider()

    @property
    def guest_memory(self) -> Any:
        """The guest's physical address space (STEs live there); the same as ``memory``
        unless a hidden stage 2 sits in between (:class:`~.host.HostIoas`)."""
        return self._memory_provider()

    def map(self, iova: int, size: int, prot: int, fd: int | None = None,
            fd_offset: int = 0) -> None:
        mem = self.memory
        if mem is None:
            raise DomainError("IOAS has no guest memory", "ENODEV")
        mem.add(iova, size, prot, fd=fd, fd_offset=fd_offset)

    def unmap(self, iova: int, size: int) -> int:
        mem = self.memory
        if mem is None:
            return 0
        removed = mem.remove(iova, size)
        for fn in list(self.on_unmap):
            fn(iova, size)
        return len(removed)

    def areas(self) -> list[dict[str, Any]]:
        mem = self.memory
        if mem is None:
            return []
        out = []
        for r in mem.regions:
            out.append({"iova": hex(r.iova), "size": hex(r.size), "prot": int(r.prot),
                        "fd": r.has_fd})
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "areas": self.areas()}


class Hwpt(IommuObject):
    """A hardware page table (domain).  ``auto``: allocated by the manager for a stream
    and destroyed when its last user goes (iommufd's auto domains)."""

    kind = "hwpt"

    def __init__(self, obj_id: int, *, auto: bool = False,
                 fault: "FaultQueue | None" = None, owner: str = "guest") -> None:
        super().__init__(obj_id)
        self.auto = auto
        self.fault = fault
        self.owner = owner  # "guest": made for the guest's STE; "host": the host's own
        self.owns_fault = False  # its fault queue was made for it (freed with it)
        self.devices: set[int] = set()  # SIDs attached

    def flags(self) -> list[str]:
        return ["auto"] if self.auto else []

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "devices": sorted(self.devices), "flags": self.flags(),
                "owner": self.owner, "fault-queue": None if self.fault is None else self.fault.id}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "auto": self.auto, "owner": self.owner,
                "devices": sorted(self.devices), "flags": self.flags(),
                "fault_queue": None if self.fault is None else self.fault.id}


class HwptBlocking(Hwpt):
    kind = "hwpt_blocking"


class HwptPaging(Hwpt):
    """A paging domain over an IOAS: identity (``s2 is None``), a guest stage 2, or
    (``table``) the host's own stage-2 io-pgtable of a hidden stage 2.
    ``enforce_cache_coherency`` None: decided by the first device attached."""

    kind = "hwpt_paging"

    def __init__(self, obj_id: int, ioas: Ioas, s2: S2Config | None, *,
                 nest_parent: bool = False, enforce_cache_coherency: bool | None = False,
                 auto: bool = False, fault: "FaultQueue | None" = None,
                 owner: str = "guest", table: Any = None, dirty_tracking: bool = False
                 ) -> None:
        super().__init__(obj_id, auto=auto, fault=fault, owner=owner)
        self.ioas = ioas
        self.table = table  # domains.host.HostPageTable of a host stage 2
        self.s2 = table.s2config() if table is not None else s2
        self.nest_parent = nest_parent
        self.enforce_cache_coherency = enforce_cache_coherency
        self.dirty_tracking = dirty_tracking
        self.children: set[int] = set()  # nested HWPT ids

    @property
    def identity(self) -> bool:
        return self.s2 is None

    @property
    def vmid(self) -> int:
        return self.s2.vmid if self.s2 is not None else 0

    def compatible(self, dev: "Device") -> bool:
        """iommufd's attach check: a domain enforcing cache coherency only takes devices
        that can have no-snoop blocked."""
        return dev.can_enforce_coherency or not self.enforce_cache_coherency

    def flags(self) -> list[str]:
        return super().flags() + [f for f, on in (
            ("nest-parent", self.nest_parent), ("dirty-tracking", self.dirty_tracking),
            ("enforce-cc", self.enforce_cache_coherency)) if on]

    def describe(self) -> dict[str, Any]:
        d = {**super().describe(), "ioas": self.ioas.id,
             "type": "identity" if self.s2 is None else
             "host-s2" if self.table is not None else "s2",
             "nest_parent": self.nest_parent,
             "enforce_cache_coherency": self.enforce_cache_coherency,
             "children": sorted(self.children)}
        if self.s2 is not None:
            d.update(vmid=self.s2.vmid, s2ttb=hex(self.s2.ttb),
                     granule=self.s2.tg, ia_bits=self.s2.ia_bits)
        return d


class HwptNested(Hwpt):
    """A guest stage-1 (CD table) on a NEST_PARENT :class:`HwptPaging`, fixed at
    allocation.  Decoded CDs are cached per SubstreamID (``None`` = no PASID)."""

    kind = "hwpt_nested"

    def __init__(self, obj_id: int, parent: HwptPaging, s1: S1Context, *, auto: bool = False,
                 fault: "FaultQueue | None" = None, owner: str = "guest") -> None:
        if not parent.nest_parent:
            raise DomainError(f"hwpt {parent.id} is not a NEST_PARENT")
        super().__init__(obj_id, auto=auto, fault=fault, owner=owner)
        self.parent = parent
        self.s1 = s1
        self.cds: dict[int | None, S1Config | None | ConfigFault] = {}

    @property
    def s2(self) -> S2Config | None:
        return self.parent.s2

    @property
    def enforce_cache_coherency(self) -> bool | None:
        return self.parent.enforce_cache_coherency

    def compatible(self, dev: "Device") -> bool:
        return self.parent.compatible(dev)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "parent": self.parent.id}

    @property
    def asids(self) -> list[int]:
        return sorted({c.asid for c in self.cds.values() if isinstance(c, S1Config)})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "parent": self.parent.id,
                "cd_table": hex(self.s1.cd_ptr), "s1fmt": self.s1.fmt,
                "s1cdmax": self.s1.cdmax, "s1dss": self.s1.dss, "asids": self.asids}


AUTO = "auto"  # a device's binding when the host left it to the guest (its default domain)


@dataclass
class Device:
    """One stream behind the SMMU (iommufd_device): its StreamID, the SubstreamIDs seen,
    its group, its capabilities and what it is attached to.

    ``binding`` is the host's choice: :data:`AUTO` (the default domain, made from the
    guest's STE), a :class:`Hwpt` the host attached, or None (detached: DMA blocked).
    ``hwpt`` is the domain its DMA uses now (under a hidden stage 2 a host NEST_PARENT
    binding carries the guest's stage 1 as a nested HWPT)."""

    sid: int
    name: str = ""
    group: int | str | None = None  # None: a group of its own
    can_enforce_coherency: bool = True
    ssids: set[int] = field(default_factory=set)
    hwpt: Hwpt | None = None
    binding: Any = AUTO
    holds: set = field(default_factory=set, repr=False)  # HWPTs it holds a reference on
    iopf: bool = False  # the host turned the endpoint's page requests on (host fault queue)
    ste: StreamConfig | None = None
    config_fault: ConfigFault | None = None  # STE could not be fetched / decoded
    # the endpoint's Address Translation Cache, used while its ATS is enabled and the
    # STE allows ATS (see DomainManager.ats_probes); only CMD_ATC_INV empties it
    atc: ATC = field(default_factory=ATC, repr=False)

    @property
    def group_key(self) -> Any:
        return ("sid", self.sid) if self.group is None else ("group", self.group)

    def describe(self) -> dict[str, Any]:
        return {"sid": self.sid, "name": self.name,
                "group": self.group if self.group is not None else None,
                "can_enforce_coherency": self.can_enforce_coherency,
                "ssids": sorted(self.ssids),
                "hwpt": self.hwpt.id if self.hwpt else None,
                "binding": self.binding if self.binding in (AUTO, None) else self.binding.id,
                "iopf": self.iopf,
                "config": self.ste.config if self.ste else None,
                "config_fault": self.config_fault.event if self.config_fault else None,
                "atc": self.atc.stats()}


# -- faults -----------------------------------------------------------------------------------
@dataclass
class PendingFault:
    """A page request group (``kind == "pri"``, key = PRG index) or a stalled transaction
    (``kind == "stall"``, key = STAG), waiting for the guest's answer."""

    kind: str
    sid: int
    ssid: int | None
    key: int
    addr: int
    write: bool = False
    response: FaultResponse | None = None
    cookie: int = 0  # given by the fault queue that holds it (iommufd's fault cookie)
    queue: int | None = None  # id of that fault queue
    _callbacks: list[Callable[["PendingFault"], None]] = field(default_factory=list, repr=False)

    @property
    def done(self) -> bool:
        return self.response is not None

    def add_done_callback(self, fn: Callable[["PendingFault"], None]) -> None:
        if self.done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def complete(self, response: FaultResponse) -> None:
        if self.done:
            return
        self.response = response
        for fn in self._callbacks:
            fn(self)
        self._callbacks.clear()

    def describe(self) -> dict[str, Any]:
        return {"queue": self.queue, "cookie": self.cookie, "kind": self.kind, "sid": self.sid,
                "ssid": self.ssid, "key": self.key, "addr": hex(self.addr),
                "write": self.write}


class FaultQueue(IommuObject):
    """Pending page requests and stalls of one fault-capable domain (iommufd_fault).
    Each record gets a cookie (the key of its response); ``listeners`` hear of each new
    record (QMP ``VIOMMU_FAULT``)."""

    kind = "fault"

    def __init__(self, obj_id: int) -> None:
        super().__init__(obj_id)
        self.pending: dict[tuple[str, int, int], PendingFault] = {}
        self.responded = {r.name: 0 for r in FaultResponse}
        self.listeners: list[Callable[["FaultQueue", PendingFault], None]] = []
        self._next_cookie = 1

    def __iter__(self) -> Iterator[PendingFault]:
        return iter(list(self.pending.values()))

    def __len__(self) -> int:
        return len(self.pending)

    def __bool__(self) -> bool:  # an empty queue is still a queue (``hwpt.fault or ...``)
        return True

    def add(self, pf: PendingFault) -> PendingFault:
        k = (pf.kind, pf.sid, pf.key)
        if k in self.pending:
            raise DomainError(f"{pf.kind} {pf.key} of sid {pf.sid:#x} already pending", "EEXIST")
        self.pending[k] = pf
        pf.cookie, pf.queue = self._next_cookie, self.id
        self._next_cookie += 1
        for fn in list(self.listeners):
            fn(self, pf)
        return pf

    def respond_cookie(self, cookie: int, response: FaultResponse) -> None:
        """The host's answer to the record ``cookie``; one that is not pending (answered,
        flushed, never given) is refused with EINVAL, as iommufd does."""
        for (kind, sid, key), pf in self.pending.items():
            if pf.cookie == cookie:
                self.respond(kind, sid, key, response)
                return
        raise DomainError(f"fault queue {self.id} has no pending record {cookie}")

    def respond(self, kind: str, sid: int, key: int, response: FaultResponse) -> bool:
        pf = self.pending.pop((kind, sid, key), None)
        if pf is None:
            return False
        self.responded[response.name] += 1
        pf.complete(response)
        return True

    def flush(self, sid: int | None = None, kind: str | None = None,
              response: FaultResponse = FaultResponse.INVALID) -> int:
        """Answer every pending fault (of ``sid`` / ``kind``) with ``response``."""
        n = 0
        for (k, s, key), pf in list(self.pending.items()):
            if (sid is None or s == sid) and (kind is None or k == kind):
                n += self.respond(k, s, key, response)
        return n

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "pending": len(self.pending)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pending": [p.describe() for p in self],
                "responded": dict(self.responded)}
