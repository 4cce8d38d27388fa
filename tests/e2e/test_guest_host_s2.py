"""A hidden stage 2 under the stock arm-smmu-v3 driver (one boot).

The SMMU function runs with ``host_s2 = true`` and ``host_pa = "reversed"``: the guest sees
a stage-1-only SMMU (IDR0.S2P = 0), the host owns stage 2, and guest RAM sits reversed in
host memory (2 MiB chunks), so every DMA the guest's stage 1 lets through must also go
through the host's stage 2 to reach the right bytes.  The default workload runs on it
(virtio-blk hot-plugged, O_DIRECT write / read / verify at three block sizes, unplug).

Next to it sits the DMA engine (testdev ``dma0`` behind a second root port, no guest
driver; the guest only turns its bus mastering on).  While the guest's block I/O runs,
the host plays demand paging with it: it claims the engine's group, attaches a
fault-capable domain of its own, unmaps a page of guest RAM that the guest does not use
(``mem=1008M`` keeps the guest below it) from the host stage 2, has the engine write
there (``viommu-dma``): the engine's page request reaches the host's fault queue
(``VIOMMU_FAULT``), the host maps the IPA onto another page and answers Success
(``viommu-fault-respond``), the engine retries and the write lands
(``VIOMMU_DMA_COMPLETED``) where the new mapping says.

Needs the set-up made by scripts/setup; skips without it except under CI=true (fails).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from viommu_backend.config import default_config_text, loads_config
from viommu_backend.guest.boot import BootSummary, HostContext, run_boot
from viommu_backend.guest.qemu import Marker

from tests.support.guest import leftover_processes

pytestmark = pytest.mark.e2e
BLK_SID = 0x100  # blk0 behind rp0: bus 1
ENGINE_SID = 0x200  # dma0 behind rp1: bus 2
ENGINE_BDF = "0000:02:00.0"
RAM = 0x4000_0000
SCRATCH = RAM + (1008 << 20)  # above the guest's mem=1008M: the host's to play with
PAGE = 0x1000
OLD, NEW = bytes(range(256)) * 16, b"demand-paged by the host!\n" * 157 + b"\0" * 14
FEAT_TRANS_S1, FEAT_TRANS_S2 = 1 << 9, 1 << 10  # arm-smmu-v3.h


def config_text() -> str:
    text = default_config_text()
    text = re.sub(r'(?m)^workload = ".*"', 'workload = "enumerate,smmu,hotplug,host,blk,unplug"',
                  text)
    text = text.replace("timeout = 300", 'timeout = 300\ncmdline = "mem=1008M"')
    text = text.replace('kind = "smmuv3"\nslot = 1\n', 'kind = "smmuv3"\nslot = 1\n'
                        'options = { host_s2 = true, host_pa = "reversed" }\n')
    text = text.replace('[[function]]\nname = "viommu"',
                        '[[root_port]]\nname = "rp1"\nslot = 3\nchassis = 2\n\n'
                        '[[function]]\nname = "viommu"')
    return text + '\n[[function]]\nname = "dma0"\nkind = "testdev"\nport = "rp1"\n'


async def next_event(listener: Any, name: str) -> dict[str, Any]:
    while True:
        ev = await asyncio.wait_for(listener.get(), 20)
        if ev["event"] == name:
            return ev["data"]


class Host:
    """The host: bus mastering for the engine, demand paging during the block I/O."""

    def __init__(self) -> None:
        self.q: dict[str, Any] = {}

    async def __call__(self, m: Marker, ctx: HostContext) -> str | None:
        if m.name == "wait-host":
            return f"busmaster:{ENGINE_BDF}" if m.data["n"] == 0 else "end"
        if m.name == "blk-dev":  # the guest starts its block I/O: page while it runs
            await self.demand_paging(ctx)
        if m.name == "done":
            self.q["final"] = await ctx.execute("query-viommu")
            self.q["final-domains"] = await ctx.execute("query-viommu-domains")
        return None

    async def demand_paging(self, ctx: HostContext) -> None:
        q, ex = self.q, ctx.execute
        q["start"] = await ex("query-viommu")
        q["domains"] = await ex("query-viommu-domains")
        q["claim"] = await ex("viommu-group-claim", {"sid": ENGINE_SID, "owner": "user"})
        fq = (await ex("viommu-fault-queue-alloc"))["id"]
        h = (await ex("viommu-hwpt-alloc", {"sid": ENGINE_SID, "fault-queue": fq}))["id"]
        await ex("viommu-device-attach", {"sid": ENGINE_SID, "hwpt": h})
        q["old"] = await ex("viommu-dma", {"device": "dma0", "iova": SCRATCH, "size": PAGE,
                                            "write": True, "data": OLD.hex()})
        q["other"] = await ex("viommu-iova-to-phys", {"hwpt": h, "iova": SCRATCH + PAGE})
        q["unmap"] = await ex("viommu-ioas-unmap", {"iova": SCRATCH, "length": PAGE})
        client = await ctx.backend()
        with client.listener() as listener:
            q["dma"] = await ex("viommu-dma", {"device": "dma0", "iova": SCRATCH,
                                                "size": PAGE, "write": True,
                                                "data": NEW.hex()})
            q["fault"] = await next_event(listener, "VIOMMU_FAULT")
            q["queue"] = await ex("query-viommu-fault-queue", {"id": fq})
            await ex("viommu-ioas-map", {"iova": SCRATCH, "length": PAGE,
                                         "pa": q["other"]["pa"]})
            await ex("viommu-fault-respond", {"id": fq, "cookie": q["fault"]["cookie"],
                                              "code": "success"})
            q["done"] = await next_event(listener, "VIOMMU_DMA_COMPLETED")
        q["read"] = await ex("viommu-dma", {"device": "dma0", "iova": SCRATCH, "size": PAGE})
        q["read-other"] = await ex("viommu-dma", {"device": "dma0", "iova": SCRATCH + PAGE,
                                                   "size": PAGE})
        # back as it was: the default map, the engine in its default domain
        await ex("viommu-ioas-unmap", {"iova": SCRATCH, "length": PAGE})
        await ex("viommu-ioas-map", {"iova": SCRATCH, "length": PAGE})
        await ex("viommu-device-detach", {"sid": ENGINE_SID})
        await ex("viommu-destroy", {"id": h})
        await ex("viommu-destroy", {"id": fq})
        q["release"] = await ex("viommu-group-release", {"sid": ENGINE_SID, "owner": "user"})
        q["end"] = await ex("query-viommu")


class Run:
    def __init__(self, summary: BootSummary, host: Host, log: list[str]) -> None:
        self.s, self.q, self.log = summary, host.q, log

    def marks(self, name: str) -> list[dict[str, Any]]:
        return [m.data for m in self.s.markers if m.name == name]

    def context(self) -> str:
        console = self.s.console_log.read_text()[-4000:] if self.s.console_log else ""
        return "\n".join(self.log) + f"\nconsole:\n{console}"


@pytest.fixture(scope="module")
def run(guest_ready, tmp_path_factory) -> Run:  # noqa: F811
    tmp = tmp_path_factory.mktemp("host-s2")
    config = loads_config(config_text(), "<test>")
    assert config.iommu_function().options["host_s2"] is True
    host, log = Host(), []
    s = asyncio.run(run_boot(config, progress=log.append, workdir=tmp / "run",
                             on_marker=host))
    r = Run(s, host, log)
    assert leftover_processes(tmp / "run") == []
    assert s.ok, r.context()
    return r


def test_the_guest_sees_a_stage1_only_smmu(run):
    feats = [int(m[1], 16) for d in run.marks("kmsg")
             if (m := re.search(r"\(features 0x([0-9a-f]+)\)", d["text"]))]
    assert feats and feats[-1] & FEAT_TRANS_S1 and not feats[-1] & FEAT_TRANS_S2, feats
    start = run.q["start"]
    assert start["IDR0"]["S2P"] == 0 and start["IDR0"]["S1P"] == 1


def test_default_workload_runs_through_the_hidden_remapped_stage2(run):
    ios = run.marks("blk-io")
    assert [io["bs"] for io in ios] == [4096, 65536, 1048576], run.context()
    assert all(io["match"] for io in ios), ios
    assert run.marks("unplug") and run.marks("done") == [{"errors": 0}]
    d = run.q["domains"]
    assert d["host-s2"] is True and d["ioas"][0]["layout"] == "reversed"
    objs = {o["id"]: o for o in d["objects"]}
    blk = next(x for x in d["devices"] if x["sid"] == BLK_SID)
    nested = objs[blk["hwpt"]]
    parent = objs[nested["parent"]]
    assert nested["type"] == "hwpt_nested" and "nest-parent" in parent["flags"]
    assert parent["owner"] == "host" and nested["owner"] == "guest"
    # the guest's DMA really went through the remapped stage 2: walks of the host tables,
    # no stage-2 fault, and nothing of the host's reached the guest's event queue
    final = run.q["final"]
    assert final["translation"]["walks"] > 0 and final["translation"]["host_faults"] == 1
    assert final["counters"]["events"] == {}
    assert final["translation"]["bytes_written"] >= 3 * 4 * 1048576


def test_host_demand_paging_round_trip_during_io(run):
    q = run.q
    assert q["claim"] == {"owner": "user", "count": 1}
    assert q["old"] == {"written": PAGE}
    assert q["other"]["mapped"] and q["other"]["pa"] != SCRATCH + PAGE  # reversed layout
    assert q["unmap"] == {"unmapped": PAGE}
    assert q["dma"]["pending"] is True
    pr = q["dma"]["page-request"]
    assert q["fault"] == {**pr, "kind": "pri", "sid": ENGINE_SID, "addr": hex(SCRATCH),
                          "write": True}
    assert [p["cookie"] for p in q["queue"]["pending"]] == [pr["cookie"]]
    assert q["done"]["job"] == q["dma"]["job"] and q["done"]["written"] == PAGE
    assert "fault" not in q["done"]
    # the write landed where the host mapped the IPA: the page behind SCRATCH + PAGE
    assert bytes.fromhex(q["read"]["data"]) == NEW
    assert bytes.fromhex(q["read-other"]["data"]) == NEW
    assert q["release"] == {"owner": None, "count": 0}
    # during the guest's I/O: it moved on after the round trip was over
    assert q["end"]["translation"]["bytes_written"] < \
        q["final"]["translation"]["bytes_written"]
    assert q["end"]["translation"]["host_page_requests"] == 1
    assert q["end"]["counters"]["page_requests"] == 0  # none went to the guest's PRIQ
    # the engine is back in its default domain (the guest's, nested on the host parent)
    eng = next(x for x in q["final-domains"]["devices"] if x["sid"] == ENGINE_SID)
    assert eng["binding"] == "auto" and eng["iopf"] is False
