"""Fixtures of the guest end-to-end tests."""

from __future__ import annotations

import pytest

from viommu_backend.config import load_default
from viommu_backend.guest.image import cached_image
from viommu_backend.guest.toolroot import SetupError, find_qemu

from tests.support.guest import require


@pytest.fixture(scope="module")
def guest_ready() -> None:
    try:
        find_qemu(install=False)
    except SetupError as e:
        require(False, f"no QEMU >= 10.1: {e}")
    default = load_default()  # scripts/setup builds the default config's image; others are
    # built on demand by run_boot (ensure_guest_tools), from the same cached packages
    require(cached_image(default.kernel, default.guest.modules) is not None,
            "guest image not built: run scripts/setup")
