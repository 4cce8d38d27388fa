"""Tracing over QMP against a Backend served in-process: the SMMU is brought up through
the project's vfio-user client by the ``env`` fixture of test_qmp_inject (same rig, same
guest tables), then the guest's register writes, commands and stream (re)configuration
are read back with ``query-viommu-trace`` through qemu.qmp's QMPClient."""

from __future__ import annotations

import asyncio

import pytest
from qemu.qmp import ExecuteError

from viommu_backend.app import Backend
from viommu_backend.config import ConfigError, loads_config
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command

from tests.support.viommu_rig import set_bus_master
from tests.support.viommu_rig import CONFIG, SID, STRTAB


async def test_trace_shows_prod_write_commands_and_stream_attach(env):
    qmp, g, ram = env["qmp"], env["g"], env["ram"]
    st = await qmp.execute("viommu-trace", {"enable": ["cmd", "reg", "domain"]})
    assert st["enabled"] == ["reg", "cmd", "domain"] and st["size"] == 4096
    start = st["next"]
    # the endpoint's first DMA binds its stream: attached to the S1 domain of its STE
    await set_bus_master(env["ep"], True)
    r = await qmp.execute("viommu-dma", {"device": "dma0", "iova": 0x10_0000, "size": 16})
    assert bytes.fromhex(r["data"]) == b"guest data 0123!"
    # the driver switches the stream to bypass: STE, CFGI_STE, TLBI, CMD_SYNC
    b.write_words(ram, STRTAB + SID * 64, b.make_ste(fl.STE_CONFIG_BYPASS))
    await g.submit(encode_command("CFGI_STE", SID=SID, LEAF=1),
                   encode_command("TLBI_NH_VA", VMID=0, ASID=1, ADDR=0x10_0000, LEAF=1),
                   encode_command("CMD_SYNC"))
    assert await g.cons() == 5
    q = await qmp.execute("query-viommu-trace", {"since": start})
    assert q["dropped"] == 0
    recs = q["records"]
    assert [r["seq"] for r in recs] == list(range(start, q["next"]))
    attach = [r for r in recs if r["cat"] == "domain"]
    assert [(r["kind"], r["sid"]) for r in attach] == [("replace", SID)]
    assert attach[0]["from-type"] == "HwptNested" and attach[0]["to-type"] == "HwptPaging"
    assert attach[0]["config"] == "bypass"
    prod = next(i for i, r in enumerate(recs) if r["cat"] == "reg" and r["reg"] == "CMDQ_PROD")
    assert recs[prod]["op"] == "w" and recs[prod]["value"] == 5
    assert recs[prod]["offset"] == regs.SMMU_REGS["CMDQ_PROD"].offset
    cmds = [r for r in recs[prod:] if r["cat"] == "cmd"]
    assert [(c["name"], c["index"]) for c in cmds] == \
        [("CFGI_STE", 2), ("TLBI_NH_VA", 3), ("CMD_SYNC", 4)]
    assert cmds[0]["fields"]["SID"] == SID and cmds[0]["fields"]["LEAF"] == 1
    assert cmds[1]["fields"]["ASID"] == 1 and cmds[1]["fields"]["ADDR"] == 0x10_0000
    # the replace happens while CFGI_STE runs: between it and the TLBI
    order = [r["seq"] for r in (cmds[0], attach[0], cmds[1], cmds[2])]
    assert order == sorted(order)
    # the CMDQ_CONS poll after the PROD write is traced as a read
    assert any(r["cat"] == "reg" and r["op"] == "r" and r["reg"] == "CMDQ_CONS"
               for r in recs[prod:])
    # category filter and paging through the records
    only = await qmp.execute("query-viommu-trace", {"since": start, "cat": ["cmd"], "limit": 2})
    assert [c["name"] for c in only["records"]] == ["CFGI_STE", "TLBI_NH_VA"]
    rest = await qmp.execute("query-viommu-trace", {"since": only["next"], "cat": ["cmd"]})
    assert [c["name"] for c in rest["records"]] == ["CMD_SYNC"]


