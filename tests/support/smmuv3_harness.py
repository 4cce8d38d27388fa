"""Shared set-up for the SMMUv3 register-model tests: a real GuestMemory over a memfd,
an SMMUv3 with a recording command sink and interrupt sink, and helpers that program
it the way Linux's arm-smmu-v3 driver does (register writes only)."""

from __future__ import annotations

import mmap

from viommu_backend.memory import GuestMemory
from viommu_backend.smmuv3 import builders
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.cmdq import RecordingSink
from viommu_backend.smmuv3.smmu_config import SmmuConfig
from viommu_backend.smmuv3.device import SMMUv3
from viommu_backend.smmuv3.shared_regs import SharedRegisters

RAM_BASE = 0x4000_0000
RAM_SIZE = 0x10_0000
CMDQ_ADDR = RAM_BASE + 0x0000
EVTQ_ADDR = RAM_BASE + 0x1_0000
PRIQ_ADDR = RAM_BASE + 0x2_0000
MSI_ADDR = RAM_BASE + 0x3_0000


def make_memory(base: int = RAM_BASE, size: int = RAM_SIZE) -> GuestMemory:
    return builders.make_memory(base, size)


class RecordingIrq:
    """IrqSink that remembers levels and pulses (stands in for the PCI function)."""

    def __init__(self) -> None:
        self.levels: dict[str, bool] = {}
        self.history: list[tuple[str, bool]] = []
        self.pulses: list[str] = []

    def set_level(self, source: str, level: bool) -> None:
        self.levels[source] = level
        self.history.append((source, level))

    def pulse(self, source: str) -> None:
        self.pulses.append(source)


class GuestMapping:
    """The guest's view of BAR0 in shared memory: plain loads and stores on the memfd,
    each store followed by the scan the server's poller would make."""

    def __init__(self, shared: SharedRegisters) -> None:
        self.shared = shared
        self.map = mmap.mmap(shared.fd, shared.size)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.map[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.map[offset:offset + size] = value.to_bytes(size, "little")
        self.shared.poll()


def off(name: str) -> int:
    return regs.SMMU_REGS[name].offset


class Harness:
    def __init__(self, config: SmmuConfig | None = None, *, cmdq_log2: int = 4,
                 evtq_log2: int = 3, priq_log2: int = 3, shared: bool = False) -> None:
        self.mem = make_memory()
        self.sink = RecordingSink()
        self.irq = RecordingIrq()
        self.smmu = SMMUv3(config, sink=self.sink, irq=self.irq, memory=lambda: self.mem)
        # BAR0 as the driver reaches it: trapped accesses to the model, or shared memory
        self.bar = GuestMapping(SharedRegisters(self.smmu)) if shared else self.smmu
        self.cmdq_log2, self.evtq_log2, self.priq_log2 = cmdq_log2, evtq_log2, priq_log2
        self.prod = 0

    # register access as the driver does it (32-bit, or 64-bit for *_BASE)
    def w32(self, name: str, value: int) -> None:
        self.bar.write(off(name), 4, value)

    def w64(self, name: str, value: int) -> None:
        self.bar.write(off(name), 8, value)

    def r32(self, name: str) -> int:
        return self.bar.read(off(name), 4)

    def field(self, name: str, fname: str) -> int:
        return regs.layout(name).get(self.bar.read(off(name), 8 if regs.SMMU_REGS[name].width == 64 else 4), fname)

    def setup_queues(self, *, cmdq_addr: int = CMDQ_ADDR, evtq_addr: int = EVTQ_ADDR,
                     priq_addr: int = PRIQ_ADDR) -> None:
        self.w64("CMDQ_BASE", cmdq_addr | self.cmdq_log2)
        self.w64("EVTQ_BASE", evtq_addr | self.evtq_log2)
        self.w64("PRIQ_BASE", priq_addr | self.priq_log2)
        self.w32("CMDQ_PROD", 0)
        self.w32("CMDQ_CONS", 0)
        self.bar.write(off("EVTQ_PROD"), 4, 0)
        self.bar.write(off("EVTQ_CONS"), 4, 0)
        self.bar.write(off("PRIQ_PROD"), 4, 0)
        self.bar.write(off("PRIQ_CONS"), 4, 0)
        cr0 = regs.layout("CR0")
        self.w32("CR0", cr0.encode(CMDQEN=1, EVTQEN=1, PRIQEN=1))
        self.w32("IRQ_CTRL", regs.layout("IRQ_CTRL").encode(GERROR_IRQEN=1, EVTQ_IRQEN=1,
                                                             PRIQ_IRQEN=1))

    def cmd_addr(self, ptr: int) -> int:
        return CMDQ_ADDR + (ptr & ((1 << self.cmdq_log2) - 1)) * 16

    def put(self, *cmds: bytes) -> None:
        """Write commands at PROD without publishing them."""
        for c in cmds:
            self.mem.write(self.cmd_addr(self.prod), c)
            self.prod = (self.prod + 1) & ((2 << self.cmdq_log2) - 1)

    def submit(self, *cmds: bytes) -> None:
        self.put(*cmds)
        self.w32("CMDQ_PROD", self.prod)
