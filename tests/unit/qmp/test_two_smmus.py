"""Several SMMUs, one per PCIe root complex: the config ([[expander]], root ports on an
expander, ``root_complex``), bus / domain / StreamID placement, the guest DT split into
one host bridge per root complex with an iommu-map to each SMMU, and QMP commands that
select the SMMU with ``smmu``."""

from __future__ import annotations

import re
import shutil

import pytest

from viommu_backend.config import ConfigError, load_config, loads_config
from viommu_backend.guest.dt import add_smmus, dtb_to_dts, dts_to_dtb, smmu_nodes_for
from viommu_backend.guest.qemu import qemu_args
from viommu_backend.qmp.protocol import QmpError
from viommu_backend.qmp.server import QmpCommandRegistry
from viommu_backend.qmp.smmus import register_smmu_commands
from viommu_backend.topology import placements, root_complexes, translated

from tests.support.dt_data import VIRT_DTS
from tests.support import CONFIGS

TWO = CONFIGS / "two-smmus.toml"
needs_dtc = pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc missing (scripts/setup installs it)")


def test_two_smmus_config_places_each_endpoint_behind_its_root_complex():
    c = load_config(TWO)
    assert [(e.name, e.slot, e.bus_nr) for e in c.expanders] == [("pxb1", 4, 0x80)]
    assert c.root_port("rp1").bus == "pxb1" and c.root_port("rp0").bus == "pcie.0"
    assert [(f.name, f.root_complex, f.socket_name) for f in c.iommu_functions()] == [
        ("smmu0", "pcie.0", "viommu.sock"), ("smmu1", "pxb1", "smmu1.sock")]
    assert c.iommu_of(c.function("blk0")).name == "smmu0"
    assert c.iommu_of(c.function("blk1")).name == "smmu1"
    rcs = root_complexes(c)
    assert [(r.name, r.domain, r.first_bus, r.last_bus, r.map_base, r.map_end) for r in rcs] == [
        ("pcie.0", 0, 0, 0x7F, 0x100, 0x8000), ("pxb1", 1, 0x80, 0xFF, 0x8100, 0x10000)]
    p = placements(c)
    assert (p["blk0"].bdf, p["blk0"].stream_id) == ("0000:01:00.0", 0x100)
    assert (p["blk1"].bdf, p["blk1"].stream_id) == ("0001:81:00.0", 0x8100)
    assert all(translated(c, c.function(n), p[n]) for n in ("blk0", "blk1"))
    assert not translated(c, c.function("smmu1"), p["smmu1"])


def test_expander_without_an_smmu_is_not_translated():
    c = loads_config(TWO.read_text().replace('root_complex = "pxb1"\n', "")
                     .replace('name = "smmu1"\nkind = "smmuv3"\nslot = 3\nbar0_size = "128K"\n',
                              'name = "dev3"\nkind = "testdev"\nslot = 3\n'))
    assert c.iommu_of(c.function("blk1")) is None
    assert not translated(c, c.function("blk1"), placements(c)["blk1"])


def test_qemu_command_line_has_the_expander_before_its_root_port(tmp_path):
    args = qemu_args(load_config(TWO), kernel=tmp_path / "k", initrd=tmp_path / "i", socket_dir=tmp_path)
    devs = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    assert devs.index("pxb-pcie,id=pxb1,bus_nr=128,bus=pcie.0,addr=0x4") < \
        devs.index("pcie-root-port,id=rp1,bus=pxb1,chassis=2,addr=0x0")
    assert any('"id":"smmu1"' in d and "smmu1.sock" in d for d in devs)


BASE = TWO.read_text()


