"""Guest image pieces that run without downloads: cpio writer, kconfig checks, modules."""

import gzip
import lzma
import os
import shutil
import subprocess

import pytest

from viommu_backend.guest.image import (
    CpioWriter,
    check_kconfig,
    decompress_kernel,
    load_ko,
    module_closure,
    parse_kconfig,
)
from viommu_backend.guest.toolroot import SetupError


def test_cpio_newc_is_readable_by_cpio(tmp_path):
    w = CpioWriter()
    w.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    w.file("lib/modules/6.12/a.ko", b"\x7fELF" + b"x" * 5)
    data = w.finish()
    assert len(data) % 512 == 0
    if shutil.which("cpio") is None:  # scripts/setup installs it: missing only by hand
        if os.environ.get("CI") == "true":
            pytest.fail("cpio missing under CI: scripts/setup should have installed it")
        pytest.skip("cpio missing (scripts/setup installs it)")
    out = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True, check=True)
    names = out.stdout.decode().split()
    assert names == ["init", "lib", "lib/modules", "lib/modules/6.12", "lib/modules/6.12/a.ko"]
    subprocess.run(["cpio", "-id", "--quiet"], input=data, cwd=tmp_path, check=True)
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "init").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "lib/modules/6.12/a.ko").read_bytes() == b"\x7fELFxxxxx"
    with pytest.raises(ValueError, match="duplicate"):
        w.file("init", b"")


def test_kconfig_checks():
    cfg = parse_kconfig("CONFIG_ARM_SMMU_V3=y\n# CONFIG_OF_OVERLAY is not set\nCONFIG_PCI_HOST_GENERIC=y\n"
                        'CONFIG_LOCALVERSION="x"\n')
    assert cfg["CONFIG_OF_OVERLAY"] == "n" and cfg["CONFIG_LOCALVERSION"] == "x"
    rec = check_kconfig(cfg)
    assert rec["CONFIG_ARM_SMMU_V3"] == "y" and rec["CONFIG_OF_OVERLAY"] == "n" and rec["CONFIG_IOMMUFD"] == "n"
    with pytest.raises(SetupError, match="CONFIG_ARM_SMMU_V3=m"):
        check_kconfig(dict(cfg, CONFIG_ARM_SMMU_V3="m"))


def test_kernel_image_checks():
    img = bytearray(0x40)
    img[0x38:0x3C] = b"ARM\x64"
    assert decompress_kernel(bytes(img)) == bytes(img)
    assert decompress_kernel(gzip.compress(bytes(img))) == bytes(img)
    with pytest.raises(SetupError, match="not an arm64 Image"):
        decompress_kernel(b"\0" * 0x40)


def test_module_closure_and_decompression(tmp_path):
    (tmp_path / "kernel").mkdir()
    (tmp_path / "modules.dep").write_text(
        "kernel/a.ko.xz: kernel/b.ko.xz kernel/c-d.ko.xz\nkernel/b.ko.xz: kernel/c-d.ko.xz\nkernel/c-d.ko.xz:\n")
    assert module_closure(tmp_path, ["a"]) == ["kernel/c-d.ko.xz", "kernel/b.ko.xz", "kernel/a.ko.xz"]
    assert module_closure(tmp_path, ["c_d", "b"]) == ["kernel/c-d.ko.xz", "kernel/b.ko.xz"]
    with pytest.raises(SetupError, match="not found"):
        module_closure(tmp_path, ["zz"])
    (tmp_path / "kernel/b.ko.xz").write_bytes(lzma.compress(b"ELFDATA"))
    assert load_ko(tmp_path / "kernel/b.ko.xz") == b"ELFDATA"
