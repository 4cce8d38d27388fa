"""DMA ports: how an endpoint model reaches guest memory.

An endpoint never touches :class:`~viommu_backend.memory.GuestMemory` directly; it holds a
:class:`DmaPort` and issues ``read``/``write`` on bus addresses.  Two implementations:

- :class:`DirectDma` -- bus address = guest-physical address (no IOMMU in the path), via
  ``PciFunction.dma_read/dma_write`` (refused while Bus Master is off).
- :class:`TranslatedDma` -- bus address = IOVA of the endpoint's StreamID (and optional
  SubstreamID/PASID), translated by the host-side domain manager (``mgr.dma_read`` /
  ``mgr.dma_write``), which walks the SMMU tables in batches for the whole range and
  raises when translation fails.

Every failure becomes a :class:`DmaFault`; when it came from translation, ``event`` is the
SMMUv3 event name (``F_TRANSLATION``, ``F_PERMISSION``, ``C_BAD_STE``, ...).

For bulk data both also implement :class:`DmaViews`: ``views(ranges, write=...)`` checks
and translates a whole list of ranges at once (all-or-nothing) and returns zero-copy
memoryviews of the guest RAM behind them, so a device can move data between a file and
guest memory with one ``os.preadv`` / ``os.pwritev`` and no intermediate copy.

Memory a device touches on every request (a virtqueue's rings) is best reached through a
:class:`DmaWindow`: while the port can vouch that the range still translates to the same
guest RAM (:meth:`TranslatedDma.pinned`: nothing invalidated, evicted or remapped it,
and nothing -- sanitizer, xlat trace, fault injection, ATS -- watches single
translations) an access is a struct pack/unpack on a host view; otherwise it is the
ordinary ``read`` / ``write``, with the same translation, events and faults as without
the window.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

from viommu_backend.memory import GuestMemoryError
from viommu_backend.pci.function import DmaError
from viommu_backend.smmuv3.fields import EventId

if TYPE_CHECKING:  # pragma: no cover
    from viommu_backend.pci.function import PciFunction

ABORT_CODE = 0xFF  # terminated without an event (STE abort, GBPA.ABORT): no EventId
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class DmaFault(Exception):
    """A DMA that could not be performed.

    ``reason``: ``"no_bus_master"`` (Bus Master Enable off or no client), ``"bad_address"``
    (the physical address is not guest RAM; behind the IOMMU ``event`` is then
    ``"BUS_ERROR"``) or ``"translation"`` (the IOMMU refused it; ``event`` names the SMMUv3
    event, or ``"ABORT"`` for a transaction terminated without an event).

    ``pending``: the transaction stalled at the SMMU instead (CD.S / STE.S2S) and waits for
    an answer (a :class:`~viommu_backend.domains.PendingFault`: ``response`` SUCCESS means
    retry, anything else terminated); None when it was terminated at once."""

    def __init__(self, reason: str, addr: int, size: int, *, write: bool = False,
                 event: str | None = None, ssid: int | None = None, detail: str = "",
                 pending: Any = None, iova: int | None = None) -> None:
        what = f"DMA {'write' if write else 'read'} {addr:#x}+{size:#x}"
        if ssid is not None:
            what += f" ssid {ssid:#x}"
        text = f"{what}: {event or reason}"
        super().__init__(f"{text} ({detail})" if detail else text)
        self.reason = reason
        self.addr = addr
        self.size = size
        self.write = write
        self.event = event
        self.ssid = ssid
        self.pending = pending
        self.iova = addr if iova is None else iova  # the address that faulted

    @property
    def event_code(self) -> int:
        """SMMUv3 event record type code of ``event``; ``ABORT_CODE`` for ABORT, 0 when
        not a translation fault or the name is unknown."""
        if self.event is None:
            return 0
        if self.event == "ABORT":
            return ABORT_CODE
        try:
            return int(EventId[self.event])
        except KeyError:
            return 0


@runtime_checkable
class DmaPort(Protocol):
    """Bus-master access of one endpoint.  Addresses are what the device was programmed
    with (IOVA behind an IOMMU); ``ssid`` selects a SubstreamID/PASID (None = none)."""

    def read(self, addr: int, n: int, *, ssid: int | None = None) -> bytes: ...

    def write(self, addr: int, data: bytes | bytearray | memoryview, *,
              ssid: int | None = None) -> None: ...


@runtime_checkable
class DmaViews(Protocol):
    """Optional capability of a :class:`DmaPort`: guest RAM behind bus-address ranges as
    memoryviews, in order (no view for an empty range).  ``write``: the device will write
    them (the views are writable).  Every range is checked (Bus Master, translation,
    guest RAM) before any view is returned: :class:`DmaFault` otherwise.  Drop the views
    when the transfer is done."""

    def views(self, ranges: Iterable[tuple[int, int]], *, write: bool,
              ssid: int | None = None) -> list[memoryview]: ...


HostView = Callable[[int], "memoryview | None"]
"""``get(n)``: the pinned host view for an access of ``n`` bytes, or None once invalid."""


class DmaWindow:
    """A bus-address range ``[addr, addr + size)`` of ``port`` that a device accesses
    again and again (a ring): offsets are relative to ``addr``; ``write``: the device
    writes it (else reads).  Accesses use the port's pinned host view (``port.pinned``,
    when the port has one) while it is valid, else the port's ordinary read / write --
    whose translation reports any fault -- after which the window pins again."""

    __slots__ = ("port", "addr", "size", "write", "ssid", "_get", "_pin")

    def __init__(self, port: DmaPort, addr: int, size: int, *, write: bool,
                 ssid: int | None = None) -> None:
        self.port = port
        self.addr = addr
        self.size = size
        self.write = write
        self.ssid = ssid
        self._pin: Callable[..., HostView | None] | None = getattr(port, "pinned", None)
        self._get: HostView | None = None

    @property
    def pinned(self) -> bool:
        """Does the window hold a host view (checked again at its next access)?"""
        return self._get is not None

    def _view(self, n: int) -> memoryview | None:
        get = self._get
        if get is None:
            return None
        v = get(n)
        if v is None:
            self._get = None
        return v

    def _repin(self) -> None:
        if self._pin is not None:
            self._get = self._pin(self.addr, self.size, write=self.write, ssid=self.ssid)

    def read(self, off: int, n: int) -> bytes:
        """``n`` bytes at offset ``off`` (inside the window)."""
        v = self._view(n)
        if v is not None:
            return bytes(v[off:off + n])
        data = self.port.read(self.addr + off, n, ssid=self.ssid)
        self._repin()
        return data

    def unpack_from(self, st: struct.Struct, off: int) -> tuple[Any, ...]:
        """``st`` unpacked at offset ``off``."""
        v = self._view(st.size)
        if v is not None:
            return st.unpack_from(v, off)
        return st.unpack(self.read(off, st.size))

    def pack_into(self, st: struct.Struct, off: int, *values: Any) -> None:
        """Write ``values`` packed by ``st`` at offset ``off`` (a writable window)."""
        v = self._view(st.size)
        if v is not None:
            st.pack_into(v, off, *values)
            return
        self.port.write(self.addr + off, st.pack(*values), ssid=self.ssid)
        self._repin()


def _range_fault_addr(ranges: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(first address, total length) of ``ranges``, for a DmaFault."""
    first = next((a for a, n in ranges if n > 0), ranges[0][0] if ranges else 0)
    return first, sum(max(n, 0) for _, n in ranges)


