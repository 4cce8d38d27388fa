"""Guest kernels built from source (Debian's linux-source-6.12, and a user's tree, with the
project's fragment) boot against the backend and run the default workload, data verified.

The first run builds each kernel (about 3 minutes on two cores; scripts/test's set-up
builds the 6.12 one before the tests start); later runs take them from the cache.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from viommu_backend.config import load_config, loads_config
from viommu_backend.guest.image import cached_image
from viommu_backend.guest.kernel import cached_kernel, debian_source
from viommu_backend.guest.toolroot import ToolRoot, cache_dir

from tests.support.guest import boot
from tests.support import CONFIGS

pytestmark = pytest.mark.e2e
CONFIG = CONFIGS / "built-6.12.toml"


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
    # route 2: the module enabled the function before the driver ever looked at it, so
    # the boot-time probe of an undecoded BAR (all-ones IDR0) never happens
    assert [m["ok"] for m in s.marks("module")] == [True], s.marks("module")
    texts = [k["text"] for k in s.marks("kmsg")]
    assert any("handed to arm-smmu-v3" in t for t in texts), texts
    assert not any("TT endianness" in t for t in texts), texts
    assert not [k for k in s.marks("kmsg") if k["level"] <= 3], s.marks("kmsg")  # no errors at all
    blk = s.marks("blk-io")
    assert [b["bs"] for b in blk] == [4096, 65536, 1048576]
    assert all(b["match"] for b in blk), blk
    dev = s.marks("blk-dev")[0]
    assert dev["iommu_group"] and dev["domain_type"] == "DMA", dev
    assert s.marks("unplug")[0]["blk_gone"] is True


async def test_a_users_tree_builds_and_boots(guest_ready, tmp_path) -> None:  # noqa: F811
    """``[kernel] source = TREE``: a Linux tree of the user's (here Debian's unpacked
    linux-source-7.3, the newest packaged source) is built out of tree with the project's
    fragment and runs the default workload."""
    cache = cache_dir()
    tree, _ = await asyncio.to_thread(debian_source, "7.3", cache, ToolRoot(cache), print)
    text = CONFIG.read_text().replace('build = "6.12"', f'source = "{tree}"')  # (route 2 too)
    config = loads_config(text)
    assert config.kernel.source == tree
    s = await boot(config, tmp_path)

    kb = cached_kernel(config.kernel)
    assert kb is not None and kb.src == tree
    assert kb.manifest["source"] == f"tree {tree}"
    assert kb.manifest["source_version"].startswith("mtime ")  # not a git tree
    assert re.fullmatch(r"7\.3\.\d+", kb.manifest["kernel_release"]), kb.manifest["kernel_release"]
    assert not (tree / ".config").exists()  # built out of tree: the user's tree stays clean
    assert s.kernel.startswith(kb.manifest["kernel_release"])
    assert s.marks("smmu")[0]["probed"] is True
    blk = s.marks("blk-io")
    assert len(blk) == 3 and all(b["match"] for b in blk), blk
