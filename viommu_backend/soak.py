"""The soak: one guest, two virtio-blk disks and the DMA test engine behind the emulated
SMMU, all busy at once for a duration with every byte checked (guest workload
``soak:SECONDS``, guest_images/init.sh), while the host injects faults over the backend's
QMP socket at random intervals.  Only faults the stock driver is architected to survive
are injected, each answered as the architecture says:

- ``event``: an F_TRANSLATION record for a random endpoint's stream (the driver logs it);
- ``gerror``: GERROR.MSI_GERROR_ABT_ERR (the driver logs and acknowledges it);
- ``sync-delay``: the next 1-4 CMD_SYNCs complete 10-200 ms late (well inside the
  driver's 1 s poll).

Between injections the host waits for the driver to consume the event queue and
acknowledge GERROR, so no injection hides another.  The run fails on any data mismatch, a
guest error, a backend error (fail loudly: ``query-viommu-errors``) or an endpoint that did
no I/O.  ``scripts/soak`` is the entry point; :func:`run_soak` is what the e2e test runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from viommu_backend.config import Config, load_config
from viommu_backend.guest.boot import (KMSG_ALLOWED, BootSummary, HostContext,
                                       run_boot_interruptible)
from viommu_backend.guest.qemu import Marker

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "qemu_configs" / "soak.toml"
KINDS = ("event", "gerror", "sync-delay")
GAP_S = (2.0, 12.0)  # random interval between injections
SETTLE_S = 30.0  # at most this long for the driver to consume what an injection raised

SOAK_KMSG = KMSG_ALLOWED + (
    (re.compile(r"smmuv3: event 0x10 received:$"), "injected F_TRANSLATION event"),
    (re.compile(r"smmuv3:\s+0x[0-9a-f]{16}$"), "the injected event record, dumped"),
    (re.compile(r"smmuv3: unexpected global error reported"), "injected GERROR"),
    (re.compile(r"smmuv3: GERROR MSI write aborted"), "injected GERROR (MSI_GERROR_ABT_ERR)"),
)


@dataclasses.dataclass
class Injector:
    """The host side: random faults at random intervals while the guest soaks."""

    rng: random.Random
    progress: Callable[[str], None]
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    streams: list[int] = dataclasses.field(default_factory=list)
    last: dict[str, Any] | None = None  # the guest's last soak-progress / soak marker
    started: float = 0.0
    _task: asyncio.Task[None] | None = None
    error: str | None = None

    async def __call__(self, m: Marker, ctx: HostContext) -> str | None:
        if m.name == "soak-start":
            self.started = time.monotonic()
            self.streams = await self._endpoint_streams(ctx)
            self._task = asyncio.create_task(self._loop(ctx))
        elif m.name == "soak-progress":
            self.last = m.data
            self.progress(f"[soak] {m.data['ms'] / 1000:.0f} s: {_endpoints_line(m.data)}; "
                          f"faults injected {sum(self.counts.values())}")
        elif m.name == "soak":
            self.last = m.data
            await self.stop()
        return None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    @staticmethod
    async def _endpoint_streams(ctx: HostContext) -> list[int]:
        smmus = await ctx.execute("query-viommu-smmus")
        return [e["stream-id"] for unit in smmus for e in unit["endpoints"]]

    async def _loop(self, ctx: HostContext) -> None:
        try:
            while True:
                await asyncio.sleep(self.rng.uniform(*GAP_S))
                kind = self.rng.choice(KINDS)
                await self._inject(ctx, kind)
                self.counts[kind] += 1
                await self._settle(ctx)
        except Exception as e:  # reported, and the run fails (cancellation is not an Exception)
            self.error = f"injection failed: {type(e).__name__}: {e}"
            self.progress(f"[soak] {self.error}")

    async def _inject(self, ctx: HostContext, kind: str) -> None:
        if kind == "event":
            await ctx.execute("viommu-inject-event", {
                "type": "F_TRANSLATION", "sid": self.rng.choice(self.streams),
                "iova": self.rng.randrange(0, 1 << 32, 4096)})
        elif kind == "gerror":
            await ctx.execute("viommu-inject-gerror", {"error": "MSI_GERROR_ABT_ERR"})
        else:
            await ctx.execute("viommu-inject-sync", {
                "mode": "delay", "count": self.rng.randint(1, 4),
                "delay-ms": self.rng.randint(10, 200)})

    @staticmethod
    async def _settle(ctx: HostContext) -> None:
        """Wait until the driver has read the event queue and acknowledged GERROR."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            v = await ctx.execute("query-viommu")
            q = v["queues"]["EVTQ"]
            if q["prod"] == q["cons"] and not v["gerror_active"]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the driver did not consume the injected fault in {SETTLE_S:.0f} s: "
                                   f"EVTQ {q}, GERROR active {v['gerror_active']}")
            await asyncio.sleep(0.2)