class DmaPortBase:
    """Convenience accessors shared by the implementations (little-endian scalars)."""

    def read(self, addr: int, n: int, *, ssid: int | None = None) -> bytes:
        raise NotImplementedError

    def write(self, addr: int, data: bytes | bytearray | memoryview, *,
              ssid: int | None = None) -> None:
        raise NotImplementedError

    def read_u16(self, addr: int, *, ssid: int | None = None) -> int:
        return _U16.unpack(self.read(addr, 2, ssid=ssid))[0]

    def read_u32(self, addr: int, *, ssid: int | None = None) -> int:
        return _U32.unpack(self.read(addr, 4, ssid=ssid))[0]

    def read_u64(self, addr: int, *, ssid: int | None = None) -> int:
        return _U64.unpack(self.read(addr, 8, ssid=ssid))[0]

    def write_u32(self, addr: int, value: int, *, ssid: int | None = None) -> None:
        self.write(addr, _U32.pack(value & 0xFFFF_FFFF), ssid=ssid)

    def read_into(self, addr: int, buf: bytearray | memoryview, *,
                  ssid: int | None = None) -> None:
        """Fill ``buf`` from ``addr`` (one access for the whole length)."""
        mv = memoryview(buf).cast("B")
        mv[:] = self.read(addr, len(mv), ssid=ssid)


