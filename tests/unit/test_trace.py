"""The trace ring (bounds, since / limit / dropped, category filters, configuration
errors, streaming) and the hooks in the SMMU model and the domain manager, driven
through registers and real guest memory."""

from __future__ import annotations

import pytest

from viommu_backend.domains import ABORT, DomainManager
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command
from viommu_backend.smmuv3.events import Event, PageRequest
from viommu_backend.trace import CATEGORIES, TraceError, Tracer, parse_categories

from tests.support.smmuv3_harness import Harness, off


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fill(t: Tracer, n: int, cat: str = "cmd") -> None:
    for i in range(n):
        t.record(cat, i=i)


# -- the ring ----------------------------------------------------------------------------------
def test_ring_is_bounded_and_keeps_the_newest():
    t = Tracer(size=4)
    fill(t, 10)
    assert len(t.ring) == 4 and t.oldest == 6 and t.next_seq == 10
    assert [r["seq"] for r in t.ring] == [6, 7, 8, 9] and [r["i"] for r in t.ring] == [6, 7, 8, 9]
    t.configure(size=2)  # shrinking keeps the newest
    assert [r["seq"] for r in t.ring] == [8, 9]
    t.configure(size=8)
    fill(t, 3)
    assert [r["seq"] for r in t.ring] == [8, 9, 10, 11, 12]


def test_records_carry_seq_time_and_category():
    clk = FakeClock()
    t = Tracer(clock=clk)
    clk.now += 1.5
    t.record("reg", op="w", offset=0x98, value=3)
    (r,) = t.query()["records"]
    assert r == {"seq": 0, "t": 1.5, "cat": "reg", "op": "w", "offset": 0x98, "value": 3}
    assert list(r)[:3] == ["seq", "t", "cat"]


def test_since_limit_next_and_dropped():
    t = Tracer(size=8)
    fill(t, 5)
    q = t.query(since=0, limit=2)
    assert [r["seq"] for r in q["records"]] == [0, 1] and q["next"] == 2 and q["dropped"] == 0
    q = t.query(since=q["next"])
    assert [r["seq"] for r in q["records"]] == [2, 3, 4] and q["next"] == 5
    q = t.query(since=5)  # nothing new: next stays
    assert q == {"records": [], "next": 5, "dropped": 0}
    fill(t, 10)  # seq 5..14; ring keeps 7..14
    q = t.query(since=5)
    assert q["dropped"] == 2 and [r["seq"] for r in q["records"]] == list(range(7, 15))
    assert q["next"] == 15
    assert t.query(since=0)["dropped"] == 7
    assert t.query(since=12)["dropped"] == 0
    q = t.query(since=100)  # from the future: waits there
    assert q == {"records": [], "next": 100, "dropped": 0}


def test_clear_empties_the_ring_but_seq_goes_on():
    t = Tracer()
    fill(t, 3)
    st = t.configure(clear=True)
    assert st["records"] == 0 and st["next"] == 3 and st["oldest"] == 3
    q = t.query(since=1)
    assert q == {"records": [], "next": 3, "dropped": 2}
    t.record("cmd")
    assert [r["seq"] for r in t.query(since=3)["records"]] == [3]


def test_category_filter_advances_next_past_other_categories():
    t = Tracer()
    for cat in ("reg", "cmd", "reg", "cmd", "domain", "reg"):
        t.record(cat)
    q = t.query(cats=["cmd", "domain"])
    assert [(r["seq"], r["cat"]) for r in q["records"]] == [(1, "cmd"), (3, "cmd"), (4, "domain")]
    assert q["next"] == 6  # every record was examined
    q = t.query(cats=["cmd"], limit=1)
    assert [r["seq"] for r in q["records"]] == [1] and q["next"] == 2
    q = t.query(since=q["next"], cats=["cmd"], limit=1)
    assert [r["seq"] for r in q["records"]] == [3] and q["next"] == 4


def test_exported_records_are_copies():
    t = Tracer()
    t.record("cmd", name="CFGI_STE", fields={"SID": 1})
    r = t.query()["records"][0]
    r["fields"]["SID"] = 99
    r["name"] = "X"
    assert t.query()["records"][0]["fields"] == {"SID": 1}
    assert t.query()["records"][0]["name"] == "CFGI_STE"


