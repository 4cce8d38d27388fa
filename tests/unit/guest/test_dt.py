"""Device-tree generation for the SMMU node (route 1), checked by parsing dtc's output."""

import re
import shutil

import pytest

from viommu_backend.config import loads_config
from viommu_backend.guest.dt import (
    SmmuNode,
    add_smmus,
    cache_key,
    dtb_to_dts,
    dts_to_dtb,
    find_pcie_node,
    intx_spi,
    predict_bar0,
    smmu_nodes_for,
)
from viommu_backend.guest.toolroot import SetupError

from tests.support.dt_data import VIRT_DTS

pytestmark = pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc missing (scripts/setup installs it)")

# A cut-down virt DT as dtc decompiles QEMU's dump (same shapes: 2 address cells,
# a GICv3 with a phandle, the ECAM host bridge).


def node_body(dts: str, name: str) -> str:
    m = re.search(r"^\t" + re.escape(name) + r" \{\n(.*?)^\t\};", dts, re.M | re.S)
    assert m, f"node {name} not in:\n{dts}"
    return m.group(1)


def cells(body: str, prop: str) -> list[int]:
    m = re.search(r"^\t\t" + re.escape(prop) + r" = <([^>]*)>;", body, re.M)
    assert m, f"{prop} missing in:\n{body}"
    return [int(x, 16) for x in m.group(1).split()]


def test_add_smmu_roundtrips_through_dtc():
    smmu = SmmuNode(base=0x10200000, spi=4)
    dtb = dts_to_dtb(add_smmus(VIRT_DTS, [smmu], []))
    back = dtb_to_dts(dtb)
    node = node_body(back, "smmuv3@10200000")
    assert '\t\tcompatible = "arm,smmu-v3";' in node
    assert cells(node, "reg") == [0x0, 0x10200000, 0x0, 0x20000]
    assert cells(node, "interrupts") == [0, 4, 4]
    assert '\t\tinterrupt-names = "combined";' in node
    assert cells(node, "#iommu-cells") == [1]
    assert "\t\tdma-coherent;" in node
    phandle = cells(node, "phandle")[0]
    assert phandle not in (0x8002, 0x8003)  # no clash with existing phandles
    pcie = node_body(back, "pcie@10000000")
    assert cells(pcie, "iommu-map") == [0x100, phandle, 0x100, 0xFF00]
    # the rest of the tree is untouched
    assert cells(pcie, "msi-map") == [0, 0x8003, 0, 0x10000]
    assert 'bootargs = "console=ttyAMA0";' in back


def test_high_base_and_custom_map():
    smmu = SmmuNode(base=0x80_0000_0000, size=0x40000, spi=6, iommu_map_base=0x200)
    back = dtb_to_dts(dts_to_dtb(add_smmus(VIRT_DTS, [smmu], [])))
    node = node_body(back, "smmuv3@8000000000")
    assert cells(node, "reg") == [0x80, 0x0, 0x0, 0x40000]
    assert cells(node, "interrupts") == [0, 6, 4]
    assert cells(node_body(back, "pcie@10000000"), "iommu-map")[::2] == [0x200, 0x200]
    assert cells(node_body(back, "pcie@10000000"), "iommu-map")[3] == 0xFE00


def test_find_pcie_node():
    assert find_pcie_node(VIRT_DTS) == "/pcie@10000000"
    with pytest.raises(SetupError, match="pci-host-ecam-generic"):
        find_pcie_node(VIRT_DTS.replace("pci-host-ecam-generic", "x"))


def test_dtc_errors_are_reported():
    with pytest.raises(SetupError, match="dtc"):
        dts_to_dtb("/dts-v1/;\n/ { broken")


FN = '[[function]]\nname = "viommu"\nkind = "smmuv3"\nslot = {slot}\n'
RP = '[[root_port]]\nname = "rp{i}"\nslot = {slot}\n'


BAR32 = "bar0_64bit = false\n"


