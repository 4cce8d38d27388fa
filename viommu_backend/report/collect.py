"""What a boot collects for its report, over the backend's QMP socket while the guest runs:
the trace (categories :data:`TRACE` on from the server's start, ring grown to 2^20 records at
the guest's first marker, read out at ``done``), ``query-viommu`` at ``done``, and the
STE -> CDs -> mappings of the translated endpoint (``query-viommu-stream``) just before it
is unplugged (or at ``done``).

    rec = ReportCollector()
    summary = await run_boot(config, server_argv=rec.server_argv(), on_marker=rec.on_marker)
    rec.save(workdir / DATA_FILE)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from viommu_backend.trace import MAX_SIZE

TRACE = ("reg", "cmd", "event", "priq", "irq", "fault", "domain", "xlat")
DATA_FILE = "report-data.json"
READ_CHUNK = 1024  # records per query-viommu-trace (xlat records carry page lists)
STREAM_LIMIT = 256  # mappings per table in the stream snapshot
SNAPSHOT_AT = ("blk-dev", "blk-io", "io", "wait-unplug", "done")  # markers to snapshot the stream at


class ReportCollector:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {"trace": [], "dropped": 0, "viommu": None, "stream": None,
                                     "errors": []}
        self._sized = False

    @staticmethod
    def server_argv() -> list[str]:
        """``run_boot(server_argv=...)``: the default server, tracing from its start."""
        return [sys.executable, "-m", "viommu_backend", "serve", "--socket-dir", "{socket_dir}",
                "--qmp", "{qmp}", "--config", "{config}", "--trace", ",".join(TRACE)]

    async def on_marker(self, marker: Any, ctx: Any) -> str | None:
        try:
            if not self._sized:
                self._sized = True
                await ctx.execute("viommu-trace", {"size": MAX_SIZE})
            data = marker.data if isinstance(marker.data, dict) else {}
            if marker.name in SNAPSHOT_AT or isinstance(data.get("ok"), bool):  # and after program checks
                self._keep_fuller(await self._stream(ctx))
            if marker.name == "done":
                self.data["viommu"] = await ctx.execute("query-viommu")
                await self._drain(ctx)
        except Exception as e:  # noqa: BLE001 - the report shows it; the boot's verdict is its own
            self.data["errors"].append(f"{marker.name}: {type(e).__name__}: {e}")
        return None

    def _keep_fuller(self, snap: dict[str, Any] | None) -> None:
        """Keep the snapshot with the most mappings (strict mode unmaps buffers at once)."""
        if snap is not None and _mappings(snap) >= _mappings(self.data["stream"]):
            self.data["stream"] = snap

    async def _stream(self, ctx: Any) -> dict[str, Any] | None:
        """The first translated stream's tables (the endpoint behind the SMMU)."""
        graph = await ctx.execute("query-viommu-domains")
        for dev in graph.get("devices", []):
            if dev.get("config") in ("s1", "s2", "nested"):
                return await ctx.execute("query-viommu-stream", {"sid": dev["sid"], "limit": STREAM_LIMIT})
        return None

    async def _drain(self, ctx: Any) -> None:
        since = 0
        while True:
            r = await ctx.execute("query-viommu-trace", {"since": since, "limit": READ_CHUNK}, timeout=60)
            self.data["trace"] += r["records"]
            self.data["dropped"] += r["dropped"]
            if r["next"] == since or not r["records"]:
                return
            since = r["next"]

    def save(self, path: Path, **extra: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data | extra, default=str) + "\n")
        return path


def _mappings(snap: dict[str, Any] | None) -> int:
    if not snap:
        return -1
    stages = [s.get("stage1", {}) for s in snap.get("substreams", [])] + [snap.get("stage2", {})]
    return sum(len(st.get("mappings", [])) for st in stages)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def reporting_boot() -> Any:
    """A matrix boot function (``run_matrix(boot=...)``) that also collects each run's
    report data into ``<run folder>/report-data.json``."""
    async def boot(config: Any, *, progress: Any, workdir: Path | None) -> Any:
        from viommu_backend.guest.boot import run_boot

        rec = ReportCollector()
        summary = await run_boot(config, progress=progress, workdir=workdir,
                                 server_argv=rec.server_argv(), on_marker=rec.on_marker)
        if workdir is not None:
            rec.save(workdir / DATA_FILE)
        return summary
    return boot