@pytest.mark.parametrize("text, msg", [
    (BASE.replace('root_complex = "pxb1"', 'root_complex = "pxb9"'), "root_complex must be one of"),
    (BASE.replace('root_complex = "pxb1"', 'root_complex = "pcie.0"'), "translated by both"),
    (BASE.replace('bus = "pxb1"', 'bus = "pxb2"'), r"\.bus: pcie\.0 or an \[\[expander\]\] name"),
    (BASE.replace("bus_nr = 0x80", "bus_nr = 1"), "bus_nr: must be 2..254"),
    (BASE.replace("bus_nr = 0x80", "bus_nr = 0xfe") + '[[root_port]]\nname = "rp2"\nbus = "pxb1"\nslot = 1\n'
     'chassis = 3\n', "needs buses 254..256"),
    (BASE.replace("bus_nr = 0x80", "bus_nr = 2") + '[[root_port]]\nname = "rp3"\nslot = 5\nchassis = 3\n',
     "need buses below the first expander"),
    (BASE.replace('name = "pxb1"\nslot = 4', 'name = "pxb1"\nslot = 2'), "slot 2|share a bus 0 slot"),
    (BASE.replace('name = "smmu1"\nkind = "smmuv3"\nslot = 3', 'name = "smmu1"\nkind = "smmuv3"\nslot = 5'),
     "share an INTx line"),
    (BASE.replace('name = "blk1"\nkind = "virtio-blk"', 'name = "blk1"\nkind = "virtio-blk"\nroot_complex = "pxb1"'),
     "only for a smmuv3 function"),
])
def test_bad_multi_smmu_configs(text, msg):
    with pytest.raises(ConfigError, match=msg):
        loads_config(text, "bad.toml")


@needs_dtc
def test_dt_splits_the_host_bridge_and_maps_each_root_complex_to_its_smmu():
    c = load_config(TWO)
    nodes = smmu_nodes_for(c)
    assert [(n.label, n.root_complex, n.spi, n.base) for n in nodes] == [
        ("viommu_smmu", "pcie.0", 4, 0x80_0020_0000), ("viommu_smmu1", "pxb1", 6, 0x80_0022_0000)]
    dts = VIRT_DTS.replace("ranges = <0x1000000 0x00 0x00 0x00 0x3eff0000 0x00 0x10000>;",
                           "ranges = <0x1000000 0x00 0x00 0x00 0x3eff0000 0x00 0x10000 "
                           "0x2000000 0x00 0x10000000 0x00 0x10000000 0x00 0x2eff0000 "
                           "0x3000000 0x80 0x00 0x80 0x00 0x80 0x00>;")
    back = dtb_to_dts(dts_to_dtb(add_smmus(dts, nodes, root_complexes(c))))
    bridges = dict(re.findall(r"^\t(pcie@[0-9a-f]+) \{\n(.*?)^\t\};", back, re.M | re.S))
    assert set(bridges) == {"pcie@10000000", "pcie@4018000000"}
    main, pxb = bridges["pcie@10000000"], bridges["pcie@4018000000"]
    phandles = dict(re.findall(r"^\t(smmuv3@[0-9a-f]+) \{\n.*?phandle = <(0x[0-9a-f]+)>;", back, re.M | re.S))
    assert f"iommu-map = <0x100 {phandles['smmuv3@8000200000']} 0x100 0x7f00>;" in main
    assert f"iommu-map = <0x8100 {phandles['smmuv3@8000220000']} 0x8100 0x7f00>;" in pxb
    assert "bus-range = <0x00 0x7f>;" in main and "bus-range = <0x80 0xff>;" in pxb
    assert "reg = <0x40 0x10000000 0x00 0x8000000>;" in main
    assert "reg = <0x40 0x18000000 0x00 0x8000000>;" in pxb
    assert "linux,pci-domain = <0x00>;" in main and "linux,pci-domain = <0x01>;" in pxb
    # each window halved: I/O 32 KiB, MEM32 0x17700000, MEM64 0x40_0000_0000 each
    assert ("ranges = <0x1000000 0x00 0x00 0x00 0x3eff0000 0x00 0x8000 0x2000000 0x00 0x10000000 0x00 "
            "0x10000000 0x00 0x17700000 0x3000000 0x80 0x00 0x80 0x00 0x40 0x00>;") in main
    assert ("ranges = <0x1000000 0x00 0x8000 0x00 0x3eff8000 0x00 0x8000 0x2000000 0x00 0x27700000 0x00 "
            "0x27700000 0x00 0x17700000 0x3000000 0xc0 0x00 0xc0 0x00 0x40 0x00>;") in pxb
    for prop in ("interrupt-map-mask", "msi-map", "dma-coherent", "compatible", "device_type"):
        assert prop in pxb


