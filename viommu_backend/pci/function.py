"""A PCI function served over vfio-user: config space, memory BARs, capabilities and
interrupts (INTx level, MSI, MSI-X) on top of :class:`VfioUserDevice`.

Device models (the SMMU function, the endpoints) subclass or compose
:class:`PciFunction`: they add BARs with an :class:`MmioHandler`, declare capabilities,
raise interrupts with :meth:`PciFunction.notify` / :meth:`set_intx` and do DMA with
:meth:`PciFunction.dma_read` / :meth:`dma_write` (refused unless Bus Master is on).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from viommu_backend.pci.capabilities import (
    DEVCAP2, PCIE_REGS, AtsCap, MsiCap, MsixCap, PasidCap, PciePortType, PriCap, add_pcie_cap,
    add_pm_cap, add_vendor_cap)
from viommu_backend.pci.config_space import COMMAND, CONFIG_SIZE, HEADER, ConfigSpace
from viommu_backend.vfio_user.protocol import (
    IRQ_ACTION_TRIGGER, IRQ_ACTION_UNMASK, IRQ_DATA_BOOL, IRQ_DATA_EVENTFD, IRQ_DATA_MASK,
    IRQ_DATA_NONE)
from viommu_backend.vfio_user.device import (
    DeviceContext, DeviceFlags, DeviceInfo, IrqInfo, IrqInfoFlags, PciIrq,
    PciRegion, RegionFlags, RegionInfo, SetIrqs, VfioUserDevice, VfioUserError, einval)

if TYPE_CHECKING:  # pragma: no cover
    from viommu_backend.memory import GuestMemory

log = logging.getLogger(__name__)

# Bus Master Enable: its byte in the configuration space and its bit in that byte
_MASTER_BYTE = HEADER["COMMAND"].offset + (COMMAND["MASTER"].mask.bit_length() - 1) // 8
_MASTER_BIT = COMMAND["MASTER"].mask >> (8 * (_MASTER_BYTE - HEADER["COMMAND"].offset))


class MmioHandler(Protocol):
    """Register block behind a BAR; ``size`` is 1, 2, 4 or 8 and the access is
    naturally aligned (PciFunction splits anything else)."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class DmaError(Exception):
    """A device DMA that cannot be performed (bus master off, no client, bad address)."""


@dataclass
class Bar:
    index: int
    size: int
    handler: MmioHandler
    is64: bool
    prefetchable: bool


def split_access(offset: int, count: int) -> Iterator[tuple[int, int]]:
    """Split ``[offset, offset+count)`` into naturally aligned 1/2/4/8-byte pieces."""
    end = offset + count
    while offset < end:
        size = 8
        while size > 1 and (offset % size or offset + size > end):
            size //= 2
        yield offset, size
        offset += size


