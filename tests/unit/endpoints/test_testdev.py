"""The DMA test device: registers, doorbell interrupts and the copy engine."""

from __future__ import annotations

from typing import Iterator

import pytest
from tests.support.endpoint_env import DATA, SmmuEnv
from tests.support.pci_ctx import RAM_BASE, RAM_SIZE, TestContext

from viommu_backend.endpoints.testdev import (
    CLASS_CODE, DEVICE_ID, DMA_MAX_LEN, MAGIC, MSIX_PBA_OFF, MSIX_TABLE_OFF, REGS,
    VENDOR_ID, VERSION, DmaErr, TestDevice)
from viommu_backend.endpoints.dma import TranslatedDma
from viommu_backend.pci.capabilities import DEVCAP2, MSIX_CTRL, PASID_CTRL, PCIE_REGS, CapId, ExtCapId
from viommu_backend.pci.function import PciFunction
from viommu_backend.smmuv3.fields import EventId
from viommu_backend.pci.config_space import COMMAND, STATUS
from viommu_backend.vfio_user.device import PciIrq, PciRegion

MSIX, INTX = int(PciIrq.MSIX), int(PciIrq.INTX)
OFF = {r.name: r.offset for r in REGS.registers}
STATUS_L = REGS.layouts["DMA_STATUS"]


@pytest.fixture
def ctx() -> Iterator[TestContext]:
    c = TestContext()
    yield c
    c.close()


@pytest.fixture
def dev(ctx: TestContext) -> TestDevice:
    d = TestDevice()
    d.connected(ctx)
    return d


def w(dev: TestDevice, name: str, v: int, size: int = 4) -> None:
    dev.region_write(0, OFF[name], v.to_bytes(size, "little"))


def r(dev: TestDevice, name: str, size: int = 4) -> int:
    return int.from_bytes(dev.region_read(0, OFF[name], size), "little")


def cfg_w(dev: TestDevice, off: int, size: int, v: int) -> None:
    dev.region_write(PciRegion.CONFIG, off, v.to_bytes(size, "little"))


def cfg_r(dev: TestDevice, off: int, size: int) -> int:
    return int.from_bytes(dev.region_read(PciRegion.CONFIG, off, size), "little")


def enable_msix(dev: TestDevice) -> None:
    assert dev.msix is not None
    cfg_w(dev, dev.msix.off + 2, 2, MSIX_CTRL.encode(ENABLE=1))
    for v in range(dev.msix.nvec):
        dev.region_write(0, MSIX_TABLE_OFF + 16 * v + 12, bytes(4))


def test_identity_and_capabilities(dev: TestDevice) -> None:
    assert cfg_r(dev, 0, 2) == VENDOR_ID and cfg_r(dev, 2, 2) == DEVICE_ID
    assert cfg_r(dev, 9, 3) == CLASS_CODE
    assert [cid for cid, _ in dev.cfg.caps()] == [CapId.PCIE, CapId.PM, CapId.MSIX]
    cfg_w(dev, 0x10, 4, 0xFFFFFFFF)
    assert cfg_r(dev, 0x10, 4) == 0xFFFFF000  # 4 KiB, 32-bit, non-prefetchable
    assert dev.region_info(0).size == 0x1000 and dev.region_info(1).size == 0
    assert dev.irq_info(PciIrq.MSIX).count == 2


def test_magic_version_scratch(dev: TestDevice) -> None:
    assert r(dev, "MAGIC") == MAGIC and r(dev, "VERSION") == VERSION == 4
    w(dev, "MAGIC", 0)
    assert r(dev, "MAGIC") == MAGIC
    w(dev, "SCRATCH", 0x11223344)
    assert r(dev, "SCRATCH") == 0x11223344
    dev.region_write(0, OFF["SCRATCH"] + 1, b"\xAA")  # byte write merges
    assert r(dev, "SCRATCH") == 0x1122AA44
    assert dev.region_read(0, OFF["SCRATCH"] + 2, 2) == b"\x22\x11"
    assert dev.region_read(0, 0x200, 4) == bytes(4)  # unassigned offsets read 0


def test_doorbell_intx_level_until_status_cleared(dev: TestDevice, ctx: TestContext) -> None:
    w(dev, "DOORBELL", 0)
    assert ctx.irqs == [(INTX, 0)] and dev.intx_level
    assert STATUS.get(cfg_r(dev, 6, 2), "INTERRUPT") == 1
    assert r(dev, "IRQ_STATUS") == 1
    w(dev, "IRQ_STATUS", 0)  # writing 0 does not clear
    assert dev.intx_level
    w(dev, "IRQ_STATUS", 1)
    assert r(dev, "IRQ_STATUS") == 0 and not dev.intx_level
    assert STATUS.get(cfg_r(dev, 6, 2), "INTERRUPT") == 0


