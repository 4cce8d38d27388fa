"""The boot summary: the guest programs' check lines become `check` lines of the summary."""

from viommu_backend.guest.boot import BootSummary
from viommu_backend.guest.qemu import parse_marker


def summary(*lines: str) -> BootSummary:
    s = BootSummary()
    s.markers = [m for m in (parse_marker(line) for line in lines) if m is not None]
    return s


def test_check_lines_are_the_markers_with_an_ok() -> None:
    s = summary('VIOMMU-MARK: module {"path":"/lib/modules/x/viommu_dma.ko","ok":true}',
                'VIOMMU-MARK: dma-api {"ok":true,"copies":[]}',
                'VIOMMU-MARK: hotplug {"devices":4}',
                'VIOMMU-MARK: sva {"ok":false,"bind":-22}')
    assert [(n, d["ok"]) for n, d in s.checks()] == [("dma-api", True), ("sva", False)]
    text = s.format()
    assert "  check dma-api: OK" in text and "  check sva: FAILED" in text
    assert "check module" not in text and "check hotplug" not in text


def test_selftest_results_from_the_guests_ktap_markers() -> None:
    # the workload vfio-selftests passes each program's output on line by line (verbatim
    # from a run of vfio_pci_device_test here, shortened)
    s = summary(
        'VIOMMU-MARK: ktap {"test":"vfio_pci_device_test","line":"TAP version 13"}',
        'VIOMMU-MARK: ktap {"test":"vfio_pci_device_test","line":"1..2"}',
        'VIOMMU-MARK: ktap {"test":"vfio_pci_device_test","line":"#  RUN           vfio_pci_device_test.reset ..."}',
        'VIOMMU-MARK: ktap {"test":"vfio_pci_device_test","line":"ok 1 vfio_pci_device_test.reset"}',
        'VIOMMU-MARK: ktap {"test":"vfio_pci_device_test","line":'
        '"ok 2 vfio_pci_irq_test.msi.enable_trigger_disable # SKIP MSI: not supported"}',
        'VIOMMU-MARK: ktap {"test":"vfio_pci_device_test","line":'
        '"# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0"}',
        'VIOMMU-MARK: vfio-selftest {"test":"vfio_pci_device_test","bdf":"0000:01:00.0","rc":0}')
    run = s.selftests()["vfio_pci_device_test"]
    assert run.counts()["pass"] == 1 and run.by_status("skip")[0].reason == "MSI: not supported"
    assert run.problems() == [] and s.selftest_rcs() == {"vfio_pci_device_test": 0}
    text = s.format()
    assert "  vfio selftest vfio_pci_device_test (rc 0): 2 tests, pass 1, fail 0, skip 1" in text
    assert "    skipped x1 by the test: 'MSI: not supported' -- the engine has MSI-X" in text
    assert "check vfio" not in text  # KTAP results are not the project's own check lines
