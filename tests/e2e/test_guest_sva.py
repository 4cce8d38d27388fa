"""SVA, kernel PASID domains, I/O page faults and access/dirty state, driven by the stock
arm-smmu-v3 driver of kernels built from Debian's linux-source-6.12 and -7.3
(ARM_SMMU_V3_SVA, IOMMU_IOPF), with the DMA engine's guest driver
(guest_images/modules/viommu_dma) and the test program viommu_dma_test: one boot of
qemu_configs/sva.toml and one of sva-7.3.toml, one test per check.

Each test asserts the guest's own result line and the backend counters (over QMP,
``query-viommu`` at the end of the run) that prove the path ran in the SMMU model.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from viommu_backend.config import load_config
from viommu_backend.endpoints import testdev
from viommu_backend.guest.boot import BootSummary, run_boot

from tests.support.guest import leftover_processes
from tests.support import CONFIGS

pytestmark = pytest.mark.e2e
F_TRANSLATION = 0x10  # SMMUv3 event type
ERR_TRANSLATION = 4  # the engine's ERR_CODE for an IOMMU refusal
ARM_SMMU_FEAT_SVA = 1 << 17  # drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.h (6.12 and 7.3)


@pytest.fixture(scope="module", params=["sva.toml", "sva-7.3.toml"])
def run(request, guest_ready, tmp_path_factory) -> BootSummary:  # noqa: F811
    tmp = tmp_path_factory.mktemp("sva")
    log: list[str] = []
    config = load_config(CONFIGS / request.param)
    s = asyncio.run(run_boot(config, progress=log.append, workdir=tmp / "run"))
    assert leftover_processes(tmp / "run") == []
    console = s.console_log.read_text()[-4000:] if s.console_log and s.console_log.exists() else ""
    assert s.ok, "\n".join(log) + f"\nconsole:\n{console}"
    return s


def check(s: BootSummary, name: str) -> dict[str, Any]:
    [line] = s.marks(name)
    return line


def counters(s: BootSummary) -> tuple[dict[str, Any], dict[str, Any]]:
    assert s.backend is not None, s.backend_error
    v = s.backend["viommu"]
    return v["counters"], v["translation"]


def test_the_driver_enables_sva_on_this_smmu(run: BootSummary) -> None:
    texts = [k["text"] for k in run.marks("kmsg")]
    feats = [int(m[1], 16) for t in texts if (m := re.search(r"\(features 0x([0-9a-f]+)\)", t))]
    assert feats and feats[-1] & ARM_SMMU_FEAT_SVA, texts
    info = run.marks("viommu-dma")[0]
    assert info["ok"] and info["version"] == testdev.VERSION and info["pasid_bits"] == 20 and info["sva"], info


def test_dma_api_copies_through_the_default_domain(run: BootSummary) -> None:
    d = check(run, "dma-api")
    assert d["ok"], d
    assert [c["copy"]["len"] for c in d["copies"]] == [4096, 65536, 1048576, 65536]
    assert all(c["copy"]["rc"] == 0 and c["copy"]["mismatches"] == 0 for c in d["copies"]), d


def test_kernel_pasid_domains_are_isolated(run: BootSummary) -> None:
    p = check(run, "pasid")
    assert p["ok"], p
    assert p["pasids"] == [1, 1100]  # two CD leaf tables (1024 CDs each)
    for name in ("copy_a", "copy_b", "copy_pasid0"):
        assert p[name]["rc"] == 0 and p[name]["mismatches"] == 0, (name, p[name])
    for name in ("a_to_b_iova", "b_to_a_iova"):  # another domain's IOVA: translation fault
        assert p[name]["err_code"] == ERR_TRANSLATION and p[name]["event"] == F_TRANSLATION, p[name]
    assert p["after_detach"]["err_code"] == ERR_TRANSLATION, p["after_detach"]
    c, t = counters(run)
    assert c["cfgi_cd_ssids"] >= 4  # CDs of PASIDs 1 and 1100 written and cleared
    assert t["ssid_translations"] > 0


def test_sva_first_touch_faults_are_resolved_by_the_kernel(run: BootSummary) -> None:
    sv = check(run, "sva")
    assert sv["ok"], sv
    first = sv["first"]
    assert first["rc"] == 0 and sv["first_match"] and first["stalls"] >= 1, first
    bad = sv["unresolvable"]  # the kernel answered the stall with a failure: terminated
    assert bad["rc"] == -5 and bad["err_code"] == ERR_TRANSLATION and bad["event"] == F_TRANSLATION, bad
    assert sv["again"]["rc"] == 0 and sv["again_match"], sv["again"]
    c, t = counters(run)
    assert c["commands"].get("RESUME", 0) >= t["stalls"] > 0, (c["commands"], t)
    assert t["stall_retries"] > 0 and t["stall_aborts"] >= 3, t
    assert t["stalls_held"] == 0 and t["stall_terms"] == 0, t
    assert t["ssid_bytes_read"] + t["ssid_bytes_written"] > 64 * 1024, t
    assert c["events"].get("F_TRANSLATION", 0) >= 16  # every untouched page of the first copy


def test_access_and_dirty_state_as_the_cpu_sees_it(run: BootSummary) -> None:
    h = check(run, "httu")
    assert h["ok"], h
    assert h["access"]["referenced_kb_before"] == 0 and h["access"]["referenced_kb_after"] == 64, h
    assert h["dirty"]["dirty_kb_before"] == 0 and h["dirty"]["dirty_kb_after"] == 64, h
    c, _ = counters(run)
    if run.kernel.startswith("6.12."):
        # 6.12 does not set CD.HA/HD for SVA contexts: the access and dirty updates come
        # from the kernel resolving stalled Access / Permission faults
        assert h["access"]["copy"]["stalls"] >= 1 and h["dirty"]["copy"]["stalls"] >= 1, h
        assert c["events"].get("F_ACCESS", 0) >= 16 and c["events"].get("F_PERMISSION", 0) >= 16, c["events"]
    else:
        # 7.x sets CD.HA/HD (the SMMU has HTTU): the SMMU wrote AF and dirty state into the
        # process's page tables itself, without a single fault
        assert run.kernel.startswith("7.3.")
        assert h["access"]["copy"]["stalls"] == 0 and h["dirty"]["copy"]["stalls"] == 0, h
        assert "F_ACCESS" not in c["events"] and "F_PERMISSION" not in c["events"], c["events"]