def _endpoints_line(data: dict[str, Any]) -> str:
    return ", ".join(f"{name} {e['requests']} req {e['bytes'] / 2**20:.1f} MiB "
                     f"{e['checks']} ok {e['mismatches']} bad"
                     for name, e in sorted(data.get("endpoints", {}).items()))


@dataclasses.dataclass
class SoakResult:
    summary: BootSummary
    injector: Injector
    seconds: int
    wall: float

    @property
    def endpoints(self) -> dict[str, dict[str, int]]:
        final = self.summary.marks("soak")
        return final[-1]["endpoints"] if final else {}

    @property
    def backend_errors(self) -> int | None:
        b = self.summary.backend or {}
        return b.get("errors", {}).get("count")

    def problems(self) -> list[str]:
        out = []
        if not self.summary.ok:
            out.append(f"boot failed: {self.summary.error}")
        if self.injector.error:
            out.append(self.injector.error)
        if not self.summary.marks("soak"):
            out.append("the guest never finished the soak")
        for name, e in self.endpoints.items():
            if e["mismatches"]:
                out.append(f"{name}: {e['mismatches']} data mismatches")
            if e["errors"]:
                out.append(f"{name}: {e['errors']} requests failed even when retried")
            if not e["checks"]:
                out.append(f"{name}: no verified I/O")
        if self.backend_errors != 0:
            out.append(f"backend errors: {self.backend_errors}")
        return out

    def format(self) -> str:
        lines = [f"[soak] {self.seconds} s of I/O in {self.wall / 60:.1f} min wall time"]
        total_req = total_bytes = 0
        for name, e in sorted(self.endpoints.items()):
            total_req += e["requests"]
            total_bytes += e["bytes"]
            lines.append(f"  {name:5} requests {e['requests']:8}  bytes {e['bytes']:12}  "
                         f"checks passed {e['checks']:7}  mismatches {e['mismatches']}  "
                         f"retried {e['retries']}  failed {e['errors']}")
        lines.append(f"  total requests {total_req}, bytes {total_bytes} ({total_bytes / 2**20:.1f} MiB)")
        kinds = ", ".join(f"{k} {n}" for k, n in self.injector.counts.items())
        lines.append(f"  faults injected {sum(self.injector.counts.values())} ({kinds})")
        lines.append(f"  backend errors {self.backend_errors}, guest errors "
                     f"{len(self.summary.guest_errors)}")
        problems = self.problems()
        lines.append("  result: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))
        return "\n".join(lines)


def soak_config(config: Config, seconds: int) -> Config:
    """``config`` with its soak workload lasting ``seconds`` and a boot timeout to match."""
    words = [w if not w.startswith("soak") else f"soak:{seconds}"
             for w in config.guest.workload.split(",")]
    if not any(w.startswith("soak") for w in words):
        words.append(f"soak:{seconds}")
    guest = dataclasses.replace(config.guest, workload=",".join(words),
                                timeout=config.guest.timeout + seconds)
    return dataclasses.replace(config, guest=guest)


async def run_soak(config: Config, seconds: int, *, seed: int, workdir: Path | None = None,
                   progress: Callable[[str], None] = print) -> SoakResult:
    injector = Injector(random.Random(seed), progress)
    every = 30 if seconds >= 300 else 10
    t0 = time.monotonic()
    try:
        summary = await run_boot_interruptible(
            soak_config(config, seconds), progress=progress, workdir=workdir,
            cmdline_extra=f"viommu.soak_every={every}", kmsg_allowed=SOAK_KMSG,
            on_marker=injector)
    finally:
        await injector.stop()
    return SoakResult(summary, injector, seconds, time.monotonic() - t0)


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``30m``, ``1h`` -> seconds."""
    m = re.fullmatch(r"(\d+)([smh]?)", text.strip())
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 1h)")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=parse_duration, default=parse_duration("30m"))
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--logs", type=Path, default=None, help="keep the run's logs here")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"[soak] {args.duration} s, seed {seed}, config {args.config}", flush=True)
    result = asyncio.run(run_soak(load_config(args.config), args.duration, seed=seed,
                                  workdir=args.logs, progress=lambda s: print(s, flush=True)))
    print(result.format(), flush=True)
    return 1 if result.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
