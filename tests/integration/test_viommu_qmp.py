"""viommu QMP commands over a real SMMUv3 register model + DomainManager, driven by the
driver's register writes and commands, queried with the qemu.qmp client."""

from __future__ import annotations

import asyncio

import pytest
from qemu.qmp import ExecuteError, QMPClient

from viommu_backend.domains import DmaFault, DomainManager, HwptNested
from viommu_backend.qmp.commands import forward_events, register_viommu_commands
from viommu_backend.qmp.server import QmpCommandRegistry, QmpServer
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command

from tests.support.smmuv3_harness import RAM_BASE, Harness

RAM = 16 << 20
STRTAB = RAM_BASE + 0x10_0000
TABLES = RAM_BASE + 0x20_0000
DATA = RAM_BASE + 0x80_0000


class Setup:
    def __init__(self) -> None:
        self.h = Harness()
        self.h.mem = b.make_memory(RAM_BASE, RAM)
        self.mem = self.h.mem
        self.smmu = self.h.smmu
        self.mgr = DomainManager(lambda: self.mem)
        self.mgr.attach_smmu(self.smmu)
        self.al = b.Allocator(TABLES, 0x40_0000)
        self.h.setup_queues()
        self.h.w64("STRTAB_BASE", STRTAB)
        self.h.w32("STRTAB_BASE_CFG", regs.layout("STRTAB_BASE_CFG").encode(FMT=0, LOG2SIZE=10))
        cr0 = regs.layout("CR0")
        self.h.w32("CR0", cr0.encode(SMMUEN=1, CMDQEN=1, EVTQEN=1, PRIQEN=1))

    def set_ste(self, sid: int, words: list[int]) -> None:
        b.write_words(self.mem, STRTAB + sid * 64, words)
        self.h.submit(encode_command("CFGI_STE", SID=sid, LEAF=1),
                      encode_command("CMD_SYNC"))


def test_cfgi_through_command_queue_attaches_and_tlbi_invalidates():
    s = Setup()
    pt = b.PageTable(s.mem, s.al)
    pt.map(0x3000, DATA)
    cd = s.al.alloc(64, 64)
    b.write_words(s.mem, cd, b.make_cd(pt.root, asid=5))
    s.mgr.add_device(0x100)
    assert s.mgr.devices[0x100].config_fault.event == "C_BAD_STE"  # zeroed STE: V=0
    s.set_ste(0x100, b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cd))
    dev = s.mgr.devices[0x100]
    assert isinstance(dev.hwpt, HwptNested)
    s.mgr.dma_write(0x100, None, 0x3010, b"hello")
    assert s.mem.read(DATA + 0x10, 5) == b"hello"
    assert len(s.mgr.tlb) == 1
    s.h.submit(encode_command("TLBI_NH_ASID", ASID=5, VMID=0), encode_command("CMD_SYNC"))
    assert len(s.mgr.tlb) == 0
    # a fault reaches the guest's event queue
    with pytest.raises(DmaFault):
        s.mgr.dma_read(0x100, None, 0x9000, 4)
    assert s.smmu.counters.events.get("F_TRANSLATION") == 1
    assert s.smmu.evtq.count() == 1


async def test_viommu_qmp_commands(tmp_path):
    s = Setup()
    pt = b.PageTable(s.mem, s.al)
    pt.map(0x5000, DATA + 0x2000, read_only=True)
    cd = s.al.alloc(64, 64)
    b.write_words(s.mem, cd, b.make_cd(pt.root, asid=3))
    s.set_ste(0x10, b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cd))
    s.set_ste(0x11, b.make_ste(fl.STE_CONFIG_BYPASS))
    s.mgr.add_device(0x10, name="testdev")
    reg = QmpCommandRegistry()
    register_viommu_commands(reg, s.mgr, s.smmu)
    srv = QmpServer(reg)
    forward_events(s.smmu, srv.emit)
    path = str(tmp_path / "qmp.sock")
    await srv.start(path)
    cli = QMPClient("t")
    await cli.connect(path)
    try:
        r = await cli.execute("viommu-translate", {"sid": 0x10, "iova": 0x5123})
        assert r["pa"] == DATA + 0x2123 and r["page-size"] == 4096 and r["perm"][:2] == "r-"
        assert r["domain"] == s.mgr.devices[0x10].hwpt.id
        r = await cli.execute("viommu-translate", {"sid": 0x10, "iova": 0x5000, "write": True})
        assert r["fault"] == "F_PERMISSION"
        r = await cli.execute("viommu-translate", {"sid": 0x10, "iova": 0x7000})
        assert r["fault"] == "F_TRANSLATION"
        # unseen stream: probed from its STE, nothing bound
        r = await cli.execute("viommu-translate", {"sid": 0x11, "iova": 0x1234})
        assert r["pa"] == 0x1234 and r["domain"] is None and 0x11 not in s.mgr.devices
        r = await cli.execute("viommu-translate", {"sid": 0x12, "iova": 0})
        assert r["fault"] == "C_BAD_STE"
        assert s.smmu.counters.events == {}  # probes record nothing
        with pytest.raises(ExecuteError):
            await cli.execute("viommu-translate", {"sid": -1, "iova": 0})
        with pytest.raises(ExecuteError):
            await cli.execute("viommu-translate", {"iova": 0})

        q = await cli.execute("query-viommu")
        assert "CR0" in q and q["queues"]["CMDQ"]["prod"] == q["queues"]["CMDQ"]["cons"]
        assert "translations" in q["translation"] and "tlb" in q["translation"]

        g = await cli.execute("query-viommu-domains")
        devs = {d["sid"]: d for d in g["devices"]}
        assert devs[0x10]["name"] == "testdev" and devs[0x10]["config"] == "s1"
        hw = {h["id"]: h for h in g["hwpts"]}
        nested = hw[devs[0x10]["hwpt"]]
        assert nested["kind"] == "hwpt_nested" and nested["refcount"] == 1
        assert hw[nested["parent"]]["nest_parent"] is True
        assert g["ioas"][0]["areas"][0]["iova"] == hex(RAM_BASE)

        with cli.listener() as listener:
            with pytest.raises(DmaFault):
                s.mgr.dma_read(0x10, None, 0x8000, 16)
            ev = await asyncio.wait_for(listener.get(), 5)
        assert ev["event"] == "VIOMMU_EVENT"
        assert ev["data"]["name"] == "F_TRANSLATION" and ev["data"]["STREAMID"] == 0x10
        assert ev["data"]["INPUTADDR"] == 0x8000
    finally:
        await cli.disconnect()
        await srv.stop()
