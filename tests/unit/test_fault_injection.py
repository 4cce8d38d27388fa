"""FaultInjector logic, and its hook points in the domain manager and the SMMU model."""

from __future__ import annotations


import numpy as np
import pytest

from viommu_backend.domains import DmaFault, DomainManager
from viommu_backend.fault_injection import FaultInjector, InjectError
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command
from viommu_backend.smmuv3.events import EVENT_RECORD, decode_event
from viommu_backend.smmuv3.fields import EventId

from tests.support.smmuv3_harness import MSI_ADDR, RAM_BASE, Harness

F_TRANS = int(EventId.F_TRANSLATION)
F_PERM = int(EventId.F_PERMISSION)


# -- rules -----------------------------------------------------------------------------
def test_range_matching_is_half_open_and_per_stream():
    inj = FaultInjector()
    r = inj.add_fault(0x10, 0x2000, 0x1000)
    assert inj.fault_for(0x10, None, 0x1FFF, False) == 0
    assert inj.fault_for(0x10, None, 0x2000, False) == F_TRANS
    assert inj.fault_for(0x10, None, 0x2FFF, True) == F_TRANS
    assert inj.fault_for(0x10, None, 0x3000, False) == 0
    assert inj.fault_for(0x11, None, 0x2000, False) == 0  # other stream
    assert r.hits == 2


def test_once_fires_a_single_time_sticky_until_cleared():
    inj = FaultInjector()
    once = inj.add_fault(1, 0x1000, event="F_PERMISSION", once=True)
    sticky = inj.add_fault(2, 0x1000)
    assert inj.fault_for(1, None, 0x1000, False) == F_PERM
    assert inj.fault_for(1, None, 0x1000, False) == 0
    assert once.hits == 1 and not once.active
    for _ in range(3):
        assert inj.fault_for(2, None, 0x1800, False) == F_TRANS
    assert sticky.hits == 3
    assert inj.clear_faults(sticky.id) == 1
    assert inj.fault_for(2, None, 0x1800, False) == 0
    with pytest.raises(InjectError):
        inj.clear_faults(sticky.id)
    inj.add_fault(3, 0)
    inj.add_fault(4, 0)
    assert inj.clear_faults() == 3 and inj.faults() == []


def test_peek_does_not_consume_and_write_only_and_ssid():
    inj = FaultInjector()
    r = inj.add_fault(5, 0x4000, once=True, write_only=True, ssid=7)
    assert inj.fault_for(5, 7, 0x4000, True, consume=False) == F_TRANS
    assert r.hits == 0 and r.active
    assert inj.fault_for(5, 7, 0x4000, False) == 0  # reads pass
    assert inj.fault_for(5, 8, 0x4000, True) == 0  # other substream
    assert inj.fault_for(5, None, 0x4000, True) == 0  # no PASID
    assert inj.fault_for(5, 7, 0x4000, True) == F_TRANS
    any_ssid = inj.add_fault(6, 0)
    assert inj.fault_for(6, None, 0, False) and inj.fault_for(6, 3, 0, False)
    assert any_ssid.hits == 2


def test_batched_codes_count_one_hit_per_call():
    inj = FaultInjector()
    assert inj.fault_codes(1, None, np.array([0], np.uint64), False) is None
    r = inj.add_fault(1, 0x3000, 0x2000, event="F_ACCESS", once=True)
    va = np.array([0x2FFF, 0x3000, 0x4800, 0x5000], np.uint64)
    codes = inj.fault_codes(1, None, va, False)
    assert codes.tolist() == [0, int(EventId.F_ACCESS), int(EventId.F_ACCESS), 0]
    assert r.hits == 1
    assert inj.fault_codes(1, None, va, False) is None  # once: spent


