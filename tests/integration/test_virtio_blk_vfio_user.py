"""virtio-blk served by the real vfio-user server, driven through the project's client
the way QEMU + a guest driver would: config space, BAR4 common config, rings in shared
guest RAM (memfd DMA_MAP), posted notify writes, MSI-X eventfds, data in the image file."""

from __future__ import annotations

import os
import struct
from typing import AsyncIterator

import pytest

from viommu_backend.endpoints.virtio_blk import (
    COMMON_REGS, VIRTIO_BAR, BlkStatus, Feature, PciCapType, ReqType, Status, VirtioBlk,
    feature_bits)
from viommu_backend.pci.capabilities import MSIX_CTRL
from viommu_backend.pci.config_space import COMMAND
from viommu_backend.vfio_user.client import VfioUserClient
from viommu_backend.vfio_user.device import PciIrq, PciRegion
from viommu_backend.vfio_user.server import VfioUserServer

from tests.support.virtio_driver import Ring, blk_header, find_virtio_caps

RAM = 0x4000_0000
CFG = PciRegion.CONFIG
OFF = {r.name: r.offset for r in COMMON_REGS.registers}
WIDTH = {r.name: r.width // 8 for r in COMMON_REGS.registers}
FEATURES = feature_bits(Feature.VERSION_1, Feature.ACCESS_PLATFORM, Feature.BLK_FLUSH,
                        Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC)


def le(v: int, n: int) -> bytes:
    return v.to_bytes(n, "little")


@pytest.fixture
async def rig(tmp_path) -> AsyncIterator[tuple[VfioUserClient, VirtioBlk, str]]:
    img = str(tmp_path / "disk.img")
    dev = VirtioBlk("vblk0", backing=img, size=4 << 20)
    srv = VfioUserServer()
    path = tmp_path / "vblk0.sock"
    srv.add_device(path, dev)
    await srv.start()
    c = await VfioUserClient.connect(path)
    try:
        yield c, dev, img
    finally:
        await c.close()
        await srv.close()
        dev.close()


async def test_virtio_blk_end_to_end(rig) -> None:
    c, dev, img = rig
    mem = await c.map_memory(RAM, 4 << 20)
    cfg = await c.region_read(CFG, 0, 4096)
    assert cfg[:4] == le(0x10421AF4, 4)
    caps = find_virtio_caps(cfg)
    common = caps[PciCapType.COMMON_CFG]["OFFSET"]
    notify = caps[PciCapType.NOTIFY_CFG]
    assert (await c.region_info(VIRTIO_BAR)).size == 0x4000
    await c.region_write(CFG, 4, le(COMMAND.encode(MEMORY=1, MASTER=1), 2))

    async def cset(name: str, v: int) -> None:
        await c.region_write(VIRTIO_BAR, common + OFF[name], le(v, WIDTH[name]))

    async def cget(name: str) -> int:
        return int.from_bytes(await c.region_read(VIRTIO_BAR, common + OFF[name],
                                                  WIDTH[name]), "little")

    # MSI-X: enable, eventfds for config (0) and queue (1), unmask
    assert dev.msix is not None
    await c.region_write(CFG, dev.msix.off + 2, le(MSIX_CTRL.encode(ENABLE=1), 2))
    efds = await c.set_irq_eventfds(PciIrq.MSIX, 0, 2)
    for v in range(2):
        await c.region_write(dev.msix.table_bar, dev.msix.table_off + 16 * v + 12, le(0, 4))

    await cset("DEVICE_STATUS", 0)
    await cset("DEVICE_STATUS", Status.ACKNOWLEDGE | Status.DRIVER)
    for sel in (0, 1):
        await cset("DRIVER_FEATURE_SELECT", sel)
        await cset("DRIVER_FEATURE", (FEATURES >> 32 * sel) & 0xFFFF_FFFF)
    await cset("DEVICE_STATUS", Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
    assert await cget("DEVICE_STATUS") & Status.FEATURES_OK
    await cset("CONFIG_MSIX_VECTOR", 0)
    ring = Ring(mem, RAM + 0x1000, 32)
    await cset("QUEUE_SELECT", 0)
    await cset("QUEUE_SIZE", 32)
    await cset("QUEUE_MSIX_VECTOR", 1)
    assert await cget("QUEUE_MSIX_VECTOR") == 1
    for name, addr in (("QUEUE_DESC", ring.desc), ("QUEUE_DRIVER", ring.avail),
                       ("QUEUE_DEVICE", ring.used)):
        await cset(name, addr)
    await cset("QUEUE_ENABLE", 1)
    await cset("DEVICE_STATUS", Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
               | Status.DRIVER_OK)
    notify_addr = notify["OFFSET"] + await cget("QUEUE_NOTIFY_OFF") * notify["NOTIFY_OFF_MULTIPLIER"]

    # a 64 KiB write in 16 segments, then read back through an indirect table
    payload = os.urandom(64 << 10)
    hdr, data, st = RAM + 0x10000, RAM + 0x20000, RAM + 0x11000
    mem.write(hdr, blk_header(ReqType.OUT, 16))
    mem.write(data, payload)
    bufs = [(hdr, 16, False)] + [(data + i * 4096, 4096, False) for i in range(16)] + \
        [(st, 1, True)]
    ring.set_used_event(0)
    ring.publish(ring.add_chain(bufs[:3] + [(data + 8192, 14 * 4096, False), (st, 1, True)]))
    await c.region_write(VIRTIO_BAR, notify_addr, le(0, 2), posted=True)
    assert await c.wait_irq(efds[1]) == 1
    assert ring.pop_used()[0][1] == 1 and mem.read(st, 1)[0] == BlkStatus.OK
    with open(img, "rb") as f:
        f.seek(16 * 512)
        assert f.read(len(payload)) == payload

    hdr2, data2, st2, table = RAM + 0x12000, RAM + 0x40000, RAM + 0x13000, RAM + 0x14000
    mem.write(hdr2, blk_header(ReqType.IN, 16))
    ibufs = [(hdr2, 16, False), (data2, 64 << 10, True), (st2, 1, True)]
    for k, (a, ln, wr) in enumerate(ibufs):
        last = k == len(ibufs) - 1
        ring.set_desc(k, a, ln, (2 if wr else 0) | (0 if last else 1), 0 if last else k + 1,
                      table=table)
    head = ring.free.pop(0)
    ring.set_desc(head, table, 16 * len(ibufs), 4)
    ring.set_used_event(1)
    ring.publish(head)
    c.region_write_multi([(VIRTIO_BAR, notify_addr, le(0, 2))])
    assert await c.wait_irq(efds[1]) == 1
    assert ring.pop_used() == [(head, (64 << 10) + 1)]
    assert mem.read(data2, 64 << 10) == payload and mem.read(st2, 1)[0] == BlkStatus.OK
    assert struct.unpack("<H", mem.read(ring.used + 4 + 8 * 32, 2))[0] == 2  # avail_event

    # a broken chain: DEVICE_NEEDS_RESET + config interrupt on vector 0
    ring.set_desc(ring.free[0], hdr, 16, 1, 1000)
    ring.publish(ring.free[0])
    await c.region_write(VIRTIO_BAR, notify_addr, le(0, 2), posted=True)
    assert await c.wait_irq(efds[0]) == 1
    assert await cget("DEVICE_STATUS") & Status.DEVICE_NEEDS_RESET
    # vfio-user DEVICE_RESET brings the device back to status 0
    await c.reset()
    assert await cget("DEVICE_STATUS") == 0
