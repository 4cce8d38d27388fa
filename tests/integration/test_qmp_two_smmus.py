"""Two SMMU functions served by one Backend, each for its own root complex (pcie.0 and a
pxb-pcie expander), each brought up over vfio-user with its own stream table: QMP
commands select the SMMU with ``smmu``, each SMMU translates and does DMA for its own
endpoint only, and a client that names no SMMU gets a clear error."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from qemu.qmp import ExecuteError, QMPClient

from viommu_backend.app import Backend
from viommu_backend.config import loads_config
from viommu_backend.pci.config_space import COMMAND
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command
from viommu_backend.vfio_user.client import VfioUserClient
from viommu_backend.vfio_user.device import PciRegion

from tests.support.viommu_rig import Guest, GuestRam

CONFIG = """
[[expander]]
name = "pxb1"
slot = 4
bus_nr = 0x80

[[root_port]]
name = "rp0"
slot = 2
chassis = 1

[[root_port]]
name = "rp1"
bus = "pxb1"
slot = 0
chassis = 2

[[function]]
name = "smmu0"
kind = "smmuv3"
slot = 1

[[function]]
name = "smmu1"
kind = "smmuv3"
slot = 3
root_complex = "pxb1"

[[function]]
name = "dma0"
kind = "testdev"
port = "rp0"