def test_doorbell_msix_vector(dev: TestDevice, ctx: TestContext) -> None:
    enable_msix(dev)
    w(dev, "DOORBELL", 1)
    w(dev, "DOORBELL", 0)
    assert ctx.irqs == [(MSIX, 1), (MSIX, 0)] and not dev.intx_level
    dev.region_write(0, MSIX_TABLE_OFF + 12, b"\1\0\0\0")  # mask vector 0
    w(dev, "DOORBELL", 0)
    assert int.from_bytes(dev.region_read(0, MSIX_PBA_OFF, 8), "little") == 1
    assert len(ctx.irqs) == 2


def program_dma(dev: TestDevice, src: int, dst: int, n: int, irq: bool = False) -> None:
    w(dev, "DMA_SRC", src, 8)
    # the destination as two dwords (what a 32-bit devmem does), the source as one qword
    dev.region_write(0, OFF["DMA_DST"], (dst & 0xFFFF_FFFF).to_bytes(4, "little"))
    dev.region_write(0, OFF["DMA_DST"] + 4, (dst >> 32).to_bytes(4, "little"))
    w(dev, "DMA_LEN", n)
    w(dev, "DMA_CTRL", 1 | (2 if irq else 0))


def test_dma_copy(dev: TestDevice, ctx: TestContext) -> None:
    payload = bytes(range(256)) * 16
    ctx.memory.write(RAM_BASE + 0x1000, payload)
    cfg_w(dev, 4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
    program_dma(dev, RAM_BASE + 0x1000, RAM_BASE + 0x8000, len(payload))
    assert r(dev, "DMA_DST", 8) == RAM_BASE + 0x8000 and r(dev, "DMA_SRC", 8) == RAM_BASE + 0x1000
    # the copy runs after the posted write is handled, not inside it
    assert STATUS_L.decode(r(dev, "DMA_STATUS"))["BUSY"] == 1
    assert ctx.memory.read(RAM_BASE + 0x8000, 16) == bytes(16)
    assert r(dev, "DMA_CTRL") & 1 == 0  # GO reads 0
    ctx.run_soon()
    assert ctx.memory.read(RAM_BASE + 0x8000, len(payload)) == payload
    st = STATUS_L.decode(r(dev, "DMA_STATUS"))
    assert (st["BUSY"], st["DONE"], st["ERROR"]) == (0, 1, 0)
    assert r(dev, "DMA_COUNT") == 1 and ctx.irqs == []  # no IRQ requested


def test_dma_completion_interrupt_msix(dev: TestDevice, ctx: TestContext) -> None:
    enable_msix(dev)
    cfg_w(dev, 4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
    program_dma(dev, RAM_BASE, RAM_BASE + 0x100, 8, irq=True)
    ctx.run_soon()
    assert ctx.irqs == [(MSIX, 1)] and r(dev, "IRQ_STATUS") == 0b10


def test_dma_repeat_runs_a_series_then_interrupts_once(dev: TestDevice, ctx: TestContext) -> None:
    enable_msix(dev)
    cfg_w(dev, 4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
    ctx.memory.write(RAM_BASE, b"0123456789abcdef")
    w(dev, "DMA_REPEAT", 5)
    program_dma(dev, RAM_BASE, RAM_BASE + 0x100, 16, irq=True)
    for done in range(1, 5):  # one copy per turn of the event loop, BUSY in between
        ctx.soon.pop(0)()
        assert r(dev, "DMA_COUNT") == done and STATUS_L.decode(r(dev, "DMA_STATUS"))["BUSY"] == 1
        assert ctx.irqs == [] and len(ctx.soon) == 1
    ctx.run_soon()
    st = STATUS_L.decode(r(dev, "DMA_STATUS"))
    assert (st["BUSY"], st["DONE"], st["ERROR"]) == (0, 1, 0) and r(dev, "DMA_COUNT") == 5
    assert ctx.memory.read(RAM_BASE + 0x100, 16) == b"0123456789abcdef"
    assert ctx.irqs == [(MSIX, 1)] and r(dev, "DMA_REPEAT") == 5  # the count stays programmed


@pytest.mark.parametrize("count", [0, 1])
def test_dma_repeat_zero_or_one_is_a_single_copy(dev: TestDevice, ctx: TestContext, count: int) -> None:
    cfg_w(dev, 4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
    w(dev, "DMA_REPEAT", count)
    program_dma(dev, RAM_BASE, RAM_BASE + 0x100, 16)
    ctx.run_soon()
    assert r(dev, "DMA_COUNT") == 1 and STATUS_L.decode(r(dev, "DMA_STATUS"))["DONE"] == 1


def test_dma_repeat_series_ends_at_a_failure_or_reset(dev: TestDevice, ctx: TestContext) -> None:
    cfg_w(dev, 4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
    w(dev, "DMA_REPEAT", 0x1_0003)  # COUNT is 16 bits: 3
    program_dma(dev, RAM_BASE, RAM_BASE + 0x100, 16)
    ctx.soon.pop(0)()
    cfg_w(dev, 4, 2, COMMAND.encode(MEMORY=1))  # bus master off: the next copy fails
    ctx.run_soon()
    st = STATUS_L.decode(r(dev, "DMA_STATUS"))
    assert (st["BUSY"], st["ERROR"], st["ERR_CODE"]) == (0, 1, DmaErr.NO_BUS_MASTER)
    assert r(dev, "DMA_COUNT") == 1
    cfg_w(dev, 4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
    program_dma(dev, RAM_BASE, RAM_BASE + 0x100, 16)
    ctx.soon.pop(0)()
    dev.reset()  # forgets the rest of the series
    ctx.run_soon()
    assert r(dev, "DMA_COUNT") == 0 and r(dev, "DMA_STATUS") == 0 and r(dev, "DMA_REPEAT") == 0


@pytest.mark.parametrize("case,code", [
    ("no_master", DmaErr.NO_BUS_MASTER),
    ("unmapped", DmaErr.BAD_ADDRESS),
    ("off_the_end", DmaErr.BAD_ADDRESS),
    ("too_long", DmaErr.TOO_LONG),
])
def test_dma_errors(dev: TestDevice, ctx: TestContext, case: str, code: DmaErr) -> None:
    if case != "no_master":
        cfg_w(dev, 4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
    src, dst, n = RAM_BASE, RAM_BASE + 0x1000, 64
    if case == "unmapped":
        src = 0x1000
    elif case == "off_the_end":
        dst = RAM_BASE + RAM_SIZE - 32
    elif case == "too_long":
        n = DMA_MAX_LEN + 1
    ctx.memory.write(RAM_BASE + RAM_SIZE - 64, b"\xEE" * 64)
    program_dma(dev, src, dst, n, irq=True)
    ctx.run_soon()
    st = STATUS_L.decode(r(dev, "DMA_STATUS"))
    assert (st["DONE"], st["ERROR"], st["ERR_CODE"]) == (0, 1, code)
    assert r(dev, "DMA_COUNT") == 0
    assert ctx.irqs == [(INTX, 0)]  # completion (with error) still interrupts
    # nothing was written, not even the part that fitted
    assert ctx.memory.read(RAM_BASE + RAM_SIZE - 64, 64) == b"\xEE" * 64


def test_reset_clears_registers_and_queued_dma(dev: TestDevice, ctx: TestContext) -> None:
    cfg_w(dev, 4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
    w(dev, "SCRATCH", 5)
    ctx.memory.write(RAM_BASE, b"abcd")
    program_dma(dev, RAM_BASE, RAM_BASE + 0x10, 4)
    dev.reset()
    ctx.run_soon()  # the queued copy must not run after reset
    assert r(dev, "SCRATCH") == 0 and r(dev, "DMA_STATUS") == 0 and r(dev, "DMA_COUNT") == 0
    assert ctx.memory.read(RAM_BASE + 0x10, 4) == bytes(4)
    assert r(dev, "MAGIC") == MAGIC and not dev.bus_master_enabled


# -- behind the IOMMU: SubstreamID, translated copies, ATS/PRI/PASID declared ------------


def test_extended_capabilities_declared(dev: TestDevice) -> None:
    ids = [cid for cid, *_ in dev.cfg.ext_caps()]
    assert ids == [ExtCapId.ATS, ExtCapId.PRI, ExtCapId.PASID]
    assert dev.pasid is not None and dev.pasid.max_width == 20 and not dev.pasid.enabled
    assert dev.pri is not None and dev.pri.capacity == 32
    assert dev.ats is not None and not dev.ats.enabled
    cfg_w(dev, dev.pasid.off + 6, 2, PASID_CTRL.encode(ENABLE=1))
    assert dev.pasid.enabled


def test_pasid_device_supports_end_end_tlp_prefixes(dev: TestDevice) -> None:
    """A PASID is carried in an End-End TLP Prefix: DevCap2 says the function supports
    them (Linux's pci_enable_pasid refuses a device whose path lacks them), read-only."""
    assert dev.pcie_cap is not None
    devcap2 = dev.pcie_cap + PCIE_REGS["DEVCAP2"].offset
    assert DEVCAP2.get(dev.cfg.read(devcap2, 4), "EETLPP") == 1
    cfg_w(dev, devcap2, 4, 0)
    assert DEVCAP2.get(dev.cfg.read(devcap2, 4), "EETLPP") == 1
    plain = PciFunction("plain", 0x5555, 0x2, 0xFF0000)
    assert DEVCAP2.get(plain.cfg.read(plain.add_pcie_cap() + PCIE_REGS["DEVCAP2"].offset, 4), "EETLPP") == 0


@pytest.fixture
def smmu_env() -> Iterator[SmmuEnv]:
    e = SmmuEnv()
    yield e
    e.close()


def translated_dev(env: SmmuEnv, sid: int) -> TestDevice:
    d = TestDevice()
    d.connected(env.ctx)
    d.set_dma_port(TranslatedDma(d, env.mgr, sid))
    cfg_w(d, 4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
    return d


def test_translated_copy_with_and_without_ssid(smmu_env: SmmuEnv) -> None:
    env = smmu_env
    pts = env.s1_stream(0x20, n_cds=2)
    pts[0].map(0x1000, DATA)
    pts[0].map(0x2000, DATA + 0x1000)
    pts[1].map(0x1000, DATA + 0x5000)  # same IOVA, other address space
    pts[1].map(0x2000, DATA + 0x6000)
    env.mem.write(DATA, b"ssid none" + bytes(7))
    env.mem.write(DATA + 0x5000, b"ssid one!" + bytes(7))
    dev = translated_dev(env, 0x20)
    program_dma(dev, 0x1000, 0x2000, 16)
    env.ctx.run_soon()
    assert STATUS_L.decode(r(dev, "DMA_STATUS"))["DONE"] == 1
    assert env.mem.read(DATA + 0x1000, 9) == b"ssid none"
    c = env.mgr.counters
    assert (c.ssid_translations, c.ssid_bytes_read, c.ssid_bytes_written) == (0, 0, 0)
    # SSID valid while PASID is disabled: refused without touching memory
    w(dev, "DMA_SSID", (1 << 31) | 1)
    program_dma(dev, 0x1000, 0x2000, 16)
    env.ctx.run_soon()
    st = STATUS_L.decode(r(dev, "DMA_STATUS"))
    assert (st["ERROR"], st["ERR_CODE"]) == (1, DmaErr.PASID_DISABLED)
    assert env.mem.read(DATA + 0x6000, 9) == bytes(9)
    assert dev.pasid is not None
    cfg_w(dev, dev.pasid.off + 6, 2, PASID_CTRL.encode(ENABLE=1))
    program_dma(dev, 0x1000, 0x2000, 16)
    env.ctx.run_soon()
    assert STATUS_L.decode(r(dev, "DMA_STATUS"))["DONE"] == 1
    assert env.mem.read(DATA + 0x6000, 9) == b"ssid one!"
    # PASID DMA counted apart: one page read and one written with SubstreamID 1
    assert (c.ssid_translations, c.ssid_bytes_read, c.ssid_bytes_written) == (2, 16, 16)
    assert (c.bytes_read, c.bytes_written) == (32, 32)
    assert r(dev, "DMA_SSID") == (1 << 31) | 1 and r(dev, "DMA_COUNT") == 2


@pytest.mark.parametrize("case,event", [
    ("unmapped_src", EventId.F_TRANSLATION),
    ("read_only_dst", EventId.F_PERMISSION),
])
def test_translation_fault_reports_event(smmu_env: SmmuEnv, case: str, event: EventId) -> None:
    env = smmu_env
    (pt,) = env.s1_stream(0x21)
    pt.map(0x1000, DATA)
    pt.map(0x2000, DATA + 0x1000, read_only=True)
    dev = translated_dev(env, 0x21)
    src, dst = (0x9000, 0x1000) if case == "unmapped_src" else (0x1000, 0x2000)
    env.mem.write(DATA, b"\x11" * 32)
    program_dma(dev, src, dst, 32, irq=True)
    env.ctx.run_soon()
    st = STATUS_L.decode(r(dev, "DMA_STATUS"))
    assert (st["ERROR"], st["ERR_CODE"], st["EVENT"]) == (1, DmaErr.TRANSLATION, event)
    assert dev.last_fault is not None and dev.last_fault.event == event.name
    assert env.mem.read(DATA + 0x1000, 32) == bytes(32)
    assert env.ctx.irqs == [(INTX, 0)]
