"""A user's own kernel ([kernel] image = ...) boots against the backend and its stock
arm-smmu-v3 driver brings the SMMU up, just as with the Debian kernel the recipe fetches."""

from __future__ import annotations

import json
import shutil

import pytest

from viommu_backend.config import load_default, loads_config
from viommu_backend.guest.boot import run_boot
from viommu_backend.guest.image import cached_image
from viommu_backend.guest.toolroot import cache_dir

from tests.support.guest import leftover_processes

pytestmark = pytest.mark.e2e


async def test_user_supplied_kernel_image(guest_ready, tmp_path) -> None:  # noqa: F811
    default = load_default()
    debian = cached_image(default.kernel, default.guest.modules)
    assert debian is not None
    # A stable copy (same path, size and mtime every run) so the image built from it is
    # cached like any other recipe instead of being rebuilt per test run.
    user_dir = cache_dir() / "test-user-kernel"
    user_dir.mkdir(parents=True, exist_ok=True)
    image = user_dir / "Image"
    if not image.exists() or image.stat().st_size != debian.kernel.stat().st_size:
        shutil.copy2(debian.kernel, image)

    config = loads_config(f"""
[kernel]
image = "{image}"

[guest]
workload = "enumerate,smmu"
timeout = 180

[[function]]
name = "viommu"
kind = "smmuv3"
slot = 1
""")
    lines: list[str] = []
    s = await run_boot(config, progress=lines.append, workdir=tmp_path)
    assert leftover_processes(tmp_path) == []
    assert s.ok, "\n".join(lines)

    built = cached_image(config.kernel)
    assert built is not None
    assert built.manifest["kernel_source"] == f"user {image}"
    assert built.manifest["kernel_version"] == debian.manifest["kernel_version"]

    smmu = s.marks("smmu")
    assert smmu and smmu[0]["probed"] is True, json.dumps(smmu)
    assert smmu[0]["node"] == "8000000000.smmuv3"  # a lone 64-bit BAR0 at 00:01.0
    assert s.kernel.startswith(debian.manifest["kernel_version"])
