"""The driver sanitizer (SMMU option ``sanitize``), rule by rule, on tables built here and
a real SMMU model + domain manager (the command queue driven as a driver would)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from viommu_backend.domains import DomainManager
from viommu_backend.fault_injection import FaultInjector
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command
from viommu_backend.smmuv3.smmu_config import SmmuConfig

from tests.support.smmuv3_harness import RAM_BASE, Harness

STRTAB = RAM_BASE + 0x4_0000
TABLES = RAM_BASE + 0x8_0000
DATA = RAM_BASE + 0xC_0000
SID = 0x20
IOVA = 0x10_0000


class Setup:
    def __init__(self, **cfg: bool) -> None:
        self.h = Harness(SmmuConfig(**cfg))
        self.mem, self.smmu = self.h.mem, self.h.smmu
        self.mgr = DomainManager(lambda: self.mem)
        self.mgr.attach_smmu(self.smmu)
        self.inj = FaultInjector().install(self.mgr, self.smmu)
        self.seen: list[dict] = []
        if self.mgr.sanitizer is not None:
            self.mgr.sanitizer.listeners.append(self.seen.append)
        self.h.setup_queues()
        self.h.w64("STRTAB_BASE", STRTAB)
        self.h.w32("STRTAB_BASE_CFG", regs.layout("STRTAB_BASE_CFG").encode(FMT=0, LOG2SIZE=6))
        self.h.w32("CR0", regs.layout("CR0").encode(SMMUEN=1, CMDQEN=1, EVTQEN=1))
        al = b.Allocator(TABLES, 0x4_0000)
        self.pt = b.PageTable(self.mem, al)
        self.pt.map_range(IOVA, DATA, 0x1_0000)
        cd = al.alloc(64, 64)
        b.write_words(self.mem, cd, b.make_cd(self.pt.root, asid=1))
        b.write_words(self.mem, STRTAB + SID * 64, b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cd))
        self.h.submit(encode_command("CFGI_STE", SID=SID, LEAF=1), encode_command("CMD_SYNC"))

    def remap(self, iova: int, pa: int) -> None:
        """The driver changes a live leaf (the invalidation is the test's business)."""
        self.pt.map(iova, pa)

    def tlbi(self, iova: int) -> None:
        self.h.submit(encode_command("TLBI_NH_VA", ASID=1, ADDR=iova, LEAF=1),
                      encode_command("CMD_SYNC"))

    def violations(self) -> dict[str, int]:
        """The rules with violations (driver and device)."""
        san = self.mgr.stats()["sanitizer"]
        return {r: n for r, n in {**san["violations"], **san["device"]}.items() if n}


def test_off_by_default_and_today_unchanged():
    s = Setup()
    assert s.mgr.sanitizer is None and "sanitizer" not in s.mgr.stats()
    s.mem.write(DATA + 0x1000, b"old!")
    assert s.mgr.dma_read(SID, None, IOVA + 0x1000, 4) == b"old!"
    s.remap(IOVA + 0x1000, DATA + 0x8000)
    assert s.mgr.dma_read(SID, None, IOVA + 0x1000, 4) == b"old!"  # stale, unreported


def test_invalidated_change_is_clean():
    s = Setup(sanitize=True)
    s.mem.write(DATA + 0x8000, b"new!")
    s.mgr.dma_read(SID, None, IOVA + 0x1000, 4)
    s.mgr.dma_read(SID, None, IOVA + 0x1000, 4)  # a hit, checked
    s.remap(IOVA + 0x1000, DATA + 0x8000)
    s.tlbi(IOVA + 0x1000)
    assert s.mgr.dma_read(SID, None, IOVA + 0x1000, 4) == b"new!"
    s.mgr.dma_read(SID, None, IOVA, 0x4000)  # batched path, hits and misses
    s.mgr.dma_read(SID, None, IOVA, 0x4000)
    stats = s.mgr.stats()["sanitizer"]
    assert s.violations() == {} and stats["checks"] >= 5 and not s.seen


@pytest.mark.parametrize("batched", [False, True])
def test_stale_tlb_use_after_dropped_invalidation(batched, caplog):
    s = Setup(sanitize=True)
    s.mem.write(DATA + 0x1000, b"old!")
    read = ((lambda: s.mgr.dma_read(SID, None, IOVA, 0x4000)[0x1000:0x1004]) if batched
            else (lambda: s.mgr.dma_read(SID, None, IOVA + 0x1000, 4)))
    assert read() == b"old!"
    s.remap(IOVA + 0x1000, DATA + 0x8000)
    s.inj.add_drop("TLBI_NH_VA", asid=1)
    s.tlbi(IOVA + 0x1000)  # dropped: the driver "forgot" it
    with caplog.at_level(logging.WARNING, logger="viommu_backend.domains.sanitizer"):
        assert read() == b"old!"  # the stale entry is used ... and reported
    assert s.violations() == {"stale-tlb": 1}
    (v,) = s.seen
    assert v["rule"] == "stale-tlb" and v["sid"] == SID and v["ssid"] is None
    assert v["iova"] == IOVA + 0x1000 and v["pa"] == DATA + 0x1000
    assert v["now-pa"] == DATA + 0x8000 and v["asid"] == 1 and v["size"] == 0x1000
    (rec,) = [r for r in s.smmu.trace.ring if r["cat"] == "sanitizer"]
    assert rec["rule"] == "stale-tlb" and rec["iova"] == IOVA + 0x1000
    (line,) = [r for r in caplog.records if "stale-tlb" in r.getMessage()]
    assert line.levelno == logging.WARNING  # sanitize_fail off
    s.tlbi(IOVA + 0x1000)  # the invalidation, late
    assert read() == bytes(4) and s.violations() == {"stale-tlb": 1}


def test_unmapped_page_still_hit_is_stale_and_fail_logs_an_error(caplog):
    s = Setup(sanitize=True, sanitize_fail=True)
    s.mgr.dma_read(SID, None, IOVA + 0x2000, 4)
    s.pt.unmap(IOVA + 0x2000)
    with caplog.at_level(logging.WARNING, logger="viommu_backend.domains.sanitizer"):
        r = s.mgr.translate(SID, None, np.array([IOVA + 0x2008], dtype=np.uint64))
    assert not r.fault_name(0)  # still served from the TLB
    (v,) = s.seen
    assert v["now-fault"] == "F_TRANSLATION" and v["iova"] == IOVA + 0x2008
    assert [r.levelno for r in caplog.records if "stale-tlb" in r.getMessage()] == \
        [logging.ERROR]
    t, _ = s.mgr.probe(SID, None, IOVA + 0x2000)
    assert t.fault  # the probe walks: no cache, no report
    assert len(s.seen) == 1


def test_run_summary_has_a_line_per_violation():
    from viommu_backend.guest.boot import BootSummary

    s = Setup(sanitize=True)
    s.mgr.dma_read(SID, None, IOVA + 0x3000, 4)
    s.remap(IOVA + 0x3000, DATA + 0x9000)
    s.mgr.dma_read(SID, None, IOVA + 0x3000, 4)
    lines = BootSummary(backend={"viommu": {"translation": s.mgr.stats()}}).backend_lines()
    san = [ln for ln in lines if "sanitizer" in ln]
    assert san[0].endswith("cached entries checked, violations: stale-tlb 1")  # the others 0
    assert "rule=stale-tlb" in san[1] and f"iova={IOVA + 0x3000:#x}" in san[1]
    assert f"now-pa={DATA + 0x9000:#x}" in san[1]
    assert san[-1].endswith("device use after unmap: none; invalidations matching nothing "
                            "live: none")
