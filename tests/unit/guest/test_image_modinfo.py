"""Module dependencies from .modinfo when the tree has no modules.dep (Debian packages)."""

import lzma

import pytest

from viommu_backend.guest.image import module_closure, modinfo_depends
from viommu_backend.guest.toolroot import SetupError


def ko(depends: str) -> bytes:
    return b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0"


def test_modinfo_closure_without_modules_dep(tmp_path):
    d = tmp_path / "kernel/drivers"
    d.mkdir(parents=True)
    (d / "virtio_blk.ko.xz").write_bytes(lzma.compress(ko("virtio_ring,crc-x")))
    (d / "virtio_ring.ko.xz").write_bytes(lzma.compress(ko("")))
    (d / "crc-x.ko").write_bytes(ko("virtio_ring"))
    assert modinfo_depends(ko("a,b")) == ["a", "b"] and modinfo_depends(ko("")) == []
    assert module_closure(tmp_path, ["virtio_blk"]) == [
        "kernel/drivers/virtio_ring.ko.xz", "kernel/drivers/crc-x.ko", "kernel/drivers/virtio_blk.ko.xz"]
    with pytest.raises(SetupError, match="not found"):
        module_closure(tmp_path, ["nope"])