[[function]]
name = "dma1"
kind = "testdev"
port = "rp1"
"""
RAM, RAM_SIZE = 0x4000_0000, 8 << 20
CMDQ, EVTQ = RAM, RAM + 0x1_0000
TABLES, DATA = RAM + 0x10_0000, RAM + 0x30_0000
STRTAB = RAM + 0x40_0000  # linear, 2^16 STEs (4 MiB): StreamIDs up to 0xffff
SIDS = {"smmu0": 0x100, "smmu1": 0x8100}  # dma0 at 0000:01:00.0, dma1 at 0001:81:00.0
PAYLOAD = {"smmu0": b"behind smmu zero", "smmu1": b"behind smmu one!"}


async def bring_up(c: VfioUserClient, sid: int, payload: bytes) -> GuestRam:
    """The SMMU enabled with a linear stream table whose only valid STE is ``sid``: S1,
    IOVA 0x10_0000 -> DATA (holding ``payload``)."""
    ram = GuestRam(await c.map_memory(RAM, RAM_SIZE))
    await c.region_write(PciRegion.CONFIG, 4, COMMAND.encode(MEMORY=1, MASTER=1).to_bytes(2, "little"))
    g = Guest(c, ram)
    al = b.Allocator(TABLES, 0x10_0000)
    pt = b.PageTable(ram, al)
    pt.map_range(0x10_0000, DATA, 0x1000)
    cd = al.alloc(64, 64)
    b.write_words(ram, cd, b.make_cd(pt.root, asid=1))
    b.write_words(ram, STRTAB + sid * 64, b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cd))
    ram.write(DATA, payload)
    await g.w("CMDQ_BASE", CMDQ | 4)
    await g.w("EVTQ_BASE", EVTQ | 4)
    await g.w("STRTAB_BASE", STRTAB)
    await g.w("STRTAB_BASE_CFG", regs.layout("STRTAB_BASE_CFG").encode(FMT=0, LOG2SIZE=16))
    await g.w("CR0", regs.layout("CR0").encode(SMMUEN=1, CMDQEN=1, EVTQEN=1))
    await g.submit(encode_command("CFGI_ALL"), encode_command("CMD_SYNC"))
    assert await g.cons() == 2
    return ram


@contextlib.asynccontextmanager
async def two_smmus(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    be = Backend(loads_config(CONFIG), tmp_path / "s", qmp_path=tmp_path / "qmp.sock")
    await be.start()
    clients: list[VfioUserClient] = []
    qmp = QMPClient("two-smmus")
    try:
        for name in ("smmu0", "smmu1", "dma0", "dma1"):
            clients.append(await VfioUserClient.connect(be.socket_path(name)))
        for c, smmu in zip(clients, SIDS):
            await bring_up(c, SIDS[smmu], PAYLOAD[smmu])
        for ep in clients[2:]:  # the endpoints may master the bus
            await ep.region_write(PciRegion.CONFIG, 4, COMMAND.encode(MEMORY=1, MASTER=1).to_bytes(2, "little"))
        await qmp.connect(str(tmp_path / "qmp.sock"))
        yield {"be": be, "qmp": qmp}
    finally:
        await qmp.disconnect()
        for c in clients:
            await c.close()
        await be.close()


async def test_each_smmu_translates_its_own_root_complex(tmp_path):
    async with two_smmus(tmp_path) as env:
        qmp, be = env["qmp"], env["be"]
        assert be.socket_path("smmu0").name == "viommu.sock" and be.socket_path("smmu1").name == "smmu1.sock"
        smmus = await qmp.execute("query-viommu-smmus")
        assert [(u["name"], u["bdf"], u["root-complex"], u["connected"]) for u in smmus] == [
            ("smmu0", "0000:00:01.0", "pcie.0", True), ("smmu1", "0000:00:03.0", "pxb1", True)]
        assert [[(e["name"], e["bdf"], e["stream-id"]) for e in u["endpoints"]] for u in smmus] == [
            [("dma0", "0000:01:00.0", 0x100)], [("dma1", "0001:81:00.0", 0x8100)]]

        for smmu, sid in SIDS.items():
            t = await qmp.execute("viommu-translate", {"smmu": smmu, "sid": sid, "iova": 0x10_0008})
            assert t["pa"] == DATA + 8
            other = SIDS["smmu1" if smmu == "smmu0" else "smmu0"]
            t = await qmp.execute("viommu-translate", {"smmu": smmu, "sid": other, "iova": 0x10_0008})
            assert t["fault"] == "C_BAD_STE"  # the other root complex's stream: not in this table
            s = await qmp.execute("query-viommu-stream", {"smmu": smmu, "sid": sid})
            assert s["config"] == "s1"

        # DMA of each endpoint through its own SMMU into that SMMU's view of guest memory
        for smmu, dev in (("smmu0", "dma0"), ("smmu1", "dma1")):
            r = await qmp.execute("viommu-dma", {"smmu": smmu, "device": dev, "iova": 0x10_0000, "size": 16})
            assert bytes.fromhex(r["data"]) == PAYLOAD[smmu]
        with pytest.raises(ExecuteError, match="no endpoint 'dma1'"):
            await qmp.execute("viommu-dma", {"smmu": "smmu0", "device": "dma1", "iova": 0x10_0000, "size": 4})

        # each SMMU's counters and domains: its own endpoint only
        for smmu, sid in SIDS.items():
            q = await qmp.execute("query-viommu", {"smmu": smmu})
            assert q["translation"]["bytes_read"] == 16
            d = await qmp.execute("query-viommu-domains", {"smmu": smmu})
            assert [dev["sid"] for dev in d["devices"]] == [sid]

        # events name their SMMU; query-viommu-functions names each endpoint's SMMU
        with qmp.listener() as listener:
            r = await qmp.execute("viommu-inject-event", {"smmu": "smmu1", "type": "F_TRANSLATION",
                                                          "sid": 0x8100, "iova": 0x5000})
            assert r == {"outcome": "written"}
            seen = [await asyncio.wait_for(listener.get(), 5) for _ in range(2)]
        assert {(e["event"], e["data"]["smmu"]) for e in seen} == {("VIOMMU_EVENT", "smmu1"),
                                                                   ("VIOMMU_INJECTED", "smmu1")}
        fns = await qmp.execute("query-viommu-functions")
        assert {n: f.get("smmu") for n, f in fns.items()} == {
            "smmu0": None, "smmu1": None, "dma0": "smmu0", "dma1": "smmu1"}

        # naming no SMMU, or an unknown one, is a clear error (one SMMU: no argument needed)
        with pytest.raises(ExecuteError, match="Parameter 'smmu' is missing.*smmu0, smmu1"):
            await qmp.execute("query-viommu")
        with pytest.raises(ExecuteError, match="no SMMU 'smmu9'"):
            await qmp.execute("viommu-translate", {"smmu": "smmu9", "sid": 0x100, "iova": 0})
        with pytest.raises(ExecuteError, match="Invalid parameter type for 'smmu'"):
            await qmp.execute("query-viommu", {"smmu": 1})