def test_configuration_and_bad_arguments():
    t = Tracer(enable="cmd,reg")
    assert t.enabled == ("reg", "cmd") and t.on_reg and t.on_cmd and not t.on_irq
    st = t.configure(enable=["all"], disable=["reg"])  # disable first, then enable
    assert st["enabled"] == list(CATEGORIES)
    st = t.configure(disable="all", enable=["fault"])
    assert st["enabled"] == ["fault"]
    assert parse_categories(" cmd , irq,cmd") == ("cmd", "irq")
    for bad in ({"enable": ["cmd", "nope"]}, {"disable": [3]}, {"size": 0},
                {"size": True}, {"size": 1 << 30}, {"enable": ["fault"], "size": -1}):
        with pytest.raises(TraceError):
            t.configure(**bad)
    assert t.enabled == ("fault",) and t.size == 4096  # nothing applied on error
    for kw in ({"since": -1}, {"limit": 0}, {"limit": 4097}, {"since": "x"},
               {"cats": ["bogus"]}):
        with pytest.raises(TraceError):
            t.query(**kw)
    with pytest.raises(TraceError):
        Tracer(enable=["cmd", "bogus"])


def test_stream_listener_is_rate_limited():
    clk = FakeClock()
    t = Tracer(clock=clk)
    got: list[dict] = []
    t.listener = got.append
    t.stream_rate = 3
    fill(t, 5)
    assert [r["i"] for r in got] == [0, 1, 2] and t.stream_dropped == 2
    clk.now += 1.0
    fill(t, 1)
    assert len(got) == 4 and got[-1]["seq"] == 5
    assert len(t.ring) == 6  # the ring has them all


# -- hooks in the SMMU model --------------------------------------------------------------------
def test_disabled_tracer_records_nothing():
    h = Harness()
    h.setup_queues()
    h.submit(encode_command("CFGI_STE", SID=3), encode_command("CMD_SYNC"))
    h.smmu.record_event(Event("F_TRANSLATION", sid=1))
    h.smmu.raise_gerror("MSI_GERROR_ABT_ERR")
    assert h.smmu.trace.enabled == () and len(h.smmu.trace.ring) == 0
    assert h.smmu.trace.next_seq == 0


def test_reg_and_cmd_records_in_order():
    h = Harness()
    h.setup_queues()
    tr = h.smmu.trace
    tr.configure(enable=["reg", "cmd"])
    h.submit(encode_command("CFGI_STE", SID=3, LEAF=1),
             encode_command("TLBI_NH_VA", VMID=2, ASID=9, ADDR=0x12_3000, LEAF=1),
             encode_command("CMD_SYNC"))
    assert h.r32("CMDQ_CONS") == 3
    recs = tr.query()["records"]
    assert [r["cat"] for r in recs] == ["reg", "cmd", "cmd", "cmd", "reg"]
    w = recs[0]
    assert (w["op"], w["reg"], w["offset"], w["size"], w["value"]) == \
        ("w", "CMDQ_PROD", off("CMDQ_PROD"), 4, 3)
    assert [(r["name"], r["index"]) for r in recs[1:4]] == \
        [("CFGI_STE", 0), ("TLBI_NH_VA", 1), ("CMD_SYNC", 2)]
    assert recs[1]["fields"]["SID"] == 3 and recs[1]["fields"]["LEAF"] == 1
    assert recs[2]["fields"]["ASID"] == 9 and recs[2]["fields"]["ADDR"] == 0x12_3000
    assert recs[4]["op"] == "r" and recs[4]["reg"] == "CMDQ_CONS" and recs[4]["value"] == 3
    # 64-bit register written as two halves: the upper half is named after its register
    tr.configure(clear=True)
    h.smmu.write(off("STRTAB_BASE") + 4, 4, 0)
    h.smmu.write(off("CMDQ_BASE"), 8, 0x4000_0000 | 4)
    names = [(r["reg"], r["size"]) for r in tr.query()["records"]]
    assert names == [("STRTAB_BASE+4", 4), ("CMDQ_BASE", 8)]


def test_illegal_command_and_gerror_records():
    h = Harness()
    h.setup_queues()
    h.smmu.trace.configure(enable=["cmd", "gerror", "irq"])
    h.submit(bytes([0x7F]) + bytes(15))
    recs = h.smmu.trace.query()["records"]
    ill = recs[0]
    assert ill["cat"] == "cmd" and ill["name"] == "ILLEGAL" and ill["index"] == 0
    assert "0x7f" in ill["error"]
    g = next(r for r in recs if r["cat"] == "gerror")
    assert g["name"] == "CMDQ_ERR" and g["cerror"] == regs.CERROR_ILL and g["cons"] == 0
    irq = next(r for r in recs if r["cat"] == "irq")
    assert irq == {**irq, "source": "gerror", "kind": "level", "level": True}
    assert recs.index(g) < recs.index(irq)


