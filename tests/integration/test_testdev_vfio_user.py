"""The test device served by the real vfio-user server, driven by the vfio-user client
the way QEMU drives it: config reads, BAR sizing, INTx eventfd + unmask, MSI-X, DMA."""

from __future__ import annotations

from typing import AsyncIterator

import pytest

from viommu_backend.endpoints.testdev import MAGIC, MSIX_TABLE_OFF, REGS, TestDevice
from viommu_backend.pci.capabilities import MSIX_CTRL
from viommu_backend.pci.config_space import COMMAND
from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user.client import VfioUserClient
from viommu_backend.vfio_user.device import PciIrq, PciRegion
from viommu_backend.vfio_user.server import VfioUserServer

OFF = {r.name: r.offset for r in REGS.registers}
RAM = 0x4000_0000
CFG = PciRegion.CONFIG


def u32(b: bytes) -> int:
    return int.from_bytes(b, "little")


def le(v: int, n: int = 4) -> bytes:
    return v.to_bytes(n, "little")


@pytest.fixture
async def client(tmp_path) -> AsyncIterator[tuple[VfioUserClient, TestDevice]]:
    dev = TestDevice()
    srv = VfioUserServer()
    path = tmp_path / "testdev.sock"
    srv.add_device(path, dev)
    await srv.start()
    c = await VfioUserClient.connect(path)
    try:
        yield c, dev
    finally:
        await c.close()
        await srv.close()


async def test_realize_sequence_and_bar_sizing(client) -> None:
    c, _ = client
    info = await c.device_info()
    assert (info.num_regions, info.num_irqs) == (9, 5)
    assert (await c.region_info(CFG)).size == 4096
    assert (await c.region_info(PciRegion.ROM)).size == 0
    cfg = await c.region_read(CFG, 0, 4096)
    assert cfg[:4] == le(0x00015555)
    await c.region_write(CFG, 0x30, le(0xFFFFF800))  # QEMU's ROM probe
    assert u32(await c.region_read(CFG, 0x30, 4)) == 0
    await c.region_write(CFG, 0x10, le(0xFFFFFFFF))
    assert u32(await c.region_read(CFG, 0x10, 4)) == 0xFFFFF000
    assert (await c.irq_info(PciIrq.MSIX)).count == 2


async def test_intx_doorbell_and_unmask(client) -> None:
    c, _ = client
    (efd,) = await c.set_irq_eventfds(PciIrq.INTX, 0, 1)
    assert u32(await c.region_read(0, OFF["MAGIC"], 4)) == MAGIC
    await c.region_write(0, OFF["DOORBELL"], le(0), posted=True)
    assert await c.wait_irq(efd) == 1
    # automasked: the client unmasks after the guest's access; still high -> fires again
    await c.set_irqs(p.IrqSetFlags.DATA_NONE | p.IrqSetFlags.ACTION_UNMASK, PciIrq.INTX, 0, 1)
    assert await c.wait_irq(efd) == 1
    await c.region_write(0, OFF["IRQ_STATUS"], le(1))
    await c.set_irqs(p.IrqSetFlags.DATA_NONE | p.IrqSetFlags.ACTION_UNMASK, PciIrq.INTX, 0, 1)
    assert u32(await c.region_read(0, OFF["IRQ_STATUS"], 4)) == 0


async def test_dma_copy_and_msix_completion(client) -> None:
    c, dev = client
    mem = await c.map_memory(RAM, 0x10_0000)
    mem.write(RAM + 0x2000, b"vfio-user dma!" * 10)
    await c.region_write(CFG, 4, le(COMMAND.encode(MEMORY=1, MASTER=1), 2))
    assert dev.msix is not None
    await c.region_write(CFG, dev.msix.off + 2, le(MSIX_CTRL.encode(ENABLE=1), 2))
    efds = await c.set_irq_eventfds(PciIrq.MSIX, 0, 2)
    await c.region_write(0, MSIX_TABLE_OFF + 16 + 12, le(0), posted=True)  # unmask vector 1
    c.region_write_multi([(0, OFF["DMA_SRC"], le(RAM + 0x2000, 8)),
                          (0, OFF["DMA_DST"], le(RAM + 0x9000, 8)),
                          (0, OFF["DMA_LEN"], le(140)),
                          (0, OFF["DMA_CTRL"], le(0b11))])
    assert await c.wait_irq(efds[1]) == 1
    assert mem.read(RAM + 0x9000, 140) == b"vfio-user dma!" * 10
    st = REGS.layouts["DMA_STATUS"].decode(u32(await c.region_read(0, OFF["DMA_STATUS"], 4)))
    assert (st["DONE"], st["ERROR"]) == (1, 0)
    assert u32(await c.region_read(0, OFF["DMA_COUNT"], 4)) == 1
