"""The run digest (viommu_backend.guest.report): one SMMU's query-viommu as summary lines
and key counters, block I/O rates, endpoint BAR accesses, and a whole run in figures, from
a summary built of real marker lines and a query-viommu shaped as the backend answers it."""

from __future__ import annotations

from pathlib import Path

import pytest

from viommu_backend.guest.qemu import parse_marker
from viommu_backend.guest.report import (
    BootSummary, SmmuCounters, backend_counters, blk_rates, digest, endpoint_bar_accesses, mbps, mbps_text,
)

VIOMMU = {
    "counters": {"commands": {"CMD_SYNC": 10, "TLBI_NH_VA": 30, "TLBI_NH_ASID": 2, "CFGI_STE": 1},
                 "syncs": 10, "msi_writes": 9, "events": {"F_TRANSLATION": 2},
                 "gerrors": {"CMDQ_ERR": 1}, "mmio_reads": {"CMDQ_CONS": 7, "IDR0": 1},
                 "cfgi_cd_ssids": 3, "sink_errors": 0},
    "translation": {"translations": 100, "walks": 25, "faults": 2, "bytes_read": 5, "bytes_written": 6,
                    "dma_reads": 1, "dma_writes": 2, "tlb": {"hits": 75, "misses": 25},
                    "ssid_translations": 4, "ssid_bytes_read": 8, "ssid_bytes_written": 8,
                    "stalls": 1, "stall_retries": 1,
                    "atc": {"hits": 3, "misses": 1, "invalidations": 2}},
}
LINES = [
    'VIOMMU-MARK: boot {"kernel":"6.12.117-viommu"}',
    'VIOMMU-MARK: kmsg {"level":6,"text":"arm-smmu-v3 10000000.smmuv3: option mask 0x0"}',
    'VIOMMU-MARK: kmsg {"level":6,"text":"arm-smmu-v3 10000000.smmuv3: ias 48-bit, oas 48-bit (features 0x00088fe7)"}',
    'VIOMMU-MARK: kmsg {"level":6,"text":"virtio_blk virtio0: [vda] 131072 512-byte logical blocks"}',
    'VIOMMU-MARK: blk-dev {"dev":"vda","bdf":"0000:01:00.0","bytes":67108864,"iommu_group":"1","domain_type":"DMA-FQ"}',
    'VIOMMU-MARK: blk-io {"bs":4096,"bytes":1048576,"write_ms":1000,"read_ms":500,"match":true}',
    'VIOMMU-MARK: iommufd-fault {"ok":false,"steps":[{"op":"alloc","ok":true},{"op":"attach","ok":false}]}',
    'VIOMMU-MARK: module {"path":"/lib/modules/x/viommu_dma.ko","ok":true}',
    'VIOMMU-MARK: done {"errors":0}',
]


def booted(**kw) -> BootSummary:
    s = BootSummary(ok=True, kernel="6.12 (set-up)", backend={"viommu": VIOMMU},
                    timings={"total": 42.0}, workdir=Path("/tmp/run"), **kw)
    s.markers = [m for m in (parse_marker(line) for line in LINES) if m is not None]
    return s


def test_rates_in_megabytes_a_second() -> None:
    assert mbps(1_000_000, 1000) == pytest.approx(1.0) and mbps(5, 0) == 0.0
    assert mbps_text(2_000_000, 1000) == "   2.00 MB/s" and mbps_text(1, 0) == "      ? MB/s"
    r = blk_rates({"bs": 4096, "bytes": 1 << 20, "write_ms": 1000, "read_ms": 500, "match": True})
    assert r["write_mbps"] == pytest.approx(1.048576) and r["read_mbps"] == pytest.approx(2.097152)
    assert r["mbps"] == pytest.approx(2 * 1.048576 / 1.5) and r["match"] and r["bytes"] == 1 << 20
    assert blk_rates({"bs": 4096, "bytes": 0, "write_ms": 0, "read_ms": 0})["mbps"] == 0.0


def test_key_counters_of_one_smmu() -> None:
    c = SmmuCounters.from_query(VIOMMU)
    assert c.tlb == (75, 100) and c.tlb_hit_rate == 0.75 and c.tlbi == 32 and c.dma_bytes == 11
    k = c.key_counters()
    assert (k["translations"], k["walks"], k["faults"], k["commands"], k["syncs"], k["msi_writes"]) == \
        (100, 25, 2, 43, 10, 9)
    assert (k["cmdq_cons_reads"], k["events"], k["gerrors"], k["bytes"]) == (7, 2, 1, 11)
    assert k["commands_by_type"]["TLBI_NH_VA"] == 30 and k["events_by_type"] == {"F_TRANSLATION": 2}
    assert backend_counters({"viommu": VIOMMU}) == k and backend_counters(None) == {}
    assert SmmuCounters.from_query(None).key_counters()["tlb_hit_rate"] is None


