"""Fault injection over QMP against a Backend served in-process: the SMMU is programmed
through the project's vfio-user client (BAR0 writes, guest RAM shared by memfd), the
endpoint's bus mastering through its own vfio-user connection, and the injection
commands are driven with qemu.qmp's QMPClient."""

from __future__ import annotations

import time

import pytest
from qemu.qmp import ExecuteError

from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command
from viommu_backend.smmuv3.events import EVENT_RECORD
from viommu_backend.vfio_user.device import PciRegion

from tests.support.topologies import SMMU_TESTDEV
from tests.support.viommu_rig import DATA, EVTQ, MSI, SID, next_event, set_bus_master, smmu_rig

async def test_injected_event_lands_in_event_queue_with_interrupt(env):
    qmp, ram = env["qmp"], env["ram"]
    with qmp.listener() as listener:
        r = await qmp.execute("viommu-inject-event", {
            "type": "F_PERMISSION", "sid": 0x1234, "ssid": 3, "iova": 0xABCD_E000,
            "write": True, "stall": True, "stag": 0x77, "class": "IN"})
        assert r == {"outcome": "written"}
        rec = await next_event(listener, "VIOMMU_EVENT")  # the record, then the note
        inj = await next_event(listener, "VIOMMU_INJECTED", "event")
    assert inj["type"] == "F_PERMISSION" and rec["name"] == "F_PERMISSION"
    raw = ram.read(EVTQ, 32)
    w = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, 32, 8)]
    assert w[0] == 0x13 | 1 << 11 | 3 << 12 | 0x1234 << 32  # EVENTID SSV SSID STREAMID
    assert w[1] == 0x77 | 1 << 31 | 2 << 40  # STAG, STALL, RnW=0 (write), CLASS=IN
    assert w[2] == 0xABCD_E000
    assert await env["g"].r("EVTQ_PROD") & 0x1F == 1
    assert await env["c"].wait_irq(env["intx"]) >= 1  # the combined wired interrupt
    q = await qmp.execute("query-viommu")
    assert q["injected"]["counts"]["event"] == 1
    for bad in ({"type": "F_NOPE", "sid": 1}, {"type": "F_TRANSLATION", "sid": 1, "class": 7},
                {"type": "F_TRANSLATION"}, {"type": "F_TRANSLATION", "sid": "x"}):
        with pytest.raises(ExecuteError) as ei:
            await qmp.execute("viommu-inject-event", bad)
        assert ei.value.error_class == "GenericError"


async def test_injected_fault_fails_translate_and_dma_until_cleared(env):
    qmp, ram = env["qmp"], env["ram"]
    await set_bus_master(env["ep"], True)
    r = await qmp.execute("viommu-dma", {"device": "dma0", "iova": 0x10_0000, "size": 16})
    assert bytes.fromhex(r["data"]) == b"guest data 0123!"
    with qmp.listener() as listener:
        fid = (await qmp.execute("viommu-inject-fault", {
            "sid": SID, "iova": 0x10_0000, "size": 0x2000, "type": "F_ACCESS"}))["id"]
        assert (await next_event(listener, "VIOMMU_INJECTED", "fault"))["id"] == fid
    t = await qmp.execute("viommu-translate", {"sid": SID, "iova": 0x10_1008})
    assert t["fault"] == "F_ACCESS"
    assert "pa" in await qmp.execute("viommu-translate", {"sid": SID, "iova": 0x10_2000})
    r = await qmp.execute("viommu-dma", {"device": "dma0", "iova": 0x10_0000, "size": 16})
    assert r["fault"] == "F_ACCESS"
    w = await qmp.execute("viommu-dma", {"device": "dma0", "iova": 0x10_1000, "size": 2,
                                         "write": True, "data": "beef"})
    assert w["fault"] == "F_ACCESS" and ram.read(DATA + 0x1000, 2) == b"\0\0"
    # the fault went through the normal path: records in the event queue
    assert EVENT_RECORD.get(EVENT_RECORD.from_bytes(ram.read(EVTQ, 32)), "EVENTID") == 0x12
    assert EVENT_RECORD.get(EVENT_RECORD.from_bytes(ram.read(EVTQ, 32)), "STREAMID") == SID
    (rule,) = await qmp.execute("query-viommu-faults")
    assert rule["id"] == fid and rule["hits"] == 2 and rule["type"] == "F_ACCESS"
    assert (await qmp.execute("viommu-clear-fault", {"id": fid})) == {"cleared": 1}
    with pytest.raises(ExecuteError, match="no injected fault"):
        await qmp.execute("viommu-clear-fault", {"id": fid})
    w = await qmp.execute("viommu-dma", {"device": "dma0", "iova": 0x10_1000, "size": 2,
                                         "write": True, "data": "beef"})
    assert w == {"written": 2} and ram.read(DATA + 0x1000, 2) == b"\xbe\xef"
    # once: the next access only
    await qmp.execute("viommu-inject-fault", {"sid": SID, "iova": 0x10_0000, "once": True})
    assert "fault" in await qmp.execute("viommu-dma", {"device": "dma0", "iova": 0x10_0000,
                                                       "size": 4})
    assert "data" in await qmp.execute("viommu-dma", {"device": "dma0", "iova": 0x10_0000,
                                                      "size": 4})
    q = await qmp.execute("query-viommu")
    assert q["injected"]["counts"]["fault"] == 2 and q["injected"]["counts"]["fault-hit"] == 3
    # bad requests and the endpoint's own refusal
    for bad, msg in (({"device": "nope", "iova": 0, "size": 4}, "no endpoint"),
                     ({"device": "viommu", "iova": 0, "size": 4}, "no endpoint"),
                     ({"device": "dma0", "iova": 0, "size": 0}, "size"),
                     ({"device": "dma0", "iova": 0, "size": 2, "write": True, "data": "zz"},
                      "hex"),
                     ({"device": "dma0", "iova": 0, "size": 3, "write": True, "data": "00"},
                      "bytes")):
        with pytest.raises(ExecuteError, match=msg):
            await qmp.execute("viommu-dma", bad)
    with pytest.raises(ExecuteError, match="type"):
        await qmp.execute("viommu-inject-fault", {"sid": SID, "iova": 0, "type": "C_BAD_STE"})
    await set_bus_master(env["ep"], False)
    with pytest.raises(ExecuteError, match="bus master"):
        await qmp.execute("viommu-dma", {"device": "dma0", "iova": 0x10_0000, "size": 4})


