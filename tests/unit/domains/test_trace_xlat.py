"""The ``xlat`` trace category: one record per translation request of a translated stream,
with the pages it touched and those the TLB did not serve (walked)."""

from __future__ import annotations

import numpy as np

from tests.support.domain_env import DATA, Env


def test_xlat_records_pages_walks_and_faults():
    env = Env()
    pt = env.s1_table()
    for i in range(4):
        pt.map(0x10000 + i * 0x1000, DATA + i * 0x1000)
    env.set_ste(5, env.s1_ste(env.cd(pt)))
    env.mgr.trace.configure(enable="xlat")
    iovas = (np.arange(0x10000, 0x14000, 0x800, dtype=np.uint64))  # 4 pages, 2 addresses each
    env.mgr.translate(5, None, iovas)
    env.mgr.translate(5, None, iovas)  # now all from the TLB
    env.mgr.translate_one(5, None, 0x10010)  # a hit, scalar path
    env.mgr.translate_one(5, None, 0x20000)  # unmapped: walked, faults
    recs = env.mgr.trace.query(0, 100)["records"]
    assert [r["cat"] for r in recs] == ["xlat"] * 4
    first, second, hit, miss = recs
    assert first["sid"] == 5 and first["ssid"] is None and first["write"] is False
    assert first["pages"] == [0x10, 0x11, 0x12, 0x13] and first["walked"] == [0x10, 0x11, 0x12, 0x13]
    assert second["pages"] == first["pages"] and second["walked"] == [] and second["faults"] == 0
    assert (hit["pages"], hit["walked"], hit["faults"]) == ([0x10], [], 0)
    assert (miss["pages"], miss["walked"], miss["faults"]) == ([0x20], [0x20], 1)
    env.mgr.trace.configure(disable="xlat")
    env.mgr.translate(5, None, iovas)
    assert len(env.mgr.trace.query(0, 100)["records"]) == 4  # off: nothing recorded