async def test_trace_ring_size_clear_disable_and_bad_arguments(env):
    qmp, g = env["qmp"], env["g"]
    st = await qmp.execute("viommu-trace", {"enable": ["cmd"], "size": 2, "clear": True})
    assert st["size"] == 2 and st["records"] == 0
    start = st["next"]
    await g.submit(*[encode_command("TLBI_NH_ASID", VMID=0, ASID=a) for a in range(3)],
                   encode_command("CMD_SYNC"))
    q = await qmp.execute("query-viommu-trace", {"since": start})
    assert q["dropped"] == 2 and [r["name"] for r in q["records"]] == ["TLBI_NH_ASID", "CMD_SYNC"]
    assert q["records"][0]["fields"]["ASID"] == 2
    st = await qmp.execute("viommu-trace", {"disable": ["all"]})
    assert st["enabled"] == []
    await g.submit(encode_command("CMD_SYNC"))
    assert (await qmp.execute("viommu-trace"))["next"] == q["next"]  # nothing recorded
    for cmd, args, msg in (
            ("viommu-trace", {"enable": ["cmd", "bogus"]}, "unknown trace category 'bogus'"),
            ("viommu-trace", {"enable": "cmd"}, "expected: array"),
            ("viommu-trace", {"size": 0}, "trace size"),
            ("viommu-trace", {"disable": [1]}, "list of category names"),
            ("query-viommu-trace", {"limit": 5000}, "'limit'"),
            ("query-viommu-trace", {"since": -1}, "'since'"),
            ("query-viommu-trace", {"cat": ["nope"]}, "unknown trace category"),
            ("query-viommu-trace", {"what": 1}, "unexpected")):
        with pytest.raises(ExecuteError, match=msg) as ei:
            await qmp.execute(cmd, args)
        assert ei.value.error_class == "GenericError"


async def test_trace_stream_sends_viommu_trace_events(env):
    qmp, g = env["qmp"], env["g"]
    with qmp.listener() as listener:
        st = await qmp.execute("viommu-trace", {"enable": ["cmd"], "stream": True})
        assert st["stream"] is True
        await g.submit(encode_command("CFGI_STE", SID=SID, LEAF=1), encode_command("CMD_SYNC"))
        got = []
        while len(got) < 2:
            ev = await asyncio.wait_for(listener.get(), 5)
            if ev["event"] == "VIOMMU_TRACE":
                got.append(ev["data"])
    assert [(d["cat"], d["name"]) for d in got] == [("cmd", "CFGI_STE"), ("cmd", "CMD_SYNC")]
    assert got[1]["seq"] == got[0]["seq"] + 1
    assert (await qmp.execute("viommu-trace", {"stream": False}))["stream"] is False


def test_backend_trace_option(tmp_path):
    be = Backend(loads_config(CONFIG), tmp_path / "s", trace="cmd,domain")
    assert be.tracer.enabled == ("cmd", "domain")
    assert be.iommu.smmu.trace is be.tracer and be.manager.trace is be.tracer
    with pytest.raises(ConfigError, match="unknown trace category"):
        Backend(loads_config(CONFIG), tmp_path / "t", trace=["cmd", "x"])


async def test_trace_vfio_shows_requests_and_interrupts_with_server_time(env):
    qmp, g = env["qmp"], env["g"]
    st = await qmp.execute("viommu-trace", {"enable": ["vfio"], "clear": True})
    start = st["next"]
    await g.submit(encode_command("CMD_SYNC"))
    cons_off = regs.SMMU_REGS["CMDQ_CONS"].offset
    assert await g.cons() == 3  # a REGION_READ of CMDQ_CONS
    # an injected event raises the SMMU's wired interrupt: an INTx eventfd signal
    await qmp.execute("viommu-inject-event", {"type": "F_TRANSLATION", "sid": SID})
    assert await env["c"].wait_irq(env["intx"]) >= 1
    q = await qmp.execute("query-viommu-trace", {"since": start, "cat": ["vfio"]})
    recs = q["records"]
    reqs = [r for r in recs if "cmd" in r]
    prod = next(r for r in reqs if r["cmd"] == "REGION_WRITE"
                and r["offset"] == regs.SMMU_REGS["CMDQ_PROD"].offset)
    assert prod["dev"] == "viommu" and prod["region"] == 0 and prod["count"] == 4
    read = next(r for r in reqs if r["cmd"] == "REGION_READ" and r["offset"] == cons_off)
    assert read["seq"] > prod["seq"] and read["t"] >= prod["t"] and read["posted"] is False
    assert all(isinstance(r["us"], float) and 0 <= r["us"] < 1e6 for r in reqs)
    irqs = [r for r in recs if "irq" in r]
    assert irqs and irqs[-1]["dev"] == "viommu" and irqs[-1]["irq"] == "INTX" \
        and irqs[-1]["vector"] == 0
    # off again: nothing more is recorded
    await qmp.execute("viommu-trace", {"disable": ["vfio"]})
    nxt = (await qmp.execute("viommu-trace", {}))["next"]
    await g.cons()
    assert (await qmp.execute("viommu-trace", {}))["next"] == nxt