async def test_gerror_cmdq_err_toggles_and_stops_queue(env):
    qmp, g = env["qmp"], env["g"]
    gerror0 = await g.r("GERROR")
    r = await qmp.execute("viommu-inject-gerror", {"error": "CMDQ_ERR"})
    assert r["raised"] is True
    assert (await g.r("GERROR") ^ gerror0) == 1  # CMDQ_ERR toggled
    assert (await g.r("CMDQ_CONS") >> 24) & 0x7F == regs.CERROR_ILL
    assert await env["c"].wait_irq(env["intx"]) >= 1
    before = await g.cons()
    await g.submit(encode_command("CMD_SYNC"))
    assert await g.cons() == before  # stopped until acknowledged
    assert (await qmp.execute("viommu-inject-gerror", {"error": "CMDQ_ERR"}))["raised"] is False
    await g.w("GERRORN", await g.r("GERROR"))
    assert await g.cons() == before + 1
    r = await qmp.execute("viommu-inject-gerror", {"error": "EVTQ_ABT_ERR"})
    assert r["raised"] and (await g.r("GERROR") ^ await g.r("GERRORN")) == 1 << 2
    with pytest.raises(ExecuteError, match="error"):
        await qmp.execute("viommu-inject-gerror", {"error": "BOGUS"})


async def test_dropped_sync_waits_for_normal_delayed_sync_completes_later(env):
    qmp, g, ram = env["qmp"], env["g"], env["ram"]
    at = await g.cons()
    await qmp.execute("viommu-inject-sync", {"mode": "drop"})
    await g.submit(encode_command("CMD_SYNC", CS=1, MSIADDR=MSI, MSIDATA=0xA5))
    await g.submit(encode_command("CFGI_ALL"), encode_command("CMD_SYNC"))
    for _ in range(3):  # the driver polling: nothing moves
        assert await g.cons() == at and ram.read(MSI, 4) == b"\0\0\0\0"
    q = await qmp.execute("query-viommu")
    assert q["injected"]["sync"]["held"] is True
    with pytest.raises(ExecuteError, match="count"):
        await qmp.execute("viommu-inject-sync", {"mode": "drop", "count": 2})
    await qmp.execute("viommu-inject-sync", {"mode": "normal"})
    assert await g.cons() == at + 3
    assert int.from_bytes(ram.read(MSI, 4), "little") == 0xA5

    delay = 0.2
    with qmp.listener() as listener:
        await qmp.execute("viommu-inject-sync", {"mode": "delay", "delay-ms": 200})
        t0 = time.monotonic()
        await g.submit(encode_command("CMD_SYNC", CS=1, MSIADDR=MSI, MSIDATA=0x5A))
        assert await g.cons() == at + 3  # not yet
        await next_event(listener, "VIOMMU_INJECTED", "sync-released")
        elapsed = time.monotonic() - t0
    assert await g.cons() == at + 4
    assert int.from_bytes(ram.read(MSI, 4), "little") == 0x5A
    assert elapsed >= delay * 0.9  # completed no sooner than asked (a lower bound only)
    counts = (await qmp.execute("query-viommu"))["injected"]["counts"]
    assert counts["sync-dropped"] == 1 and counts["sync-delayed"] == 1
    with pytest.raises(ExecuteError, match="mode"):
        await qmp.execute("viommu-inject-sync", {"mode": "sometimes"})


