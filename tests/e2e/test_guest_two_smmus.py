"""Two SMMUs, one per PCIe root complex (qemu_configs/two-smmus*.toml): the stock
arm-smmu-v3 driver probes both, each hot-plugged disk joins an iommu group of the SMMU of
its own root complex, O_DIRECT data is verified on both, and each SMMU's QMP view
(query-viommu, query-viommu-domains, query-viommu-stream, viommu-translate with ``smmu``)
shows its own endpoint only.  No backend error (``run_boot`` fails the run on any)."""

from __future__ import annotations

from typing import Any

import pytest

from viommu_backend.config import load_config
from viommu_backend.guest.boot import HostContext
from viommu_backend.guest.dt import smmu_nodes_for
from viommu_backend.guest.qemu import Marker
from viommu_backend.topology import placements

from tests.support.guest import boot
from tests.support import CONFIGS

pytestmark = pytest.mark.e2e
ENDPOINTS = {"smmu0": "blk0", "smmu1": "blk1"}


# route 1 on Debian's kernel (re-probe); route 2 on a kernel built from linux-source-6.12
# (built on first use, ~5 min on 2 cores): the guest module picks each SMMU's node
@pytest.mark.parametrize("name", ["two-smmus.toml", "two-smmus-built.toml"])
async def test_two_smmus_each_with_its_own_endpoint(guest_ready, tmp_path, name):  # noqa: F811
    config = load_config(CONFIGS / name)
    where = placements(config)
    views: dict[str, Any] = {}

    async def at_done(m: Marker, ctx: HostContext) -> str | None:
        if m.name != "done":
            return None
        qmp = await ctx.backend()
        views["smmus"] = await qmp.execute("query-viommu-smmus")
        for smmu in ENDPOINTS:
            views[smmu] = {ep: await qmp.execute("query-viommu-stream", {
                "smmu": smmu, "sid": where[ep].stream_id, "limit": 4}) for ep in ENDPOINTS.values()}
        try:
            await qmp.execute("query-viommu", {})
        except Exception as e:  # noqa: BLE001 - the QMP error reply is the point
            views["no-smmu-arg"] = str(e)
        return None

    s = await boot(config, tmp_path / "run", on_marker=at_done)

    # the stock driver probed two instances, at the two nodes of the generated DT
    nodes = {f"{n.base:x}.smmuv3" for n in smmu_nodes_for(config)}
    assert len(nodes) == 2
    probed = {m["node"] for m in s.marks("smmu") if m["probed"]}
    assert probed == nodes
    lines = [k["text"] for k in s.marks("kmsg") if "features 0x" in k["text"]]
    assert {line.split()[1].rstrip(":") for line in lines} == nodes, lines

    # each disk behind the SMMU of its root complex, in an iommu group of its own
    units = {f"{n.base:x}.smmuv3": f"smmu3.0x{n.base:016x}" for n in smmu_nodes_for(config)}
    disks = {d["bdf"]: d for d in s.marks("blk-dev")}
    assert set(disks) == {where["blk0"].bdf, where["blk1"].bdf} == {"0000:01:00.0", "0001:81:00.0"}
    bases = {name: n for name, n in zip(ENDPOINTS, smmu_nodes_for(config))}
    for smmu, ep in ENDPOINTS.items():
        d = disks[where[ep].bdf]
        assert d["iommu"] == units[f"{bases[smmu].base:x}.smmuv3"], d
        assert d["domain_type"] == "DMA"
    assert disks["0000:01:00.0"]["iommu_group"] != disks["0001:81:00.0"]["iommu_group"]
    ios = s.marks("blk-io")
    assert {io["dev"] for io in ios} == {d["dev"] for d in disks.values()}
    assert ios and all(io["match"] for io in ios)

    # per-SMMU QMP: each SMMU lists, attaches and translated for its own endpoint only
    listed = {u["name"]: [e["name"] for e in u["endpoints"]] for u in views["smmus"]}
    assert listed == {"smmu0": ["blk0"], "smmu1": ["blk1"]}
    assert {u["name"]: u["root-complex"] for u in views["smmus"]} == {"smmu0": "pcie.0", "smmu1": "pxb1"}
    for smmu, ep in ENDPOINTS.items():
        view = s.backend["smmus"][smmu]
        sids = [d["sid"] for d in view["domains"]["devices"]]
        assert sids == [where[ep].stream_id]
        assert [a["sid"] for a in view["domains"]["attachments"]] == sids
        t = view["viommu"]["translation"]
        assert t["translations"] > 0 and t["bytes_read"] > 0 and t["bytes_written"] > 0, t
        own = views[smmu][ep]
        assert own["config"] == "s1" and "domain" in own and own["substreams"], own
        other = views[smmu][ENDPOINTS["smmu1" if smmu == "smmu0" else "smmu0"]]
        # the other root complex's StreamID: no STE in this SMMU's table (Linux made none)
        assert "domain" not in other and other.get("event") == "C_BAD_STE", other
    assert "smmu" in views["no-smmu-arg"] and "smmu0" in views["no-smmu-arg"]