class PciFunction(VfioUserDevice):
    """A type-0 PCI function with up to six memory BARs."""

    def __init__(self, name: str, vendor_id: int, device_id: int, class_code: int,
                 revision: int = 0, subsystem_vendor_id: int | None = None,
                 subsystem_id: int = 0, *, interrupt_pin: int = 1) -> None:
        self.name = name
        self.cfg = ConfigSpace()
        self.bars: dict[int, Bar] = {}
        self.ctx: DeviceContext | None = None
        self.on_reset: list[Callable[[], None]] = []
        self.msix: MsixCap | None = None
        self.msi: MsiCap | None = None
        self.ats: AtsCap | None = None
        self.pri: PriCap | None = None
        self.pasid: PasidCap | None = None
        self.pcie_cap: int | None = None
        self.pm_cap: int | None = None
        self._intx_level = False
        self.resets = 0  # VFIO_USER_DEVICE_RESETs (QEMU's machine / function resets)
        # trapped guest accesses (vfio-user REGION_READ/WRITE) per BAR index, for benchmarks
        self.bar_reads: dict[int, int] = {}
        self.bar_writes: dict[int, int] = {}
        self.irq_signals: dict[str, int] = {}  # vfio-user interrupts signalled: INTX / MSI / MSIX
        self.on_irq_signal: list[Callable[[], None]] = []  # after each one signalled
        cfg = self.cfg
        cfg.init_header("VENDOR_ID", vendor_id)
        cfg.init_header("DEVICE_ID", device_id)
        cfg.init_header("REVISION_ID", revision)
        cfg.init_header("CLASS_CODE", class_code)
        cfg.init_header("SUBSYSTEM_VENDOR_ID",
                        vendor_id if subsystem_vendor_id is None else subsystem_vendor_id)
        cfg.init_header("SUBSYSTEM_ID", subsystem_id)
        cfg.init_header("INTERRUPT_PIN", interrupt_pin)
        cfg.install(0, HEADER.values())
        cfg.watch(HEADER["COMMAND"].offset, 2, self._command_written)

    # -- construction ------------------------------------------------------------------
    def add_bar(self, index: int, size: int, handler: MmioHandler, *, is64: bool = False,
                prefetchable: bool = False) -> Bar:
        taken = set(self.bars) | {b.index + 1 for b in self.bars.values() if b.is64}
        if index in taken or (is64 and index + 1 in taken):
            raise ValueError(f"BAR{index} already in use")
        self.cfg.setup_bar(index, size, is64=is64, prefetchable=prefetchable)
        bar = Bar(index, size, handler, is64, prefetchable)
        self.bars[index] = bar
        return bar

    def add_pcie_cap(self, *, port_type: PciePortType = PciePortType.ENDPOINT,
                     flr: bool = False, **kw: int) -> int:
        self.pcie_cap = add_pcie_cap(self.cfg, port_type=port_type, flr=flr,
                                     on_flr=self.reset if flr else None, **kw)
        return self.pcie_cap

    def add_pm_cap(self) -> int:
        self.pm_cap = add_pm_cap(self.cfg)
        return self.pm_cap

    def add_vendor_cap(self, body: bytes, wmask: bytes | None = None) -> int:
        return add_vendor_cap(self.cfg, body, wmask)

    def add_msix(self, nvec: int, table_bar: int, table_off: int, pba_bar: int,
                 pba_off: int) -> MsixCap:
        pba_size = (nvec + 63) // 64 * 8
        for bar, off, size in ((table_bar, table_off, nvec * 16), (pba_bar, pba_off, pba_size)):
            if bar not in self.bars or off + size > self.bars[bar].size:
                raise ValueError(f"MSI-X structure at BAR{bar}+{off:#x} outside a BAR")
        if table_bar == pba_bar and table_off < pba_off + pba_size and \
                pba_off < table_off + nvec * 16:
            raise ValueError("MSI-X table and PBA overlap")
        self.msix = MsixCap(self.cfg, nvec, table_bar, table_off, pba_bar, pba_off,
                            trigger=lambda v: self._trigger(PciIrq.MSIX, v))
        return self.msix

    def add_msi(self, nvec: int = 1, *, is64: bool = True,
                per_vector_mask: bool = True) -> MsiCap:
        self.msi = MsiCap(self.cfg, nvec, lambda v: self._trigger(PciIrq.MSI, v),
                          is64=is64, per_vector_mask=per_vector_mask)
        return self.msi

    def add_ats(self, **kw: int | bool) -> AtsCap:
        self.ats = AtsCap(self.cfg, **kw)  # type: ignore[arg-type]
        return self.ats

    def add_pri(self, capacity: int = 32, *, pasid_required: bool = False) -> PriCap:
        self.pri = PriCap(self.cfg, capacity, pasid_required=pasid_required)
        return self.pri

    def add_pasid(self, max_width: int = 20, *, exec_perm: bool = False,
                  priv: bool = False) -> PasidCap:
        self.pasid = PasidCap(self.cfg, max_width, exec_perm=exec_perm, priv=priv)
        if self.pcie_cap is not None:
            # a PASID travels in an End-End TLP Prefix: say so in DevCap2 (Linux's
            # pci_enable_pasid refuses a device without it on its whole path)
            devcap2 = self.pcie_cap + PCIE_REGS["DEVCAP2"].offset
            self.cfg.init(devcap2, 4, DEVCAP2.set(self.cfg.read(devcap2, 4), "EETLPP", 1))
        return self.pasid

    # -- state -------------------------------------------------------------------------
    @property
    def memory_enabled(self) -> bool:
        return bool(self.cfg.command("MEMORY"))

    @property
    def bus_master_enabled(self) -> bool:
        # checked on every DMA: the COMMAND byte holding MASTER, read directly
        return bool(self.cfg.data[_MASTER_BYTE] & _MASTER_BIT)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.cfg.command("INTX_DISABLE"))

    @property
    def intx_level(self) -> bool:
        return self._intx_level

    @property
    def memory(self) -> "GuestMemory":
        if self.ctx is None:
            raise DmaError(f"{self.name}: no client connected")
        return self.ctx.memory

    # -- VfioUserDevice ----------------------------------------------------------------
    def device_info(self) -> DeviceInfo:
        return DeviceInfo(DeviceFlags.RESET | DeviceFlags.PCI, PciRegion.NUM, PciIrq.NUM)

    def region_info(self, index: int) -> RegionInfo:
        rw = RegionFlags.READ | RegionFlags.WRITE
        if 0 <= index <= PciRegion.BAR5:
            bar = self.bars.get(index)
            return RegionInfo(index, rw, bar.size) if bar else RegionInfo(index, RegionFlags(0), 0)
        if index == PciRegion.CONFIG:
            return RegionInfo(index, rw, CONFIG_SIZE)
        if index in (PciRegion.ROM, PciRegion.VGA):
            return RegionInfo(index, RegionFlags(0), 0)
        raise einval(f"no region {index}")

    def irq_info(self, index: int) -> IrqInfo:
        ev = IrqInfoFlags.EVENTFD
        if index == PciIrq.INTX:
            count = 1 if self.cfg.header("INTERRUPT_PIN") else 0
            return IrqInfo(index, ev | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED, count)
        if index == PciIrq.MSI:
            return IrqInfo(index, ev | IrqInfoFlags.NORESIZE, self.msi.nvec if self.msi else 0)
        if index == PciIrq.MSIX:
            return IrqInfo(index, ev, self.msix.nvec if self.msix else 0)
        if index in (PciIrq.ERR, PciIrq.REQ):
            return IrqInfo(index, ev, 1)
        raise einval(f"no irq index {index}")

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == PciRegion.CONFIG:
            self._check_range(offset, count, CONFIG_SIZE)
            return self.cfg.read_bytes(offset, count)
        bar = self._bar(index, offset, count)
        self.bar_reads[index] = self.bar_reads.get(index, 0) + 1
        if count in (1, 2, 4, 8) and not offset % count:  # one naturally aligned access
            return self._bar_read(bar, offset, count).to_bytes(count, "little")
        out = bytearray()
        for off, size in split_access(offset, count):
            out += self._bar_read(bar, off, size).to_bytes(size, "little")
        return bytes(out)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == PciRegion.CONFIG:
            self._check_range(offset, len(data), CONFIG_SIZE)
            self.cfg.write_bytes(offset, bytes(data))
            return
        bar = self._bar(index, offset, len(data))
        self.bar_writes[index] = self.bar_writes.get(index, 0) + 1
        n = len(data)
        if n in (1, 2, 4, 8) and not offset % n:  # one naturally aligned access
            self._bar_write(bar, offset, n, int.from_bytes(data, "little"))
            return
        for off, size in split_access(offset, len(data)):
            rel = off - offset
            self._bar_write(bar, off, size, int.from_bytes(data[rel:rel + size], "little"))

    def set_irqs(self, req: SetIrqs) -> None:
        flags = int(req.flags)  # plain ints: an INTx unmask comes with every interrupt
        data = flags & IRQ_DATA_MASK
        if req.index == PciIrq.INTX and self._intx_level:
            unmask = bool(flags & IRQ_ACTION_UNMASK) and (
                data == IRQ_DATA_NONE or (data == IRQ_DATA_BOOL and req.bools[:1] == (True,)))
            assigned = bool(flags & IRQ_ACTION_TRIGGER) and \
                data == IRQ_DATA_EVENTFD and any(fd >= 0 for fd in req.fds)
            if unmask or assigned:
                self._fire_intx()
        elif flags & IRQ_ACTION_TRIGGER and data == IRQ_DATA_EVENTFD:
            # a vector got an eventfd: deliver what was left pending for want of one
            vectors = range(req.start, req.start + req.count)
            if req.index == PciIrq.MSIX and self.msix:
                self.msix.deliver_pending(vectors)
            elif req.index == PciIrq.MSI and self.msi:
                self.msi.deliver_pending()

    def reset(self) -> None:
        """Back to the power-on state: config space, MSI-X table/PBA, INTx low, PRI
        credits; then the device model's ``on_reset`` hooks.  Counted in ``resets``."""
        self.resets += 1
        log.info("%s: function reset (%d so far)", self.name, self.resets)
        self.cfg.reset()
        if self.msix:
            self.msix.reset()
        if self.pri:
            self.pri.reset_state()
        self._intx_level = False
        for fn in list(self.on_reset):
            fn()

    def connected(self, ctx: DeviceContext) -> None:
        """A new client gets the device in its power-on state, whatever the previous
        one left (e.g. a QEMU killed with the SMMU enabled and queues running)."""
        self.reset()
        self.ctx = ctx

    def disconnected(self) -> None:
        self.ctx = None

    # -- interrupts --------------------------------------------------------------------
    def _trigger(self, index: int, sub: int = 0) -> bool:
        ok = self.ctx is not None and bool(self.ctx.trigger_irq(index, sub))
        if ok:
            name = PciIrq(index).name
            self.irq_signals[name] = self.irq_signals.get(name, 0) + 1
            for fn in self.on_irq_signal:
                fn()
        return ok

    def _fire_intx(self) -> None:
        if self.cfg.header("INTERRUPT_PIN") and not self.intx_disabled:
            self._trigger(PciIrq.INTX)

    def set_intx(self, level: bool) -> None:
        """Drive INTA# to ``level``.  Rising: the eventfd fires once; vfio-user INTx is
        automasked, so the client's next ACTION_UNMASK re-fires while still high."""
        level = bool(level)
        if level == self._intx_level:
            return
        self._intx_level = level
        self.cfg.set_status("INTERRUPT", int(level))
        if level:
            self._fire_intx()

    def msix_notify(self, vector: int) -> bool:
        return self.msix.notify(vector) if self.msix else False

    def notify(self, vector: int = 0) -> None:
        """Signal ``vector`` by whatever the guest enabled: MSI-X, else MSI, else an INTx
        pulse (one eventfd edge; the client holds the line until the guest's next
        access and unmasks)."""
        if self.msix and self.msix.enabled:
            self.msix.notify(vector)
        elif self.msi and self.msi.enabled:
            self.msi.notify(vector)
        else:
            self._fire_intx()

    def _command_written(self, old: int, new: int) -> None:
        was_disabled = bool(COMMAND.get(old, "INTX_DISABLE"))
        if was_disabled and not self.intx_disabled and self._intx_level:
            self._fire_intx()

    # -- DMA ---------------------------------------------------------------------------
    def _dma_check(self) -> "GuestMemory":
        if not self.bus_master_enabled:
            raise DmaError(f"{self.name}: DMA with bus master disabled")
        return self.memory

    def dma_read(self, addr: int, n: int) -> bytes:
        """Read guest memory (fd-backed regions) as this function's DMA."""
        return bytes(self._dma_check().read(addr, n))

    def dma_write(self, addr: int, data: bytes) -> None:
        self._dma_check().write(addr, data)

    # -- BAR dispatch ------------------------------------------------------------------
    @staticmethod
    def _check_range(offset: int, count: int, size: int) -> None:
        if offset < 0 or count < 0 or offset + count > size:
            raise einval(f"access {offset:#x}+{count:#x} outside region of {size:#x}")

    def _bar(self, index: int, offset: int, count: int) -> Bar:
        bar = self.bars.get(index)
        if bar is None:
            raise VfioUserError(errno.EINVAL, f"{self.name}: region {index} not implemented")
        self._check_range(offset, count, bar.size)
        return bar

    def _bar_read(self, bar: Bar, off: int, size: int) -> int:
        m = self.msix
        if m is not None:
            if bar.index == m.table_bar and off in m.table_range():
                return m.table_read(off - m.table_off, size)
            if bar.index == m.pba_bar and off in m.pba_range():
                return m.pba_read(off - m.pba_off, size)
        return int(bar.handler.read(off, size)) & ((1 << 8 * size) - 1)

    def _bar_write(self, bar: Bar, off: int, size: int, value: int) -> None:
        m = self.msix
        if m is not None:
            if bar.index == m.table_bar and off in m.table_range():
                m.table_write(off - m.table_off, size, value)
                return
            if bar.index == m.pba_bar and off in m.pba_range():
                return  # the PBA is read-only
        bar.handler.write(off, size, value)
