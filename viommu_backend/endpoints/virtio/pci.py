"""The virtio-pci modern transport (virtio 1.x, 4.1), device-independent.

PCI identity 1af4:(0x1040 + device type) rev 1, subsystem 1af4:(device type).
Capabilities: vendor-specific virtio structures, PCI Express, PM, MSI-X (optional).

BAR4 (64-bit, prefetchable, 16 KiB) holds the virtio structures:

=======  ==========  =========================================================
offset   structure   notes
=======  ==========  =========================================================
0x0000   COMMON_CFG  struct virtio_pci_common_cfg (:data:`COMMON_REGS`)
0x1000   ISR_CFG     bit 0 queue interrupt, bit 1 config change; read clears
0x2000   DEVICE_CFG  the device's configuration (:meth:`VirtioPciFunction.device_config`)
0x3000   NOTIFY_CFG  queue q notifies at q * NOTIFY_OFF_MULTIPLIER
=======  ==========  =========================================================

BAR1 (32-bit, 4 KiB): MSI-X table at 0 (num_queues + 1 vectors), PBA at 0x800.

A device subclasses :class:`VirtioPciFunction`, ORs its feature bits into
``device_features`` and implements :meth:`~VirtioPciFunction.device_config` and
:meth:`~VirtioPciFunction.handle_chain`; the transport does feature negotiation, the
device status state machine, queue registers, notifications, the split virtqueues
(:mod:`.virtqueue`) and interrupts (MSI-X vectors, or INTx + ISR without MSI-X).
A malformed ring or descriptor chain puts the device into DEVICE_NEEDS_RESET with a
configuration-change interrupt, and the device stops using its queues until reset.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Mapping

from viommu_backend.bitfield import F, Layout, Register, RegisterMap
from viommu_backend.endpoints.dma import DirectDma, DmaFault, DmaPort
from viommu_backend.endpoints.virtio.virtqueue import NO_VECTOR, ChainError, Segment, Virtqueue
from viommu_backend.pci.function import PciFunction

log = logging.getLogger(__name__)

VENDOR_ID = 0x1AF4
DEVICE_ID_BASE = 0x1040  # + virtio device type
REVISION = 1
SUBSYSTEM_VENDOR_ID = 0x1AF4

VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
STRUCT_LEN = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE_OFF, MSIX_PBA_OFF = 0x000, 0x800
ISR_QUEUE, ISR_CONFIG = 1, 2


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


# DRIVER_OK set, DEVICE_NEEDS_RESET and FAILED clear: the device processes its queues
_LIVE = int(Status.DRIVER_OK)
_LIVE_MASK = int(Status.DRIVER_OK | Status.DEVICE_NEEDS_RESET | Status.FAILED)


class VirtioFeature(enum.IntEnum):
    """Device-independent feature bit numbers (the reserved range 28..)."""
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36


def feature_bits(*bits: int) -> int:
    out = 0
    for b in bits:
        out |= 1 << int(b)
    return out


TRANSPORT_FEATURES = feature_bits(
    VirtioFeature.VERSION_1, VirtioFeature.ACCESS_PLATFORM,
    VirtioFeature.RING_INDIRECT_DESC, VirtioFeature.RING_EVENT_IDX)
"""What this transport and its split virtqueues implement (offered by every device)."""

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


def config_bytes(regs: RegisterMap, size: int, values: Mapping[str, int]) -> bytes:
    """A device configuration structure of ``size`` bytes laid out by ``regs``; fields
    not in ``values`` read 0."""
    out = bytearray(size)
    for reg in regs.registers:
        n = reg.width // 8
        out[reg.offset:reg.offset + n] = values.get(reg.name, 0).to_bytes(n, "little")
    return bytes(out)


@dataclass
class VirtioStats:
    """Transport counters; a device's stats class extends this one."""
    notifies: int = 0
    interrupts: int = 0
    needs_reset: int = 0
    last_error: str = ""


class _Bar1(object):
    """BAR1 holds only the MSI-X table/PBA (PciFunction routes those); the rest is RAZ/WI."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class VirtioPciFunction(PciFunction):
    """A virtio device on the virtio-pci modern transport.  ``dma``: the DMA port (default:
    guest-physical through the function; replace it with :meth:`set_dma_port` once the
    StreamID is known).  Subclasses set ``device_features`` (|= their bits) and ``stats``
    (a :class:`VirtioStats`) and implement :meth:`device_config` and :meth:`handle_chain`.
    ``msix=False``: INTx + ISR only."""

    def __init__(self, name: str, device_type: int, class_code: int, *,
                 dma: DmaPort | None = None, num_queues: int = 1, queue_size: int = 256,
                 require_access_platform: bool = True, msix: bool = True) -> None:
        super().__init__(name, VENDOR_ID, DEVICE_ID_BASE + device_type, class_code,
                         revision=REVISION, subsystem_vendor_id=SUBSYSTEM_VENDOR_ID,
                         subsystem_id=device_type)
        if not 1 <= num_queues <= 64:
            raise ValueError("num_queues must be 1..64")
        if queue_size < 2 or queue_size > 32768 or queue_size & (queue_size - 1):
            raise ValueError("queue_size must be a power of two in 2..32768")
        self.require_access_platform = require_access_platform
        self.dma: DmaPort = dma if dma is not None else DirectDma(self)
        self.queues = [Virtqueue(i, queue_size) for i in range(num_queues)]
        self.stats = VirtioStats()
        self.device_features = TRANSPORT_FEATURES

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

    # -- the device's part ---------------------------------------------------------------
    def device_config(self) -> bytes:
        """The device configuration structure as the driver reads it (see
        :func:`config_bytes`); writes to it are ignored."""
        raise NotImplementedError

    def handle_chain(self, q: Virtqueue, segs: list[Segment]) -> int:
        """Perform the request in one descriptor chain of queue ``q``; returns the used
        length (bytes written to the driver).  Device-level failures are reported in the
        request's own status; raising :class:`ChainError` or
        :class:`~viommu_backend.endpoints.dma.DmaFault` means DEVICE_NEEDS_RESET."""
        raise NotImplementedError

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

    # -- features / status ---------------------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features >> int(bit) & 1)

    def _features_acceptable(self) -> bool:
        f = self.driver_features
        if f & ~self.device_features:
            return False
        if not f >> VirtioFeature.VERSION_1 & 1:
            return False  # no legacy interface here
        if self.require_access_platform and not f >> VirtioFeature.ACCESS_PLATFORM & 1:
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
        # ISR and device config ignore writes

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
        self._interrupt(self.config_msix_vector, ISR_CONFIG)

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
        return int(self.status) & _LIVE_MASK == _LIVE  # (plain ints: once per notify)

    def process_queue(self, qi: int) -> int:
        """Complete every available request of queue ``qi``; returns how many."""
        q = self.queues[qi]
        if not self._live() or not q.enabled:
            return 0
        try:
            return q.process(
                self.dma, lambda segs: self.handle_chain(q, segs),
                event_idx=self.has_feature(VirtioFeature.RING_EVENT_IDX),
                indirect=self.has_feature(VirtioFeature.RING_INDIRECT_DESC),
                interrupt=lambda: self._interrupt(q.msix_vector, ISR_QUEUE),
                report=self._report)
        except ChainError as e:
            self.needs_reset(f"queue {qi}: {e}")
        except DmaFault as e:
            self.needs_reset(f"queue {qi}: ring access failed: {e}")
        return 0

    def _report(self, error: str) -> None:
        self.stats.last_error = error
