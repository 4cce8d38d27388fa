"""The sanitizer's ordering, update and device rules (:mod:`viommu_backend.domains.
sanitizer_rules`), rule by rule, on tables built here and the real SMMU model + domain
manager, its command queue driven as a driver would."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from viommu_backend.domains.sanitizer_rules import CD_KIND, STE_KIND, torn_qwords
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.commands import encode_command

from tests.unit.domains.test_sanitizer import DATA, IOVA, SID, STRTAB, TABLES, Setup

SYNC = encode_command("CMD_SYNC")
STE_ADDR = STRTAB + SID * 64
CD2 = TABLES + 0x3_F000  # a second CD table (one CD), past the page tables


def used_setup(**cfg: bool) -> Setup:
    """Setup with the stream bound and its page at IOVA used once."""
    s = Setup(sanitize=True, **cfg)
    s.mgr.dma_read(SID, None, IOVA, 4)
    return s


def nomatch(s: Setup) -> dict[str, int]:
    return {k: n for k, n in s.mgr.stats()["sanitizer"]["no-match"].items() if n}


def xlat(s: Setup, iova: int) -> str | None:
    return s.mgr.translate(SID, None, np.array([iova], dtype=np.uint64)).fault_name(0)


# -- missing-sync ------------------------------------------------------------------------------
TLBI_VA = encode_command("TLBI_NH_VA", ASID=1, ADDR=IOVA + 0x1000, LEAF=1)
MISSING_SYNC = [
    # (what the driver sends, the DMA after it, reported as missing-sync)
    ("tlbi then sync", [TLBI_VA, SYNC], IOVA + 0x1000, None),
    ("tlbi, no sync, covered page", [TLBI_VA], IOVA + 0x1000, "TLBI_NH_VA"),
    ("tlbi, no sync, other page", [TLBI_VA], IOVA + 0x2000, None),
    ("tlbi of another asid, no sync", [encode_command("TLBI_NH_ASID", ASID=2)], IOVA, None),
    ("asid tlbi, no sync", [encode_command("TLBI_NH_ASID", ASID=1)], IOVA + 0x5000,
     "TLBI_NH_ASID"),
    ("range tlbi, no sync", [encode_command("TLBI_NH_VA", ASID=1, ADDR=IOVA, TG=1, NUM=3)],
     IOVA + 0x3000, "TLBI_NH_VA"),
    ("range tlbi, no sync, past its end",
     [encode_command("TLBI_NH_VA", ASID=1, ADDR=IOVA, TG=1, NUM=3)], IOVA + 0x4000, None),
    ("cfgi_ste, no sync", [encode_command("CFGI_STE", SID=SID, LEAF=1)], IOVA, "CFGI_STE"),
    ("cfgi_ste of another stream, no sync", [encode_command("CFGI_STE", SID=SID + 1, LEAF=1)],
     IOVA, None),
    ("cfgi_cd, no sync", [encode_command("CFGI_CD", SID=SID, SSID=0, LEAF=1)], IOVA,
     "CFGI_CD"),
    ("nsnh_all, no sync", [encode_command("TLBI_NSNH_ALL")], IOVA, "TLBI_NSNH_ALL"),
    ("nsnh_all, sync late", [encode_command("TLBI_NSNH_ALL"), encode_command("PREFETCH_CONFIG",
                                                                              SID=SID), SYNC],
     IOVA, None),
]


@pytest.mark.parametrize("cmds,iova,reported", [c[1:] for c in MISSING_SYNC],
                         ids=[c[0] for c in MISSING_SYNC])
def test_missing_sync(cmds, iova, reported):
    s = used_setup()
    s.h.submit(*cmds)
    s.mgr.dma_read(SID, None, iova, 4)
    s.mgr.dma_read(SID, None, iova, 4)  # reported once per invalidation
    assert s.smmu.counters.sink_errors == 0
    if reported is None:
        assert s.violations() == {} and not s.seen
        return
    assert s.violations() == {"missing-sync": 1}
    (v,) = s.seen
    assert v["cmd"] == reported and v["by"] == "driver" and v["sid"] == SID
    assert v["iova"] == iova & ~0xFFF
    s.h.submit(SYNC)  # the sync, late: nothing more
    s.mgr.dma_read(SID, None, iova, 4)
    assert len(s.seen) == 1


def test_missing_sync_waits_while_a_sync_is_queued():
    """A CMD_SYNC the SMMU holds (fault injection) is on its way: the queue is not drained,
    the driver has not relied on the TLBI yet."""
    s = used_setup()
    s.inj.set_sync_mode("drop")
    s.h.submit(TLBI_VA, SYNC)
    assert s.smmu.cmd_sync_held is not None
    s.mgr.dma_read(SID, None, IOVA + 0x1000, 4)
    assert s.violations() == {}
    s.inj.set_sync_mode("normal")  # released: consumed
    s.mgr.dma_read(SID, None, IOVA + 0x1000, 4)
    assert s.violations() == {} and s.smmu.cmd_sync_held is None


def test_missing_sync_fails_the_run_with_sanitize_fail(caplog):
    s = used_setup(sanitize_fail=True)
    s.h.submit(TLBI_VA)
    with caplog.at_level(logging.WARNING, logger="viommu_backend.domains.sanitizer"):
        s.mgr.dma_read(SID, None, IOVA + 0x1000, 4)
    assert [r.levelno for r in caplog.records if "missing-sync" in r.getMessage()] == \
        [logging.ERROR]
    (rec,) = [r for r in s.smmu.trace.ring if r["cat"] == "sanitizer" and "rule" in r]
    assert rec["rule"] == "missing-sync" and rec["cmd"] == "TLBI_NH_VA"


# -- no-match counters -------------------------------------------------------------------------
NO_MATCH = [
    # (commands, counters expected)
    ("cfgi_ste of the live stream", [encode_command("CFGI_STE", SID=SID, LEAF=1)], {}),
    ("cfgi_ste beyond the table", [encode_command("CFGI_STE", SID=64, LEAF=1)],
     {"cfgi-ste-beyond-table": 1}),
    ("cfgi_ste of an invalid ste", [encode_command("CFGI_STE", SID=SID + 1, LEAF=1)],
     {"cfgi-ste-invalid": 1}),
    ("cfgi_all", [encode_command("CFGI_ALL")], {}),
    ("cfgi_cd of the live stream", [encode_command("CFGI_CD", SID=SID, SSID=0, LEAF=1)], {}),
    ("cfgi_cd of a stream without cd table",
     [encode_command("CFGI_CD", SID=SID + 1, SSID=0, LEAF=1)], {"cfgi-cd-no-table": 1}),
    ("cfgi_cd beyond S1CDMax", [encode_command("CFGI_CD", SID=SID, SSID=5, LEAF=1)],
     {"cfgi-cd-beyond-table": 1}),
    ("tlbi of the live asid", [encode_command("TLBI_NH_ASID", ASID=1)], {}),
    ("tlbi of an unused asid", [encode_command("TLBI_NH_ASID", ASID=7)],
     {"tlbi-asid-unused": 1}),
    ("va tlbi of an unused asid", [encode_command("TLBI_NH_VA", ASID=7, ADDR=IOVA)],
     {"tlbi-asid-unused": 1}),
    ("va tlbi where nothing was translated",
     [encode_command("TLBI_NH_VA", ASID=1, ADDR=0x7000_0000)], {"tlbi-range-empty": 1}),
    ("range tlbi over the used page",
     [encode_command("TLBI_NH_VA", ASID=1, ADDR=IOVA - 0x2000, TG=1, NUM=3)], {}),
    ("asid tlbi twice: the second has nothing left",
     [encode_command("TLBI_NH_ASID", ASID=1), SYNC, encode_command("CFGI_CD_ALL", SID=SID),
      encode_command("TLBI_NH_ASID", ASID=1)], {"tlbi-asid-unused": 1}),
    ("s12_vmall of an unused vmid", [encode_command("TLBI_S12_VMALL", VMID=9)],
     {"tlbi-vmid-unused": 1}),
    ("s2_ipa of an unused vmid", [encode_command("TLBI_S2_IPA", VMID=9, ADDR=IOVA)],
     {"tlbi-vmid-unused": 1}),
]


@pytest.mark.parametrize("cmds,counted", [c[1:] for c in NO_MATCH], ids=[c[0] for c in NO_MATCH])
def test_no_match_counters(cmds, counted):
    s = used_setup()
    s.h.submit(*cmds, SYNC)
    assert nomatch(s) == counted
    assert s.violations() == {} and not s.seen  # counters, not violations
    assert s.smmu.counters.sink_errors == 0  # the observer ran through
    if counted:
        (kind,) = counted
        assert any(r.get("counter") == kind for r in s.smmu.trace.ring
                   if r["cat"] == "sanitizer")


# -- torn STE / CD (the rule itself, on words built here) --------------------------------------
S1 = b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=0x8_0000)
S1_OTHER_CD = b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=0x9_0000)
BYPASS = b.make_ste(fl.STE_CONFIG_BYPASS, SHCFG=1)
S2 = b.make_ste(fl.STE_CONFIG_S2, s2_ttb=0x10_0000, s2_vmid=3)
INVALID_S1 = [S1[0] & ~1] + S1[1:]
S1_OTHER_CIR = b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=0x9_0000, S1CIR=2)
S2_OTHER = b.make_ste(fl.STE_CONFIG_S2, s2_ttb=0x20_0000, s2_vmid=4)
NESTED_VMID = b.make_ste(fl.STE_CONFIG_NESTED, s1_ctx_ptr=0x8_0000, s2_ttb=0x10_0000, s2_vmid=3)


def _mix(a: list[int], b_: list[int], qwords: set[int]) -> list[int]:
    """``a`` with the qwords ``qwords`` taken from ``b_``."""
    return [b_[i] if i in qwords else a[i] for i in range(len(a))]


STE_STEPS = [
    # (name, first, second, torn qwords)
    ("same", S1, S1, []),
    ("new CD table: qword 0 only", S1, S1_OTHER_CD, []),
    ("s1 -> s2 at once: s2 fields unused by s1 first, then qword 0", S1,
     b.make_ste(fl.STE_CONFIG_S2, s2_ttb=0x10_0000, s2_vmid=0), []),
    ("s1 -> s2 with another VMID (used by both)", S1, S2, [0, 2]),
    ("s1 -> bypass at once: qword 0, then the s1 bits bypass ignores", S1, BYPASS, []),
    ("new CD table and CD fetch attributes at once", S1, S1_OTHER_CIR, [0, 1]),
    ("s2: new VMID and S2TTB at once", S2, S2_OTHER, [2, 3]),
    ("s1 -> nested with another VMID", S1, NESTED_VMID, [0, 2]),
    ("s1 -> s2 through V=0 (1/2)", S1, INVALID_S1, []),
    ("s1 -> s2 through V=0 (2/2)", INVALID_S1, S2, []),
    ("s1 -> bypass hitless: set SHCFG (unused by s1)", S1,
     [S1[0], S1[1] | BYPASS[1]] + S1[2:], []),
    ("s1 -> bypass hitless: critical qword 0", [S1[0], S1[1] | BYPASS[1]] + S1[2:],
     [BYPASS[0], S1[1] | BYPASS[1]] + S1[2:], []),
    ("s1 -> bypass hitless: clear the s1 bits (unused by bypass)",
     [BYPASS[0], S1[1] | BYPASS[1]] + S1[2:], BYPASS, []),
    ("MEV changes along with qword 0 (update-safe)", S1,
     _mix(S1_OTHER_CD, b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=0x9_0000, MEV=1), {1}), []),
    ("EATS 0 -> Trans along with qword 0 (update-safe)", S1,
     b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=0x9_0000, EATS=1), []),
    ("EATS 0 -> S1Chk along with qword 0", S1,
     b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=0x9_0000, EATS=2), [0, 1]),
]


@pytest.mark.parametrize("a,b_,torn", [c[1:] for c in STE_STEPS], ids=[c[0] for c in STE_STEPS])
def test_torn_ste_rule(a, b_, torn):
    assert torn_qwords(STE_KIND, a, b_) == torn


CD_A = b.make_cd(0x10_0000, asid=1)
CD_B = b.make_cd(0x20_0000, asid=2)
CD_EPD0 = b.make_cd(0x10_0000, asid=1, epd0=1)
CD_STEPS = [
    ("new TTB0 only (qword 1)", CD_A, b.make_cd(0x20_0000, asid=1), []),
    ("new ASID and TTB0 at once", CD_A, CD_B, [0, 1]),
    ("through V=0", CD_A, b.make_cd(0x10_0000, asid=1, v=0), []),
    ("EPD0 set: TTB0 and T0SZ unused by both", CD_EPD0,
     b.make_cd(0x20_0000, asid=1, epd0=1, tsz=20), []),
    ("EPD0 cleared, TTB0 set before", CD_EPD0, CD_A, []),
    ("EPD0 cleared and a new TTB0 at once: TTB0 (unused) first", CD_EPD0,
     b.make_cd(0x20_0000, asid=1), []),
    ("new TTB0 and MAIR at once", CD_A, b.make_cd(0x20_0000, asid=1, MAIR0=0x44), [1, 3]),
]


@pytest.mark.parametrize("a,b_,torn", [c[1:] for c in CD_STEPS], ids=[c[0] for c in CD_STEPS])
def test_torn_cd_rule(a, b_, torn):
    assert torn_qwords(CD_KIND, a, b_) == torn


# -- torn STE / CD as the SMMU observes them ----------------------------------------------------
def write_ste(s: Setup, words: list[int]) -> None:
    b.write_words(s.mem, STE_ADDR, words)
    s.h.submit(encode_command("CFGI_STE", SID=SID, LEAF=1), SYNC)


def test_torn_ste_observed_on_cfgi():
    s = used_setup()
    live = [int.from_bytes(bytes(s.mem.read(STE_ADDR + 8 * i, 8)), "little") for i in range(8)]
    cd = fl.STE["S1ContextPtr"].get(live[0])
    other = b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cd + 0x40, S1CIR=2)
    write_ste(s, other)  # the CD table (qword 0) and its attributes (qword 1) at once
    assert s.violations() == {"torn-ste": 1}
    (v,) = s.seen
    assert v["rule"] == "torn-ste" and v["sid"] == SID and v["qwords"] == [0, 1]
    assert v["old"][0] == hex(live[0]) and v["new"][0] == hex(other[0])
    write_ste(s, [other[0] & ~1] + other[1:])  # breaking: V=0 ...
    write_ste(s, [other[0] & ~1] + live[1:])  # ... the rest ...
    write_ste(s, live)  # ... then qword 0 valid: clean
    s2 = b.make_ste(fl.STE_CONFIG_S2, s2_ttb=TABLES, s2_vmid=0)
    write_ste(s, [live[0]] + s2[1:])  # S1 -> S2 hitless: what S1 ignores ...
    write_ste(s, s2[:1] + live[1:2] + s2[2:])  # ... qword 0 ...
    write_ste(s, s2)  # ... what S2 ignores
    assert s.violations() == {"torn-ste": 1}
    assert s.mgr.dma_read(SID, None, IOVA, 4) is not None


def test_torn_cd_observed_on_cfgi_cd():
    s = used_setup()
    cd = s.mgr.devices[SID].ste.s1.cd_ptr
    old = b.make_cd(s.pt.root, asid=1)
    pt2 = b.PageTable(s.mem, b.Allocator(CD2 + 0x1000, 0x1_0000))
    pt2.map_range(IOVA, DATA, 0x1000)
    new = b.make_cd(pt2.root, asid=5)
    b.write_words(s.mem, cd, new)  # new ASID (qword 0) and TTB0 (qword 1) at once
    s.h.submit(encode_command("CFGI_CD", SID=SID, SSID=0, LEAF=1), SYNC)
    assert s.violations() == {"torn-cd": 1}
    (v,) = s.seen
    assert v["rule"] == "torn-cd" and v["ssid"] == 0 and v["qwords"] == [0, 1]
    # back the breaking way: V=0, the other qwords, then qword 0 valid
    for words in ([new[0] & ~(1 << 31)] + new[1:], [new[0] & ~(1 << 31)] + old[1:], old):
        b.write_words(s.mem, cd, words)
        s.h.submit(encode_command("CFGI_CD", SID=SID, SSID=0, LEAF=1), SYNC)
    assert s.violations() == {"torn-cd": 1}


# -- use-after-unmap (device) ------------------------------------------------------------------
def test_use_after_unmap_is_the_device_s_and_does_not_fail_the_run(caplog):
    s = used_setup(sanitize_fail=True)
    s.mgr.dma_read(SID, None, IOVA + 0x2000, 4)
    s.pt.unmap(IOVA + 0x2000)
    s.tlbi(IOVA + 0x2000)  # unmapped and invalidated (with its CMD_SYNC)
    with caplog.at_level(logging.WARNING, logger="viommu_backend.domains.sanitizer"):
        assert xlat(s, IOVA + 0x2010) == "F_TRANSLATION"
    assert s.violations() == {"use-after-unmap": 1}
    stats = s.mgr.stats()["sanitizer"]
    assert stats["device"] == {"use-after-unmap": 1}
    assert all(n == 0 for n in stats["violations"].values())  # not a driver bug
    (v,) = s.seen
    assert v["by"] == "device" and v["iova"] == IOVA + 0x2000 and v["sid"] == SID
    assert [r.levelno for r in caplog.records if "use-after-unmap" in r.getMessage()] == \
        [logging.WARNING]
    assert xlat(s, IOVA + 0x2000) == "F_TRANSLATION"  # once per page
    assert len(s.seen) == 1


UAU = [
    # (name, used before, invalidation, reported)
    ("never mapped", False, "va", False),
    ("unmapped, not invalidated yet (evicted)", True, None, False),
    ("unmapped and invalidated by va", True, "va", True),
    ("unmapped and invalidated by asid", True, "asid", True),
    ("unmapped, invalidation of another page", True, "other", False),
]


@pytest.mark.parametrize("used,inv,reported", [c[1:] for c in UAU], ids=[c[0] for c in UAU])
def test_use_after_unmap_needs_a_mapping_and_its_invalidation(used, inv, reported):
    s = used_setup()
    page = IOVA + 0x6000
    if used:
        s.mgr.translate(SID, None, np.arange(page, page + 0x3000, 0x800, dtype=np.uint64))
    s.pt.unmap(page)
    s.mgr.tlb.inv_all()  # the SMMU dropped its entries (as an eviction would)
    cmd = {"va": encode_command("TLBI_NH_VA", ASID=1, ADDR=page, LEAF=1),
           "asid": encode_command("TLBI_NH_ASID", ASID=1),
           "other": encode_command("TLBI_NH_VA", ASID=1, ADDR=page + 0x1000, LEAF=1)}.get(inv)
    if cmd is not None:
        s.h.submit(cmd, SYNC)
    r = s.mgr.translate(SID, None, np.arange(page, page + 0x2000, 0x800, dtype=np.uint64))
    assert r.fault_name(0) == "F_TRANSLATION" and not r.fault_name(3)
    assert s.violations() == ({"use-after-unmap": 1} if reported else {})


def test_use_after_unmap_forgotten_when_the_stream_changes_domain():
    s = used_setup()
    s.mgr.dma_read(SID, None, IOVA + 0x2000, 4)
    s.pt.unmap(IOVA + 0x2000)
    s.tlbi(IOVA + 0x2000)
    s.h.submit(encode_command("CFGI_STE", SID=SID, LEAF=1), SYNC)  # a new domain, say
    assert xlat(s, IOVA + 0x2000) == "F_TRANSLATION"
    assert s.violations() == {}


def test_a_reset_smmu_starts_over():
    """SMMUEN off, the tables rewritten (a rebooted guest), SMMUEN on: a new first copy."""
    from viommu_backend.smmuv3 import regs

    s = used_setup()
    s.h.w32("CR0", regs.layout("CR0").encode(SMMUEN=0, CMDQEN=1, EVTQEN=1))
    b.write_words(s.mem, STE_ADDR, b.make_ste(fl.STE_CONFIG_S2, s2_ttb=TABLES, s2_vmid=3))
    s.h.w32("CR0", regs.layout("CR0").encode(SMMUEN=1, CMDQEN=1, EVTQEN=1))
    s.h.submit(encode_command("CFGI_ALL"), SYNC)
    assert s.mgr.devices[SID].ste.config == "s2"
    assert s.violations() == {}


def test_use_after_unmap_one_report_per_access():
    s = used_setup()
    s.mgr.dma_read(SID, None, IOVA + 0x8000, 0x4000)
    for off in (0x9000, 0xA000):
        s.pt.unmap(IOVA + off)
    s.h.submit(encode_command("TLBI_NH_VA", ASID=1, ADDR=IOVA + 0x8000, TG=1, NUM=3), SYNC)
    r = s.mgr.translate(SID, None, np.arange(IOVA + 0x8000, IOVA + 0xC000, 0x400,
                                             dtype=np.uint64))
    assert [r.fault_name(i * 4) for i in range(4)] == [None, "F_TRANSLATION", "F_TRANSLATION",
                                                        None]
    (v,) = s.seen
    assert v["rule"] == "use-after-unmap" and v["iova"] == IOVA + 0x9000 and v["pages"] == 2


def test_a_new_cd_table_is_not_an_update():
    """The STE moves the stream to another CD table (as a nested one of a VMM): its CD 0
    is another entry, not a torn update of the old one."""
    s = used_setup()
    b.write_words(s.mem, CD2, b.make_cd(TABLES + 0x3_8000, asid=0x21, MAIR0=0xFF44))
    live = [int.from_bytes(bytes(s.mem.read(STE_ADDR + 8 * i, 8)), "little") for i in range(8)]
    write_ste(s, [fl.STE["S1ContextPtr"].put(live[0], CD2)] + live[1:])
    s.h.submit(encode_command("CFGI_CD", SID=SID, SSID=0, LEAF=1), SYNC)
    assert s.mgr.devices[SID].ste.s1.cd_ptr == CD2
    assert s.violations() == {}
    b.write_words(s.mem, CD2, b.make_cd(TABLES + 0x3_9000, asid=0x22))  # and now torn
    s.h.submit(encode_command("CFGI_CD", SID=SID, SSID=0, LEAF=1), SYNC)
    assert s.violations() == {"torn-cd": 1} and s.seen[0]["table"] == CD2
