"""The virtio-pci transport on its own: a minimal non-block device built on
VirtioPciFunction (as the next virtio device would be) negotiates, gets its config
structure read through BAR4 and has its descriptor chains handed to it."""

from __future__ import annotations

import struct

from tests.support.endpoint_env import DATA, RAM, SmmuEnv
from tests.support.virtio_driver import Driver, Ring

from viommu_backend.bitfield import Register, RegisterMap
from viommu_backend.endpoints.virtio.pci import (
    DEVICE_ID_BASE, TRANSPORT_FEATURES, VENDOR_ID, Status, VirtioFeature, VirtioPciFunction,
    config_bytes, feature_bits)
from viommu_backend.endpoints.virtio.virtqueue import Segment, Virtqueue, gather, scatter
from viommu_backend.pci.config_space import COMMAND
from viommu_backend.vfio_user.device import PciRegion

ECHO_TYPE = 0x3F
ECHO_CONFIG = RegisterMap([Register("MAGIC", 0x0, 32), Register("NQ", 0x4, 16)])
F_ECHO_UPPER = 3  # a device-specific feature bit


class Echo(VirtioPciFunction):
    """Copies its readable buffers into its writable ones, upper-cased."""

    def __init__(self) -> None:
        super().__init__("echo", ECHO_TYPE, 0xFF0000, num_queues=2, queue_size=16, msix=False)
        self.device_features |= feature_bits(F_ECHO_UPPER)
        self.seen: list[tuple[int, list[Segment]]] = []

    def device_config(self) -> bytes:
        return config_bytes(ECHO_CONFIG, 8, {"MAGIC": 0xEC40, "NQ": len(self.queues)})

    def handle_chain(self, q: Virtqueue, segs: list[Segment]) -> int:
        self.seen.append((q.index, segs))
        rd = [s for s in segs if not s.writable]
        wr = [s for s in segs if s.writable]
        data = gather(self.dma, rd, 0, sum(s.length for s in rd)).upper()
        scatter(self.dma, wr, data)
        return len(data)


def test_minimal_device_on_the_transport() -> None:
    env = SmmuEnv()
    dev = Echo()
    dev.connected(env.ctx)
    dev.region_write(PciRegion.CONFIG, 4, COMMAND.encode(MEMORY=1, MASTER=1).to_bytes(2, "little"))
    cfg = dev.region_read(PciRegion.CONFIG, 0, 4096)
    assert struct.unpack_from("<HH", cfg, 0) == (VENDOR_ID, DEVICE_ID_BASE + ECHO_TYPE)
    assert struct.unpack_from("<H", cfg, 0x2E)[0] == ECHO_TYPE  # subsystem id
    rd = lambda bar, off, size: int.from_bytes(dev.region_read(bar, off, size), "little")  # noqa: E731
    wr = lambda bar, off, size, v: dev.region_write(bar, off, v.to_bytes(size, "little"))  # noqa: E731
    drv = Driver(cfg, rd, wr)
    assert drv.device_features() == TRANSPORT_FEATURES | 1 << F_ECHO_UPPER
    assert drv.config(0, 4) == 0xEC40 and drv.config(4, 2) == 2 and drv.config(8, 4) == 0
    # a driver without VERSION_1 is refused; with it, the device goes live
    assert not drv.negotiate(feature_bits(F_ECHO_UPPER))
    assert drv.negotiate(feature_bits(VirtioFeature.VERSION_1, VirtioFeature.ACCESS_PLATFORM))
    ring = Ring(env.mem, RAM + 0x8_0000, 16)
    drv.setup_queue(1, ring)
    drv.driver_ok()
    assert dev.status & Status.DRIVER_OK
    src, dst = DATA, DATA + 0x1000
    env.mem.write(src, b"hello, ")
    env.mem.write(src + 0x100, b"virtio")
    head = ring.add_chain([(src, 7, False), (src + 0x100, 6, False), (dst, 8, True),
                           (dst + 0x100, 8, True)])
    ring.publish(head)
    drv.kick(1)
    assert ring.used_idx() == 0  # the notify is a posted write: handled just after
    env.ctx.run_soon()
    assert ring.pop_used() == [(head, 13)]
    assert env.mem.read(dst, 8) + env.mem.read(dst + 0x100, 5) == b"HELLO, VIRTIO"
    assert [q for q, _ in dev.seen] == [1] and len(dev.seen[0][1]) == 4
    assert dev.intx_level and dev.stats.interrupts == 1  # INTx + ISR (no MSI-X)
    assert drv.isr() == 1 and not dev.intx_level  # reading ISR clears it
    env.close()