def test_summary_lines_of_one_smmu() -> None:
    lines = SmmuCounters.from_query(VIOMMU).lines("iommu smmu1")
    assert lines[0] == "  iommu smmu1: 11 bytes through the SMMU (DMA read 5 in 1, write 6 in 2)"
    assert "TLB hit rate 75.0% (75/100), faults 2; endpoint ATC hit rate 75.0% (3/4), 2 ATC_INV" in lines[1]
    assert lines[2] == "  iommu smmu1: commands: CFGI_STE 1, CMD_SYNC 10, TLBI_NH_ASID 2, TLBI_NH_VA 30"
    assert "CMD_SYNC 10 (MSI writes 9), trapped reads CMDQ_CONS 7 of 8 register reads" in lines[3]
    assert "PASID: translations 4, DMA bytes 16, CFGI_CD with SSID 3; stalls 1 (resumed 1" in lines[5]
    assert lines[6] == "  iommu smmu1: registers trapped (each access a vfio-user message)"
    assert len(lines) == 7  # no sanitizer
    shared = {"mode": "shared", "looks": 700, "polls": 50, "active_polls": 9, "writes_taken": 12,
              "publishes": 30}
    assert SmmuCounters(VIOMMU["counters"], VIOMMU["translation"], shared).lines()[6] == \
        ("  iommu: registers shared (BAR0 mapped into the guest): 700 detector looks, 50 scans, "
         "9 found writes, 12 register writes taken, 30 words published")
    san = {**VIOMMU["translation"], "sanitizer": {"checks": 9, "violations": {"stale-tlb": 1},
                                                   "recent": [{"rule": "stale-tlb", "iova": 4096}]}}
    lines = SmmuCounters(VIOMMU["counters"], san).lines()
    assert lines[-3:] == ["  iommu: sanitizer: 9 cached entries checked, violations: stale-tlb 1",
                          "  iommu: sanitizer: rule=stale-tlb iova=0x1000",
                          "  iommu: sanitizer: device use after unmap: none; invalidations "
                          "matching nothing live: none"]


def test_two_smmus_each_get_their_lines() -> None:
    s = BootSummary(backend={"viommu": VIOMMU, "smmus": {"a": {"viommu": VIOMMU}, "b": {"viommu": {}}}})
    lines = s.backend_lines()
    assert sum(ln.startswith("  iommu a:") for ln in lines) == 7
    assert "  iommu b: 0 bytes through the SMMU (DMA read 0 in 0, write 0 in 0)" in lines
    assert BootSummary(backend_error="ConnectionRefusedError: x").backend_lines() == \
        ["  backend QMP: ConnectionRefusedError: x"]


def test_endpoint_bar_accesses_leave_the_smmu_out() -> None:
    fns = {"viommu": {"bar-reads": {"0": 100}}, "blk0": {"bar-reads": {"0": 3, "4": 2}, "bar-writes": {"4": 7}},
           "ep1": {"bar-writes": {"0": 1}}}
    assert endpoint_bar_accesses(fns, skip=("viommu",)) == (5, 8)
    assert endpoint_bar_accesses(fns) == (105, 8)


def test_digest_of_a_run() -> None:
    d = digest(booted())
    assert d.ok and d.error == "" and d.kernel == "6.12.117-viommu" and d.domain_type == "DMA-FQ"
    assert d.counters == SmmuCounters.from_query(VIOMMU).key_counters()
    assert list(d.blk) == ["4096"] and d.blk["4096"]["match"]
    assert d.driver["features"] == "0x00088fe7" and d.driver["option_mask"] == "0x0"
    assert len(d.driver["smmu_lines"]) == 2 and len(d.kmsg) == 3
    assert d.guest_checks == {"iommufd-fault": "FAIL: attach"}  # `module` is not a check
    assert d.workdir == "/tmp/run" and d.duration == 42.0 and len(d.markers) == len(LINES)
    assert d.log.startswith("boot: OK") and "  check iommufd-fault: FAILED" in d.log
    assert "  blk bs=   4096: 1024 KiB  write    1.05 MB/s  read    2.10 MB/s  data OK" in d.log


def test_digest_of_a_run_that_never_booted() -> None:
    d = digest(BootSummary(error="guest set-up failed"))
    assert not d.ok and d.error == "guest set-up failed" and d.kernel == "" and d.counters == {}
    assert d.blk == {} and d.guest_checks == {} and d.driver == {"smmu_lines": []} and d.duration == 0.0