def test_bad_requests_are_refused():
    inj = FaultInjector()
    with pytest.raises(InjectError, match="type"):
        inj.add_fault(1, 0, event="C_BAD_STE")
    with pytest.raises(InjectError, match="size"):
        inj.add_fault(1, (1 << 64) - 0x800, 0x1000)
    with pytest.raises(InjectError, match="sid"):
        inj.add_fault(-1, 0)
    with pytest.raises(InjectError, match="unknown SMMUv3 event"):
        inj.make_event("F_NOPE", 1)
    with pytest.raises(InjectError, match="class"):
        inj.make_event("F_TRANSLATION", 1, klass="XX")
    with pytest.raises(InjectError, match="class"):
        inj.make_event("F_TRANSLATION", 1, klass=3)
    with pytest.raises(InjectError, match="error"):
        inj.inject_gerror("NOT_AN_ERROR")
    with pytest.raises(InjectError, match="error"):
        inj.inject_gerror("DPT_ERR")  # architected, but not a condition the model has
    with pytest.raises(InjectError, match="no SMMU"):
        inj.inject_gerror("SFM_ERR")
    with pytest.raises(InjectError, match="mode"):
        inj.set_sync_mode("stuck")
    with pytest.raises(InjectError, match="count"):
        inj.set_sync_mode("drop", count=2)
    with pytest.raises(InjectError, match="delay-ms"):
        inj.set_sync_mode("delay")
    assert inj.injected == {}


def test_event_classes_by_name_or_value():
    inj = FaultInjector()
    for name, value in (("CD", 0), ("TTD", 1), ("IN", 2)):
        for klass in (name, value):
            ev = inj.make_event("F_TRANSLATION", 1, klass=klass, s2=True)
            assert decode_event(ev.encode())["CLASS"] == value


# -- hook points, with a real SMMU + domain manager ----------------------------------------
STRTAB = RAM_BASE + 0x4_0000
TABLES = RAM_BASE + 0x8_0000
DATA = RAM_BASE + 0xC_0000
SID = 0x20


class Setup:
    def __init__(self) -> None:
        self.h = Harness()
        self.mem, self.smmu = self.h.mem, self.h.smmu
        self.mgr = DomainManager(lambda: self.mem)
        self.mgr.attach_smmu(self.smmu)
        self.timers: list[tuple[float, object]] = []
        self.inj = FaultInjector(call_later=lambda s, fn: self.timers.append((s, fn))).install(
            self.mgr, self.smmu)
        self.h.setup_queues()
        self.h.w64("STRTAB_BASE", STRTAB)
        self.h.w32("STRTAB_BASE_CFG", regs.layout("STRTAB_BASE_CFG").encode(FMT=0, LOG2SIZE=6))
        self.h.w32("CR0", regs.layout("CR0").encode(SMMUEN=1, CMDQEN=1, EVTQEN=1))
        al = b.Allocator(TABLES, 0x4_0000)
        self.pt = pt = b.PageTable(self.mem, al)
        pt.map_range(0x10_0000, DATA, 0x1_0000)
        cd = al.alloc(64, 64)
        b.write_words(self.mem, cd, b.make_cd(pt.root, asid=1))
        b.write_words(self.mem, STRTAB + SID * 64, b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cd))
        self.h.submit(encode_command("CFGI_STE", SID=SID, LEAF=1), encode_command("CMD_SYNC"))

    def cons(self) -> int:
        return self.h.r32("CMDQ_CONS") & 0xFFFFF


def test_injected_fault_fails_dma_records_event_then_clears():
    s = Setup()
    s.mem.write(DATA + 0x1000, b"abcd")
    assert s.mgr.dma_read(SID, None, 0x10_1000, 4) == b"abcd"  # now in the TLB
    rule = s.inj.add_fault(SID, 0x10_1000, 0x1000, event="F_PERMISSION")
    with pytest.raises(DmaFault) as ei:
        s.mgr.dma_read(SID, None, 0x10_1000, 4)  # TLB hit does not bypass the injection
    assert ei.value.event == "F_PERMISSION" and ei.value.iova == 0x10_1000
    assert s.smmu.evtq.count() == 1
    rec = decode_event(s.smmu.evtq.read_entry(s.mem, 0))
    assert rec["name"] == "F_PERMISSION" and rec["STREAMID"] == SID
    assert rec["INPUTADDR"] == 0x10_1000 and rec["RNW"] == 1
    # batched path (> 8 pages), fault in the middle page; nothing written
    with pytest.raises(DmaFault) as ei:
        s.mgr.dma_write(SID, None, 0x10_0000, b"\xee" * 0x9000)
    assert ei.value.event == "F_PERMISSION" and ei.value.iova == 0x10_1000
    assert s.mem.read(DATA, 4) == b"\0\0\0\0" and s.mem.read(DATA + 0x1000, 4) == b"abcd"
    r = s.mgr.translate(SID, None, np.arange(0x10_0000, 0x10_A000, 0x1000, dtype=np.uint64))
    assert [r.fault_name(i) for i in range(10)] == [None, "F_PERMISSION"] + [None] * 8
    assert int(r.pa[2]) == DATA + 0x2000 and int(r.pa[1]) == 0
    assert rule.hits == 3 and s.inj.injected["fault-hit"] == 3
    t, _ = s.mgr.probe(SID, None, 0x10_1000)
    assert t.fault == F_PERM and rule.hits == 3  # probe sees it, does not count it
    s.inj.clear_faults()
    assert s.mgr.dma_read(SID, None, 0x10_1000, 4) == b"abcd"


