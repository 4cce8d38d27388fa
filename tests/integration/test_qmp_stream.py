"""query-viommu-stream over the real QMP socket of a served Backend whose SMMU was brought
up through vfio-user (viommu_rig): the STE, CDs and mappings as the guest wrote them, live."""

from __future__ import annotations

import pytest
from qemu.qmp import ExecuteError

from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl

from tests.support.viommu_rig import DATA, SID, STRTAB, TABLES, smmu_rig


async def test_query_stream_shows_what_the_guest_programmed(tmp_path):
    async with smmu_rig(tmp_path, client_name="stream", endpoint=False) as rig:
        qmp, ram = rig["qmp"], rig["ram"]
        r = await qmp.execute("query-viommu-stream", {"sid": SID})
        assert r["sid"] == SID and r["config"] == "s1"
        assert r["ste"]["address"] == STRTAB + SID * 64 and r["ste"]["fields"]["Config"] == fl.STE_CONFIG_S1
        (sub,) = r["substreams"]
        assert sub["ssid"] is None and sub["cd-index"] == 0 and sub["stage1"]["asid"] == 1
        maps = sub["stage1"]["mappings"]
        assert [(m["iova"], m["pa"], m["size"], m["perm"]) for m in maps] == [
            (0x10_0000 + i * 0x1000, DATA + i * 0x1000, 0x1000, "rwx") for i in range(4)]
        assert sub["stage1"]["next"] is None and r["next-ssid"] is None

        # paged: two mappings at a time
        r = await qmp.execute("query-viommu-stream", {"sid": SID, "limit": 2})
        assert r["substreams"][0]["stage1"]["next"] == 0x10_2000
        r = await qmp.execute("query-viommu-stream", {"sid": SID, "limit": 2, "iova": 0x10_2000})
        assert [m["iova"] for m in r["substreams"][0]["stage1"]["mappings"]] == [0x10_2000, 0x10_3000]

        # a second stream with substreams, written now (no CFGI needed: read live)
        al = b.Allocator(TABLES + 0x8_0000, 0x8_0000)
        cds = al.alloc(64 * 4, 4096)
        for ssid in (1, 3):
            pt = b.PageTable(ram, al)
            pt.map(0x2000_0000, DATA + ssid * 0x1000, read_only=True)
            b.write_words(ram, cds + ssid * 64, b.make_cd(pt.root, asid=20 + ssid))
        b.write_words(ram, STRTAB + (SID + 1) * 64,
                      b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cds, s1_cdmax=2, s1_dss=fl.S1DSS_BYPASS))
        r = await qmp.execute("query-viommu-stream", {"sid": SID + 1})
        assert r["cd-table"]["cdmax"] == 2 and [s["ssid"] for s in r["substreams"]] == [1, 3]
        assert [s["stage1"]["mappings"][0]["pa"] for s in r["substreams"]] == [DATA + 0x1000, DATA + 0x3000]
        assert r["substreams"][1]["stage1"]["mappings"][0]["perm"] == "r-x"
        assert "domain" not in r  # no DMA yet: the domain manager has not attached it

        for bad in ({"sid": 1 << 16}, {"sid": SID, "limit": 0}, {"sid": SID, "max-ssids": 1000}, {}):
            with pytest.raises(ExecuteError):
                await qmp.execute("query-viommu-stream", bad)