class DirectDma(DmaPortBase):
    """Guest-physical DMA of function ``fn`` (no IOMMU).  A SubstreamID is meaningless
    without an IOMMU: it is ignored (the PCIe PASID prefix would be dropped)."""

    def __init__(self, fn: "PciFunction") -> None:
        self.fn = fn

    def read(self, addr: int, n: int, *, ssid: int | None = None) -> bytes:
        try:
            return self.fn.dma_read(addr, n)
        except DmaError as e:
            raise DmaFault("no_bus_master", addr, n, detail=str(e)) from None
        except GuestMemoryError as e:
            raise DmaFault("bad_address", addr, n, detail=str(e)) from None

    def write(self, addr: int, data: bytes | bytearray | memoryview, *,
              ssid: int | None = None) -> None:
        try:
            self.fn.dma_write(addr, data)  # type: ignore[arg-type]
        except DmaError as e:
            raise DmaFault("no_bus_master", addr, len(data), write=True, detail=str(e)) from None
        except GuestMemoryError as e:
            raise DmaFault("bad_address", addr, len(data), write=True, detail=str(e)) from None

    def views(self, ranges: Iterable[tuple[int, int]], *, write: bool,
              ssid: int | None = None) -> list[memoryview]:
        rs = list(ranges)
        if not self.fn.bus_master_enabled:
            addr, n = _range_fault_addr(rs)
            raise DmaFault("no_bus_master", addr, n, write=write,
                           detail=f"{self.fn.name}: bus master disabled")
        try:
            return self.fn.memory.views(rs, write)
        except DmaError as e:
            addr, n = _range_fault_addr(rs)
            raise DmaFault("no_bus_master", addr, n, write=write, detail=str(e)) from None
        except GuestMemoryError as e:
            addr, n = _range_fault_addr(rs)
            raise DmaFault("bad_address", addr, n, write=write, detail=str(e)) from None

    def __repr__(self) -> str:
        return f"DirectDma({self.fn.name})"


class DmaManager(Protocol):
    """What :class:`TranslatedDma` needs of the domain manager."""

    def dma_read(self, sid: int, ssid: int | None, iova: int, n: int) -> bytes: ...

    def dma_write(self, sid: int, ssid: int | None, iova: int, data: bytes) -> None: ...

    def dma_views(self, sid: int, ssid: int | None, ranges: list[tuple[int, int]],
                  write: bool) -> list[memoryview]: ...

    def dma_pinned(self, sid: int, ssid: int | None, iova: int, n: int,
                   write: bool) -> Any: ...

    def no_snoop(self, sid: int) -> bool: ...

    def endpoint_page_request(self, sid: int, ssid: int | None, addr: int, *, write: bool,
                              prg_index: int) -> Any: ...


def fault_event(exc: BaseException) -> str | None:
    """The SMMUv3 event name carried by a translation exception (``.event`` as a name
    or an :class:`EventId`), or None."""
    ev = getattr(exc, "event", None)
    if isinstance(ev, EventId):
        return ev.name
    if isinstance(ev, str):
        return ev
    if isinstance(ev, int) and not isinstance(ev, bool):
        try:
            return EventId(ev).name
        except ValueError:
            return None
    name = getattr(exc, "event_name", None)
    return name if isinstance(name, str) else None


