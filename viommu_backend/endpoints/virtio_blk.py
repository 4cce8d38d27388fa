"""virtio-blk (device type 2) over the virtio-pci modern transport, split virtqueues.

PCI identity 1af4:1042 rev 1, class 018000 (mass storage, other), subsystem 1af4:0002.
The transport -- capabilities, BAR4 (COMMON/ISR/DEVICE/NOTIFY structures), BAR1 (MSI-X),
feature negotiation, status, queues, interrupts -- is
:class:`~viommu_backend.endpoints.virtio.pci.VirtioPciFunction`; the ring handling is
:mod:`viommu_backend.endpoints.virtio.virtqueue`; the backing stores are
:mod:`viommu_backend.endpoints.block_backend`.  This module is the block device proper:
struct virtio_blk_config (:data:`BLK_CONFIG`, at BAR4 0x2000) and the requests
IN / OUT / FLUSH / GET_ID.

Every guest buffer (rings, descriptors, indirect tables, data, status) is reached through
the device's :class:`~viommu_backend.endpoints.dma.DmaPort`; the device offers
VIRTIO_F_ACCESS_PLATFORM (and by default insists on it) so that the guest maps all of
them through its DMA API, hence through the IOMMU when the port translates.

Durability: an OUT request completes once its data is in the backing file (page cache); a
FLUSH completes once everything completed before it is on stable storage (fsync).  A
driver that did not negotiate VIRTIO_BLK_F_FLUSH gets each write made stable before it
completes (write-through).  :meth:`VirtioBlk.close` flushes too.

Robustness: a request whose data DMA faults, whose header is short, or that is out of
range completes with VIRTIO_BLK_S_IOERR; a malformed ring or descriptor chain (index out
of range, loop, bad indirect table, ring not readable) puts the device into
DEVICE_NEEDS_RESET with a configuration-change interrupt, and the device stops using
its queues until the driver resets it.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Callable

from viommu_backend.bitfield import F, Layout, Register, RegisterMap
from viommu_backend.endpoints.block_backend import (
    Backing, BlockBackend, FileBackend, MemoryBackend, open_backend, read_into, write_from)
from viommu_backend.endpoints.dma import DmaFault, DmaPort
from viommu_backend.endpoints.virtio.pci import (
    COMMON_CFG_SIZE, COMMON_OFF, COMMON_REGS, DEVICE_ID_BASE, DEVICE_OFF, ISR_OFF, MSIX_BAR,
    MSIX_BAR_SIZE, MSIX_PBA_OFF, MSIX_TABLE_OFF, NOTIFY_OFF, NOTIFY_OFF_MULTIPLIER, REVISION,
    STRUCT_LEN, SUBSYSTEM_VENDOR_ID, VENDOR_ID, VIRTIO_BAR, VIRTIO_BAR_SIZE, VIRTIO_PCI_CAP,
    PciCapType, Status, VirtioFeature, VirtioPciFunction, VirtioStats, config_bytes,
    feature_bits)
from viommu_backend.endpoints.virtio.virtqueue import (
    AVAIL_F_NO_INTERRUPT, DESC_FLAGS, DESC_SIZE, NO_VECTOR, VIRTQ_DESC, ChainError, Segment,
    Virtqueue, gather, ranges, scatter)

__all__ = [
    # transport and ring names, re-exported for existing importers
    "AVAIL_F_NO_INTERRUPT", "COMMON_CFG_SIZE", "COMMON_OFF", "COMMON_REGS", "DESC_FLAGS",
    "DESC_SIZE", "DEVICE_OFF", "ISR_OFF", "MSIX_BAR", "MSIX_BAR_SIZE", "MSIX_PBA_OFF",
    "MSIX_TABLE_OFF", "NO_VECTOR", "NOTIFY_OFF", "NOTIFY_OFF_MULTIPLIER", "REVISION",
    "STRUCT_LEN", "SUBSYSTEM_VENDOR_ID", "VENDOR_ID", "VIRTIO_BAR", "VIRTIO_BAR_SIZE",
    "VIRTIO_PCI_CAP", "VIRTQ_DESC", "ChainError", "PciCapType", "Segment", "Status",
    "Virtqueue", "feature_bits",
    "Backing", "BlockBackend", "FileBackend", "MemoryBackend", "open_backend",
    # the block device
    "BLK_CONFIG", "BLK_CONFIG_SIZE", "BLK_OUTHDR", "BLK_OUTHDR_SIZE", "CLASS_CODE",
    "DEFAULT_SIZE_MAX", "DEVICE_ID", "MAX_REQUEST_BYTES", "SECTOR_SIZE", "SUBSYSTEM_ID",
    "VIRTIO_BLK_ID_BYTES", "VIRTIO_ID_BLOCK", "BlkStats", "BlkStatus", "Feature", "ReqType",
    "VirtioBlk",
]

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
DEVICE_ID = DEVICE_ID_BASE + VIRTIO_ID_BLOCK
CLASS_CODE = 0x018000
SUBSYSTEM_ID = VIRTIO_ID_BLOCK

SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
MAX_REQUEST_BYTES = 64 << 20  # larger requests complete with IOERR (bounded memory)
DEFAULT_SIZE_MAX = 1 << 20


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
    RING_INDIRECT_DESC = VirtioFeature.RING_INDIRECT_DESC.value
    RING_EVENT_IDX = VirtioFeature.RING_EVENT_IDX.value
    VERSION_1 = VirtioFeature.VERSION_1.value
    ACCESS_PLATFORM = VirtioFeature.ACCESS_PLATFORM.value
    RING_PACKED = VirtioFeature.RING_PACKED.value
    IN_ORDER = VirtioFeature.IN_ORDER.value
    ORDER_PLATFORM = VirtioFeature.ORDER_PLATFORM.value


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


_REQ_NAMES = {t.value: t.name for t in ReqType}

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


@dataclass
class BlkStats(VirtioStats):
    requests: int = 0
    ioerr: int = 0
    unsupp: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    write_through: int = 0  # writes made stable before completion (no FLUSH negotiated)
    by_type: dict[str, int] = field(default_factory=dict)


class VirtioBlk(VirtioPciFunction):
    """A virtio-blk function.  ``backing``: a size in bytes (RAM disk), an image path, or
    a :class:`BlockBackend`; ``dma``: the DMA port (default: guest-physical through the
    function; replace it with :meth:`set_dma_port` once the StreamID is known)."""

    stats: BlkStats

    def __init__(self, name: str = "virtio-blk", backing: Backing = 64 << 20, *,
                 dma: DmaPort | None = None, size: int | None = None,
                 read_only: bool = False, num_queues: int = 1, queue_size: int = 256,
                 blk_size: int = SECTOR_SIZE, serial: str | None = None,
                 require_access_platform: bool = True, msix: bool = True) -> None:
        super().__init__(name, VIRTIO_ID_BLOCK, CLASS_CODE, dma=dma, num_queues=num_queues,
                         queue_size=queue_size,
                         require_access_platform=require_access_platform, msix=msix)
        if blk_size < SECTOR_SIZE or blk_size & (blk_size - 1):
            raise ValueError("blk_size must be a power of two >= 512")
        self.backend = open_backend(backing, size=size, read_only=read_only)
        self.read_only = read_only or self.backend.read_only
        self.blk_size = blk_size
        self.serial = (serial if serial is not None else name).encode()[:VIRTIO_BLK_ID_BYTES]
        self.seg_max = queue_size - 2
        self.size_max = DEFAULT_SIZE_MAX
        self.stats = BlkStats()
        feats = [Feature.BLK_SEG_MAX, Feature.BLK_SIZE_MAX, Feature.BLK_BLK_SIZE,
                 Feature.BLK_FLUSH]
        if self.read_only:
            feats.append(Feature.BLK_RO)
        if num_queues > 1:
            feats.append(Feature.BLK_MQ)
        self.device_features |= feature_bits(*feats)

    @property
    def capacity(self) -> int:
        """Disk size in 512-byte sectors."""
        return self.backend.size // SECTOR_SIZE

    def close(self) -> None:
        """Make every completed write stable and release the backing store (the
        backend's shutdown, e.g. on SIGTERM; the store's close flushes)."""
        self.backend.close()

    def device_config(self) -> bytes:
        """struct virtio_blk_config as the driver reads it."""
        return config_bytes(BLK_CONFIG, BLK_CONFIG_SIZE, {
            "CAPACITY": self.capacity, "SIZE_MAX": self.size_max, "SEG_MAX": self.seg_max,
            "BLK_SIZE": self.blk_size, "NUM_QUEUES": len(self.queues),
            "MIN_IO_SIZE": 1, "OPT_IO_SIZE": 0})

    # -- block requests -----------------------------------------------------------------
    def handle_chain(self, q: Virtqueue, segs: list[Segment]) -> int:
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
            hdr = BLK_OUTHDR.from_bytes(gather(self.dma, rsegs, 0, BLK_OUTHDR_SIZE))
            rtype = BLK_OUTHDR.get(hdr, "TYPE")
            sector = BLK_OUTHDR.get(hdr, "SECTOR")
            name = _REQ_NAMES.get(rtype) or str(rtype)
            st.by_type[name] = st.by_type.get(name, 0) + 1
            if rtype == ReqType.IN:
                self._check_extent(sector, data_wlen)
                self._read_data(sector * SECTOR_SIZE, data_wsegs, data_wlen)
                st.bytes_read += data_wlen
                status, used = BlkStatus.OK, data_wlen + 1
            elif rtype == ReqType.OUT:
                n = rlen - BLK_OUTHDR_SIZE
                if self.read_only:
                    raise _ReqError("write to a read-only disk")
                self._check_extent(sector, n)
                self._write_data(sector * SECTOR_SIZE, rsegs, n)
                if not self.has_feature(Feature.BLK_FLUSH):
                    # FLUSH offered, not negotiated: the driver has no way to make a write
                    # stable, so it must be before it completes (virtio 1.2, 5.2.6.2)
                    self.backend.flush()
                    st.write_through += 1
                st.bytes_written += n
                status = BlkStatus.OK
            elif rtype == ReqType.FLUSH:
                self.backend.flush()
                st.flushes += 1
                status = BlkStatus.OK
            elif rtype == ReqType.GET_ID:
                n = min(VIRTIO_BLK_ID_BYTES, data_wlen)
                scatter(self.dma, data_wsegs, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:n])
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

    def _read_data(self, offset: int, wsegs: list[Segment], n: int) -> None:
        """IN: ``n`` disk bytes at ``offset`` into the driver's writable ``wsegs``.  With
        a :class:`DmaViews` port the whole buffer is translated at once and the disk read
        lands straight in guest RAM; nothing is written unless all of it translates."""
        views_of = _views_of(self.dma)
        if views_of is not None:
            views = views_of(ranges(wsegs, 0, n), write=True)
            read_into(self.backend, offset, views)
        else:
            scatter(self.dma, wsegs, self.backend.pread(offset, n))

    def _write_data(self, offset: int, rsegs: list[Segment], n: int) -> None:
        """OUT: the ``n`` data bytes after the header in ``rsegs`` to the disk at
        ``offset`` (straight from guest RAM with a :class:`DmaViews` port)."""
        views_of = _views_of(self.dma)
        if views_of is not None:
            views = views_of(ranges(rsegs, BLK_OUTHDR_SIZE, n), write=False)
            write_from(self.backend, offset, views)
        else:
            self.backend.pwrite(offset, gather(self.dma, rsegs, BLK_OUTHDR_SIZE, n))

    def _check_extent(self, sector: int, n: int) -> None:
        if n % SECTOR_SIZE:
            raise _ReqError(f"transfer of {n} bytes is not a multiple of {SECTOR_SIZE}")
        if n > MAX_REQUEST_BYTES:
            raise _ReqError(f"transfer of {n} bytes exceeds {MAX_REQUEST_BYTES}")
        if sector * SECTOR_SIZE + n > self.capacity * SECTOR_SIZE:
            raise _ReqError(f"sector {sector} + {n // SECTOR_SIZE} beyond capacity "
                            f"{self.capacity}")


def _views_of(dma: DmaPort) -> Callable[..., list[memoryview]] | None:
    """The port's :meth:`DmaViews.views` (bulk zero-copy access), or None."""
    fn = getattr(dma, "views", None)
    return fn if callable(fn) else None


class _ReqError(Exception):
    """A request the device refuses with VIRTIO_BLK_S_IOERR."""
