"""Fixtures of the integration tests (the real server on a socket)."""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest

from tests.support.viommu_rig import smmu_rig


@pytest.fixture
async def env(tmp_path) -> AsyncIterator[dict[str, Any]]:
    async with smmu_rig(tmp_path, client_name="inject-test", data=b"guest data 0123!") as rig:
        yield rig
