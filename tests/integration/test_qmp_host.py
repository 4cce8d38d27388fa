"""The host's part over the real QMP socket (qemu.qmp), against a Backend served in-process
with a hidden stage 2: the SMMU is brought up over vfio-user as the guest driver would
(stream 0x100 -> S1 CD -> IOVA 0x10_0000.. onto DATA), the host allocates, attaches,
maps, answers page requests, and the endpoint's DMA (``viommu-dma``) goes through the
guest's stage 1 and the host's stage 2."""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest
from qemu.qmp import ExecuteError

from tests.support.viommu_rig import next_event, set_bus_master
from tests.support.topologies import SMMU_TESTDEV_HOST_S2
from tests.support.viommu_rig import DATA, RAM, RAM_SIZE, SID, smmu_rig

IOVA = 0x10_0000  # the guest's S1 maps IOVA 0x10_0000 + 16 KiB onto DATA
PAYLOAD = b"host side page!!"


@pytest.fixture
async def env(tmp_path) -> AsyncIterator[dict[str, Any]]:
    async with smmu_rig(tmp_path, client_name="host-test", config=SMMU_TESTDEV_HOST_S2,
                        data=b"guest data 0123!") as rig:
        await set_bus_master(rig["ep"], True)
        yield rig


async def error_of(qmp: Any, cmd: str, args: dict[str, Any] | None = None) -> str:
    with pytest.raises(ExecuteError) as ei:
        await qmp.execute(cmd, args)
    return ei.value.error.error.desc


async def domains(qmp: Any) -> dict[str, Any]:
    g = await qmp.execute("query-viommu-domains")
    return {"g": g, "objects": {o["id"]: o for o in g["objects"]},
            "devices": {d["sid"]: d for d in g["devices"]}}


async def test_guest_stage1_nests_on_the_host_stage2(env):
    qmp, ram = env["qmp"], env["ram"]
    q = await qmp.execute("query-viommu")
    assert q["IDR0"]["S2P"] == 0 and q["IDR0"]["S1P"] == 1
    d = await domains(qmp)
    assert d["g"]["host-s2"] is True
    nested = d["objects"][d["devices"][SID]["hwpt"]]
    parent = d["objects"][nested["parent"]]
    assert nested["type"] == "hwpt_nested" and parent["owner"] == "host"
    assert "nest-parent" in parent["flags"] and parent["refcount"] == 1
    # the host stage 2 is not the identity: guest RAM is placed reversed
    r = await qmp.execute("viommu-iova-to-phys", {"hwpt": parent["id"], "iova": DATA})
    assert r["mapped"] and r["pa"] == DATA - RAM_SIZE // 2 and r["pa"] != DATA
    assert "EOPNOTSUPP" in await error_of(qmp, "viommu-iova-to-phys",
                                          {"hwpt": nested["id"], "iova": IOVA})
    t = await qmp.execute("viommu-translate", {"sid": SID, "iova": IOVA + 4})
    assert t["ipa"] == DATA + 4 and t["pa"] == r["pa"] + 4
    # DMA through both stages reads what the guest wrote at the IPA, and writes there
    r = await qmp.execute("viommu-dma", {"device": "dma0", "iova": IOVA, "size": 16})
    assert bytes.fromhex(r["data"]) == b"guest data 0123!"
    await qmp.execute("viommu-dma", {"device": "dma0", "iova": IOVA + 0x1000, "size": 16,
                                     "write": True, "data": PAYLOAD.hex()})
    assert ram.read(DATA + 0x1000, 16) == PAYLOAD


async def test_demand_paging_round_trip(env):
    qmp, ram = env["qmp"], env["ram"]
    fq = (await qmp.execute("viommu-fault-queue-alloc"))["id"]
    p = await qmp.execute("viommu-hwpt-alloc", {"flags": ["nest-parent"], "fault-queue": fq,
                                                "sid": SID})
    assert p["enforce-cc"] is True
    await qmp.execute("viommu-device-replace", {"sid": SID, "hwpt": p["id"]})
    d = await domains(qmp)
    assert d["objects"][d["devices"][SID]["hwpt"]]["parent"] == p["id"]
    assert d["devices"][SID]["iopf"] is True  # the host turned the endpoint's PRI on
    r = await qmp.execute("viommu-ioas-unmap", {"iova": DATA + 0x2000, "length": 0x1000})
    assert r == {"unmapped": 0x1000}
    with qmp.listener() as listener:
        r = await qmp.execute("viommu-dma", {"device": "dma0", "iova": IOVA + 0x2000,
                                             "size": 16, "write": True,
                                             "data": PAYLOAD.hex()})
        assert r["pending"] is True and r["page-request"]["queue"] == fq
        cookie = r["page-request"]["cookie"]
        ev = await next_event(listener, "VIOMMU_FAULT")
        assert ev["cookie"] == cookie and ev["addr"] == hex(IOVA + 0x2000) and ev["write"]
        q = await qmp.execute("query-viommu-fault-queue", {"id": fq})
        assert [(x["cookie"], x["kind"], x["sid"]) for x in q["pending"]] == \
            [(cookie, "pri", SID)]
        assert ram.read(DATA + 0x2000, 16) != PAYLOAD
        await qmp.execute("viommu-ioas-map", {"iova": DATA + 0x2000, "length": 0x1000})
        await qmp.execute("viommu-fault-respond", {"id": fq, "cookie": cookie,
                                                   "code": "success"})
        done = await next_event(listener, "VIOMMU_DMA_COMPLETED")
    assert done["job"] == r["job"] and done["written"] == 16 and "fault" not in done
    assert ram.read(DATA + 0x2000, 16) == PAYLOAD
    q = await qmp.execute("query-viommu-fault-queue", {"id": fq})
    assert q["pending"] == [] and q["responded"]["SUCCESS"] == 1
    assert "EINVAL" in await error_of(qmp, "viommu-fault-respond",
                                      {"id": fq, "cookie": cookie, "code": "success"})
    assert (await qmp.execute("query-viommu"))["counters"]["events"] == {}  # guest: nothing
    # the host maps the faulting IPA onto another page of guest RAM instead
    other = await qmp.execute("viommu-iova-to-phys", {"hwpt": p["id"], "iova": DATA + 0x3000})
    await qmp.execute("viommu-ioas-unmap", {"iova": DATA + 0x2000, "length": 0x1000})
    with qmp.listener() as listener:
        r = await qmp.execute("viommu-dma", {"device": "dma0", "iova": IOVA + 0x2000,
                                             "size": 16})
        await qmp.execute("viommu-ioas-map", {"iova": DATA + 0x2000, "length": 0x1000,
                                              "pa": other["pa"], "writable": False})
        await qmp.execute("viommu-fault-respond", {"id": fq, "code": "success",
                                                   "cookie": r["page-request"]["cookie"]})
        done = await next_event(listener, "VIOMMU_DMA_COMPLETED")
    assert bytes.fromhex(done["data"]) == ram.read(DATA + 0x3000, 16)