ROUTE2 = TWO.with_name("two-smmus-built.toml")


@needs_dtc
def test_route2_nodes_name_their_pci_function():
    nodes = smmu_nodes_for(load_config(ROUTE2))
    assert [(n.disabled, n.pci_function) for n in nodes] == [(True, (0, 0, 0x08)), (True, (0, 0, 0x18))]
    back = dtb_to_dts(dts_to_dtb(add_smmus(VIRT_DTS, nodes, root_complexes(load_config(ROUTE2)))))
    assert "viommu,pci-function = <0x00 0x00 0x08>;" in back and "viommu,pci-function = <0x00 0x00 0x18>;" in back
    assert all(n.pci_function is None for n in smmu_nodes_for(load_config(TWO)))  # route 1: no need


@needs_dtc
def test_one_root_complex_dt_is_unchanged():
    c = load_config(CONFIGS / "default.toml")
    (node,) = smmu_nodes_for(c)
    assert add_smmus(VIRT_DTS, [node], root_complexes(c)) == add_smmus(VIRT_DTS, [node], [])
    assert "bus-range = <0x00 0xff>;" in dtb_to_dts(dts_to_dtb(add_smmus(VIRT_DTS, [node], [])))


def _registries() -> dict[str, QmpCommandRegistry]:
    out = {}
    for name in ("a", "b"):
        r = out[name] = QmpCommandRegistry()
        r.register("query-x", lambda args, name=name: {"smmu": name, **args}, {"*n": "int"})
    return out


async def test_qmp_commands_select_the_smmu():
    top = QmpCommandRegistry()
    register_smmu_commands(top, _registries(), lambda: [{"name": "a"}, {"name": "b"}])
    assert await top.dispatch("query-x", {"smmu": "b", "n": 3}) == {"smmu": "b", "n": 3}
    assert await top.dispatch("query-viommu-smmus", {}) == [{"name": "a"}, {"name": "b"}]
    with pytest.raises(QmpError, match="Parameter 'smmu' is missing .*a, b"):
        await top.dispatch("query-x", {})
    with pytest.raises(QmpError, match="no SMMU 'c'"):
        await top.dispatch("query-x", {"smmu": "c"})
    with pytest.raises(QmpError, match="'n'"):
        await top.dispatch("query-x", {"smmu": "a", "n": "x"})


async def test_qmp_one_smmu_needs_no_argument():
    top = QmpCommandRegistry()
    regs = _registries()
    register_smmu_commands(top, {"a": regs["a"]}, lambda: [{"name": "a"}])
    assert await top.dispatch("query-x", {}) == {"smmu": "a"}
    assert await top.dispatch("query-x", {"smmu": "a"}) == {"smmu": "a"}


def test_boot_summary_shows_and_judges_each_smmu():
    from viommu_backend.guest.boot import BootSummary, GuestError, backend_failure

    def view(nbytes: int, sink: int = 0) -> dict:
        return {"viommu": {"counters": {"sink_errors": sink}, "translation": {"bytes_read": nbytes}}}

    s = BootSummary()
    s.backend = {"errors": {"count": 0}, "viommu": view(4096)["viommu"],
                 "smmus": {"smmu0": view(4096), "smmu1": view(8192)}}
    lines = s.backend_lines()
    assert lines[0].startswith("  iommu smmu0: 4096 bytes") and any(
        line.startswith("  iommu smmu1: 8192 bytes") for line in lines)
    backend_failure(s)  # clean
    s.backend["smmus"]["smmu1"] = view(8192, sink=1)  # the second SMMU's failure counts too
    with pytest.raises(GuestError, match="1 command sink error"):
        backend_failure(s)


def test_socket_path_convention_needs_a_function_name_with_several_smmus():
    from viommu_backend.cli import _served_function

    c = load_config(TWO)
    with pytest.raises(ConfigError, match="name it with --function"):
        _served_function(c, None)
    assert _served_function(c, "smmu1") == "smmu1"
