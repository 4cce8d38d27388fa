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
