"""PRI page-request injection over QMP against a Backend served in-process: the SMMU is
programmed through the project's vfio-user client (BAR0 writes, guest RAM shared by memfd)
with its PRI queue enabled; ``viommu-inject-page-request`` has the endpoint's stream issue
a page request through the domain manager; the test plays the driver: reads the PRIQ
record, sees the PRIQ interrupt, consumes the queue and answers with CMD_PRI_RESP."""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest
from qemu.qmp import ExecuteError

from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command

from tests.support.viommu_rig import next_event
from tests.support.viommu_rig import LOG2, PRIQ, SID, Guest, GuestRam, smmu_rig

NO_FQ_SID = 0x101  # STE left invalid: blocking domain, no fault queue
QMASK = (2 << LOG2) - 1


@pytest.fixture
async def env(tmp_path) -> AsyncIterator[dict[str, Any]]:
    async with smmu_rig(tmp_path, client_name="inject-pri-test", pri=True,
                        endpoint=False) as rig:
        yield rig


def priq_words(ram: GuestRam, index: int) -> tuple[int, int]:
    raw = ram.read(PRIQ + (index & ((1 << LOG2) - 1)) * 16, 16)
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


async def answer(g: Guest, resp: int, grpid: int, ssid: int | None = None) -> None:
    """The driver's CMD_PRI_RESP (+ CMD_SYNC), checked consumed."""
    before = await g.cons()
    extra = {"SSV": 1, "SSID": ssid} if ssid is not None else {}
    await g.submit(encode_command("PRI_RESP", SID=SID, GRPID=grpid, RESP=resp, **extra),
                   encode_command("CMD_SYNC"))
    assert await g.cons() == (before + 2) & QMASK


async def test_page_request_reaches_priq_with_interrupt_and_pri_resp_completes_it(env):
    qmp, ram, g = env["qmp"], env["ram"], env["g"]
    q0 = await qmp.execute("query-viommu")
    assert q0["CR0"]["PRIQEN"] == 1 and q0["irq_levels"]["priq"] is False
    assert q0["injected"]["page-requests"] == {"pending": 0, "answered": 0}
    with qmp.listener() as listener:
        r = await qmp.execute("viommu-inject-page-request", {
            "sid": SID, "ssid": 5, "addr": 0xABCD_E123, "write": True, "priv": True,
            "exec": True, "prg-index": 0x1A5})
        assert r == {"prg-index": 0x1A5, "pending": True, "outcome": "written"}
        note = await next_event(listener, "VIOMMU_INJECTED", "page-request")
    assert note["sid"] == SID and note["prg-index"] == 0x1A5 and note["state"] == "pending"
    # the record in the PRI queue (architected layout) and the PRIQ interrupt
    w0, w1 = priq_words(ram, 0)
    assert w0 == SID | 5 << 32 | 1 << 58 | 1 << 59 | 1 << 60 | 1 << 61 | 1 << 62 | 1 << 63
    assert w1 == 0x1A5 | 0xABCD_E000
    assert await g.r("PRIQ_PROD") & QMASK == 1
    assert await env["c"].wait_irq(env["intx"]) >= 1  # the combined wired interrupt
    q = await qmp.execute("query-viommu")
    assert q["irq_levels"]["priq"] is True
    assert q["queues"]["PRIQ"]["prod"] == 1 and q["queues"]["PRIQ"]["cons"] == 0
    assert q["counters"]["page_requests"] == 1
    assert q["injected"]["counts"]["page-request"] == 1
    assert q["injected"]["page-requests"] == {"pending": 1, "answered": 0}
    [pr] = await qmp.execute("query-viommu-page-requests")
    assert pr["state"] == "pending" and "response" not in pr and pr["ssid"] == 5
    assert pr["addr"] == 0xABCD_E123 and pr["write"] and pr["read"] and pr["last"]
    # the domain's fault queue holds the group
    doms = await qmp.execute("query-viommu-domains")
    pending = [p for fq in doms["fault_queues"] for p in fq["pending"]]
    assert [(p["kind"], p["sid"], p["key"]) for p in pending] == [("pri", SID, 0x1A5)]
    # the driver consumes the record: the level interrupt drops
    await g.w("PRIQ_CONS", 1)
    assert (await qmp.execute("query-viommu"))["irq_levels"]["priq"] is False
    # ... and answers DENY (Linux's answer to an unexpected request): INVALID
    with qmp.listener() as listener:
        await answer(g, 0, 0x1A5, ssid=5)
        resp = await next_event(listener, "VIOMMU_INJECTED", "page-response")
    assert resp == {"kind": "page-response", "id": pr["id"], "sid": SID, "prg-index": 0x1A5,
                    "response": "INVALID"}
    [pr] = await qmp.execute("query-viommu-page-requests")
    assert pr["state"] == "answered" and pr["response"] == "INVALID"
    q = await qmp.execute("query-viommu")
    assert q["counters"]["commands"]["PRI_RESP"] == 1
    assert q["injected"]["page-requests"] == {"pending": 0, "answered": 1}
    doms = await qmp.execute("query-viommu-domains")
    assert [p for fq in doms["fault_queues"] for p in fq["pending"]] == []
    # a second answer for the same group finds nothing pending: ignored, nothing changes
    await answer(g, 2, 0x1A5, ssid=5)
    [pr] = await qmp.execute("query-viommu-page-requests")
    assert pr["response"] == "INVALID"


