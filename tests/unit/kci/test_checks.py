"""kci.checks: the checks of a run from the guest's markers, in KCIDB paths."""

from __future__ import annotations

from viommu_backend.guest.qemu import Marker
from viommu_backend.kci.checks import Check, checks_from_markers, requested_workloads, suites

from tests.support.run_data import markers


def by_path(checks):
    return {c.path: c for c in checks}


def test_a_clean_run_has_a_check_per_thing_shown():
    checks = checks_from_markers(markers(), ok=True)
    got = {p: c.status for p, c in by_path(checks).items()}
    assert got == {
        "viommu.boot.init": "PASS", "viommu.boot.verdict": "PASS",
        "viommu.enumerate.devices": "PASS", "viommu.smmu.probe": "PASS", "viommu.hotplug.added": "PASS",
        "viommu.blk.iommu-group": "PASS", "viommu.blk.bs-4096": "PASS", "viommu.blk.bs-65536": "PASS",
        "viommu.unplug.removed": "PASS",
        **{f"viommu.{w}.completed": "PASS" for w in ("enumerate", "smmu", "hotplug", "blk", "unplug")},
    }
    bs = by_path(checks)["viommu.blk.bs-4096"]
    assert bs.unit == "MB/s" and bs.value == round(2 * (1 << 20) / 1e3 / 500, 3) and bs.t == 3.0
    assert "domain DMA" in by_path(checks)["viommu.blk.iommu-group"].detail
    assert list(suites(checks)) == ["boot", "enumerate", "smmu", "hotplug", "blk", "unplug"]


def test_a_failed_check_fails_its_workload_and_unrun_workloads_are_missing():
    checks = by_path(checks_from_markers(markers(blk_match=False, error="bs=4096: read back x, wrote y",
                                                 stop_after="blk"), ok=False, reason="guest errors"))
    assert checks["viommu.blk.bs-4096"].status == "FAIL" and checks["viommu.blk.bs-65536"].status == "PASS"
    assert checks["viommu.blk.completed"].status == "FAIL" and "read back x" in checks["viommu.blk.completed"].detail
    assert checks["viommu.unplug.completed"].status == "MISS" and "viommu.unplug.removed" not in checks
    assert checks["viommu.boot.verdict"].status == "FAIL" and checks["viommu.boot.verdict"].detail == "guest errors"


def test_no_markers_at_all_is_a_failed_init():
    checks = by_path(checks_from_markers([], ok=False, reason="QEMU exited with 1"))
    assert set(checks) == {"viommu.boot.init", "viommu.boot.verdict"}
    assert checks["viommu.boot.init"].status == "FAIL"


def test_program_checks_and_repeated_names():
    ms = [Marker("boot", {"kernel": "x", "cmdline": "viommu.workload=sva:3,io"}, 0.0),
          Marker("module", {"path": "/lib/modules/x/viommu_dma.ko", "ok": True}, 0.5),  # not a check
          Marker("workload", {"name": "sva"}, 1.0),
          Marker("sva", {"ok": True, "pasid": 1, "bind": 0}, 1.1),
          Marker("sva", {"ok": False, "error": "mmap: 12"}, 1.2),
          Marker("workload", {"name": "io"}, 2.0),
          Marker("io", {"dev": "vda", "bytes": 65536, "write_ok": True, "read_ok": True, "match": True}, 2.1),
          Marker("io", {"dev": "vda", "op": "read", "bytes": 4096, "read_ok": False, "match": False,
                        "error": "EIO"}, 2.2)]
    assert requested_workloads(ms) == ["sva", "io"]
    checks = by_path(checks_from_markers(ms, ok=True))
    assert checks["viommu.sva.sva"].status == "PASS" and checks["viommu.sva.sva"].detail == '{"pasid":1,"bind":0}'
    assert checks["viommu.sva.sva-2"].status == "FAIL" and checks["viommu.sva.sva-2"].detail == "mmap: 12"
    assert not any("module" in p for p in checks)
    assert checks["viommu.io.io"].status == "PASS" and checks["viommu.io.io-2"].status == "FAIL"


def test_json_round_trip():
    c = checks_from_markers(markers(), ok=True)[5]
    assert Check.from_json(c.to_json()) == c and c.to_json()["path"] == c.path


def test_selftest_programs_and_their_ktap_results_are_checks():
    def ktap(program, *lines):
        return [Marker("ktap", {"test": program, "line": line}, 201.0) for line in lines]

    ms = [Marker("boot", {"kernel": "7.3.4", "cmdline": "viommu.workload=vfio-selftests"}, 200.0),
          Marker("workload", {"name": "vfio-selftests"}, 200.5),
          # verbatim lines of vfio_pci_device_test / vfio_pci_sriov_uapi_test in a guest here
          *ktap("vfio_pci_device_test", "TAP version 13", "1..2",
                "ok 1 vfio_pci_device_test.reset",
                "ok 2 vfio_pci_irq_test.msi.enable_trigger_disable # SKIP MSI: not supported",
                "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0"),
          Marker("vfio-selftest", {"test": "vfio_pci_device_test", "rc": 0}, 202.0),
          *ktap("vfio_pci_sriov_uapi_test", "1..0 # SKIP SR-IOV may not be supported by the PF: 0000:01:00.0"),
          Marker("vfio-selftest", {"test": "vfio_pci_sriov_uapi_test", "rc": 4}, 203.0),
          *ktap("vfio_pci_driver_test", "TAP version 13", "1..2", "ok 1 d.iommufd.init_remove"),
          Marker("vfio-selftest", {"test": "vfio_pci_driver_test", "rc": 1}, 204.0)]  # cut short
    c = by_path(checks_from_markers(ms, ok=True))
    w = "viommu.vfio-selftests"
    assert c[f"{w}.vfio_pci_device_test"].status == "PASS"
    assert c[f"{w}.vfio_pci_device_test"].detail == "pass 1, skip 1"
    assert c[f"{w}.vfio_pci_device_test_reset"].status == "PASS"
    msi = c[f"{w}.vfio_pci_irq_test_msi_enable_trigger_disable"]
    assert msi.status == "SKIP" and msi.detail.startswith("MSI: not supported (the engine has MSI-X")
    assert c[f"{w}.vfio_pci_sriov_uapi_test"].status == "SKIP"
    assert "no SR-IOV capability" in c[f"{w}.vfio_pci_sriov_uapi_test"].detail
    driver = c[f"{w}.vfio_pci_driver_test"]
    assert driver.status == "FAIL" and driver.detail == "pass 1; plan 1..2 but 1 result(s); exit code 1"
    assert c[f"{w}.d_iommufd_init_remove"].status == "PASS" and c[f"{w}.d_iommufd_init_remove"].t == 4.0


def test_io_checks_by_operation():
    def io_status(**d):
        [check] = [c for c in checks_from_markers([Marker("io", {"dev": "vda", "bytes": 4096, **d}, 1.0)],
                                                  ok=True) if c.path == "viommu.io.io"]
        return check.status

    assert io_status(op="both", write_ok=True, read_ok=True, match=True) == "PASS"
    assert io_status(op="both", write_ok=True, read_ok=True, match=False) == "FAIL"
    assert io_status(op="read", write_ok=True, read_ok=True, match=True) == "PASS"
    assert io_status(op="write", write_ok=True, read_ok=None, match=None) == "PASS"  # no read back
    assert io_status(op="write", write_ok=False, read_ok=None, match=None) == "FAIL"
