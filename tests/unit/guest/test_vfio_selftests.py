"""Building the kernel's VFIO selftests with the engine's driver (the tree edits), and
what their results mean here (skip causes, checks left out, the summary lines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from viommu_backend.guest import vfio_selftests as vs
from viommu_backend.guest.ktap import parse_ktap
from viommu_backend.guest.toolroot import SetupError

# shaped like Linux 7.3's lib/libvfio.mk and lib/vfio_pci_driver.c around the edit points
LIBVFIO_MK = """LIBVFIO_C := iommu.c
LIBVFIO_C += vfio_pci_driver.c

ifeq ($(ARCH:x86_64=x86),x86)
LIBVFIO_C += drivers/ioat/ioat.c
endif

LIBVFIO_C += drivers/igb/igb.c

LIBVFIO_OUTPUT := $(OUTPUT)/libvfio
"""
DRIVER_TABLE = """extern struct vfio_pci_driver_ops igb_ops;

static struct vfio_pci_driver_ops *driver_ops[] = {
\t&igb_ops,
};
"""


def test_register_driver_adds_source_and_table_entry() -> None:
    mk, table = vs.register_driver(LIBVFIO_MK, DRIVER_TABLE)
    lines = mk.splitlines()
    # outside the x86-only block, before the output folder is derived from the list
    assert lines.index("LIBVFIO_C += drivers/viommu_engine/viommu_engine.c") > lines.index("endif")
    assert lines.index("LIBVFIO_C += drivers/viommu_engine/viommu_engine.c") < lines.index(
        "LIBVFIO_OUTPUT := $(OUTPUT)/libvfio")
    assert "extern struct vfio_pci_driver_ops viommu_engine_ops;" in table
    entries = table[table.index("driver_ops[] = {"):].splitlines()[1:3]
    assert entries == ["\t&viommu_engine_ops,", "\t&igb_ops,"]


@pytest.mark.parametrize("which", ["mk", "table"])
def test_register_driver_refuses_an_unknown_layout(which: str) -> None:
    mk, table = (LIBVFIO_MK.replace("LIBVFIO_OUTPUT", "OUT"), DRIVER_TABLE) if which == "mk" else \
        (LIBVFIO_MK, DRIVER_TABLE.replace("driver_ops[]", "ops[]"))
    with pytest.raises(SetupError, match="libvfio.mk" if which == "mk" else "driver table"):
        vs.register_driver(mk, table)


def fake_tree(root: Path) -> Path:
    for part in vs.TREE_PARTS:
        p = root / part
        if part.suffix in (".h", ".mk", ".include"):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"/* {part.name} */\n")
        else:
            p.mkdir(parents=True, exist_ok=True)
    lib = root / vs.VFIO / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "libvfio.mk").write_text(LIBVFIO_MK)
    (lib / "vfio_pci_driver.c").write_text(DRIVER_TABLE)
    (root / vs.VFIO / "Makefile").write_text("TEST_GEN_PROGS += vfio_a_test\nTEST_GEN_PROGS += vfio_b_test\n")
    real = root / "drivers/x/hw.h"  # the selftests' drivers link headers from the tree
    real.parent.mkdir(parents=True)
    real.write_text("#define HW 1\n")
    (lib / "hw.h").symlink_to(Path("../../../../../drivers/x/hw.h"))
    return root


def test_prepare_tree_copies_and_leaves_the_source_alone(tmp_path: Path) -> None:
    src = fake_tree(tmp_path / "linux")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    driver = tmp_path / "viommu_engine.c"
    driver.write_text("/* driver */\n")
    (tmp_path / "engine_regs.h").write_text("/* regs */\n")
    vfio = vs.prepare_tree(src, tmp_path / "copy", [driver, tmp_path / "engine_regs.h"])
    assert vs.has_vfio_selftests(src) and vfio == tmp_path / "copy" / vs.VFIO
    assert (vfio / "lib/drivers/viommu_engine/viommu_engine.c").read_text() == "/* driver */\n"
    assert (vfio / "lib/drivers/viommu_engine/engine_regs.h").read_text() == "/* regs */\n"
    assert "viommu_engine_ops" in (vfio / "lib/vfio_pci_driver.c").read_text()
    assert not (vfio / "lib/hw.h").is_symlink() and (vfio / "lib/hw.h").read_text() == "#define HW 1\n"
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert vs.selftest_names((vfio / "Makefile").read_text()) == ["vfio_a_test", "vfio_b_test"]
    assert not vs.has_vfio_selftests(tmp_path / "copy" / "nothing")


def test_prepare_tree_names_what_is_missing(tmp_path: Path) -> None:
    src = fake_tree(tmp_path / "linux")
    (src / "scripts/subarch.include").unlink()
    with pytest.raises(SetupError, match="subarch.include"):
        vs.prepare_tree(src, tmp_path / "copy", [tmp_path / "x.c"])


# vfio_dma_mapping_test (7.3.4, in a guest here), two of its 30 results, verbatim
MAPPING = """TAP version 13
1..2
#  RUN           vfio_dma_mapping_test.iommufd_anonymous.dma_map_unmap ...
Mapped HVA 0xffff9a52b000 (size 0x1000) at IOVA 0x0
Unmapped IOVA 0x0
#            OK  vfio_dma_mapping_test.iommufd_anonymous.dma_map_unmap
ok 1 vfio_dma_mapping_test.iommufd_anonymous.dma_map_unmap
#  RUN           vfio_dma_mapping_test.iommufd_anonymous_hugetlb_2mb.dma_map_unmap ...
#      SKIP      mmap() failed: Invalid argument (22)

