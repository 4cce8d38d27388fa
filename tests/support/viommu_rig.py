"""A Backend served in-process with its SMMU brought up the way the Linux driver does it,
but through the project's vfio-user client: guest RAM shared by memfd, BAR0 register
writes, commands through the command queue. Shared by the QMP integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

from qemu.qmp import QMPClient

from viommu_backend.app import Backend
from viommu_backend.config import loads_config
from viommu_backend.pci.config_space import COMMAND
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command
from viommu_backend.vfio_user.client import ClientMemory, VfioUserClient
from viommu_backend.vfio_user.device import PciIrq, PciRegion

from tests.support.topologies import SMMU_TESTDEV as CONFIG

RAM = 0x4000_0000
RAM_SIZE = 4 << 20
CMDQ, EVTQ, PRIQ = RAM + 0x0000, RAM + 0x1_0000, RAM + 0x2_0000
MSI = RAM + 0x3_0000
STRTAB = RAM + 0x4_0000
TABLES = RAM + 0x10_0000
DATA = RAM + 0x30_0000
SID = 0x100  # dma0: bus 1, devfn 0
LOG2 = 4  # CMDQ / EVTQ / PRIQ of 16 entries


class GuestRam:
    """The guest's view of its RAM (the client's memfd mapping) for the table builders."""

    def __init__(self, m: ClientMemory) -> None:
        self.m = m

    def read(self, addr: int, n: int) -> bytes:
        return self.m.read(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        self.m.write(addr, bytes(data))

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.m.read(addr, 8), "little")

    def write_u64(self, addr: int, v: int) -> None:
        self.m.write(addr, v.to_bytes(8, "little"))


class Guest:
    """Plays the guest's SMMU driver over vfio-user."""

    def __init__(self, c: VfioUserClient, ram: GuestRam) -> None:
        self.c, self.ram, self.prod = c, ram, 0

    async def w(self, name: str, value: int) -> None:
        reg = regs.SMMU_REGS[name]
        await self.c.region_write(0, reg.offset, value.to_bytes(reg.width // 8, "little"))

    async def r(self, name: str) -> int:
        reg = regs.SMMU_REGS[name]
        return int.from_bytes(await self.c.region_read(0, reg.offset, reg.width // 8), "little")

    async def submit(self, *cmds: bytes) -> None:
        for cmd in cmds:
            self.ram.write(CMDQ + (self.prod & ((1 << LOG2) - 1)) * 16, cmd)
            self.prod = (self.prod + 1) & ((2 << LOG2) - 1)
        await self.w("CMDQ_PROD", self.prod)

    async def cons(self) -> int:
        return await self.r("CMDQ_CONS") & ((2 << LOG2) - 1)


@contextlib.asynccontextmanager
async def smmu_rig(tmp_path: Path, *, client_name: str, pri: bool = False,
                   endpoint: bool = True, data: bytes | None = None, stall: bool = False,
                   config: str = CONFIG
                   ) -> AsyncIterator[dict[str, Any]]:
    """The SMMU live with stream SID -> S1 CD -> IOVA 0x10_0000.. mapped onto DATA, its
    event queue (and with ``pri`` its PRI queue) enabled with interrupts, and a QMP client
    on the backend's control socket. ``endpoint``: also connect to dma0 (``ep``), whose
    config space the test uses for bus mastering.  ``stall``: the CD stalls faults (CD.S);
    the page table is ``pt`` (tables from the allocator ``al``).  ``config``: the
    backend's topology (default: SMMU + dma0)."""
    be = Backend(loads_config(config), tmp_path / "s", qmp_path=tmp_path / "qmp.sock")
    await be.start()
    c = await VfioUserClient.connect(be.socket_path("viommu"))
    ep = await VfioUserClient.connect(be.socket_path("dma0")) if endpoint else None
    qmp = QMPClient(client_name)
    try:
        ram = GuestRam(await c.map_memory(RAM, RAM_SIZE))
        await c.region_write(PciRegion.CONFIG, 4, COMMAND.encode(MEMORY=1, MASTER=1)
                             .to_bytes(2, "little"))
        (intx,) = await c.set_irq_eventfds(PciIrq.INTX, 0, 1)
        g = Guest(c, ram)
        al = b.Allocator(TABLES, 0x10_0000)
        pt = b.PageTable(ram, al)
        pt.map_range(0x10_0000, DATA, 0x4000)
        cd = al.alloc(64, 64)
        b.write_words(ram, cd, b.make_cd(pt.root, asid=1, S=int(stall)))
        b.write_words(ram, STRTAB + SID * 64, b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cd))
        if data is not None:
            ram.write(DATA, data)
        # driver bring-up: queues, stream table, interrupts, enable
        await g.w("CMDQ_BASE", CMDQ | LOG2)
        await g.w("EVTQ_BASE", EVTQ | LOG2)
        await g.w("PRIQ_BASE", PRIQ | LOG2)
        await g.w("STRTAB_BASE", STRTAB)
        await g.w("STRTAB_BASE_CFG", regs.layout("STRTAB_BASE_CFG").encode(FMT=0, LOG2SIZE=9))
        await g.w("IRQ_CTRL", regs.layout("IRQ_CTRL").encode(GERROR_IRQEN=1, EVTQ_IRQEN=1,
                                                             PRIQ_IRQEN=int(pri)))
        await g.w("CR0", regs.layout("CR0").encode(SMMUEN=1, CMDQEN=1, EVTQEN=1, PRIQEN=int(pri)))
        await g.submit(encode_command("CFGI_ALL"), encode_command("CMD_SYNC"))
        assert await g.cons() == 2
        await qmp.connect(str(tmp_path / "qmp.sock"))
        rig = {"be": be, "g": g, "ram": ram, "qmp": qmp, "intx": intx, "c": c, "pt": pt,
               "al": al}
        if ep is not None:
            rig["ep"] = ep
        yield rig
    finally:
        await qmp.disconnect()
        if ep is not None:
            await ep.close()
        await c.close()
        await be.close()


async def set_bus_master(ep: VfioUserClient, on: bool) -> None:
    await ep.region_write(PciRegion.CONFIG, 4, COMMAND.encode(MEMORY=1, MASTER=int(on))
                          .to_bytes(2, "little"))


async def next_event(listener: Any, name: str, kind: str | None = None) -> dict[str, Any]:
    while True:
        ev = await asyncio.wait_for(listener.get(), 5)
        if ev["event"] == name and (kind is None or ev["data"].get("kind") == kind):
            return ev["data"]