async def test_msix_on_a_translated_stream_is_warned_about(env, caplog):
    """QEMU would deliver the endpoint's MSI-X untranslated, to an IOVA: the backend says
    so when the guest enables MSI-X on a stream attached to a translating domain."""
    from viommu_backend.pci.capabilities import MSIX_CTRL, MSIX_REGS

    qmp, ep = env["qmp"], env["ep"]
    await set_bus_master(ep, True)
    r = await qmp.execute("viommu-dma", {"device": "dma0", "iova": 0x10_0000, "size": 16})
    assert "data" in r  # the stream is attached to its S1 domain now
    fn = env["be"].functions["dma0"]
    off = fn.msix.off + MSIX_REGS["CTRL"].offset
    ctrl = await ep.region_read(PciRegion.CONFIG, off, 2)
    on = int.from_bytes(ctrl, "little") | MSIX_CTRL["ENABLE"].mask
    with caplog.at_level("WARNING"):
        await ep.region_write(PciRegion.CONFIG, off, on.to_bytes(2, "little"))
    assert "MSI-X while StreamID 0x100 is translated" in caplog.text
    f = await qmp.execute("query-viommu-functions")
    assert f["dma0"]["warnings"] == ["dma0: MSI-X enabled on translated stream 0x100"]
    assert f["viommu"]["warnings"] == []


async def test_dropped_invalidation_keeps_the_stale_translation(env):
    qmp, g, ram, pt = env["qmp"], env["g"], env["ram"], env["pt"]
    await set_bus_master(env["ep"], True)
    ram.write(DATA + 0x1000, b"old!")
    ram.write(DATA + 0x3000, b"new!")
    dma = {"device": "dma0", "iova": 0x10_1000, "size": 4}
    assert bytes.fromhex((await qmp.execute("viommu-dma", dma))["data"]) == b"old!"
    with qmp.listener() as listener:
        rid = (await qmp.execute("viommu-inject-drop-invalidation",
                                 {"command": "TLBI_NH_VA", "asid": 1, "addr": 0x10_1000}))["id"]
        assert (await next_event(listener, "VIOMMU_INJECTED", "drop-invalidation"))["id"] == rid
        assert (await qmp.execute("query-viommu"))["injected"]["drops"][0]["id"] == rid
        pt.map(0x10_1000, DATA + 0x3000)
        tlbi = encode_command("TLBI_NH_VA", ASID=1, ADDR=0x10_1000, LEAF=1)
        at = await g.cons()
        await g.submit(tlbi, encode_command("CMD_SYNC"))
        assert await g.cons() == at + 2
        dropped = await next_event(listener, "VIOMMU_INJECTED", "invalidation-dropped")
    assert dropped["rule"] == rid and dropped["command"] == "TLBI_NH_VA"
    assert bytes.fromhex((await qmp.execute("viommu-dma", dma))["data"]) == b"old!"
    await g.submit(tlbi, encode_command("CMD_SYNC"))
    assert bytes.fromhex((await qmp.execute("viommu-dma", dma))["data"]) == b"new!"
    q = await qmp.execute("query-viommu")
    assert q["injected"]["drops"] == [] and q["injected"]["counts"]["invalidation-dropped"] == 1
    with pytest.raises(ExecuteError, match="command"):
        await qmp.execute("viommu-inject-drop-invalidation", {"command": "CMD_SYNC"})


async def test_sanitizer_reports_the_stale_use_a_dropped_invalidation_leaves(tmp_path):
    config = SMMU_TESTDEV.replace('kind = "smmuv3"\nslot = 1\n',
                                  'kind = "smmuv3"\nslot = 1\noptions = { sanitize = true }\n')
    async with smmu_rig(tmp_path, client_name="sanitize-test", data=b"old!",
                        config=config) as env:
        qmp, g, pt = env["qmp"], env["g"], env["pt"]
        await set_bus_master(env["ep"], True)
        dma = {"device": "dma0", "iova": 0x10_0000, "size": 4}
        assert bytes.fromhex((await qmp.execute("viommu-dma", dma))["data"]) == b"old!"
        await qmp.execute("viommu-inject-drop-invalidation", {"command": "TLBI"})
        pt.map(0x10_0000, DATA + 0x3000)
        with qmp.listener() as listener:
            await g.submit(encode_command("TLBI_NH_VA", ASID=1, ADDR=0x10_0000, LEAF=1),
                           encode_command("CMD_SYNC"))
            assert bytes.fromhex((await qmp.execute("viommu-dma", dma))["data"]) == b"old!"
            v = await next_event(listener, "VIOMMU_SANITIZER")
        assert v["rule"] == "stale-tlb" and v["sid"] == SID and v["iova"] == 0x10_0000
        assert v["pa"] == DATA and v["now-pa"] == DATA + 0x3000
        san = (await qmp.execute("query-viommu"))["translation"]["sanitizer"]
        assert san["violations"]["stale-tlb"] == 1 and san["recent"][0]["iova"] == 0x10_0000
        assert sum(san["violations"].values()) == 1 and not any(san["device"].values())