def test_injected_event_written_with_architected_bytes_and_interrupt():
    s = Setup()
    ev = s.inj.make_event("F_TRANSLATION", 0x123, ssid=5, iova=0xDEAD_B000, write=True,
                          stall=True, stag=0x42)
    assert s.inj.inject_event(ev) == "written"
    raw = s.mem.read(RAM_BASE + 0x1_0000, 32)  # EVTQ base of the harness
    assert raw == ev.encode()
    v = EVENT_RECORD.from_bytes(raw)
    assert EVENT_RECORD.get(v, "EVENTID") == 0x10 and EVENT_RECORD.get(v, "STREAMID") == 0x123
    assert EVENT_RECORD.get(v, "SSV") == 1 and EVENT_RECORD.get(v, "SUBSTREAMID") == 5
    assert EVENT_RECORD.get(v, "STAG") == 0x42 and EVENT_RECORD.get(v, "STALL") == 1
    assert EVENT_RECORD.get(v, "RNW") == 0 and EVENT_RECORD.get(v, "INPUTADDR") == 0xDEAD_B000
    assert s.h.irq.levels.get("evtq") is True


def test_gerror_cmdq_err_stops_queue_until_acknowledged():
    s = Setup()
    assert s.inj.inject_gerror("CMDQ_ERR")
    assert not s.inj.inject_gerror("CMDQ_ERR")  # already active: no second toggle
    assert s.smmu.gerror_active("CMDQ_ERR")
    assert (s.h.r32("CMDQ_CONS") >> 24) & 0x7F == regs.CERROR_ILL
    assert s.h.irq.levels.get("gerror") is True
    before = s.cons()
    s.h.submit(encode_command("CMD_SYNC"))
    assert s.cons() == before  # stopped
    s.h.w32("GERRORN", s.h.r32("GERROR"))  # the driver's acknowledgement
    assert s.cons() == before + 1
    assert s.inj.inject_gerror("SFM_ERR") and s.smmu.gerror_active("SFM_ERR")


def test_sync_drop_holds_queue_until_normal():
    s = Setup()
    s.inj.set_sync_mode("drop")
    at = s.cons()
    s.h.submit(encode_command("CMD_SYNC", CS=1, MSIADDR=MSI_ADDR, MSIDATA=0x55))
    s.h.submit(encode_command("CFGI_ALL"), encode_command("CMD_SYNC"))
    assert s.cons() == at and s.smmu.cmd_sync_held == at
    assert s.mem.read(MSI_ADDR, 4) == b"\0\0\0\0"  # no completion MSI
    s.inj.set_sync_mode("normal")
    assert s.cons() == at + 3 and s.smmu.cmd_sync_held is None
    assert int.from_bytes(s.mem.read(MSI_ADDR, 4), "little") == 0x55
    assert s.inj.injected["sync-dropped"] == 1 and s.inj.injected["sync-released"] == 1
    s.h.submit(encode_command("CMD_SYNC"))  # normal again
    assert s.cons() == at + 4