def test_event_priq_and_irq_records():
    h = Harness()
    h.setup_queues()
    h.smmu.trace.configure(enable=["event", "priq", "irq"])
    h.smmu.record_event(Event("F_PERMISSION", sid=0x100, ssid=1, addr=0xD000, read=False))
    h.smmu.record_page_request(PageRequest(0x100, 5, 0x7000, write=True))
    recs = h.smmu.trace.query()["records"]
    assert [(r["cat"], r.get("name") or r.get("source")) for r in recs] == [
        ("event", "F_PERMISSION"), ("irq", "evtq"), ("priq", "E_PAGE_REQUEST"), ("irq", "priq")]
    ev = recs[0]
    assert ev["outcome"] == "written" and ev["fields"]["sid"] == 0x100
    assert ev["fields"]["addr"] == 0xD000 and ev["fields"]["read"] is False
    assert recs[2]["fields"]["prg_index"] == 5 and recs[2]["outcome"] == "written"
    h.w32("CR0", 0)  # queues off: the record is dropped, and the trace says so
    h.smmu.record_event(Event("C_BAD_STE", sid=2))
    assert h.smmu.trace.query(since=4, cats=["event"])["records"][0]["outcome"] == "disabled"


def test_cmd_sync_interrupt_records():
    h = Harness()
    h.setup_queues()
    h.smmu.trace.configure(enable=["irq"])
    h.submit(encode_command("CMD_SYNC", CS=1))
    (r,) = h.smmu.trace.query()["records"]
    assert (r["source"], r["kind"]) == ("cmd_sync", "pulse")


# -- hooks in the domain manager ----------------------------------------------------------------
BASE = 0x4000_0000
STRTAB = BASE


def _mgr_env() -> tuple[DomainManager, object, object]:
    mem = b.make_memory(BASE, 4 << 20)
    h = Harness()
    mgr = DomainManager(lambda: mem)
    mgr.attach_smmu(h.smmu)
    h.smmu.set_memory_provider(lambda: mem)
    return mgr, mem, h.smmu


def test_manager_shares_the_smmu_tracer():
    h = Harness()
    mgr = DomainManager(lambda: None)
    assert mgr.trace is not h.smmu.trace
    mgr.attach_smmu(h.smmu)
    assert mgr.trace is h.smmu.trace


def test_domain_records_attach_replace_detach():
    mgr, _, _ = _mgr_env()
    mgr.trace.configure(enable=["domain"])
    dev = mgr.add_device(7)  # SMMU disabled, GBPA bypass: identity domain
    ident = dev.hwpt.id
    mgr.replace(7, mgr.blocking.id)
    mgr.detach(7)
    recs = mgr.trace.query()["records"]
    assert [(r["kind"], r["sid"], r["from"], r["to"]) for r in recs] == [
        ("attach", 7, None, ident), ("replace", 7, ident, mgr.blocking.id),
        ("detach", 7, mgr.blocking.id, None)]
    assert recs[0]["to-type"] == "HwptPaging" and recs[1]["to-type"] == "HwptBlocking"
    assert recs[0]["config"] == "bypass"


def test_fault_records_for_translation_config_and_abort():
    mgr, mem, smmu = _mgr_env()
    mgr.trace.configure(enable=["fault"])
    # SMMU enabled with a stream table: SID 1 S1 with an empty page table, SID 2 abort,
    # SID 3 an invalid STE
    al = b.Allocator(BASE + 0x10_0000, 0x10_0000)
    pt = b.PageTable(mem, al)
    cd = al.alloc(64, 64)
    b.write_words(mem, cd, b.make_cd(pt.root, asid=1))
    b.write_words(mem, STRTAB + 1 * 64, b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cd))
    b.write_words(mem, STRTAB + 2 * 64, b.make_ste(fl.STE_CONFIG_ABORT))
    b.write_words(mem, STRTAB + 3 * 64, b.make_ste(fl.STE_CONFIG_S1, v=0))
    smmu.write(off("STRTAB_BASE"), 8, STRTAB)
    smmu.write(off("STRTAB_BASE_CFG"), 4, regs.layout("STRTAB_BASE_CFG").encode(FMT=0, LOG2SIZE=6))
    smmu.write(off("CR0"), 4, regs.layout("CR0").encode(SMMUEN=1))
    assert mgr.translate_one(1, None, 0x5000, write=True).fault == fl.EventId.F_TRANSLATION
    assert mgr.translate_one(2, None, 0x6000).fault == ABORT
    assert mgr.translate_one(3, None, 0x7000).fault == fl.EventId.C_BAD_STE
    mgr.translate(2, None, [0x1000, 0x2000, 0x3000])
    recs = mgr.trace.query()["records"]
    assert [(r["sid"], r["fault"], r["iova"]) for r in recs] == [
        (1, "F_TRANSLATION", 0x5000), (2, "ABORT", 0x6000), (3, "C_BAD_STE", 0x7000),
        (2, "ABORT", 0x1000)]
    assert recs[0]["write"] is True and recs[0]["recorded"] is True
    assert recs[1]["recorded"] is False and recs[3]["count"] == 3
    assert recs[2]["config"] is True

