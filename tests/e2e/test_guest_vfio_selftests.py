"""The kernel's own VFIO selftests (tools/testing/selftests/vfio of Debian's
linux-source-7.3) in the guest, unchanged, against the DMA test engine through the
project's driver for their library (guest_images/vfio_selftests/viommu_engine.c):
qemu_configs/vfio-selftests-7.3.toml, workload ``vfio-selftests``.  The host parses each
program's KTAP output (``BootSummary.selftests()``); every test must pass or skip itself
for a reason this machine explains (``vfio_selftests.SKIP_CAUSES``), and the checks the
tests leave out without a SKIP (the Intel-only page-table check) are named.
"""

from __future__ import annotations

import pytest

from viommu_backend.config import load_config
from viommu_backend.guest import vfio_selftests
from viommu_backend.guest.report import BootSummary
from viommu_backend.kci.checks import checks_from_markers

from tests.support import CONFIGS
from tests.support.guest import boot

pytestmark = pytest.mark.e2e
CONFIG = CONFIGS / "vfio-selftests-7.3.toml"
MODES = ("vfio_type1_iommu", "vfio_type1v2_iommu", "iommufd_compat_type1", "iommufd_compat_type1v2", "iommufd")
PROGRAMS = {  # program -> tests it runs (all variants): every one of them must report
    "vfio_dma_mapping_test": 30, "vfio_dma_mapping_mmio_test": 15, "vfio_iommufd_setup_test": 6,
    "vfio_pci_device_test": 5, "vfio_pci_device_init_perf_test": 5, "vfio_pci_driver_test": 35,
}
DRIVER_PASSES = ("init_remove", "memcpy_success", "memcpy_from_unmapped_iova", "memcpy_to_unmapped_iova",
                 "mix_and_match", "memcpy_storm")


def statuses(s: BootSummary, program: str) -> dict[str, str]:
    return {r.name: r.status for r in s.selftests()[program].results}


async def test_vfio_selftests_on_built_7_3(guest_ready, tmp_path) -> None:
    s = await boot(load_config(CONFIG), tmp_path)
    runs = s.selftests()
    rcs = s.selftest_rcs()
    for program, n in PROGRAMS.items():
        run = runs[program]
        assert run.problems() == [] and len(run.results) == n, (program, run.problems(), len(run.results))
        assert rcs[program] == 0, (program, rcs[program])
        assert run.counts()["fail"] == run.counts()["error"] == 0, program
        for r in run.by_status("skip"):  # each skip is the test's own, for a known cause
            assert vfio_selftests.skip_cause(r.reason), (program, r.name, r.reason)
    sriov = runs["vfio_pci_sriov_uapi_test"]  # the whole program skips itself: no SR-IOV
    assert rcs["vfio_pci_sriov_uapi_test"] == 4 and sriov.results == () and sriov.skipped, sriov
    assert sriov.problems() == [], sriov.problems()
    assert "SR-IOV" in vfio_selftests.skip_cause(sriov.skipped)
    total = {k: sum(run.counts()[k] for run in runs.values()) for k in ("pass", "skip")}
    assert total["pass"] >= 70, total

    # the engine's driver: probed, copies through every IOMMU mode, faults reported as errors
    driver = statuses(s, "vfio_pci_driver_test")
    for mode in MODES:
        for test in DRIVER_PASSES:
            assert driver[f"vfio_pci_driver_test.{mode}.{test}"] == "pass", (mode, test)
        send = next(r for r in runs["vfio_pci_driver_test"].results
                    if r.name == f"vfio_pci_driver_test.{mode}.send_msi")
        assert send.status == "skip" and "send_msi" in send.reason, send
    storm = next(r for r in runs["vfio_pci_driver_test"].results if r.name.endswith("iommufd.memcpy_storm"))
    assert any(line.startswith("Kicking off 256 memcpys of size 0x10000") for line in storm.output), storm.output

    # the engine has MSI-X only, so the MSI variant skips and the MSI-X one passes
    device = statuses(s, "vfio_pci_device_test")
    assert device["vfio_pci_irq_test.msix.enable_trigger_disable"] == "pass"
    assert device["vfio_pci_irq_test.msi.enable_trigger_disable"] == "skip"

    # dma_map_unmap passes in every mode without its page-table check (Intel VT-d only)
    [(what, names)] = vfio_selftests.unchecked(runs["vfio_dma_mapping_test"])
    assert "page-table" in what.check and len(names) == len(MODES), names
    assert all(r.reason.startswith("mmap() failed") for r in runs["vfio_dma_mapping_test"].by_status("skip"))

    # the backend saw the engine's copies and the faults the unmapped-IOVA tests provoke
    t = s.backend["viommu"]["translation"]
    assert t["bytes_written"] >= len(MODES) * 16 << 20 and t["faults"] > 0, t
    # the run's checks (KCIDB, LAVA, HTML report): one per program and one per KTAP result
    checks = {c.path: c for c in checks_from_markers(s.markers, ok=s.ok)}
    w = "viommu.vfio-selftests"
    assert checks[f"{w}.vfio_pci_driver_test"].status == "PASS"
    assert checks[f"{w}.vfio_pci_driver_test_iommufd_memcpy_storm"].status == "PASS"
    assert checks[f"{w}.vfio_pci_driver_test_iommufd_send_msi"].status == "SKIP"
    assert checks[f"{w}.vfio_pci_sriov_uapi_test"].status == "SKIP"
    assert sum(c.workload == "vfio-selftests" and c.status == "FAIL" for c in checks.values()) == 0
    text = s.format()
    assert "vfio selftest vfio_pci_driver_test (rc 0): 35 tests, pass 30, fail 0, skip 5" in text, text
