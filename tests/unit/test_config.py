"""Config files: the embedded default, validation errors, sizes and topology rules."""


import pytest

from viommu_backend.config import (
    ConfigError,
    default_config_text,
    load_config,
    load_default,
    loads_config,
    parse_size,
    smmu_config,
    sva_blockers,
)
from tests.support import REPO

MIN = '[[function]]\nname = "ep0"\nkind = "testdev"\nslot = 1\n'


def test_default_is_embedded_and_matches_repo_copy():
    assert default_config_text() == (REPO / "qemu_configs/default.toml").read_text()
    c = load_default()
    assert c.machine.memory == 1 << 30
    assert c.iommu_function() is not None and c.iommu_function().name == "viommu"
    assert c.iommu_function().slot == 1
    assert [f.name for f in c.hotplug_functions()] == ["blk0"]
    assert c.function("blk0").port == "rp0" and c.function("blk0").kind == "virtio-blk"
    assert c.kernel.suite == "trixie" and c.kernel.flavour == "cloud-arm64"


def test_minimal_config_defaults():
    c = loads_config(MIN)
    assert c.machine.cpus == 2 and c.machine.memory == 1 << 30
    assert c.guest.workload == "enumerate"
    assert c.boot_functions()[0].socket_name == "ep0.sock"
    assert c.iommu_function() is None


@pytest.mark.parametrize("text,size", [("1G", 1 << 30), ("512M", 512 << 20), ("128K", 128 << 10),
                                       ("2GiB", 2 << 30), ("4096", 4096)])
def test_parse_size(text, size):
    assert parse_size(text, "x") == size


@pytest.mark.parametrize("bad", ["", "1X", "-1G", "G", True, 0, 1.5])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError, match="x"):
        parse_size(bad, "x")


@pytest.mark.parametrize(
    "text,msg",
    [
        ("[machine\n", "invalid TOML"),
        ("[machine]\nmemory = \"100M\"\n", ">= 128M"),
        ("[machine]\ncpus = 0\n", "cpus"),
        ("[machine]\nbogus = 1\n", "unknown key"),
        ("[kernel]\nsuite = \"buster\"\n", "suite"),
        ("[kernel]\nmodules = \"m\"\n", "needs 'image'"),
        ("[guest]\nworkload = \"rm -rf\"\n", "workload"),
        ("[[function]]\nname = \"a\"\nkind = \"gpu\"\nslot = 1\n", "kind"),
        ("[[function]]\nname = \"a\"\nkind = \"testdev\"\n", "exactly one of 'slot'"),
        ("[[function]]\nname = \"a\"\nkind = \"testdev\"\nslot = 40\n", "slot must be 1..31"),
        ("[[function]]\nname = \"A b\"\nkind = \"testdev\"\nslot = 1\n", "bad name"),
        ("[[function]]\nname = \"a\"\nkind = \"testdev\"\nslot = 1\nhotplug = true\n", "hotplug needs"),
        (MIN + MIN, "used twice"),
        (MIN + '[[function]]\nname = "b"\nkind = "testdev"\nslot = 1\n', "slot 1 used by both"),
        ('[[function]]\nname = "a"\nkind = "testdev"\nport = "rp9"\n', "unknown root port"),
        ('[[function]]\nname = "v"\nkind = "smmuv3"\nport = "rp0"\n[[root_port]]\nname = "rp0"\nslot = 2\n',
         "must sit on bus 0"),
        ('[[function]]\nname = "v"\nkind = "smmuv3"\nslot = 1\n[[function]]\nname = "w"\nkind = "smmuv3"\nslot = 2\n',
         "translated by both"),
        ('[[root_port]]\nname = "a"\nslot = 2\nchassis = 1\n[[root_port]]\nname = "b"\nslot = 3\nchassis = 1\n',
         "chassis"),
        ("[machine]\ncpus = \"two\"\n", r"cpus: expected int"),
        ("[machine]\ncpu = \"cortex-a8\"\n", r"cpu: must be one of .*neoverse-n1"),
        ("[iommu]\ndevice_tree = 1\n", "expected bool"),
    ],
)
def test_bad_configs_give_clear_errors(text, msg):
    with pytest.raises(ConfigError, match=msg):
        loads_config(text, "bad.toml")


def test_load_config_names_the_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[machine]\ncpus = 99\n")
    with pytest.raises(ConfigError, match=str(p)):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_user_kernel_paths_are_relative_to_the_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[kernel]\nimage = "k/Image"\nmodules = "k/modules"\n' + MIN)
    c = load_config(p)
    assert c.kernel.image == tmp_path / "k/Image"
    assert c.kernel.modules == tmp_path / "k/modules"


