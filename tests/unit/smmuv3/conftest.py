"""Fixtures of the SMMUv3 model tests."""

from __future__ import annotations

import pytest

from viommu_backend.smmuv3.smmu_config import REGISTER_MODES


@pytest.fixture(params=REGISTER_MODES)
def registers(request) -> str:
    """How the driver reaches BAR0: trapped accesses, or the shared-memory page."""
    return request.param