#            OK  vfio_dma_mapping_test.iommufd_anonymous_hugetlb_2mb.dma_map_unmap
ok 2 vfio_dma_mapping_test.iommufd_anonymous_hugetlb_2mb.dma_map_unmap # SKIP mmap() failed: Invalid argument (22)
# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0
"""


def test_skip_causes_unchecked_checks_and_summary() -> None:
    run = parse_ktap(MAPPING.splitlines())
    assert "HugeTLB" in vs.skip_cause(run.results[1].reason)
    assert vs.skip_cause("Driver does not support send_msi()").startswith("viommu_engine has no send_msi()")
    assert vs.skip_cause("something new") == ""
    [(what, names)] = vs.unchecked(run)
    assert names == ["vfio_dma_mapping_test.iommufd_anonymous.dma_map_unmap"] and "Intel" in what.why
    # on Intel the test prints the page-table levels: then nothing is left out
    intel = parse_ktap(MAPPING.replace("Unmapped IOVA", "Found IOMMU mappings for IOVA 0x0:\nUnmapped IOVA")
                       .splitlines())
    assert vs.unchecked(intel) == []
    sriov = parse_ktap(["1..0 # SKIP SR-IOV may not be supported by the PF: 0000:01:00.0"])
    lines = vs.summary_lines({"vfio_dma_mapping_test": run, "vfio_pci_sriov_uapi_test": sriov},
                             {"vfio_dma_mapping_test": 0, "vfio_pci_sriov_uapi_test": 4})
    assert lines[0] == "  vfio selftest vfio_dma_mapping_test (rc 0): 2 tests, pass 1, fail 0, skip 1"
    assert lines[1].startswith("    skipped x1 by the test: 'mmap() failed: Invalid argument (22)' -- no HugeTLB")
    assert lines[2].startswith("    not checked in 1 passing test(s): IOMMU page-table levels")
    assert lines[3] == "  vfio selftest vfio_pci_sriov_uapi_test (rc 4): 0 tests, pass 0, fail 0, skip 0"
    assert lines[4].startswith("    skipped entirely by the program: 'SR-IOV may not be supported")
    failed = parse_ktap(["TAP version 13", "1..1", "not ok 1 t.send_msi #  timeout"])
    assert vs.summary_lines({"p": failed}, {})[1] == "    FAILED t.send_msi: timeout"


def test_the_driver_sources_are_in_the_recipe() -> None:
    recipe = Path(__file__).resolve().parents[3] / "guest_images"
    driver, regs = vs.driver_sources(recipe)
    assert driver.is_file() and regs.is_file()
    assert '#include "engine_regs.h"' in driver.read_text()
    assert "viommu_engine_ops" in driver.read_text()