MF = ('[[root_port]]\nname = "rp0"\nslot = 2\n'
      '[[function]]\nname = "e0"\nkind = "testdev"\nport = "rp0"\n'
      '[[function]]\nname = "e1"\nkind = "testdev"\nport = "rp0"\nfunc = 1\n')


def test_multi_function_device_behind_a_root_port():
    from viommu_backend.topology import placements

    c = loads_config(MF)
    assert [(f.name, f.func, f.multifunction) for f in c.functions] == [("e0", 0, True), ("e1", 1, True)]
    p = placements(c)
    assert (p["e0"].stream_id, p["e1"].stream_id) == (0x100, 0x101)
    assert p["e1"].bdf == "0000:01:00.1"
    alone = loads_config(MF.split('[[function]]\nname = "e1"')[0])
    assert alone.function("e0").multifunction is False
    bus0 = loads_config('[[function]]\nname = "a"\nkind = "testdev"\nslot = 3\n'
                        '[[function]]\nname = "b"\nkind = "testdev"\nslot = 3\nfunc = 2\n')
    assert placements(bus0)["b"].stream_id == (3 << 3 | 2) and bus0.function("a").multifunction


@pytest.mark.parametrize(
    "text, msg",
    [
        (MF.replace("func = 1", "func = 0"), "used by both 'e0' and 'e1'"),
        (MF.replace('port = "rp0"\n[[function]]', 'port = "rp0"\nfunc = 2\n[[function]]'), "no function 0"),
        (MF.replace("func = 1", "func = 8"), r"func \(e1\): a PCI function number is 0..7"),
        (MF.replace('port = "rp0"\nfunc = 1', 'port = "rp0"\nfunc = 1\nhotplug = true'), "cannot be hot-plugged"),
        ('[[function]]\nname = "v"\nkind = "smmuv3"\nslot = 1\n'
         '[[function]]\nname = "x"\nkind = "testdev"\nslot = 1\nfunc = 1\n', "must be alone in its slot"),
    ],
)
def test_multi_function_errors(text, msg):
    with pytest.raises(ConfigError, match=msg):
        loads_config(text, "bad.toml")


SMMU = '[[function]]\nname = "viommu"\nkind = "smmuv3"\nslot = 1\n'


def test_sva_blockers_pair_the_cpu_pa_range_with_the_smmu_oas():
    """Linux 6.12 arm_smmu_sva_supported(): SMMU OAS >= the CPU's PA range (max: 52
    bits), 16-bit ASIDs, coherency, 4K granule."""
    c = loads_config(SMMU)
    assert c.machine.cpu == "max"
    (why,) = sva_blockers(c)
    assert "OAS 48 bits < the PA range of cpu max (52 bits)" in why
    assert sva_blockers(loads_config('[machine]\ncpu = "neoverse-n1"\n' + SMMU)) == []
    assert sva_blockers(loads_config(SMMU + "options = { oas_bits = 52 }\n")) == []
    bad = loads_config('[machine]\ncpu = "neoverse-n1"\n[iommu]\ndma_coherent = false\n'
                       + SMMU + "options = { asid16 = false }\n")
    assert len(sva_blockers(bad)) == 2
    assert sva_blockers(loads_config('[[function]]\nname = "t"\nkind = "testdev"\nslot = 2\n'))


@pytest.mark.parametrize(
    "options,msg",
    [
        ("{ bogus = 1 }", r"bad.toml: function v: bad SMMU option: unknown SMMU config keys: \['bogus'\]"),
        ("{ oas_bits = 47 }", r"function v: bad SMMU option: oas_bits 47 not one of"),
        ("{ stall_model = 3 }", r"function v: bad SMMU option: stall_model must be 0, 1 or 2"),
        ("{ cmdqs = 20 }", r"function v: bad SMMU option: cmdqs must be 0..19"),
    ],
)
def test_bad_smmu_options_are_config_errors_at_load(options, msg):
    """The SMMU options of a smmuv3 function are checked when the file is read, not when
    the server builds the SMMU: a config that loads is one the server accepts."""
    text = '[[function]]\nname = "v"\nkind = "smmuv3"\nslot = 1\noptions = ' + options + "\n"
    with pytest.raises(ConfigError, match=msg):
        loads_config(text, "bad.toml")


def test_smmu_config_leaves_the_function_keys_out_and_takes_overrides():
    c = loads_config('[[function]]\nname = "v"\nkind = "smmuv3"\nslot = 1\n'
                     'options = { stream_id = 3, bar0_size = "128K", s1p = false, oas_bits = 52 }\n')
    smmu = smmu_config(c.function("v"))
    assert (smmu.s1p, smmu.s2p, smmu.oas_bits) == (False, True, 52)
    assert smmu_config(c.function("v"), s2p=False).s2p is False
