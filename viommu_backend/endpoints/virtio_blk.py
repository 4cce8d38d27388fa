"""virtio-blk over the virtio-pci modern transport (virtio 1.x), split virtqueues.

PCI identity 1af4:1042 rev 1, class 018000 (mass storage, other), subsystem 1af4:0002.
Capabilities: vendor-specific virtio structures, PCI Express, PM, MSI-X.

BAR4 (64-bit, prefetchable, 16 KiB) holds the virtio structures:

=======  ==========  =========================================================
offset   structure   notes
=======  ==========  =========================================================
0x0000   COMMON_CFG  struct virtio_pci_common_cfg (:data:`COMMON_REGS`)
0x1000   ISR_CFG     bit 0 queue interrupt, bit 1 config change; read clears
0x2000   DEVICE_CFG  struct virtio_blk_config (:data:`BLK_CONFIG`)
0x3000   NOTIFY_CFG  queue q notifies at q * NOTIFY_OFF_MULTIPLIER
=======  ==========  =========================================================

BAR1 (32-bit, 4 KiB): MSI-X table at 0 (num_queues + 1 vectors), PBA at 0x800.

Every guest buffer (rings, descriptors, indirect tables, data, status) is reached through
the device's :class:`~viommu_backend.endpoints.dma.DmaPort`; the device offers
VIRTIO_F_ACCESS_PLATFORM (and by default insists on it) so that the guest maps all of
them through its DMA API, hence through the IOMMU when the port translates.

Robustness: a request whose data DMA faults, whose header is short, or that is out of
range completes with VIRTIO_BLK_S_IOERR; a malformed ring or descriptor chain (index out
of range, loop, bad indirect table, ring not readable) puts the device into
DEVICE_NEEDS_RESET with a configuration-change interrupt, and the device stops using
its queues until the driver resets it.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Protocol, Union

import numpy as np

from viommu_backend.bitfield import F, Layout, Register, RegisterMap
from viommu_backend.endpoints.dma import DirectDma, DmaFault, DmaPort
from viommu_backend.pci.function import PciFunction

log = logging.getLogger(__name__)

VENDOR_ID = 0x1AF4
DEVICE_ID = 0x1042  # 0x1040 + virtio device type 2 (block)
REVISION = 1
CLASS_CODE = 0x018000
SUBSYSTEM_VENDOR_ID = 0x1AF4
SUBSYSTEM_ID = 0x0002

VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
STRUCT_LEN = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE_OFF, MSIX_PBA_OFF = 0x000, 0x800

NO_VECTOR = 0xFFFF
SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
MAX_REQUEST_BYTES = 64 << 20  # larger requests complete with IOERR (bounded memory)
DEFAULT_SIZE_MAX = 1 << 20


class PciCapType(enum.IntEnum):
    """virtio_pci_cap.cfg_type"""
    COMMON_CFG = 1
    NOTIFY_CFG = 2
    ISR_CFG = 3
    DEVICE_CFG = 4
    PCI_CFG = 5


class Status(enum.IntFlag):
    """device_status bits"""
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class Feature(enum.IntEnum):
    """Feature bit numbers (device-specific ones for block, then the reserved range)."""
    BLK_SIZE_MAX = 1
    BLK_SEG_MAX = 2
    BLK_GEOMETRY = 4
    BLK_RO = 5
    BLK_BLK_SIZE = 6
    BLK_FLUSH = 9
    BLK_TOPOLOGY = 10
    BLK_CONFIG_WCE = 11
    BLK_MQ = 12
    BLK_DISCARD = 13
    BLK_WRITE_ZEROES = 14
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36


class ReqType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13


class BlkStatus(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


# --- declarative layouts -------------------------------------------------------------
COMMON_REGS = RegisterMap([
    Register("DEVICE_FEATURE_SELECT", 0x00, 32),
    Register("DEVICE_FEATURE", 0x04, 32, doc="RO: 32 feature bits selected above"),
    Register("DRIVER_FEATURE_SELECT", 0x08, 32),
    Register("DRIVER_FEATURE", 0x0C, 32),
    Register("CONFIG_MSIX_VECTOR", 0x10, 16, reset=NO_VECTOR),
    Register("NUM_QUEUES", 0x12, 16, doc="RO"),
    Register("DEVICE_STATUS", 0x14, 8),
    Register("CONFIG_GENERATION", 0x15, 8, doc="RO"),
    Register("QUEUE_SELECT", 0x16, 16),
    Register("QUEUE_SIZE", 0x18, 16),
    Register("QUEUE_MSIX_VECTOR", 0x1A, 16),
    Register("QUEUE_ENABLE", 0x1C, 16),
    Register("QUEUE_NOTIFY_OFF", 0x1E, 16, doc="RO"),
    Register("QUEUE_DESC", 0x20, 64),
    Register("QUEUE_DRIVER", 0x28, 64),
    Register("QUEUE_DEVICE", 0x30, 64),
])
COMMON_CFG_SIZE = 0x38
_COMMON_AT: list[Register | None] = [None] * COMMON_CFG_SIZE
for _r in COMMON_REGS.registers:
    for _b in range(_r.offset, _r.offset + _r.width // 8):
        _COMMON_AT[_b] = _r

# struct virtio_pci_cap (16 bytes from cap_vndr); the notify capability appends a
# le32 notify_off_multiplier
VIRTIO_PCI_CAP = Layout("VIRTIO_PCI_CAP", 128, (
    F("CAP_VNDR", 7, 0), F("CAP_NEXT", 15, 8), F("CAP_LEN", 23, 16), F("CFG_TYPE", 31, 24),
    F("BAR", 39, 32), F("ID", 47, 40), F("OFFSET", 31, 0, word=1),
    F("LENGTH", 63, 32, word=1)))

VIRTQ_DESC = Layout("VIRTQ_DESC", 128, (
    F("ADDR", 63, 0), F("LEN", 31, 0, word=1), F("FLAGS", 47, 32, word=1),
    F("NEXT", 63, 48, word=1)))
DESC_FLAGS = Layout("DESC_FLAGS", 16, (F("NEXT", 0), F("WRITE", 1), F("INDIRECT", 2)))
DESC_SIZE = 16
AVAIL_F_NO_INTERRUPT = 1

BLK_OUTHDR = Layout("VIRTIO_BLK_OUTHDR", 128, (
    F("TYPE", 31, 0), F("IOPRIO", 63, 32), F("SECTOR", 63, 0, word=1)))
BLK_OUTHDR_SIZE = 16

BLK_CONFIG = RegisterMap([
    Register("CAPACITY", 0x00, 64, doc="in 512-byte sectors"),
    Register("SIZE_MAX", 0x08, 32),
    Register("SEG_MAX", 0x0C, 32),
    Register("GEOMETRY_CYLINDERS", 0x10, 16),
    Register("GEOMETRY_HEADS", 0x12, 8),
    Register("GEOMETRY_SECTORS", 0x13, 8),
    Register("BLK_SIZE", 0x14, 32),
    Register("PHYSICAL_BLOCK_EXP", 0x18, 8),
    Register("ALIGNMENT_OFFSET", 0x19, 8),
    Register("MIN_IO_SIZE", 0x1A, 16),
    Register("OPT_IO_SIZE", 0x1C, 32),
    Register("WRITEBACK", 0x20, 8),
    Register("NUM_QUEUES", 0x22, 16),
])
BLK_CONFIG_SIZE = 0x24


def feature_bits(*bits: int) -> int:
    out = 0
    for b in bits:
        out |= 1 << int(b)
    return out


# --- backing store ------------------------------------------------------------------
class BlockBackend(Protocol):
    size: int
    read_only: bool

    def pread(self, offset: int, n: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class MemoryBackend:
    """A RAM disk (numpy bytes); ``data`` gives the initial contents."""

    def __init__(self, size: int, *, data: bytes | None = None, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError("negative disk size")
        self.size = size
        self.read_only = read_only
        self.buf = np.zeros(size, np.uint8)
        if data:
            self.buf[:len(data)] = np.frombuffer(data[:size], np.uint8)

    def pread(self, offset: int, n: int) -> bytes:
        return self.buf[offset:offset + n].tobytes()

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.buf[offset:offset + len(data)] = np.frombuffer(data, np.uint8)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class FileBackend:
    """A disk image file accessed with pread/pwrite.  With ``size`` the file is created
    if missing and grown to ``size``; otherwise its current size is the disk size."""

    def __init__(self, path: str | os.PathLike[str], *, size: int | None = None,
                 read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if size is not None and not read_only:
            flags |= os.O_CREAT
        self.fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
        try:
            cur = os.fstat(self.fd).st_size
            if size is not None and cur < size and not read_only:
                os.ftruncate(self.fd, size)
            self.size = size if size is not None else cur
        except OSError:
            os.close(self.fd)
            raise

    def pread(self, offset: int, n: int) -> bytes:
        out = os.pread(self.fd, n, offset)
        return out + bytes(n - len(out)) if len(out) < n else out

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        while len(mv):
            done = os.pwrite(self.fd, mv, offset)
            mv, offset = mv[done:], offset + done

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


Backing = Union[int, str, "os.PathLike[str]", BlockBackend]


def open_backend(backing: Backing, *, size: int | None = None,
                 read_only: bool = False) -> BlockBackend:
    """``int`` -> RAM disk of that many bytes; a path -> image file; a backend as is."""
    if isinstance(backing, bool):
        raise TypeError("backing must be a size, a path or a BlockBackend")
    if isinstance(backing, int):
        return MemoryBackend(backing, read_only=read_only)
    if isinstance(backing, (str, os.PathLike)):
        return FileBackend(backing, size=size, read_only=read_only)
    return backing


# --- virtqueue ----------------------------------------------------------------------
class ChainError(Exception):
    """The driver broke the ring or descriptor rules: the device needs a reset."""


@dataclass
class Segment:
    addr: int
    length: int
    writable: bool


@dataclass
class Virtqueue:
    """Per-queue transport state of a split virtqueue."""

    index: int
    max_size: int
    size: int = 0
    msix_vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    last_avail: int = 0  # free-running 16-bit
    used_idx: int = 0  # free-running 16-bit

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.msix_vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0
        self.last_avail = self.used_idx = 0


@dataclass
class BlkStats:
    requests: int = 0
    ioerr: int = 0
    unsupp: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    notifies: int = 0
    interrupts: int = 0
    needs_reset: int = 0
    last_error: str = ""
    by_type: dict[str, int] = field(default_factory=dict)


def _need_event(event_idx: int, new: int, old: int) -> bool:
    """vring_need_event: did the used index pass the driver's used_event?"""
    return ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class _Bar1(object):
    """BAR1 holds only the MSI-X table/PBA (PciFunction routes those); the rest is RAZ/WI."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class VirtioBlk(PciFunction):
    """A virtio-blk function.  ``backing``: a size in bytes (RAM disk), an image path, or
    a :class:`BlockBackend`; ``dma``: the DMA port (default: guest-physical through the
    function; replace it with :meth:`set_dma_port` once the StreamID is known)."""

    def __init__(self, name: str = "virtio-blk", backing: Backing = 64 << 20, *,
                 dma: DmaPort | None = None, size: int | None = None,
                 read_only: bool = False, num_queues: int = 1, queue_size: int = 256,
                 blk_size: int = SECTOR_SIZE, serial: str | None = None,
                 require_access_platform: bool = True, msix: bool = True) -> None:
        super().__init__(name, VENDOR_ID, DEVICE_ID, CLASS_CODE, revision=REVISION,
                         subsystem_vendor_id=SUBSYSTEM_VENDOR_ID, subsystem_id=SUBSYSTEM_ID)
        if not 1 <= num_queues <= 64:
            raise ValueError("num_queues must be 1..64")
        if queue_size < 2 or queue_size > 32768 or queue_size & (queue_size - 1):
            raise ValueError("queue_size must be a power of two in 2..32768")
        if blk_size < SECTOR_SIZE or blk_size & (blk_size - 1):
            raise ValueError("blk_size must be a power of two >= 512")
        self.backend = open_backend(backing, size=size, read_only=read_only)
        self.read_only = read_only or self.backend.read_only
        self.blk_size = blk_size
        self.serial = (serial if serial is not None else name).encode()[:VIRTIO_BLK_ID_BYTES]
        self.require_access_platform = require_access_platform
        self.dma: DmaPort = dma if dma is not None else DirectDma(self)
        self.queues = [Virtqueue(i, queue_size) for i in range(num_queues)]
        self.seg_max = queue_size - 2
        self.size_max = DEFAULT_SIZE_MAX
        self.stats = BlkStats()
        feats = [Feature.VERSION_1, Feature.ACCESS_PLATFORM, Feature.BLK_SEG_MAX,
                 Feature.BLK_SIZE_MAX, Feature.BLK_BLK_SIZE, Feature.BLK_FLUSH,
                 Feature.RING_INDIRECT_DESC, Feature.RING_EVENT_IDX]
        if self.read_only:
            feats.append(Feature.BLK_RO)
        if num_queues > 1:
            feats.append(Feature.BLK_MQ)
        self.device_features = feature_bits(*feats)

        # transport state
        self.status = 0
        self.driver_features = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.config_msix_vector = NO_VECTOR
        self.config_generation = 0
        self.queue_select = 0
        self.isr = 0
        self._scheduled: set[int] = set()

        self.add_bar(MSIX_BAR, MSIX_BAR_SIZE, _Bar1())
        self.add_bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, self, is64=True, prefetchable=True)
        self._add_virtio_cap(PciCapType.COMMON_CFG, COMMON_OFF, STRUCT_LEN)
        self._add_virtio_cap(PciCapType.ISR_CFG, ISR_OFF, STRUCT_LEN)
        self._add_virtio_cap(PciCapType.DEVICE_CFG, DEVICE_OFF, STRUCT_LEN)
        self._add_virtio_cap(PciCapType.NOTIFY_CFG, NOTIFY_OFF, STRUCT_LEN,
                             NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little"))
        self.add_pcie_cap()
        self.add_pm_cap()
        if msix:  # without: INTx + ISR only (QEMU 11.1 aborts unplugging vfio-user MSI-X devices)
            self.add_msix(num_queues + 1, MSIX_BAR, MSIX_TABLE_OFF, MSIX_BAR, MSIX_PBA_OFF)
        self.on_reset.append(self.virtio_reset)

    # -- construction helpers ------------------------------------------------------------
    def _add_virtio_cap(self, cfg_type: PciCapType, offset: int, length: int,
                        extra: bytes = b"") -> int:
        raw = VIRTIO_PCI_CAP.encode(CAP_LEN=16 + len(extra), CFG_TYPE=cfg_type,
                                    BAR=VIRTIO_BAR, OFFSET=offset, LENGTH=length)
        return self.add_vendor_cap(VIRTIO_PCI_CAP.to_bytes(raw)[2:] + extra)

    def set_dma_port(self, port: DmaPort) -> None:
        """Route all further DMA through ``port`` (e.g. a TranslatedDma with the
        endpoint's StreamID, known once the topology is decided)."""
        self.dma = port

    @property
    def capacity(self) -> int:
        """Disk size in 512-byte sectors."""
        return self.backend.size // SECTOR_SIZE

    def close(self) -> None:
        self.backend.close()

    # -- features / status ---------------------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features >> int(bit) & 1)

    def _features_acceptable(self) -> bool:
        f = self.driver_features
        if f & ~self.device_features:
            return False
        if not f >> Feature.VERSION_1 & 1:
            return False  # no legacy interface here
        if self.require_access_platform and not f >> Feature.ACCESS_PLATFORM & 1:
            return False
        return True

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.virtio_reset()
            return
        old = self.status
        new = value & ~Status.DEVICE_NEEDS_RESET | (old & Status.DEVICE_NEEDS_RESET)
        if new & Status.FEATURES_OK and not old & Status.FEATURES_OK:
            if not self._features_acceptable():
                log.info("%s: driver features %#x refused", self.name, self.driver_features)
                new &= ~Status.FEATURES_OK
        if new & Status.DRIVER_OK and not new & Status.FEATURES_OK:
            new &= ~Status.DRIVER_OK  # DRIVER_OK before FEATURES_OK is a driver bug
        self.status = new

    def virtio_reset(self) -> None:
        """Device reset (device_status written 0, or a PCI/function reset)."""
        self.status = 0
        self.driver_features = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.config_msix_vector = NO_VECTOR
        self.queue_select = 0
        self.isr = 0
        self._scheduled.clear()
        for q in self.queues:
            q.reset()
        self.set_intx(False)

    # -- MmioHandler for BAR4 ------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset < ISR_OFF:
            return self._common_read(offset - COMMON_OFF, size)
        if offset < DEVICE_OFF:
            if offset == ISR_OFF:
                return self._isr_read()
            return 0
        if offset < NOTIFY_OFF:
            off = offset - DEVICE_OFF
            cfg = self.device_config()
            return int.from_bytes(cfg[off:off + size].ljust(size, b"\0"), "little")
        return 0  # notify registers are write-only

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < ISR_OFF:
            self._common_write(offset - COMMON_OFF, size, value)
        elif offset >= NOTIFY_OFF:
            self._notify_write(offset - NOTIFY_OFF)
        # ISR and device config (no CONFIG_WCE) ignore writes

    def _common_read(self, off: int, size: int) -> int:
        out = 0
        for i in range(size):
            b = off + i
            reg = _COMMON_AT[b] if b < COMMON_CFG_SIZE else None
            if reg is None:
                continue
            byte = (self._common_get(reg.name) >> (8 * (b - reg.offset))) & 0xFF
            out |= byte << (8 * i)
        return out

    def _common_write(self, off: int, size: int, value: int) -> None:
        # group the written bytes by register, merge into the current value, store once
        touched: dict[str, tuple[Register, int, int]] = {}
        for i in range(size):
            b = off + i
            reg = _COMMON_AT[b] if b < COMMON_CFG_SIZE else None
            if reg is None:
                continue
            _, val, mask = touched.get(reg.name, (reg, 0, 0))
            shift = 8 * (b - reg.offset)
            val |= ((value >> (8 * i)) & 0xFF) << shift
            mask |= 0xFF << shift
            touched[reg.name] = (reg, val, mask)
        for name, (reg, val, mask) in touched.items():
            cur = self._common_get(name)
            self._common_set(name, (cur & ~mask) | val)

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_get(self, name: str) -> int:
        q = self._selected_queue()
        match name:
            case "DEVICE_FEATURE_SELECT":
                return self.device_feature_select
            case "DEVICE_FEATURE":
                return (self.device_features >> (32 * self.device_feature_select)) & 0xFFFF_FFFF \
                    if self.device_feature_select < 2 else 0
            case "DRIVER_FEATURE_SELECT":
                return self.driver_feature_select
            case "DRIVER_FEATURE":
                return (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFF_FFFF \
                    if self.driver_feature_select < 2 else 0
            case "CONFIG_MSIX_VECTOR":
                return self.config_msix_vector
            case "NUM_QUEUES":
                return len(self.queues)
            case "DEVICE_STATUS":
                return self.status
            case "CONFIG_GENERATION":
                return self.config_generation
            case "QUEUE_SELECT":
                return self.queue_select
        if q is None:
            return NO_VECTOR if name == "QUEUE_MSIX_VECTOR" else 0
        match name:
            case "QUEUE_SIZE":
                return q.size
            case "QUEUE_MSIX_VECTOR":
                return q.msix_vector
            case "QUEUE_ENABLE":
                return int(q.enabled)
            case "QUEUE_NOTIFY_OFF":
                return q.index
            case "QUEUE_DESC":
                return q.desc
            case "QUEUE_DRIVER":
                return q.driver
            case "QUEUE_DEVICE":
                return q.device
        return 0

    def _vector(self, v: int) -> int:
        """An MSI-X vector the driver asks for, or NO_VECTOR when it does not exist."""
        return v if self.msix is not None and v < self.msix.nvec else NO_VECTOR

    def _common_set(self, name: str, v: int) -> None:
        q = self._selected_queue()
        match name:
            case "DEVICE_FEATURE_SELECT":
                self.device_feature_select = v
            case "DRIVER_FEATURE_SELECT":
                self.driver_feature_select = v
            case "DRIVER_FEATURE":
                if self.status & Status.FEATURES_OK or self.driver_feature_select >= 2:
                    return  # features are frozen once FEATURES_OK is accepted
                sh = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << sh)) | (v << sh)
            case "CONFIG_MSIX_VECTOR":
                self.config_msix_vector = self._vector(v)
            case "DEVICE_STATUS":
                self._write_status(v)
            case "QUEUE_SELECT":
                self.queue_select = v
            case _ if q is None or q.enabled and name != "QUEUE_MSIX_VECTOR":
                return  # no such queue, or a live queue's layout is fixed
            case "QUEUE_SIZE":
                q.size = v
            case "QUEUE_MSIX_VECTOR":
                q.msix_vector = self._vector(v)
            case "QUEUE_ENABLE":
                if v == 1:
                    self._enable_queue(q)
            case "QUEUE_DESC":
                q.desc = v
            case "QUEUE_DRIVER":
                q.driver = v
            case "QUEUE_DEVICE":
                q.device = v
            # read-only registers ignore writes

    def _enable_queue(self, q: Virtqueue) -> None:
        if not 0 < q.size <= q.max_size or q.size & (q.size - 1):
            self.needs_reset(f"queue {q.index}: bad size {q.size}")
            return
        q.enabled = True
        q.last_avail = q.used_idx = 0

    def _isr_read(self) -> int:
        v, self.isr = self.isr, 0
        self.set_intx(False)
        return v

    def device_config(self) -> bytes:
        """struct virtio_blk_config as the driver reads it."""
        vals = {"CAPACITY": self.capacity, "SIZE_MAX": self.size_max, "SEG_MAX": self.seg_max,
                "BLK_SIZE": self.blk_size, "NUM_QUEUES": len(self.queues),
                "MIN_IO_SIZE": 1, "OPT_IO_SIZE": 0}
        out = bytearray(BLK_CONFIG_SIZE)
        for reg in BLK_CONFIG.registers:
            n = reg.width // 8
            out[reg.offset:reg.offset + n] = vals.get(reg.name, 0).to_bytes(n, "little")
        return bytes(out)

    # -- interrupts -------------------------------------------------------------------
    def _interrupt(self, vector: int, isr_bit: int) -> None:
        self.stats.interrupts += 1
        if self.msix is not None and self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix_notify(vector)
            return
        self.isr |= isr_bit
        self.set_intx(True)

    def config_interrupt(self) -> None:
        self._interrupt(self.config_msix_vector, 2)

    def needs_reset(self, why: str) -> None:
        """Enter DEVICE_NEEDS_RESET (driver error seen) and tell the driver."""
        log.warning("%s: device needs reset: %s", self.name, why)
        self.stats.needs_reset += 1
        self.stats.last_error = why
        if self.status & Status.DEVICE_NEEDS_RESET:
            return
        self.status |= Status.DEVICE_NEEDS_RESET
        if self.status & Status.DRIVER_OK:
            self.config_interrupt()

    # -- notification and queue processing ---------------------------------------------
    def _notify_write(self, off: int) -> None:
        self.stats.notifies += 1
        qi = off // NOTIFY_OFF_MULTIPLIER
        if qi >= len(self.queues) or qi in self._scheduled:
            return
        self._scheduled.add(qi)
        if self.ctx is not None:
            self.ctx.call_soon(lambda: self._run_scheduled(qi))
        else:
            self._run_scheduled(qi)

    def _run_scheduled(self, qi: int) -> None:
        if qi not in self._scheduled:
            return  # reset while queued
        self._scheduled.discard(qi)
        self.process_queue(qi)

    def _live(self) -> bool:
        s = self.status
        return bool(s & Status.DRIVER_OK) and not s & (Status.DEVICE_NEEDS_RESET | Status.FAILED)

    def process_queue(self, qi: int) -> int:
        """Complete every available request of queue ``qi``; returns how many."""
        q = self.queues[qi]
        if not self._live() or not q.enabled:
            return 0
        try:
            return self._process(q)
        except ChainError as e:
            self.needs_reset(f"queue {qi}: {e}")
        except DmaFault as e:
            self.needs_reset(f"queue {qi}: ring access failed: {e}")
        return 0

    def _process(self, q: Virtqueue) -> int:
        dma, size = self.dma, q.size
        event_idx = self.has_feature(Feature.RING_EVENT_IDX)
        # avail ring: flags, idx, ring[size], used_event -- read in one access
        avail = dma.read(q.driver, 4 + 2 * size + 2)
        flags, avail_idx = struct.unpack_from("<HH", avail)
        pending = (avail_idx - q.last_avail) & 0xFFFF
        if pending > size:
            raise ChainError(f"avail idx {avail_idx} is {pending} ahead of {q.last_avail}")
        old_used = q.used_idx
        done = 0
        try:
            while pending:
                head = struct.unpack_from("<H", avail, 4 + 2 * (q.last_avail % size))[0]
                if head >= size:
                    raise ChainError(f"avail ring head {head} >= queue size {size}")
                segs = self._read_chain(q, head)
                written = self._handle_request(segs)
                slot = q.device + 4 + 8 * (q.used_idx % size)
                dma.write(slot, struct.pack("<II", head, written))
                q.last_avail = (q.last_avail + 1) & 0xFFFF
                q.used_idx = (q.used_idx + 1) & 0xFFFF
                done += 1
                pending -= 1
                if not pending:  # pick up requests the driver added meanwhile
                    avail = dma.read(q.driver, 4 + 2 * size + 2)
                    flags, avail_idx = struct.unpack_from("<HH", avail)
                    pending = (avail_idx - q.last_avail) & 0xFFFF
                    if pending > size:
                        raise ChainError(f"avail idx {avail_idx} is {pending} ahead")
            if event_idx:  # avail_event: notify me when you pass this
                dma.write(q.device + 4 + 8 * size, struct.pack("<H", q.last_avail))
        finally:
            if done:  # requests completed before an error are still returned
                self._publish_used(q, old_used, flags, avail, event_idx)
        return done

    def _publish_used(self, q: Virtqueue, old_used: int, flags: int, avail: bytes,
                      event_idx: bool) -> None:
        try:
            self.dma.write(q.device + 2, struct.pack("<H", q.used_idx))
        except DmaFault as e:
            self.stats.last_error = f"used idx: {e}"
            return
        if event_idx:
            used_event = struct.unpack_from("<H", avail, 4 + 2 * q.size)[0]
            fire = _need_event(used_event, q.used_idx, old_used)
        else:
            fire = not flags & AVAIL_F_NO_INTERRUPT
        if fire:
            self._interrupt(q.msix_vector, 1)

    def _read_chain(self, q: Virtqueue, head: int) -> list[Segment]:
        """Walk the descriptor chain from ``head`` (following one indirect table)."""
        dma = self.dma
        segs: list[Segment] = []
        table: bytes | None = None  # indirect table contents once followed
        tsize, idx, seen = q.size, head, 0
        while True:
            if idx >= tsize:
                raise ChainError(f"descriptor index {idx} >= table size {tsize}")
            seen += 1
            if seen > tsize:
                raise ChainError(f"descriptor chain from {head} loops")
            raw = table[idx * DESC_SIZE:(idx + 1) * DESC_SIZE] if table is not None \
                else dma.read(q.desc + idx * DESC_SIZE, DESC_SIZE)
            addr, length, flags, nxt = struct.unpack("<QIHH", raw)
            if flags & 4:  # INDIRECT
                if table is not None:
                    raise ChainError("nested indirect descriptor")
                if not self.has_feature(Feature.RING_INDIRECT_DESC):
                    raise ChainError("indirect descriptor without INDIRECT_DESC")
                if flags & 1:
                    raise ChainError("descriptor with both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > 32768:
                    raise ChainError(f"indirect table length {length}")
                table = dma.read(addr, length)
                tsize, idx, seen = length // DESC_SIZE, 0, 0
                continue
            writable = bool(flags & 2)
            if not writable and segs and segs[-1].writable:
                raise ChainError("device-readable descriptor after a writable one")
            if length:  # zero-length descriptors carry nothing
                segs.append(Segment(addr, length, writable))
            if not flags & 1:
                return segs
            idx = nxt

    # -- block requests -----------------------------------------------------------------
    def _gather(self, segs: list[Segment], skip: int, n: int) -> bytes:
        out = bytearray()
        for s in segs:
            if skip >= s.length:
                skip -= s.length
                continue
            take = min(s.length - skip, n - len(out))
            out += self.dma.read(s.addr + skip, take)
            skip = 0
            if len(out) == n:
                break
        return bytes(out)

    def _scatter(self, segs: list[Segment], data: bytes | memoryview) -> None:
        mv, pos = memoryview(data), 0
        for s in segs:
            if pos >= len(mv):
                break
            take = min(s.length, len(mv) - pos)
            self.dma.write(s.addr, mv[pos:pos + take])
            pos += take

    def _handle_request(self, segs: list[Segment]) -> int:
        """Perform one request; returns the used length (bytes written to the driver)."""
        st = self.stats
        st.requests += 1
        rsegs = [s for s in segs if not s.writable]
        wsegs = [s for s in segs if s.writable]
        rlen = sum(s.length for s in rsegs)
        wlen = sum(s.length for s in wsegs)
        if wlen < 1:
            st.ioerr += 1
            st.last_error = "request without a writable status byte"
            return 0
        last = wsegs[-1]
        status_addr = last.addr + last.length - 1
        # writable data area: every writable byte but the status byte
        data_wsegs = wsegs[:-1] + ([Segment(last.addr, last.length - 1, True)]
                                   if last.length > 1 else [])
        data_wlen = wlen - 1
        status, used = BlkStatus.IOERR, 1
        try:
            if rlen < BLK_OUTHDR_SIZE:
                raise _ReqError(f"request header {rlen} bytes")
            hdr = BLK_OUTHDR.from_bytes(self._gather(rsegs, 0, BLK_OUTHDR_SIZE))
            rtype = BLK_OUTHDR.get(hdr, "TYPE")
            sector = BLK_OUTHDR.get(hdr, "SECTOR")
            name = ReqType(rtype).name if rtype in ReqType._value2member_map_ else str(rtype)
            st.by_type[name] = st.by_type.get(name, 0) + 1
            if rtype == ReqType.IN:
                self._check_extent(sector, data_wlen)
                data = self.backend.pread(sector * SECTOR_SIZE, data_wlen)
                self._scatter(data_wsegs, data)
                st.bytes_read += data_wlen
                status, used = BlkStatus.OK, data_wlen + 1
            elif rtype == ReqType.OUT:
                n = rlen - BLK_OUTHDR_SIZE
                if self.read_only:
                    raise _ReqError("write to a read-only disk")
                self._check_extent(sector, n)
                self.backend.pwrite(sector * SECTOR_SIZE,
                                    self._gather(rsegs, BLK_OUTHDR_SIZE, n))
                st.bytes_written += n
                status = BlkStatus.OK
            elif rtype == ReqType.FLUSH:
                self.backend.flush()
                st.flushes += 1
                status = BlkStatus.OK
            elif rtype == ReqType.GET_ID:
                n = min(VIRTIO_BLK_ID_BYTES, data_wlen)
                self._scatter(data_wsegs, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:n])
                status, used = BlkStatus.OK, n + 1
            else:
                status = BlkStatus.UNSUPP
                st.unsupp += 1
        except (_ReqError, DmaFault, OSError) as e:
            st.ioerr += 1
            st.last_error = str(e)
            log.info("%s: request failed: %s", self.name, e)
            status, used = BlkStatus.IOERR, 1
        try:
            self.dma.write(status_addr, bytes([status]))
        except DmaFault as e:
            st.last_error = f"status byte: {e}"
            return 0
        return used

    def _check_extent(self, sector: int, n: int) -> None:
        if n % SECTOR_SIZE:
            raise _ReqError(f"transfer of {n} bytes is not a multiple of {SECTOR_SIZE}")
        if n > MAX_REQUEST_BYTES:
            raise _ReqError(f"transfer of {n} bytes exceeds {MAX_REQUEST_BYTES}")
        if sector * SECTOR_SIZE + n > self.capacity * SECTOR_SIZE:
            raise _ReqError(f"sector {sector} + {n // SECTOR_SIZE} beyond capacity "
                            f"{self.capacity}")


class _ReqError(Exception):
    """A request the device refuses with VIRTIO_BLK_S_IOERR."""
