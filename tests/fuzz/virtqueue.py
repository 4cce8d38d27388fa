"""Virtqueues: a virtio-blk device (RAM disk, untranslated DMA into guest RAM; one per
process) reset and set up before each input by a driver as Linux does it at probe, then a
descriptor table, avail ring and request buffers from the input, and a notification.

Architected answers checked (virtio 1.2, 2.1 / 2.7): a malformed ring or chain sets
DEVICE_NEEDS_RESET (an avail head beyond the queue size must); otherwise every published
request is completed in the used ring; never an exception or an error logged; no access
outside guest RAM."""

from __future__ import annotations

import struct

from tests.support.pci_ctx import TestContext
from tests.support.virtio_driver import DEFAULT_FEATURES, Driver, Ring, blk_header

from tests.fuzz.common import STATS, ErrorTrap, Finding, Reader, fenced_memory
from viommu_backend.endpoints.virtio_blk import Feature, MemoryBackend, Status, VirtioBlk, feature_bits
from viommu_backend.pci.config_space import COMMAND
from viommu_backend.vfio_user.device import PciRegion

RAM, RAM_SIZE = 0x4000_0000, 0x2_0000
RING, QSIZE = RAM, 16
BUFS = RAM + 0x1000
FEATURES = (DEFAULT_FEATURES, DEFAULT_FEATURES | feature_bits(Feature.RING_INDIRECT_DESC),
            DEFAULT_FEATURES | feature_bits(Feature.RING_EVENT_IDX),
            DEFAULT_FEATURES | feature_bits(Feature.RING_INDIRECT_DESC, Feature.RING_EVENT_IDX))
CTX = TestContext(RAM, 0x1000)
CTX.memory.clear()
CTX.memory = fenced_memory(RAM, RAM_SIZE)
TRAP = ErrorTrap()


DISK = MemoryBackend(64 << 10)  # zeroed before each input: no input sees another's writes


def _device() -> tuple[VirtioBlk, Driver]:
    """The device and its driver, built once per process (each input resets them)."""
    dev = VirtioBlk("vblk", backing=DISK, queue_size=QSIZE)
    dev.connected(CTX)
    dev.region_write(PciRegion.CONFIG, 4, COMMAND.encode(MEMORY=1, MASTER=1).to_bytes(2, "little"))

    def rd(bar: int, off: int, size: int) -> int:
        return int.from_bytes(dev.region_read(bar, off, size), "little")

    def wr(bar: int, off: int, size: int, v: int) -> None:
        dev.region_write(bar, off, v.to_bytes(size, "little"))
    return dev, Driver(dev.region_read(PciRegion.CONFIG, 0, 4096), rd, wr)


DEV, DRV = _device()


def _probe(features: int) -> Ring:
    """What Linux's driver does at probe: reset the device (it must read back status 0:
    else a finding), negotiate ``features``, set up queue 0 on a fresh ring, DRIVER_OK."""
    DRV.set("DEVICE_STATUS", 0)
    if DRV.get("DEVICE_STATUS") != 0:
        raise Finding(f"device reset did not take: DEVICE_STATUS {DRV.get('DEVICE_STATUS'):#x}")
    if not DRV.negotiate(features):
        raise Finding("driver features refused")
    ring = Ring(CTX.memory, RING, QSIZE)
    DRV.setup_queue(0, ring)
    DRV.driver_ok()
    CTX.irqs.clear()
    return ring


def one_input(data: bytes) -> None:
    STATS["inputs"] += 1
    DISK.buf[:] = 0
    r = Reader(data)
    drv, ring = DRV, _probe(FEATURES[r.int(1) % len(FEATURES)])
    mem = CTX.memory
    mem.write(ring.desc, r.take(16 * QSIZE))
    avail = r.take(6 + 2 * QSIZE)
    mem.write(ring.avail, avail)
    mem.write(BUFS, r.rest()[:0x2000])
    drv.kick(0)
    CTX.run_soon()
    TRAP.check()
    status = drv.get("DEVICE_STATUS")
    # the avail index the device saw last: the input's, unless a request's data went
    # into the avail ring itself (the device DMAs where the descriptors say)
    idx = struct.unpack("<H", mem.read(ring.avail + 2, 2))[0]
    head = struct.unpack_from("<H", avail, 4)[0]
    if status & Status.DEVICE_NEEDS_RESET:
        STATS["needs_reset"] += 1
    elif 0 < idx <= QSIZE and head >= QSIZE:
        raise Finding(f"avail head {head} >= queue size {QSIZE} without DEVICE_NEEDS_RESET")
    elif idx <= QSIZE and ring.used_idx() != idx:
        raise Finding(f"{idx} requests published, used idx {ring.used_idx()}, no NEEDS_RESET")
    else:
        STATS["completed"] += ring.used_idx()


def seeds() -> list[bytes]:
    """Well-formed requests: a read, a write, a flush and a get-id (direct chains)."""
    out = []
    for rtype, data_len, wr in ((0, 512, True), (1, 512, False), (4, 0, False), (8, 20, True)):
        desc = bytearray(16 * QSIZE)
        bufs = [(BUFS, 16, False)] + ([(BUFS + 0x100, data_len, wr)] if data_len else []) \
            + [(BUFS + 0x80, 1, True)]
        for i, (addr, ln, w) in enumerate(bufs):
            last = i == len(bufs) - 1
            struct.pack_into("<QIHH", desc, 16 * i, addr, ln, (2 if w else 0) | (0 if last else 1),
                             0 if last else i + 1)
        avail = struct.pack("<HHH", 0, 1, 0).ljust(6 + 2 * QSIZE, b"\0")
        out.append(bytes([0]) + bytes(desc) + avail + blk_header(rtype, 3))
    return out
