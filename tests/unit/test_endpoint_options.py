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