async def test_refusals_name_their_errno(env):
    qmp = env["qmp"]
    d = await domains(qmp)
    parent = d["objects"][d["devices"][SID]["hwpt"]]["parent"]
    assert (await error_of(qmp, "viommu-destroy", {"id": parent})).startswith("EBUSY: ")
    assert (await error_of(qmp, "viommu-destroy", {"id": 999})).startswith("ENOENT: ")
    assert (await error_of(qmp, "viommu-device-attach",
                           {"sid": SID, "hwpt": 999})).startswith("ENOENT: ")
    assert (await error_of(qmp, "viommu-ioas-map",
                           {"iova": DATA, "length": 0x1000})).startswith("EEXIST: ")
    assert (await error_of(qmp, "viommu-ioas-unmap",
                           {"iova": RAM - 0x1000, "length": 0x1000})).startswith("ENOENT: ")
    assert (await error_of(qmp, "viommu-hwpt-alloc",
                           {"parent": parent})).startswith("EINVAL: ")  # whose stage 1?
    assert (await error_of(qmp, "viommu-group-claim",
                           {"sid": SID, "owner": "kernel"})).startswith("EINVAL: ")
    assert (await error_of(qmp, "viommu-ioas-map",
                           {"iova": -1, "length": 1})).startswith("ERANGE: ")


async def test_group_ownership_and_host_attached_domains(env):
    qmp, ram = env["qmp"], env["ram"]
    assert await qmp.execute("viommu-group-claim", {"sid": SID, "owner": "user"}) == \
        {"owner": "user", "count": 1}
    r = await qmp.execute("viommu-dma", {"device": "dma0", "iova": IOVA, "size": 4})
    assert r["fault"] == "ABORT"  # claimed: off its default domain, blocked
    assert "EBUSY" in await error_of(qmp, "viommu-group-claim",
                                     {"sid": SID, "owner": "dma-api"})
    # the user attaches a plain paging domain of its own: IOVA = IPA, no guest stage 1
    h = await qmp.execute("viommu-hwpt-alloc", {"sid": SID})
    await qmp.execute("viommu-device-attach", {"sid": SID, "hwpt": h["id"]})
    r = await qmp.execute("viommu-dma", {"device": "dma0", "iova": DATA, "size": 16})
    assert bytes.fromhex(r["data"]) == ram.read(DATA, 16) == b"guest data 0123!"
    r = await qmp.execute("viommu-dma", {"device": "dma0", "iova": DATA, "size": 4,
                                         "no-snoop": True})
    assert r["no-snoop"] is False  # an enforcing domain performs it snooped
    c = await qmp.execute("query-viommu-coherency")
    assert c["noncoherent-dma"] is False and c["snoop-forced"] == 1
    assert "EBUSY" in await error_of(qmp, "viommu-device-attach", {"sid": SID, "hwpt": h["id"]})
    await qmp.execute("viommu-device-detach", {"sid": SID})
    await qmp.execute("viommu-destroy", {"id": h["id"]})
    assert await qmp.execute("viommu-group-release", {"sid": SID, "owner": "user"}) == \
        {"owner": None, "count": 0}
    r = await qmp.execute("viommu-dma", {"device": "dma0", "iova": IOVA, "size": 16})
    assert bytes.fromhex(r["data"]) == b"guest data 0123!"  # the default domain again


async def test_stream_view_reads_the_guests_tables_in_its_own_space(env):
    """query-viommu-stream shows what the guest wrote (its STE, CD, stage 1) from the
    guest's physical space, not from the host's reversed one."""
    s = await env["qmp"].execute("query-viommu-stream", {"sid": SID, "iova": IOVA,
                                                          "limit": 4})
    assert s["config"] == "s1" and s["domain"] is not None
    [sub] = s["substreams"]
    maps = sub["stage1"]["mappings"]
    assert [(m["iova"], m["pa"]) for m in maps] == \
        [(IOVA + i * 0x1000, DATA + i * 0x1000) for i in range(4)]  # the guest's IPAs
