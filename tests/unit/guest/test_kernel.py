"""Kernels built from source: config keys, fragments, cache keys (no build here; the
build itself runs in tests/e2e/test_built_kernel.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from viommu_backend.config import DEBIAN_SOURCES, ConfigError, loads_config
from viommu_backend.guest import kernel as kmod
from viommu_backend.guest.toolroot import SetupError
from tests.support import REPO

FN = '[[function]]\nname = "viommu"\nkind = "smmuv3"\nslot = 1\n'


def test_build_key_selects_a_debian_source() -> None:
    c = loads_config('[kernel]\nbuild = "6.12"\n' + FN)
    assert c.kernel.build == "6.12" and c.kernel.built and c.kernel.image is None
    assert DEBIAN_SOURCES["6.12"] == "trixie"
    assert not loads_config(FN).kernel.built


@pytest.mark.parametrize("kernel,msg", [
    ('build = "5.10"', "build: must be one of"),
    ('build = "6.12"\nimage = "/x/Image"', "at most one of"),
    ('source = "/x/linux"\nbuild = "6.12"', "at most one of"),
    ('fragments = ["a.config"]', "only for kernels built from source"),
    ('build = "6.12"\nfragments = [1]', "list of file names"),
])
def test_bad_kernel_tables_are_refused(kernel: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        loads_config(f"[kernel]\n{kernel}\n" + FN)


def test_fragments_and_source_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "extra.config").write_text("CONFIG_DEBUG_FS=y\n")
    cfg = tmp_path / "m.toml"
    cfg.write_text('[kernel]\nsource = "linux"\nfragments = ["extra.config"]\n' + FN)
    from viommu_backend.config import load_config
    k = load_config(cfg).kernel
    assert k.source == tmp_path / "linux"
    assert k.fragments == (tmp_path / "extra.config",)


def test_project_fragment_asks_for_what_the_workloads_need() -> None:
    frag = kmod.parse_fragment((REPO / "guest_images/kernel/viommu.config").read_text())
    for opt in ("CONFIG_ARM_SMMU_V3", "CONFIG_ARM_SMMU_V3_SVA", "CONFIG_IOMMUFD", "CONFIG_VFIO_PCI",
                "CONFIG_VFIO_DEVICE_CDEV", "CONFIG_PCI_ATS", "CONFIG_PCI_PRI", "CONFIG_PCI_PASID",
                "CONFIG_VIRTIO_BLK", "CONFIG_HOTPLUG_PCI_PCIE", "CONFIG_ARM_GIC_V3_ITS",
                "CONFIG_SERIAL_AMBA_PL011_CONSOLE", "CONFIG_BLK_DEV_INITRD", "CONFIG_MODULES",
                "CONFIG_DEBUG_FS"):
        assert frag.get(opt) == "y", opt
    for opt, val in kmod.REQUIRED.items():
        assert frag.get(opt) == val, opt


def test_parse_fragment_and_mismatches() -> None:
    got = kmod.parse_fragment('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\nnoise\n')
    assert got == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "x y"}
    assert kmod.config_mismatches({"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_D": "n"}, got) \
        == {"CONFIG_B": "y/n"}


def test_kernel_key_follows_the_fragments(tmp_path: Path) -> None:
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_DEBUG_FS=y\n")
    base = loads_config('[kernel]\nbuild = "6.12"\n' + FN).kernel
    with_frag = loads_config(f'[kernel]\nbuild = "6.12"\nfragments = ["{frag}"]\n' + FN).kernel
    k1, k2 = kmod.kernel_key(base), kmod.kernel_key(with_frag)
    assert k1 == kmod.kernel_key(base) and k1 != k2
    frag.write_text("CONFIG_DEBUG_FS=n\n")
    assert kmod.kernel_key(with_frag) != k2
    other = loads_config('[kernel]\nbuild = "7.3"\n' + FN).kernel
    assert kmod.kernel_key(other) != k1


def test_kernel_key_of_a_tree_follows_head_and_uncommitted_changes(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    tree.mkdir()
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tree / "Makefile").write_text("a\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    k = loads_config(f'[kernel]\nsource = "{tree}"\n' + FN).kernel
    k1 = kmod.kernel_key(k)
    (tree / "Makefile").write_text("b\n")
    k2 = kmod.kernel_key(k)
    subprocess.run([*git, "commit", "-qam", "two"], check=True)
    k3 = kmod.kernel_key(k)
    assert len({k1, k2, k3}) == 3


def test_no_key_for_a_packaged_kernel() -> None:
    with pytest.raises(SetupError):
        kmod.kernel_key(loads_config(FN).kernel)


def test_missing_fragment_is_a_setup_error(tmp_path: Path) -> None:
    k = loads_config(f'[kernel]\nbuild = "6.12"\nfragments = ["{tmp_path}/nope.config"]\n' + FN).kernel
    with pytest.raises(SetupError, match="not found"):
        kmod.fragments(k)


def test_guest_extras_refuse_a_folder_the_tool_root_cannot_see(tmp_path: Path) -> None:
    kb = kmod.KernelBuild(tmp_path / "k", tmp_path / "src", {"kernel_release": "6.12.0"})
    with pytest.raises(SetupError, match="must be built under"):
        kmod.build_guest_extras(kb, tmp_path / "elsewhere", root=None, progress=print,  # type: ignore[arg-type]
                                cache=tmp_path / "cache")


@pytest.mark.parametrize("text,msg", [
    ('[iommu]\nroute = "overlay"\n', "route: must be one of"),
    ('[iommu]\nroute = "module"\n[guest]\nmodules = ["viommu_smmu"]\n', "needs a kernel built from source"),
    ('[kernel]\nbuild = "6.12"\n[iommu]\nroute = "module"\n', "needs a kernel built from source"),
])
def test_route_2_needs_a_built_kernel_and_its_module(text: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        loads_config(text + FN)


def test_shipped_built_kernel_config_uses_route_2() -> None:
    from viommu_backend.config import load_config
    c = load_config(REPO / "qemu_configs/built-6.12.toml")
    assert c.iommu.route == "module" and "viommu_smmu" in c.guest.modules and c.kernel.build == "6.12"


def test_expected_kernel_messages_are_regexes() -> None:
    c = loads_config('[guest]\nexpect_kmsg = ["smmuv3: event 0x10", "a+b"]\n' + FN)
    assert c.guest.expect_kmsg == ("smmuv3: event 0x10", "a+b")
    with pytest.raises(ConfigError, match="bad regex"):
        loads_config('[guest]\nexpect_kmsg = ["(unclosed"]\n' + FN)
    with pytest.raises(ConfigError, match="list of regexes"):
        loads_config('[guest]\nexpect_kmsg = [1]\n' + FN)
