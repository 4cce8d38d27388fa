"""Endpoint test environment: a function connected to a TestContext (real memfd guest RAM)
and, for translated DMA, a real DomainManager reading a linear stream table, STEs, CDs
and stage-1 page tables that the SMMUv3 builders write into that RAM."""

from __future__ import annotations

from viommu_backend.domains import DomainManager
from viommu_backend.pci.config_space import COMMAND
from viommu_backend.pci.function import PciFunction
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.device import StreamTableConfig
from viommu_backend.vfio_user.device import PciRegion

from tests.support.pci_ctx import TestContext

RAM = 0x4000_0000
RAM_SIZE = 16 << 20
STRTAB = RAM  # linear, 256 STEs
LOG2SIZE = 8
TABLES = RAM + 0x10000  # page tables / CDs in [TABLES, RAM + 4 MiB)
DATA = RAM + (4 << 20)  # guest data pages from here


class SmmuEnv:
    """Guest RAM + stream table + DomainManager (events collected in ``events``)."""

    def __init__(self) -> None:
        self.ctx = TestContext(RAM, RAM_SIZE)
        self.mem = self.ctx.memory
        self.al = b.Allocator(TABLES, (4 << 20) - 0x10000)
        self.events: list[object] = []
        self.mgr = DomainManager(lambda: self.mem, stream_table=self.st,
                                 on_event=self.events.append)

    def st(self) -> StreamTableConfig:
        return StreamTableConfig(True, STRTAB, regs.STRTAB_FMT_LINEAR, LOG2SIZE, 0, 16, False)

    def s1_stream(self, sid: int, n_cds: int = 1) -> list[b.PageTable]:
        """Give ``sid`` an S1 STE over a linear CD table of ``n_cds`` (a power of two)
        CDs, each with its own fresh page table (SSID i -> table i; no SSID -> CD 0)."""
        pts = [b.PageTable(self.mem, self.al) for _ in range(n_cds)]
        cds = self.al.alloc(64 * n_cds, 64)
        for i, pt in enumerate(pts):
            b.write_words(self.mem, cds + 64 * i, b.make_cd(pt.root, asid=(sid << 4) + i))
        kw = dict(s1_cdmax=n_cds.bit_length() - 1, s1_dss=2) if n_cds > 1 else {}
        b.write_words(self.mem, STRTAB + sid * fl.STE_SIZE,
                      b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cds, **kw))
        self.mgr.stream_table_changed(sid)
        self.mgr.add_device(sid)
        return pts

    def bypass_stream(self, sid: int) -> None:
        b.write_words(self.mem, STRTAB + sid * fl.STE_SIZE, b.make_ste(fl.STE_CONFIG_BYPASS))
        self.mgr.stream_table_changed(sid)
        self.mgr.add_device(sid)

    def close(self) -> None:
        self.ctx.close()


def bus_master(fn: PciFunction, on: bool = True) -> None:
    """Set or clear Bus Master Enable (Memory Space stays on) as the guest would."""
    fn.region_write(PciRegion.CONFIG, 4,
                    COMMAND.encode(MEMORY=1, MASTER=int(on)).to_bytes(2, "little"))
