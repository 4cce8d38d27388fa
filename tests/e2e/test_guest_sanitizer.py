"""The driver sanitizer (SMMU option ``sanitize``) on a real guest with the stock
arm-smmu-v3 driver: the default workload runs clean with ``sanitize_fail`` (a violation
would be an error log line, failing the run); and an invalidation dropped by
``viommu-inject-drop-invalidation`` (as a driver that forgot it) is reported as the stale
TLB use it leads to; and VFIO type1's own test program, which DMAs into a range it
unmapped on purpose, is reported as the device's use after unmap, the driver clean.

Needs the set-up made by scripts/setup; skips without it except under CI=true (fails).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Awaitable, Callable

import pytest

from viommu_backend.config import default_config_text, loads_config
from viommu_backend.guest.boot import HostContext, run_boot
from viommu_backend.guest.qemu import Marker

from tests.support import CONFIGS
from tests.support.guest import boot, leftover_processes

pytestmark = pytest.mark.e2e
BLK_SID = 0x100  # blk0 behind rp0: bus 1, devfn 0

def sanitized(text: str, fail: bool) -> str:
    return text.replace('kind = "smmuv3"\nslot = 1\n', 'kind = "smmuv3"\nslot = 1\noptions = '
                        f'{{ sanitize = true, sanitize_fail = {str(fail).lower()} }}\n')


def test_default_workload_is_clean_under_the_sanitizer(guest_ready, tmp_path):  # noqa: F811
    text = sanitized(default_config_text(), fail=True)
    log: list[str] = []
    s = asyncio.run(run_boot(loads_config(text, "<test>"), progress=log.append,
                             workdir=tmp_path / "run"))
    assert leftover_processes(tmp_path / "run") == []
    assert s.ok, "\n".join(log)  # any violation is an error line: the run would fail
    san = s.backend["viommu"]["translation"]["sanitizer"]
    assert san["violations"]["stale-tlb"] == 0 and san["recent"] == [], san
    # the ordering / update / device rules: the stock driver is clean too
    assert not any(san["violations"].values()) and not any(san["device"].values()), san
    assert any("invalidations matching nothing live" in ln for ln in s.backend_lines())
    assert san["checks"] > 0, san  # the TLB hits of the workload's DMA were checked


def drop_then_dma(qmp: dict[str, Any]) -> Callable[[Marker, HostContext], Awaitable[str | None]]:
    """The host side.  At the first ``wait-host``: arm the drop of the next TLBI and let the
    guest write one page (its request's first unmap loses its invalidation; nothing maps
    the disk's buffers after a write-only io).  At the next: the endpoint reads 4 bytes at
    the IOVA of the dropped TLBI -- unmapped by the driver, still in the TLB -- then keep
    query-viommu in ``qmp`` and end."""
    async def on_marker(m: Marker, ctx: HostContext) -> str | None:
        if m.name == "wait-host" and "armed" not in qmp:
            qmp["armed"] = await ctx.execute("viommu-inject-drop-invalidation",
                                             {"command": "TLBI", "count": 1})
            return "io:4096:write"
        if m.name == "wait-host":
            [dropped] = (await ctx.execute("query-viommu"))["injected"]["dropped"]
            qmp["dropped"] = dropped
            qmp["dma"] = await ctx.execute("viommu-dma", {"device": "blk0", "size": 4,
                                                          "iova": dropped["fields"]["ADDR"]})
            qmp["final"] = await ctx.execute("query-viommu")
            return "end"
        return None
    return on_marker


def test_dropped_invalidation_is_reported_as_stale_use(guest_ready, tmp_path):  # noqa: F811
    """Deterministic: the stale entry is used by a DMA at exactly the IOVA whose TLBI was
    dropped, after the driver's unmap cleared its page-table entry."""
    text = re.sub(r'(?m)^workload = ".*"', 'workload = "smmu,hotplug,io,host"',
                  sanitized(default_config_text(), fail=False))
    qmp: dict[str, Any] = {}
    log: list[str] = []
    s = asyncio.run(run_boot(loads_config(text, "<test>"), progress=log.append,
                             workdir=tmp_path / "run", on_marker=drop_then_dma(qmp)))
    assert leftover_processes(tmp_path / "run") == []
    assert s.ok, "\n".join(log)
    io = s.marks("io")[-1]  # the host's step (the workload list's io ran before it)
    assert io["op"] == "write" and io["write_ok"] is True, io
    assert qmp["dropped"]["command"] == "TLBI_NH_VA", qmp["dropped"]
    final = qmp["final"]
    assert final["injected"]["counts"]["invalidation-dropped"] == 1, final["injected"]
    assert len(bytes.fromhex(qmp["dma"]["data"])) == 4  # served by the stale TLB entry
    san = final["translation"]["sanitizer"]
    assert san["violations"]["stale-tlb"] >= 1, san
    stale = [v for v in san["recent"] if v["rule"] == "stale-tlb"]
    assert all(v["sid"] == BLK_SID for v in stale), stale
    assert any(v["iova"] == qmp["dropped"]["fields"]["ADDR"] and "now-fault" in v for v in stale), stale


ENGINE_SID = 0x100  # eng0 behind rp0 in qemu_configs/vfio-type1.toml
IOVA_DST = 0x40100000  # vfio_type1_test.c check "map": the range unmapped, then DMA'd into


def test_device_use_after_unmap_on_vfio_type1(guest_ready, tmp_path):
    """vfio_type1_test maps dst, DMAs into it, unmaps it (TLBI + CMD_SYNC by the stock
    driver) and starts the engine into the hole again: the device's use after unmap,
    reported apart from the driver's violations (none of the ordering / update rules).
    Without sanitize_fail: its check "remap" unmaps A while the engine copies into it, and
    a copy between the PTE clear and the TLBI may hit the TLB entry, which ``stale-tlb``
    (no invalidation yet) reports though the driver's TLBI is on its way."""
    path = CONFIGS / "vfio-type1.toml"
    text = sanitized(path.read_text(), fail=False)
    assert "sanitize = true" in text
    s = asyncio.run(boot(loads_config(text, "<test>"), tmp_path / "run"))
    san = s.backend["viommu"]["translation"]["sanitizer"]
    assert {r: n for r, n in san["violations"].items() if n and r != "stale-tlb"} == {}, san
    assert san["device"]["use-after-unmap"] >= 1, san
    uau = [v for v in san["recent"] if v["rule"] == "use-after-unmap"]
    assert all(v["rule"] in ("use-after-unmap", "stale-tlb") for v in san["recent"]), san
    assert all(v["by"] == "device" and v["sid"] == ENGINE_SID for v in uau), uau
    assert any(v["iova"] == IOVA_DST and v["pages"] >= 1 for v in uau), uau
    assert any("device use after unmap: use-after-unmap" in ln for ln in s.backend_lines())


def test_nesting_on_7_3_is_clean_under_the_sanitizer(guest_ready, tmp_path):
    """qemu_configs/iommufd-7.3-nesting.toml under the sanitizer: the 7.3 driver's STE
    updates (to a nested STE and back: hitless or breaking) and the move of the stream to
    the test's own CD table are no torn updates; the test's DMA into an unmapped IOAS
    range is the device's use after unmap."""
    text = (CONFIGS / "iommufd-7.3-nesting.toml").read_text()
    text = text.replace("options = { fwb = true }",
                        "options = { fwb = true, sanitize = true, sanitize_fail = true }")
    text = text.replace('"../guest_images/', f'"{CONFIGS.parent}/guest_images/')
    assert "sanitize = true" in text
    cfg = tmp_path / "nesting.toml"
    cfg.write_text(text)
    s = asyncio.run(boot(loads_config(text, str(cfg)), tmp_path / "run"))
    assert [m["ok"] for m in s.marks("iommufd-nesting")] == [True]
    san = s.backend["viommu"]["translation"]["sanitizer"]
    assert not any(san["violations"].values()), san
    assert san["observed"]["updates-ste"] >= 2, san  # the nested STE was installed and left
    assert [(v["rule"], v["by"], v["sid"]) for v in san["recent"]] == \
        [("use-after-unmap", "device", ENGINE_SID)] * san["device"]["use-after-unmap"], san