async def test_each_pri_response_code_and_groups(env):
    qmp, ram, g = env["qmp"], env["ram"], env["g"]
    cons = 0
    for resp, name in ((2, "SUCCESS"), (1, "FAILURE"), (0, "INVALID")):
        r = await qmp.execute("viommu-inject-page-request", {"sid": SID, "addr": 0x20_0000})
        assert r["pending"] is True and r["prg-index"] == 0  # lowest free index
        w0, w1 = priq_words(ram, cons)
        assert w0 == SID | 1 << 60 | 1 << 62 and w1 == 0x20_0000  # R, L; no SSV
        cons += 1
        await g.w("PRIQ_CONS", cons)
        await answer(g, resp, 0)
        last = (await qmp.execute("query-viommu-page-requests"))[-1]
        assert last["response"] == name
    # a group of three requests: the guest answers once, after the last
    idx = []
    for i, last in enumerate((False, False, True)):
        r = await qmp.execute("viommu-inject-page-request", {
            "sid": SID, "addr": 0x30_0000 + i * 0x1000, "last": last,
            **({"prg-index": idx[0]} if idx else {})})
        idx.append(r["prg-index"])
        w0, _ = priq_words(ram, cons + i)
        assert bool(w0 >> 62 & 1) == last
    assert idx == [0, 0, 0]
    # while the group is open the next auto index skips it
    other = await qmp.execute("viommu-inject-page-request", {"sid": SID, "addr": 0x40_0000})
    assert other["prg-index"] == 1
    await g.w("PRIQ_CONS", cons + 4)
    await answer(g, 2, 0)
    reqs = await qmp.execute("query-viommu-page-requests")
    assert [p["response"] for p in reqs[3:6]] == ["SUCCESS"] * 3
    assert reqs[6]["state"] == "pending" and reqs[6]["prg-index"] == 1
    q = await qmp.execute("query-viommu")
    assert q["injected"]["page-requests"] == {"pending": 1, "answered": 6}
    assert q["queues"]["PRIQ"]["prod"] == cons + 4


async def test_stream_without_fault_queue_is_answered_invalid_at_once(env):
    qmp = env["qmp"]
    r = await qmp.execute("viommu-inject-page-request", {"sid": NO_FQ_SID, "addr": 0x1000})
    assert r == {"prg-index": 0, "pending": False, "outcome": "none", "response": "INVALID"}
    q = await qmp.execute("query-viommu")
    assert q["queues"]["PRIQ"]["prod"] == 0  # nothing reached the guest
    [pr] = await qmp.execute("query-viommu-page-requests")
    assert pr["sid"] == NO_FQ_SID and pr["response"] == "INVALID"


async def test_bad_page_requests_are_refused(env):
    qmp, g = env["qmp"], env["g"]
    for bad, msg in (({"sid": SID, "addr": 0, "prg-index": 512}, "prg-index"),
                     ({"sid": SID, "addr": 0, "read": False}, "read and/or write"),
                     ({"sid": SID, "addr": 0, "exec": True}, "ssid"),
                     ({"sid": SID, "addr": 1 << 64}, "addr"),
                     ({"sid": SID, "addr": 0, "ssid": 1 << 20}, "ssid"),
                     ({"sid": -1, "addr": 0}, "sid"),
                     ({"sid": "x", "addr": 0}, "sid"),
                     ({"addr": 0}, "sid")):
        with pytest.raises(ExecuteError, match=msg):
            await qmp.execute("viommu-inject-page-request", bad)
    await g.w("CR0", regs.layout("CR0").encode(SMMUEN=1, CMDQEN=1, EVTQEN=1))
    with pytest.raises(ExecuteError, match="PRIQEN = 0"):
        await qmp.execute("viommu-inject-page-request", {"sid": SID, "addr": 0})
    assert await qmp.execute("query-viommu-page-requests") == []
    q = await qmp.execute("query-viommu")
    assert "page-request" not in q["injected"]["counts"] and q["queues"]["PRIQ"]["prod"] == 0


async def test_auto_index_skips_groups_the_endpoint_has_outstanding(env):
    qmp, be = env["qmp"], env["be"]
    # the endpoint's own page request (not injected), group 0 left open
    pf = be.manager.page_request(SID, None, 0x50_0000, prg_index=0, last=False)
    assert not pf.done
    r = await qmp.execute("viommu-inject-page-request", {"sid": SID, "addr": 0x60_0000})
    assert r["prg-index"] == 1
    # a stream far outside the stream table: blocking, answered at once, nothing queued
    r = await qmp.execute("viommu-inject-page-request", {"sid": 0xFFFF_FFFF, "addr": 0})
    assert r["pending"] is False and r["response"] == "INVALID"
    assert (await qmp.execute("query-viommu"))["queues"]["PRIQ"]["prod"] == 2
