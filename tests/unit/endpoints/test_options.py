"""Endpoint options of the config file, as the backend builds the functions."""

from __future__ import annotations

from viommu_backend.app import ENDPOINT_BUILDERS
from viommu_backend.config import FunctionConfig
from viommu_backend.endpoints.virtio.pci import VirtioFeature


def blk(**options):
    return ENDPOINT_BUILDERS["virtio-blk"](FunctionConfig("b", "virtio-blk", options=options))


def test_virtio_blk_options():
    indirect = 1 << VirtioFeature.RING_INDIRECT_DESC
    d = blk(size="1M")
    assert d.device_features & indirect and d.msix is not None and d.ats is None
    d = blk(size="1M", indirect=False, msix=False, ats=True)
    assert not d.device_features & indirect and d.msix is None
    assert d.ats is not None and not d.ats.enabled  # offered; the driver enables it
    assert d.device_features & (1 << VirtioFeature.RING_EVENT_IDX)


def test_testdev_options():
    from viommu_backend.pci.capabilities import ExtCapId

    def ext_caps(**options):
        d = ENDPOINT_BUILDERS["testdev"](FunctionConfig("t", "testdev", options=options))
        return [cid for cid, *_ in d.cfg.ext_caps()], d

    caps, d = ext_caps()
    assert ExtCapId.PASID in caps and d.pasid is not None
    caps, d = ext_caps(pasid=False)
    assert ExtCapId.PASID not in caps and d.pasid is None and ExtCapId.PRI in caps
