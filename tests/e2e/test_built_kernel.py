"""A guest kernel built from source (Debian's linux-source-6.12 + the project's fragment)
boots against the backend and runs the default workload with data verified.

The first run builds the kernel (about 5 minutes on two cores; scripts/test's set-up does
it before the tests start); later runs take it from the cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from viommu_backend.config import load_config
from viommu_backend.guest.image import cached_image
from viommu_backend.guest.kernel import cached_kernel

from test_guest_boot import boot, guest_ready  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e
CONFIG = Path(__file__).resolve().parents[2] / "qemu_configs" / "built-6.12.toml"


async def test_built_kernel_runs_the_default_workload(guest_ready, tmp_path) -> None:  # noqa: F811
    config = load_config(CONFIG)
    s = await boot(config, tmp_path)

    kb = cached_kernel(config.kernel)
    assert kb is not None, "run_boot built the kernel, so it must be cached now"
    m = kb.manifest
    assert m["source"] == "debian linux-source-6.12"
    assert re.fullmatch(r"6\.12\.\d+-\d+", m["source_version"]), m["source_version"]
    assert m["compiler"].startswith("aarch64-linux-gnu-gcc")
    assert "viommu.config" in m["fragments"]
    assert m["config_mismatches"] == {}, m["config_mismatches"]
    image = cached_image(config.kernel, config.guest.modules)
    assert image is not None
    cfg = image.manifest["config"]  # recorded from the built .config
    for opt in ("CONFIG_IOMMUFD", "CONFIG_ARM_SMMU_V3_SVA", "CONFIG_VFIO_DEVICE_CDEV", "CONFIG_PCI_PRI",
                "CONFIG_PCI_PASID"):
        assert cfg[opt] == "y", opt
    assert s.kernel.startswith(m["kernel_release"])

    smmu = s.marks("smmu")
    assert smmu and smmu[0]["probed"] is True, json.dumps(smmu)
    blk = s.marks("blk-io")
    assert [b["bs"] for b in blk] == [4096, 65536, 1048576]
    assert all(b["match"] for b in blk), blk
    dev = s.marks("blk-dev")[0]
    assert dev["iommu_group"] and dev["domain_type"] == "DMA", dev
    assert s.marks("unplug")[0]["blk_gone"] is True
