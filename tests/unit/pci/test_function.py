"""PciFunction: vfio-user region/irq info, BAR dispatch, MSI-X, INTx, reset, DMA."""

from __future__ import annotations

import errno
from typing import Iterator

import pytest
from tests.support.pci_ctx import RAM_BASE, RAM_SIZE, TestContext

from viommu_backend.memory import GuestMemoryError
from viommu_backend.pci.capabilities import DEVCTL, MSI_CTRL, MSIX_CTRL
from viommu_backend.pci.config_space import COMMAND, STATUS
from viommu_backend.pci.function import DmaError, PciFunction, split_access
from viommu_backend.vfio_user.device import (
    IrqInfoFlags, IrqSetFlags, PciIrq, PciRegion, RegionFlags, SetIrqs, VfioUserError)

MSIX, INTX, MSI = int(PciIrq.MSIX), int(PciIrq.INTX), int(PciIrq.MSI)


class RegFile:
    """A plain 8-byte-granular register file recording every access it sees."""

    def __init__(self, size: int) -> None:
        self.mem = bytearray(size)
        self.log: list[tuple[str, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return int.from_bytes(self.mem[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size))
        self.mem[offset:offset + size] = value.to_bytes(size, "little")


def make_fn(*, msix: bool = True, msi: bool = False) -> tuple[PciFunction, RegFile, RegFile]:
    fn = PciFunction("t", 0x5555, 0x0002, 0xFF0000)
    bar0, bar2 = RegFile(0x4000), RegFile(0x10000)
    fn.add_bar(0, 0x4000, bar0)
    fn.add_bar(2, 0x10000, bar2, is64=True, prefetchable=True)
    fn.add_pcie_cap(flr=True)
    fn.add_pm_cap()
    if msix:
        fn.add_msix(8, 0, 0x2000, 0, 0x3000)
    if msi:
        fn.add_msi(4)
    return fn, bar0, bar2


@pytest.fixture
def ctx() -> Iterator[TestContext]:
    c = TestContext()
    yield c
    c.close()


def cfg_w(fn: PciFunction, off: int, size: int, v: int) -> None:
    fn.region_write(PciRegion.CONFIG, off, v.to_bytes(size, "little"))


def cfg_r(fn: PciFunction, off: int, size: int) -> int:
    return int.from_bytes(fn.region_read(PciRegion.CONFIG, off, size), "little")


def bar_w(fn: PciFunction, bar: int, off: int, size: int, v: int) -> None:
    fn.region_write(bar, off, v.to_bytes(size, "little"))


def bar_r(fn: PciFunction, bar: int, off: int, size: int) -> int:
    return int.from_bytes(fn.region_read(bar, off, size), "little")


def test_device_region_and_irq_info() -> None:
    fn, _, _ = make_fn()
    info = fn.device_info()
    assert (info.num_regions, info.num_irqs) == (9, 5)
    sizes = {i: fn.region_info(i).size for i in range(9)}
    assert sizes == {0: 0x4000, 1: 0, 2: 0x10000, 3: 0, 4: 0, 5: 0, 6: 0, 7: 4096, 8: 0}
    assert fn.region_info(PciRegion.CONFIG).flags == RegionFlags.READ | RegionFlags.WRITE
    assert fn.region_info(PciRegion.BAR3).flags == 0
    with pytest.raises(VfioUserError) as e:
        fn.region_info(9)
    assert e.value.errno == errno.EINVAL
    intx = fn.irq_info(PciIrq.INTX)
    assert intx.count == 1 and intx.flags == (IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE
                                              | IrqInfoFlags.AUTOMASKED)
    assert fn.irq_info(PciIrq.MSI).count == 0
    assert fn.irq_info(PciIrq.MSIX).count == 8
    assert fn.irq_info(PciIrq.ERR).count == 1 and fn.irq_info(PciIrq.REQ).count == 1
    with pytest.raises(VfioUserError):
        fn.irq_info(5)


def test_config_region_read_whole_and_rom() -> None:
    fn, _, _ = make_fn()
    data = fn.region_read(PciRegion.CONFIG, 0, 4096)
    assert len(data) == 4096 and data[:4] == bytes.fromhex("55550200")
    cfg_w(fn, 0x30, 4, 0xFFFFF800)
    assert cfg_r(fn, 0x30, 4) == 0
    with pytest.raises(VfioUserError):
        fn.region_read(PciRegion.CONFIG, 4094, 4)


def test_split_access() -> None:
    assert list(split_access(0, 8)) == [(0, 8)]
    assert list(split_access(1, 7)) == [(1, 1), (2, 2), (4, 4)]
    assert list(split_access(6, 12)) == [(6, 2), (8, 8), (16, 2)]
    assert list(split_access(3, 3)) == [(3, 1), (4, 2)]


def test_bar_accesses_split_into_aligned_handler_calls() -> None:
    fn, bar0, bar2 = make_fn()
    bar_w(fn, 2, 0x101, 7, 0x0706050403020100 >> 8)
    assert bar2.log == [("w", 0x101, 1), ("w", 0x102, 2), ("w", 0x104, 4)]
    assert bytes(bar2.mem[0x100:0x108]) == bytes(range(8))
    bar2.log.clear()
    assert bar_r(fn, 2, 0x100, 8) == 0x0706050403020100 & ~0xFF
    assert bar2.log == [("r", 0x100, 8)]
    assert fn.region_read(2, 0x103, 3) == bytes([3, 4, 5])
    bar_w(fn, 0, 0x10, 4, 0xCAFEF00D)
    assert bar_r(fn, 0, 0x10, 4) == 0xCAFEF00D


def test_bar_access_errors() -> None:
    fn, _, _ = make_fn()
    with pytest.raises(VfioUserError):
        fn.region_read(0, 0x3FFC, 8)  # past the end
    with pytest.raises(VfioUserError):
        fn.region_read(1, 0, 4)  # unused BAR
    with pytest.raises(VfioUserError):
        fn.region_write(PciRegion.ROM, 0, b"\0")


def test_bars_served_without_memory_decode_and_flags() -> None:
    fn, bar0, _ = make_fn()
    assert not fn.memory_enabled and not fn.bus_master_enabled
    bar0.mem[0:4] = (0x1234).to_bytes(4, "little")
    assert bar_r(fn, 0, 0, 4) == 0x1234  # QEMU does the decode itself
    cfg_w(fn, 4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
    assert fn.memory_enabled and fn.bus_master_enabled


def enable_msix(fn: PciFunction, *, fmask: int = 0) -> None:
    assert fn.msix is not None
    off = fn.msix.off + 2
    cfg_w(fn, off, 2, MSIX_CTRL.encode(ENABLE=1, FUNCTION_MASK=fmask))


def test_msix_table_and_pba_through_bar(ctx: TestContext) -> None:
    fn, bar0, _ = make_fn()
    fn.connected(ctx)
    # power-on: every vector masked
    assert all(bar_r(fn, 0, 0x2000 + 16 * v + 12, 4) == 1 for v in range(8))
    # program vector 3 with one 8-byte and two 4-byte writes
    bar_w(fn, 0, 0x2030, 8, 0x0000_0080_FEE0_1000)
    bar_w(fn, 0, 0x2038, 4, 0x4041)
    assert fn.msix and fn.msix.entry(3)["ADDR"] == 0x80_FEE0_1000
    assert fn.msix.entry(3)["DATA"] == 0x4041
    assert bar0.log == []  # the table never reaches the BAR's handler
    bar_w(fn, 0, 0x203C, 4, 0xFFFF_FFFE)  # reserved vector control bits stay 0
    assert bar_r(fn, 0, 0x203C, 4) == 0
    # disabled: nothing delivered, nothing pending
    bar_w(fn, 0, 0x203C, 4, 1)
    assert not fn.msix_notify(3) and ctx.irqs == [] and bar_r(fn, 0, 0x3000, 8) == 0
    enable_msix(fn)
    assert not fn.msix_notify(3)  # masked -> pending
    assert bar_r(fn, 0, 0x3000, 8) == 1 << 3 and ctx.irqs == []
    bar_w(fn, 0, 0x3000, 8, 0)  # PBA is read-only
    assert bar_r(fn, 0, 0x3000, 8) == 1 << 3
    bar_w(fn, 0, 0x203C, 4, 0)  # unmask -> delivered, pending clears
    assert ctx.irqs == [(MSIX, 3)] and bar_r(fn, 0, 0x3000, 8) == 0
    assert fn.msix_notify(3) and ctx.irqs == [(MSIX, 3)] * 2
    assert bar0.log == []
    assert fn.irq_signals == {"MSIX": 2}  # delivered ones only (QMP query-viommu-functions)


def test_msix_function_mask_and_missing_eventfd(ctx: TestContext) -> None:
    fn, _, _ = make_fn()
    fn.connected(ctx)
    for v in range(8):
        bar_w(fn, 0, 0x2000 + 16 * v + 12, 4, 0)
    enable_msix(fn, fmask=1)
    fn.msix_notify(1)
    fn.msix_notify(5)
    assert ctx.irqs == [] and bar_r(fn, 0, 0x3000, 1) == 0b10_0010
    enable_msix(fn, fmask=0)  # clearing the function mask delivers both
    assert sorted(ctx.irqs) == [(MSIX, 1), (MSIX, 5)]
    ctx.irqs.clear()
    ctx.no_eventfd.add((MSIX, 2))  # QEMU has not given vector 2 an eventfd yet
    assert not fn.msix_notify(2) and fn.msix.pending[2]  # type: ignore[union-attr]
    ctx.no_eventfd.clear()
    fn.set_irqs(SetIrqs(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, MSIX, 2, 1,
                        fds=(9,)))
    assert ctx.irqs == [(MSIX, 2)] and bar_r(fn, 0, 0x3000, 8) == 0
    with pytest.raises(ValueError):
        fn.msix_notify(8)


def test_msix_table_virtualized_by_the_client(ctx: TestContext) -> None:
    """QEMU's vfio-pci keeps the MSI-X table itself: ours is never accessed, so its
    reset mask bits must not hold interrupts back (masking is the eventfd's absence);
    once a client does use the table here, its mask bits apply."""
    fn, _, _ = make_fn()
    fn.connected(ctx)
    enable_msix(fn)
    assert fn.msix is not None and fn.msix.client_table
    assert fn.msix_notify(4) and ctx.irqs == [(MSIX, 4)]
    ctx.no_eventfd.add((MSIX, 6))  # "masked" by the client: no eventfd for vector 6
    assert not fn.msix_notify(6) and fn.msix.pending[6]
    ctx.no_eventfd.clear()
    fn.set_irqs(SetIrqs(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, MSIX, 6, 1,
                        fds=(9,)))
    assert ctx.irqs == [(MSIX, 4), (MSIX, 6)]
    assert bar_r(fn, 0, 0x2000 + 16 * 4 + 12, 4) == 1  # a table access: ours from now on
    assert not fn.msix.client_table
    assert not fn.msix_notify(4) and fn.msix.pending[4]  # masked since reset
    bar_w(fn, 0, 0x2000 + 16 * 4 + 12, 4, 0)
    assert ctx.irqs[-1] == (MSIX, 4) and not fn.msix.pending[4]


def test_msix_structures_must_fit_in_a_bar() -> None:
    fn = PciFunction("t", 0x5555, 2, 0xFF0000)
    fn.add_bar(0, 0x1000, RegFile(0x1000))
    with pytest.raises(ValueError):
        fn.add_msix(128, 0, 0x900, 0, 0x0)  # 2 KiB table from 0x900 runs past the end
    with pytest.raises(ValueError):
        fn.add_msix(64, 0, 0xC00, 0, 0xF00)  # PBA inside the table
    with pytest.raises(ValueError):
        fn.add_msix(1, 1, 0, 0, 0x800)  # BAR1 does not exist
    m = fn.add_msix(64, 0, 0xC00, 0, 0x800)  # fits exactly: accepted
    assert fn.irq_info(PciIrq.MSIX).count == 64 and m.table_range() == range(0xC00, 0x1000)


def test_intx_level_and_unmask_retrigger(ctx: TestContext) -> None:
    fn, _, _ = make_fn()
    fn.connected(ctx)
    unmask = SetIrqs(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, INTX, 0, 1)
    fn.set_intx(True)
    assert ctx.irqs == [(INTX, 0)]
    assert STATUS.get(cfg_r(fn, 6, 2), "INTERRUPT") == 1
    fn.set_intx(True)  # still high: no new edge
    assert ctx.irqs == [(INTX, 0)]
    fn.set_irqs(unmask)  # automasked line unmasked while high -> fire again
    assert ctx.irqs == [(INTX, 0)] * 2
    fn.set_intx(False)
    assert STATUS.get(cfg_r(fn, 6, 2), "INTERRUPT") == 0
    fn.set_irqs(unmask)  # low: nothing
    bool_false = SetIrqs(IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_UNMASK, INTX, 0, 1,
                         bools=(False,))
    fn.set_intx(True)
    fn.set_irqs(bool_false)  # DATA_BOOL false = no unmask
    assert ctx.irqs == [(INTX, 0)] * 3


def test_intx_disable(ctx: TestContext) -> None:
    fn, _, _ = make_fn()
    fn.connected(ctx)
    cfg_w(fn, 4, 2, COMMAND.encode(INTX_DISABLE=1))
    fn.set_intx(True)
    assert ctx.irqs == [] and STATUS.get(cfg_r(fn, 6, 2), "INTERRUPT") == 1
    fn.set_irqs(SetIrqs(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, INTX, 0, 1))
    assert ctx.irqs == []
    cfg_w(fn, 4, 2, 0)  # re-enabled while the line is high -> delivered
    assert ctx.irqs == [(INTX, 0)]


def test_notify_picks_msix_then_msi_then_intx(ctx: TestContext) -> None:
    fn, _, _ = make_fn(msix=True, msi=True)
    fn.connected(ctx)
    fn.notify(1)
    assert ctx.irqs == [(INTX, 0)] and not fn.intx_level  # a pulse, no level kept
    assert fn.msi is not None
    cfg_w(fn, fn.msi.off + 2, 2, MSI_CTRL.encode(ENABLE=1, MME=1))
    fn.notify(1)
    assert ctx.irqs[-1] == (MSI, 1)
    bar_w(fn, 0, 0x2000 + 16 + 12, 4, 0)
    enable_msix(fn)
    fn.notify(1)
    assert ctx.irqs[-1] == (MSIX, 1) and len(ctx.irqs) == 3
    assert fn.irq_info(PciIrq.MSI).count == 4


def test_reset_restores_power_on_state(ctx: TestContext) -> None:
    fn, _, _ = make_fn()
    fn.connected(ctx)
    hooks: list[str] = []
    fn.on_reset.append(lambda: hooks.append("reset"))
    power_on = fn.region_read(PciRegion.CONFIG, 0, 4096)
    cfg_w(fn, 4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
    cfg_w(fn, 0x10, 4, 0x1000_0000)
    cfg_w(fn, 0x3C, 1, 5)
    enable_msix(fn)
    bar_w(fn, 0, 0x200C, 4, 1)
    bar_w(fn, 0, 0x201C, 4, 0)
    fn.msix_notify(0)
    fn.set_intx(True)
    fn.reset()
    assert fn.region_read(PciRegion.CONFIG, 0, 4096) == power_on
    assert bar_r(fn, 0, 0x201C, 4) == 1 and bar_r(fn, 0, 0x3000, 8) == 0
    assert not fn.intx_level and not fn.bus_master_enabled
    assert hooks == ["reset"]


def test_flr_through_config_write_resets(ctx: TestContext) -> None:
    fn, _, _ = make_fn()
    hooks: list[int] = []
    fn.on_reset.append(lambda: hooks.append(1))
    cfg_w(fn, 4, 2, COMMAND.encode(MEMORY=1))
    assert fn.pcie_cap is not None
    devctl = fn.pcie_cap + 8
    cfg_w(fn, devctl, 2, cfg_r(fn, devctl, 2) | DEVCTL.encode(BCR_FLR=1))
    assert hooks == [1] and not fn.memory_enabled
    assert DEVCTL.get(cfg_r(fn, devctl, 2), "BCR_FLR") == 0


def test_dma_requires_bus_master(ctx: TestContext) -> None:
    fn, _, _ = make_fn()
    with pytest.raises(DmaError):
        fn.dma_read(RAM_BASE, 4)  # no client
    fn.connected(ctx)
    with pytest.raises(DmaError):
        fn.dma_write(RAM_BASE, b"x")
    cfg_w(fn, 4, 2, COMMAND.encode(MASTER=1))
    fn.dma_write(RAM_BASE + 0x100, b"hello")
    assert ctx.memory.read(RAM_BASE + 0x100, 5) == b"hello"
    assert fn.dma_read(RAM_BASE + 0x101, 4) == b"ello"
    with pytest.raises(GuestMemoryError):
        fn.dma_read(RAM_BASE + RAM_SIZE - 2, 4)  # runs off the end of guest RAM
    with pytest.raises(GuestMemoryError):
        fn.dma_write(0x1000, b"x")
    fn.disconnected()
    with pytest.raises(DmaError):
        fn.dma_read(RAM_BASE, 1)