class TranslatedDma(DmaPortBase):
    """DMA of function ``fn`` with StreamID ``sid`` through the domain manager: the whole
    range of one access is handed to the manager at once (it translates all pages of it
    in one batch).  Bus Master Enable is checked here, as the function would."""

    def __init__(self, fn: "PciFunction", manager: DmaManager, sid: int) -> None:
        self.fn = fn
        self.manager = manager
        self.sid = sid

    def _check(self, addr: int, n: int, write: bool, ssid: int | None) -> None:
        if not self.fn.bus_master_enabled:
            raise DmaFault("no_bus_master", addr, n, write=write, ssid=ssid,
                           detail=f"{self.fn.name}: bus master disabled")

    def _fault(self, e: Exception, addr: int, n: int, write: bool,
               ssid: int | None) -> DmaFault:
        if isinstance(e, DmaFault):
            return e
        ev = fault_event(e)
        if ev is not None:
            reason = "bad_address" if ev == "BUS_ERROR" else "translation"
            return DmaFault(reason, addr, n, write=write, event=ev, ssid=ssid, detail=str(e),
                            pending=getattr(e, "pending", None), iova=getattr(e, "iova", None))
        if isinstance(e, GuestMemoryError):
            return DmaFault("bad_address", addr, n, write=write, ssid=ssid, detail=str(e))
        if isinstance(e, DmaError):
            return DmaFault("no_bus_master", addr, n, write=write, ssid=ssid, detail=str(e))
        raise e

    def no_snoop(self) -> bool:
        """A transaction the device marks No Snoop (allowed by its PCIe Device Control
        Enable No Snoop): does it stay No Snoop?  The domain may enforce coherency."""
        return self.manager.no_snoop(self.sid)

    def page_request(self, addr: int, *, write: bool, ssid: int | None, prg_index: int
                     ) -> Any:
        """The device's PCIe Page Request for the page at ``addr``: a PendingFault the
        answer completes."""
        return self.manager.endpoint_page_request(self.sid, ssid, addr, write=write,
                                                  prg_index=prg_index)

    def read(self, addr: int, n: int, *, ssid: int | None = None) -> bytes:
        self._check(addr, n, False, ssid)
        try:
            return bytes(self.manager.dma_read(self.sid, ssid, addr, n))
        except Exception as e:  # translation faults carry .event; others re-raised
            raise self._fault(e, addr, n, False, ssid) from None

    def write(self, addr: int, data: bytes | bytearray | memoryview, *,
              ssid: int | None = None) -> None:
        self._check(addr, len(data), True, ssid)
        try:
            self.manager.dma_write(self.sid, ssid, addr, bytes(data))
        except Exception as e:
            raise self._fault(e, addr, len(data), True, ssid) from None

    def views(self, ranges: Iterable[tuple[int, int]], *, write: bool,
              ssid: int | None = None) -> list[memoryview]:
        """All pages of all ``ranges`` translated in one batch by the manager."""
        rs = ranges if isinstance(ranges, list) else list(ranges)
        if not self.fn.bus_master_enabled:
            addr, n = _range_fault_addr(rs)
            self._check(addr, n, write, ssid)
        try:
            return self.manager.dma_views(self.sid, ssid, rs, write)
        except Exception as e:
            addr, n = _range_fault_addr(rs)
            raise self._fault(e, addr, n, write, ssid) from None

    def pinned(self, addr: int, n: int, *, write: bool, ssid: int | None = None
               ) -> HostView | None:
        """The guest RAM behind ``[addr, addr + n)`` pinned from what the SMMU caches
        hold now (no side effect; None when they do not cover it): see
        :class:`DmaWindow`.  A view is used only while Bus Master is on."""
        pv = self.manager.dma_pinned(self.sid, ssid, addr, n, write)
        if pv is None:
            return None
        fn, get = self.fn, pv.get

        def view(k: int) -> memoryview | None:
            # Bus Master off: no view (the ordinary access then raises)
            return get(k) if fn.bus_master_enabled else None
        return view

    def __repr__(self) -> str:
        return f"TranslatedDma({self.fn.name}, sid={self.sid:#x})"