def test_dropped_tlbi_leaves_the_stale_translation_until_the_next_one():
    s = Setup()
    s.mem.write(DATA + 0x1000, b"old!")
    s.mem.write(DATA + 0x8000, b"new!")
    assert s.mgr.dma_read(SID, None, 0x10_1000, 4) == b"old!"  # cached
    s.pt.map(0x10_1000, DATA + 0x8000)  # the driver remaps the page ...
    rule = s.inj.add_drop("TLBI", asid=1, addr=0x10_1000)
    other = encode_command("TLBI_NH_VA", ASID=2, ADDR=0x10_1000, LEAF=1)  # no match: ASID
    tlbi = encode_command("TLBI_NH_VA", ASID=1, ADDR=0x10_1000, LEAF=1)
    at = s.cons()
    s.h.submit(other, tlbi, encode_command("CMD_SYNC"))  # ... and invalidates: dropped
    assert s.cons() == at + 3 and not s.smmu.gerror_active("CMDQ_ERR")
    assert rule.dropped == 1 and not s.inj.drops  # used up
    assert s.smmu.counters.commands["TLBI_NH_VA"] == 1  # as though never sent
    assert s.mgr.dma_read(SID, None, 0x10_1000, 4) == b"old!"  # the stale entry serves
    assert s.inj.injected["invalidation-dropped"] == 1
    [dropped] = s.inj.snapshot()["dropped"]  # where the stale entry is, for the query
    assert dropped["command"] == "TLBI_NH_VA" and dropped["rule"] == rule.id
    assert dropped["fields"]["ADDR"] == 0x10_1000 and dropped["fields"]["ASID"] == 1
    s.h.submit(tlbi, encode_command("CMD_SYNC"))  # the next one goes through
    assert s.mgr.dma_read(SID, None, 0x10_1000, 4) == b"new!"


def test_drop_matches_command_fields_and_range():
    s = Setup()
    s.inj.add_drop("CFGI_STE", sid=SID + 1)
    s.inj.add_drop("TLBI_NH_VA", addr=0x20_3000, count=2)
    s.h.submit(encode_command("CFGI_STE", SID=SID, LEAF=1),
               encode_command("TLBI_NH_VA", ASID=1, ADDR=0x20_0000, TG=1, NUM=1, SCALE=0,
                              LEAF=1),  # 0x20_0000..0x20_1fff: not 0x20_3000
               encode_command("TLBI_NH_VA", ASID=1, ADDR=0x20_0000, TG=1, NUM=3, SCALE=0),
               encode_command("TLBI_NH_VA", ASID=3, ADDR=0x20_3000),  # TG=0: that page
               encode_command("TLBI_NH_VAA", ADDR=0x20_3000),  # another command
               encode_command("CMD_SYNC"))
    assert s.inj.injected.get("invalidation-dropped") == 2
    assert [d["command"] for d in s.inj.snapshot()["drops"]] == ["CFGI_STE"]
    s.h.submit(encode_command("CFGI_STE", SID=SID + 1), encode_command("CMD_SYNC"))
    assert s.inj.injected["invalidation-dropped"] == 3 and not s.inj.drops
    for bad, msg in ((dict(command="CMD_SYNC"), "command"), (dict(command="TLBI", count=0),
                     "count"), (dict(command="CFGI", sid=1 << 32), "sid"),
                     (dict(command="TLBI", addr=-1), "addr")):
        with pytest.raises(InjectError, match=msg):
            s.inj.add_drop(**bad)  # type: ignore[arg-type]
    s.inj.add_drop("TLBI")
    s.inj.close()
    assert not s.inj.drops


def test_sync_delay_completes_when_the_timer_fires():
    s = Setup()
    s.inj.set_sync_mode("delay", count=2, delay_ms=30)
    at = s.cons()
    s.h.submit(encode_command("CMD_SYNC"), encode_command("CMD_SYNC"),
               encode_command("CMD_SYNC"))
    assert s.cons() == at and len(s.timers) == 1 and s.timers[0][0] == pytest.approx(0.03)
    s.timers.pop()[1]()
    assert s.cons() == at + 1 and len(s.timers) == 1  # second one delayed too
    s.timers.pop()[1]()
    assert s.cons() == at + 3 and not s.timers  # third: count spent
    snap = s.smmu.snapshot()["injected"]
    assert snap["sync"]["mode"] == "normal" and snap["counts"]["sync-delayed"] == 2


def test_reset_drops_a_held_sync_and_close_unhooks():
    s = Setup()
    s.inj.set_sync_mode("drop")
    s.h.submit(encode_command("CMD_SYNC"))
    assert s.smmu.cmd_sync_held is not None
    s.smmu.reset()
    assert s.smmu.cmd_sync_held is None
    s.inj.close()
    assert s.mgr.injector is None and s.smmu.injector is None
    assert "injected" not in s.smmu.snapshot()
