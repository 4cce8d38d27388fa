"""The PCI function that exposes the SMMUv3 register block to the guest.

BAR0 (128 KiB, 64-bit, non-prefetchable): SMMU page 0 at 0x0, page 1 at 0x10000.
With the SMMU option ``registers = "shared"`` BAR0 is a memfd the client maps into the
guest (:mod:`viommu_backend.smmuv3.shared_regs`); a :class:`RegisterPoller` watches
the page from a thread and has the server loop take the driver's writes.  Interrupts: INTA# is the "combined" wired
interrupt (event queue, PRI queue, global errors; level: high while any enabled source is
pending).  With ``msix=True`` an MSI-X
table in BAR2 offers one vector per source; once the guest enables MSI-X, each rising
source sends its vector instead of driving INTx.
"""

from __future__ import annotations

import asyncio
import threading
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
    """Watches the shared registers from a detector thread; the loop takes the writes.

    The thread only looks (:meth:`SharedRegisters.pending`, a compare of the register
    words with those last taken) and sleeps as :class:`PollSchedule` says between looks.
    When it sees a change it asks the loop (``call_soon_threadsafe``) to run
    :meth:`SharedRegisters.poll`, at most one request outstanding, so the register model
    only ever runs on the loop and a busy driver never floods it.  The thread lives from
    :meth:`start` to :meth:`stop` (which joins it)."""

    def __init__(self, shared: SharedRegisters, schedule: PollSchedule = PollSchedule()) -> None:
        self.shared = shared
        self.schedule = schedule
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._kicked = threading.Event()  # set by kick(): look now, at the fastest step
        self._scan_asked = False  # a poll requested from the loop and not yet run

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop()
        self._stopping.clear()
        self._scan_asked = False
        self._thread = threading.Thread(target=self._watch, args=(loop,),
                                        name="smmuv3-register-detector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            self._kicked.set()  # ends the sleep at once
            thread.join()
            self._kicked.clear()

    def kick(self) -> None:
        """The driver is about to use the SMMU (an endpoint behind it just interrupted):
        look at once and at the fastest step again."""
        self._kicked.set()

    # -- detector thread ---------------------------------------------------------------
    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        me = threading.current_thread()
        last_active = time.monotonic()
        while not self._stopping.is_set():
            self.shared.stats.looks += 1
            if not self._scan_asked and self.shared.pending():
                last_active = time.monotonic()
                self._scan_asked = True
                try:
                    loop.call_soon_threadsafe(self._scan, me)
                except RuntimeError:  # the loop closed without stopping us
                    return
            if self._kicked.wait(self.schedule.delay(time.monotonic() - last_active)):
                self._kicked.clear()
                last_active = time.monotonic()

    # -- loop ------------------------------------------------------------------------------
    def _scan(self, thread: threading.Thread) -> None:
        if thread is not self._thread:  # asked by a detector since stopped
            return
        try:
            self.shared.poll()
        finally:
            self._scan_asked = False


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
