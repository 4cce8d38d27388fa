"""Fixtures of the endpoint unit tests: an SMMU environment and a test device in it."""

from __future__ import annotations

from typing import Iterator

import pytest

from viommu_backend.endpoints.testdev import TestDevice

from tests.support.endpoint_env import SmmuEnv, bus_master


@pytest.fixture
def env() -> Iterator[SmmuEnv]:
    e = SmmuEnv()
    yield e
    e.close()


@pytest.fixture
def fn(env: SmmuEnv) -> TestDevice:
    """A test device connected to ``env``'s guest memory, bus mastering on."""
    d = TestDevice()
    d.connected(env.ctx)
    bus_master(d)
    return d
