"""The PCI function that exposes the SMMUv3 register block to the guest.

BAR0 (128 KiB, 64-bit, non-prefetchable): SMMU page 0 at 0x0, page 1 at 0x10000.
With the SMMU option ``registers = "shared"`` BAR0 is a memfd the client maps into the
guest (:mod:`viommu_backend.smmuv3.shared_regs`); a :class:`RegisterPoller` on the
server loop takes the driver's writes.  Interrupts: INTA# is the "combined" wired
interrupt (event queue, PRI queue, global errors; level: high while any enabled source is
pending).  With ``msix=True`` an MSI-X
table in BAR2 offers one vector per source; once the guest enables MSI-X, each rising
source sends its vector instead of driving INTx.
"""

from __future__ import annotations

import asyncio
import time

from viommu_backend.memory import GuestMemory
from viommu_backend.pci.function import PciFunction
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.smmu_config import SmmuConfig
from viommu_backend.smmuv3.device import (IRQ_CMD_SYNC, IRQ_EVTQ, IRQ_GERROR, IRQ_PRIQ,
                                          SMMUv3)
from viommu_backend.smmuv3.shared_regs import PollSchedule, SharedRegisters
from viommu_backend.vfio_user.device import DeviceContext, RegionFlags, RegionInfo

VENDOR_ID = 0x5555  # not a PCI-SIG assigned vendor
DEVICE_ID = 0x0806
CLASS_CODE = 0x080600  # base class 08 (system peripheral), subclass 06 (IOMMU)

MSIX_BAR = 2
MSIX_VECTORS = {IRQ_EVTQ: 0, IRQ_PRIQ: 1, IRQ_GERROR: 2, IRQ_CMD_SYNC: 3}
_MSIX_BAR_SIZE = 0x1000
_MSIX_PBA_OFF = 0x800


class _RazWi:
    """Handler for BAR space that only holds the MSI-X structures."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class RegisterPoller:
    """Scans shared registers on the asyncio loop, as often as :class:`PollSchedule` says."""

    def __init__(self, shared: SharedRegisters, schedule: PollSchedule = PollSchedule()) -> None:
        self.shared = shared
        self.schedule = schedule
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.Handle | None = None
        self._last_active = 0.0

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop()
        self._loop = loop
        self.kick()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None

    def kick(self) -> None:
        """The driver is about to use the SMMU (it wrote a register, or an endpoint behind
        it just interrupted): scan at once and keep spinning for a while."""
        self._last_active = time.monotonic()
        waiting = isinstance(self._handle, asyncio.TimerHandle)  # a tick, not a spin
        if self._loop is not None and (self._handle is None or waiting):
            if self._handle is not None:
                self._handle.cancel()
            self._schedule(0.0)

    def _schedule(self, delay: float) -> None:
        assert self._loop is not None
        self._handle = (self._loop.call_soon(self._run) if delay == 0.0
                        else self._loop.call_later(delay, self._run))

    def _run(self) -> None:
        now = time.monotonic()
        if self.shared.poll():
            self._last_active = now
        self._schedule(self.schedule.delay(now - self._last_active))


class SMMUv3Function(PciFunction):
    def __init__(self, name: str = "viommu", config: SmmuConfig | None = None, *,
                 sink: object | None = None, msix: bool = False) -> None:
        super().__init__(name, VENDOR_ID, DEVICE_ID, CLASS_CODE)
        self._levels = {src: False for src in MSIX_VECTORS}
        self.smmu = SMMUv3(config, sink=sink, irq=self, memory=self._guest_memory)
        self.shared: SharedRegisters | None = None
        self.poller: RegisterPoller | None = None
        if self.smmu.config.registers == "shared":
            self.shared = SharedRegisters(self.smmu)
            self.poller = RegisterPoller(self.shared)
        self.add_bar(0, regs.BAR_SIZE, self.shared or self.smmu, is64=True)
        self.add_pcie_cap()
        if msix:
            self.add_bar(MSIX_BAR, _MSIX_BAR_SIZE, _RazWi(), is64=True)
            self.add_msix(len(MSIX_VECTORS), MSIX_BAR, 0, MSIX_BAR, _MSIX_PBA_OFF)
        self.on_reset.append(self.smmu.reset)
        if self.shared is not None:
            self.on_reset.append(self.shared.reset)

    def _guest_memory(self) -> GuestMemory | None:
        return self.ctx.memory if self.ctx is not None else None

    def region_info(self, index: int) -> RegionInfo:
        if index == 0 and self.shared is not None:
            return RegionInfo(0, RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP,
                              self.shared.size, fd=self.shared.fd)
        return super().region_info(index)

    def connected(self, ctx: DeviceContext) -> None:
        super().connected(ctx)
        self._apply_intx()
        if self.poller is not None:
            try:  # connected() runs on the server loop; unit tests drive it without one
                self.poller.start(asyncio.get_running_loop())
            except RuntimeError:
                pass

    def disconnected(self) -> None:
        if self.poller is not None:
            self.poller.stop()
        super().disconnected()

    # -- IrqSink ----------------------------------------------------------------------------
    def _msix_on(self) -> bool:
        return self.msix is not None and self.msix.enabled

    def set_level(self, source: str, level: bool) -> None:
        rising = level and not self._levels.get(source, False)
        self._levels[source] = level
        if rising and self._msix_on():
            self.msix_notify(MSIX_VECTORS[source])
        self._apply_intx()

    def pulse(self, source: str) -> None:
        if self._msix_on():
            self.msix_notify(MSIX_VECTORS[source])

    def _apply_intx(self) -> None:
        self.set_intx(any(self._levels.values()) and not self._msix_on())
