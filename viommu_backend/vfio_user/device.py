"""The interface between the vfio-user server and a device model.

The server (``server.py``) owns sockets, message framing, DMA_MAP bookkeeping and
SET_IRQS eventfds; a device model (e.g. :class:`viommu_backend.pci.function.PciFunction`)
implements :class:`VfioUserDevice` and never sees a socket.  Everything a device needs
from its peer arrives through :class:`DeviceContext`.
"""

from __future__ import annotations

import abc
import enum
import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

from viommu_backend.vfio_user.protocol import IrqSetFlags, VfioUserError

if TYPE_CHECKING:  # pragma: no cover
    from viommu_backend.memory import GuestMemory


# --- region / irq indexes and flags (VFIO uapi, vfio-user spec) -------------------------
class PciRegion(enum.IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8
    NUM = 9


class PciIrq(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4
    NUM = 5


class DeviceFlags(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class IrqInfoFlags(enum.IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


@dataclass(frozen=True)
class DeviceInfo:
    flags: DeviceFlags
    num_regions: int
    num_irqs: int


@dataclass(frozen=True)
class SparseArea:
    offset: int
    size: int


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: RegionFlags
    size: int
    offset: int = 0  # mmap offset within the region's fd
    sparse_mmap: tuple[SparseArea, ...] = ()
    fd: int | None = None  # a file backing mmappable areas (sent with the reply)


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: IrqInfoFlags
    count: int


@dataclass(frozen=True)
class SetIrqs:
    """A decoded VFIO_USER_DEVICE_SET_IRQS request."""

    flags: IrqSetFlags
    index: int
    start: int
    count: int
    fds: tuple[int, ...] = ()  # DATA_EVENTFD: one per vector (-1 = unassign)
    bools: tuple[bool, ...] = ()  # DATA_BOOL


class DeviceContext(Protocol):
    """What the server gives a device for the life of one client connection."""

    memory: "GuestMemory"  # DMA regions the client mapped (bounds-checked access)

    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        """Signal an interrupt on the eventfd QEMU assigned; False when none is set or it
        is masked (the caller records it as pending)."""

    def dma_read(self, addr: int, count: int) -> Awaitable[bytes]:
        """Server-initiated VFIO_USER_DMA_READ (for regions mapped without an fd)."""

    def dma_write(self, addr: int, data: bytes) -> Awaitable[None]:
        """Server-initiated VFIO_USER_DMA_WRITE (for regions mapped without an fd)."""

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the server loop after the current message is answered (work
        a posted register write starts must never delay the reply path)."""


class VfioUserDevice(abc.ABC):
    """A device model served over vfio-user.  All methods run on the server loop and
    must not block; raise :class:`VfioUserError` to send an error reply."""

    name: str = "device"

    @abc.abstractmethod
    def device_info(self) -> DeviceInfo: ...

    @abc.abstractmethod
    def region_info(self, index: int) -> RegionInfo: ...

    @abc.abstractmethod
    def irq_info(self, index: int) -> IrqInfo: ...

    @abc.abstractmethod
    def region_read(self, index: int, offset: int, count: int) -> bytes: ...

    @abc.abstractmethod
    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def set_irqs(self, req: SetIrqs) -> None:
        """Called after the server has updated its eventfd table for ``req``; devices
        re-evaluate level interrupts here (INTx ACTION_UNMASK)."""

    def reset(self) -> None:
        """VFIO_USER_DEVICE_RESET."""

    def connected(self, ctx: DeviceContext) -> None:
        """A client connected; ``ctx`` stays valid until :meth:`disconnected`."""

    def disconnected(self) -> None:
        """The client went away: drop everything tied to it (mappings, eventfds)."""

    def dma_unmapped(self, iova: int, size: int) -> None:
        """A DMA region is about to go away (DMA_UNMAP or disconnect)."""


def einval(msg: str) -> VfioUserError:
    return VfioUserError(errno.EINVAL, msg)