def test_bar_prediction_lone_function():
    # the SMMU function's BAR0 is 64-bit by default: the 64-bit window (measured in a boot)
    assert predict_bar0(loads_config(FN.format(slot=1))) == {"viommu": 0x80_0000_0000}
    assert predict_bar0(loads_config(FN.format(slot=1) + BAR32)) == {"viommu": 0x10000000}


def test_bar_prediction_with_root_ports():
    # each root port: a 2 MiB window in both windows, and its own 4 KiB BAR0 (32-bit)
    c = loads_config(FN.format(slot=1) + RP.format(i=0, slot=2))
    assert predict_bar0(c) == {"viommu": 0x80_0020_0000}
    c = loads_config(FN.format(slot=1) + BAR32 + RP.format(i=0, slot=2))
    assert predict_bar0(c) == {"viommu": 0x10200000}
    c = loads_config(FN.format(slot=1) + BAR32 + RP.format(i=0, slot=2) + RP.format(i=1, slot=3))
    assert predict_bar0(c) == {"viommu": 0x10400000}


def test_bar_prediction_orders_by_size_then_slot():
    c = loads_config(
        FN.format(slot=3) + BAR32
        + '[[function]]\nname = "big"\nkind = "testdev"\nslot = 4\nbar0_size = "1M"\n'
        + '[[function]]\nname = "small"\nkind = "testdev"\nslot = 2\nbar0_size = "4K"\n'
    )
    assert predict_bar0(c) == {"viommu": 0x10100000, "big": 0x10000000, "small": 0x10120000}


def test_route_2_node_starts_disabled():
    back = dtb_to_dts(dts_to_dtb(add_smmus(VIRT_DTS, [SmmuNode(base=0x10200000, disabled=True)], [])))
    assert '\t\tstatus = "disabled";' in node_body(back, "smmuv3@10200000")
    back = dtb_to_dts(dts_to_dtb(add_smmus(VIRT_DTS, [SmmuNode(base=0x10200000)], [])))
    assert "status" not in node_body(back, "smmuv3@10200000")


def test_dma_coherent_follows_the_config():
    back = dtb_to_dts(dts_to_dtb(add_smmus(VIRT_DTS, [SmmuNode(base=0x10200000, coherent=False)], [])))
    node = node_body(back, "smmuv3@10200000")
    assert "dma-coherent" not in node and "\t\tdma-noncoherent;" in node  # the root says coherent
    assert smmu_nodes_for(loads_config(FN.format(slot=1)))[0].coherent is True
    off = loads_config(FN.format(slot=1) + "[iommu]\ndma_coherent = false\n")
    assert off.iommu.dma_coherent is False and smmu_nodes_for(off)[0].coherent is False


def test_smmu_nodes_for_default_config():
    from viommu_backend.config import load_default

    (node,) = smmu_nodes_for(load_default())
    assert node == SmmuNode(base=0x80_0020_0000, size=0x20000, spi=4, iommu_map_base=0x100)
    assert intx_spi(1) == 4 and intx_spi(3) == 6 and intx_spi(4) == 3
    no_dt = loads_config(FN.format(slot=1) + "[iommu]\ndevice_tree = false\n")
    assert smmu_nodes_for(no_dt) == []
    route2 = loads_config('[kernel]\nbuild = "6.12"\n[guest]\nmodules = ["viommu_smmu"]\n'
                          '[iommu]\nroute = "module"\n' + FN.format(slot=1))
    assert smmu_nodes_for(route2)[0].disabled is True


def test_cache_key_depends_on_command_line_and_node():
    a = cache_key(["qemu", "-m", "1G"], SmmuNode(0x10000000))
    assert a == cache_key(["qemu", "-m", "1G"], SmmuNode(0x10000000))
    assert a != cache_key(["qemu", "-m", "2G"], SmmuNode(0x10000000))
    assert a != cache_key(["qemu", "-m", "1G"], SmmuNode(0x10200000))
