"""viommu_backend.timeline: request cycles cut from synthetic vfio trace records."""

from __future__ import annotations

import pytest

from viommu_backend.timeline import request_cycles, summarize

NOTIFY = dict(dev="blk0", cmd="REGION_WRITE", region=4, offset=0x3000, count=2, posted=True)


def rec(seq: int, t_us: float, **kw):
    return {"seq": seq, "t": t_us / 1e6, "cat": "vfio", **kw}


def one_request(seq: int, t0: float, syncs: int) -> list[dict]:
    """notify, INTx 100 us later, ISR read, unmask, then ``syncs`` CMDQ_PROD writes."""
    out = [rec(seq, t0, **NOTIFY, us=3.0),
           rec(seq + 1, t0 + 100, dev="blk0", irq="INTX", vector=0),
           rec(seq + 2, t0 + 250, dev="blk0", cmd="REGION_READ", region=4, offset=0x1000,
               count=1, posted=False, us=10.0),
           rec(seq + 3, t0 + 400, dev="blk0", cmd="DEVICE_SET_IRQS", posted=False, us=5.0),
           {"seq": seq + 4, "t": (t0 + 410) / 1e6, "cat": "irq", "source": "cmd_sync"}]
    for k in range(syncs):
        out.append(rec(seq + 5 + k, t0 + 500 + 100 * k, dev="viommu", cmd="REGION_WRITE",
                       region=0, offset=0x98, count=4, posted=True, us=20.0))
    return out


def test_cycles_split_server_and_other_time():
    recs = one_request(0, 0, 2) + one_request(100, 1000, 1) + one_request(200, 1800, 0)
    cyc = request_cycles(recs, dev="blk0", notify_region=4, notify_offset=0x3000,
                         iommu="viommu")
    assert len(cyc) == 2  # the last notify opens a cycle that never closes
    a, b = cyc
    assert a.total_us == pytest.approx(1000) and b.total_us == pytest.approx(800)
    assert a.process_us == pytest.approx(100)
    # notify->irq 100 + ISR read 10 + unmask 5 + 2 x 20 for the SMMU's commands
    assert a.server_us == pytest.approx(155) and b.server_us == pytest.approx(135)
    assert a.other_us == pytest.approx(845)
    assert a.counts == {"reads": 1, "set_irqs": 1, "iommu_writes": 2}
    s = summarize(cyc)
    assert s is not None and s.n == 2
    assert s.total_us == pytest.approx(900) and s.server_us == pytest.approx(145)
    assert s.other_us == pytest.approx(755) and s.counts["iommu_writes"] == pytest.approx(1.5)
    assert s.as_dict()["median_total_us"] == pytest.approx(900)


def test_cycles_are_cut_into_their_phases():
    recs = one_request(0, 0, 2) + one_request(100, 1000, 1) + one_request(200, 1700, 0)
    a, b = request_cycles(recs, dev="blk0", notify_region=4, notify_offset=0x3000,
                          iommu="viommu")
    # notify -> INTx 100, -> ISR read 150, -> unmask 150, -> next notify
    assert a.phases == pytest.approx({"process": 100, "irq": 150, "eoi": 150, "guest": 600})
    assert b.phases == pytest.approx({"process": 100, "irq": 150, "eoi": 150, "guest": 300})
    assert sum(a.phases.values()) == pytest.approx(a.total_us)
    s = summarize([a, b])
    assert s is not None
    assert s.phases == pytest.approx({"process": 100, "irq": 150, "eoi": 150, "guest": 450})
    assert s.as_dict()["phases"]["guest"] == pytest.approx(450)


def test_a_cycle_without_its_isr_read_has_only_the_phases_before_it():
    recs = [rec(0, 0, **NOTIFY, us=4.0),
            rec(1, 80, dev="blk0", irq="INTX", vector=0),
            rec(2, 90, dev="blk0", cmd="DEVICE_SET_IRQS", posted=False, us=5.0),  # no ISR read
            rec(3, 500, **NOTIFY, us=4.0),
            rec(4, 520, dev="blk0", cmd="REGION_READ", region=4, offset=0x1000, count=1,
                posted=False, us=3.0),  # a read before the interrupt is no ISR read
            rec(5, 600, dev="blk0", irq="INTX", vector=0),
            rec(6, 900, **NOTIFY, us=4.0)]
    a, b = request_cycles(recs, dev="blk0", notify_region=4, notify_offset=0x3000)
    assert a.phases == pytest.approx({"process": 80})
    assert b.phases == pytest.approx({"process": 100})
    s = summarize([a, b])
    assert s is not None and s.phases == pytest.approx({"process": 90})


def test_other_endpoints_and_no_interrupt():
    recs = [rec(0, 0, **NOTIFY, us=4.0),
            rec(1, 50, dev="blk1", **{k: v for k, v in NOTIFY.items() if k != "dev"}, us=2.0),
            rec(2, 60, dev="viommu", cmd="REGION_READ", region=0, offset=0x9C, count=4,
                posted=False, us=6.0),
            rec(3, 500, **NOTIFY, us=4.0)]
    (c,) = request_cycles(recs, dev="blk0", notify_region=4, notify_offset=0x3000,
                          iommu="viommu")
    assert c.process_us is None  # no interrupt: the notify's own time + every request
    assert c.server_us == pytest.approx(4 + 2 + 6)
    assert c.counts == {"other_requests": 1, "reads": 1}
    assert summarize([]) is None
    assert request_cycles([], dev="blk0", notify_region=4, notify_offset=0x3000) == []
