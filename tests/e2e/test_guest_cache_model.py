"""The most aggressive caching model the architecture allows (SMMU option ``cache =
"aggressive"``: STE / CD caches by StreamID and SubstreamID, walk caches per stage and
level, a TLB keyed by VMID / ASID / global, every entry kept until an invalidation that
covers it) with the driver sanitizer failing the run on any stale use, on a real guest
with the stock arm-smmu-v3 driver: the default workload (qemu_configs/cache-aggressive.toml)
and the smoke matrix (qemu_configs/matrix-cache.toml) run clean.

Needs the set-up made by scripts/setup; skips without it except under CI=true (fails).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from viommu_backend.config import load_config
from viommu_backend.guest.boot import run_boot
from viommu_backend.matrix import expand, load_matrix

from tests.support.guest import leftover_processes, matrix_passes

pytestmark = pytest.mark.e2e
CONFIGS = Path(__file__).resolve().parents[2] / "qemu_configs"


def assert_clean_and_cached(t: dict) -> None:
    """``query-viommu`` ``translation``: no violation, the caches at work."""
    san, caches = t["sanitizer"], t["caches"]
    assert not any(san["violations"].values()) and san["recent"] == [], san
    assert san["checks"] > 0, san
    assert caches["model"] == "aggressive" and t["tlb"]["capacity"] == 0, caches
    # filled and used (after the unplug the driver's invalidations have emptied them)
    assert caches["walk"]["hits"] > 0 and caches["walk"]["misses"] > 0, caches
    assert caches["config"]["hits"] > 0 and caches["config"]["ste-fetches"] > 0, caches


def test_default_workload_is_clean_under_the_aggressive_cache(guest_ready, tmp_path):
    log: list[str] = []
    s = asyncio.run(run_boot(load_config(CONFIGS / "cache-aggressive.toml"),
                             progress=log.append, workdir=tmp_path / "run"))
    assert leftover_processes(tmp_path / "run") == []
    assert s.ok, "\n".join(log)  # any violation is an error line: the run would fail
    assert_clean_and_cached(s.backend["viommu"]["translation"])
    assert any("cache walk: entries" in ln for ln in s.backend_lines())


async def test_smoke_matrix_is_clean_under_the_aggressive_cache(guest_ready, tmp_path):
    m = load_matrix(CONFIGS / "matrix-cache.toml")
    runs = expand(m)
    assert len(runs) == 6
    for r in await matrix_passes(m, runs, tmp_path):
        c = r.counters
        assert all(io["match"] for io in r.blk.values()) and c["events"] == 0, r.name
        san = c["sanitizer"]
        assert not any(san["violations"].values()) and san["checks"] > 0, (r.name, san)
        assert c["caches"]["model"] == "aggressive" and c["caches"]["walk"]["hits"] > 0, \
            (r.name, c["caches"])
