"""Hand-made results of guest runs (markers, summaries) and a two-axis matrix, for
the matrix, KCI and report tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viommu_backend.guest.qemu import Marker


CMDLINE = "console=ttyAMA0 viommu.workload=enumerate,smmu,hotplug,blk,unplug viommu.hotplug_count=1"


def markers(*, blk_match=True, error=None, stop_after=None):
    out = [Marker("boot", {"kernel": "6.12.117", "cmdline": CMDLINE}, 100.0),
           Marker("workload", {"name": "enumerate"}, 100.5),
           Marker("enumerate", {"count": 3}, 100.6),
           Marker("workload", {"name": "smmu"}, 101.0),
           Marker("smmu", {"node": "8000200000.smmuv3", "bdf": "0000:00:01.0", "probed": True}, 101.2),
           Marker("workload", {"name": "hotplug"}, 101.5),
           Marker("hotplug", {"devices": 4}, 102.0),
           Marker("workload", {"name": "blk"}, 102.5),
           Marker("blk-dev", {"dev": "vda", "bdf": "0000:01:00.0", "iommu_group": "0", "domain_type": "DMA"}, 102.6),
           Marker("blk-io", {"bs": 4096, "bytes": 1 << 20, "write_ms": 400, "read_ms": 100, "match": blk_match}, 103.0),
           Marker("blk-io", {"bs": 65536, "bytes": 1 << 20, "write_ms": 50, "read_ms": 50, "match": True}, 103.5)]
    if error:
        out.append(Marker("error", {"workload": "blk", "msg": error}, 103.6))
    if stop_after == "blk":
        return out
    out += [Marker("workload", {"name": "unplug"}, 104.0),
            Marker("unplug", {"bdf": "0000:01:00.0", "ms": 5300, "blk_gone": True}, 109.3),
            Marker("done", {"errors": 0}, 109.4)]
    return out


TWO_AXES = """
[matrix]
name = "t"
timeout = 50
set = { "guest.cmdline" = "viommu.blk_bytes=1048576" }

[[axis]]
name = "smmu"
values = [
  { name = "s1+s2" },
  { name = "s2-only", set = { "function.viommu.options.s1p" = false } },
  { name = "linear", set = { "function.viommu.options.two_level_strtab" = false } },
]

[[axis]]
name = "dma"
values = [
  { name = "strict", expect = { domain_type = "DMA" } },
  { name = "lazy", set = { "guest.cmdline+" = "iommu.strict=0" }, expect = { domain_type = "DMA-FQ" } },
]
"""


@dataclass
class FakeSummary:
    ok: bool
    error: str | None = None
    markers: list[Marker] = field(default_factory=list)
    backend: dict[str, Any] | None = None
    kernel: str = "6.12.107 (debian)"
    workdir: Path | None = None
    timings: dict[str, float] = field(default_factory=lambda: {"total": 12.5})

    def marks(self, name: str) -> list[Any]:
        return [m.data for m in self.markers if m.name == name]

    def format(self) -> str:
        return f"boot: {'OK' if self.ok else 'FAILED'}"


def summary(ok=True, domain="DMA", error=None, kernel="6.12.107+deb13-cloud-arm64") -> FakeSummary:
    markers = [
        Marker("boot", {"kernel": kernel}, 1.0),
        Marker("kmsg", {"level": 6, "text": "arm-smmu-v3 8000200000.smmuv3: ias 48-bit, oas 48-bit (features 0x00088fe7)"}, 2.0),
        Marker("blk-dev", {"dev": "vda", "domain_type": domain}, 3.0),
        Marker("blk-io", {"bs": 4096, "bytes": 1 << 20, "write_ms": 1000, "read_ms": 500, "match": True}, 4.0),
        Marker("blk-io", {"bs": 1 << 20, "bytes": 1 << 20, "write_ms": 100, "read_ms": 100, "match": True}, 5.0),
    ]
    backend = {"viommu": {
        "counters": {"commands": {"CMD_SYNC": 10, "TLBI_NH_VA": 30}, "syncs": 10, "msi_writes": 10,
                     "events": {"F_TRANSLATION": 2}, "gerrors": {},
                     "mmio_reads": {"CMDQ_CONS": 7, "IDR0": 1}},
        "translation": {"translations": 100, "walks": 25, "faults": 2, "bytes_read": 5, "bytes_written": 6,
                        "tlb": {"hits": 75, "misses": 25}}}}
    return FakeSummary(ok, error, markers, backend)
