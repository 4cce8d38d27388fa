"""KTAP parsing, on output the kernel's VFIO selftests printed in a guest of this project
(Linux 7.3.4, vfio_pci_device_test against the DMA test engine)."""

from __future__ import annotations

from viommu_backend.guest.ktap import KtapResult, parse_ktap, parse_result

# vfio_pci_device_test 0000:01:00.0, verbatim (the harness's own blank lines included)
DEVICE_TEST = """\
TAP version 13
1..5
# Starting 5 tests from 3 test cases.
#  RUN           vfio_pci_device_test.config_space_read_write ...
Vendor: 5555, Device: 0001
Enabled Bus Mastering (command: 0006)
Disabled Bus Mastering (command: 0002)
#            OK  vfio_pci_device_test.config_space_read_write
ok 1 vfio_pci_device_test.config_space_read_write
#  RUN           vfio_pci_device_test.validate_bars ...
BAR 0 mapped at 0xffff9a11a000 (size 0x1000)
BAR 1 does not support mmap()
BAR 2 does not support mmap()
BAR 3 does not support mmap()
BAR 4 does not support mmap()
BAR 5 does not support mmap()
#            OK  vfio_pci_device_test.validate_bars
ok 2 vfio_pci_device_test.validate_bars
#  RUN           vfio_pci_device_test.reset ...
#            OK  vfio_pci_device_test.reset
ok 3 vfio_pci_device_test.reset
#  RUN           vfio_pci_irq_test.msi.enable_trigger_disable ...
#      SKIP      MSI: not supported

#            OK  vfio_pci_irq_test.msi.enable_trigger_disable
ok 4 vfio_pci_irq_test.msi.enable_trigger_disable # SKIP MSI: not supported

#  RUN           vfio_pci_irq_test.msix.enable_trigger_disable ...
MSI-x: enabled 2 interrupts
#            OK  vfio_pci_irq_test.msix.enable_trigger_disable
ok 5 vfio_pci_irq_test.msix.enable_trigger_disable
# PASSED: 5 / 5 tests passed.
# 1 skipped test(s) detected. Consider enabling relevant config options to improve coverage.
# Totals: pass:4 fail:0 xfail:0 xpass:0 skip:1 error:0
"""


def test_real_run_results_counts_and_skip_reason() -> None:
    run = parse_ktap(DEVICE_TEST.splitlines())
    assert run.version == "TAP version 13" and run.plan == 5
    assert [r.name for r in run.results] == [
        "vfio_pci_device_test.config_space_read_write", "vfio_pci_device_test.validate_bars",
        "vfio_pci_device_test.reset", "vfio_pci_irq_test.msi.enable_trigger_disable",
        "vfio_pci_irq_test.msix.enable_trigger_disable"]
    assert run.counts() == {"pass": 4, "fail": 0, "skip": 1, "xfail": 0, "xpass": 0, "error": 0}
    assert run.totals == {"pass": 4, "fail": 0, "xfail": 0, "xpass": 0, "skip": 1, "error": 0}
    assert run.problems() == []
    skipped = run.by_status("skip")
    assert [(r.number, r.reason) for r in skipped] == [(4, "MSI: not supported")]
    # each result keeps what the test printed before it
    assert "Vendor: 5555, Device: 0001" in run.results[0].output
    assert "MSI-x: enabled 2 interrupts" in run.results[4].output
    assert run.trailing[-1].startswith("# 1 skipped test(s)")


def test_failure_timeout_and_directives() -> None:
    # a failed test as kselftest_harness reports it (a diagnostic after "#  "), a timeout,
    # and the directives kselftest.h prints
    assert parse_result("not ok 7 vfio_pci_driver_test.iommufd.send_msi") == \
        ("fail", 7, "vfio_pci_driver_test.iommufd.send_msi", "")
    assert parse_result("not ok 3 fixture.test #  Test terminated by timeout") == \
        ("fail", 3, "fixture.test", "Test terminated by timeout")
    assert parse_result("ok 2 t # XFAIL known bug") == ("xfail", 2, "t", "known bug")
    assert parse_result("ok 2 t # XPASS") == ("xpass", 2, "t", "")
    assert parse_result("not ok 9 t # error setup") == ("error", 9, "t", "setup")
    assert parse_result("ok 1 t # skip lower case") == ("skip", 1, "t", "lower case")
    assert parse_result("# ok 1 not a result") is None
    assert parse_result("    ok 1 nested subtest") is None


def test_incomplete_or_inconsistent_output_is_reported() -> None:
    lines = DEVICE_TEST.splitlines()
    cut = parse_ktap(lines[:lines.index("ok 3 vfio_pci_device_test.reset") + 1])
    assert cut.plan == 5 and len(cut.results) == 3 and cut.totals is None
    assert cut.problems() == ["plan 1..5 but 3 result(s)"]
    lying = parse_ktap([*lines[:-1], "# Totals: pass:5 fail:0 xfail:0 xpass:0 skip:0 error:0"])
    assert lying.problems() == ["# Totals disagree with the result lines: pass 5 vs 4, skip 0 vs 1"]
    assert parse_ktap(["crashed before printing anything"]).problems() == [
        "no TAP/KTAP version line", "no plan line (1..N)"]
    assert parse_ktap([]).results == () and KtapResult(1, "x", "pass").output == ()


def test_a_program_that_skips_itself_entirely() -> None:
    # vfio_pci_sriov_uapi_test against the engine (no SR-IOV), verbatim
    run = parse_ktap(["1..0 # SKIP SR-IOV may not be supported by the PF: 0000:01:00.0"])
    assert run.plan == 0 and run.results == () and run.problems() == []
    assert run.skipped == "SR-IOV may not be supported by the PF: 0000:01:00.0"
    assert parse_ktap(DEVICE_TEST.splitlines()).skipped is None
