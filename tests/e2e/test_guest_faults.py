"""Fault injection over the backend's QMP socket, with the guest's stock arm-smmu-v3 and
virtio-blk drivers watching (one boot, the guest workload ``host`` driven step by step).

Steps (the guest asks ``wait-host {"n":N}``; the host acts over QMP, then answers with the
guest workload to run; the guest runs it and dumps its new kernel log lines):

0. ``viommu-inject-event`` F_TRANSLATION for the virtio-blk stream  -> guest: ``io``
1. ``viommu-inject-fault`` (once, device writes, every IOVA below the rings) -> guest
   reads the disk (``io:4096:read``): the device's data write faults
2. ``viommu-clear-fault``                                            -> guest: ``io``
3. ``viommu-inject-gerror`` MSI_GERROR_ABT_ERR                       -> guest: ``io``
4. ``viommu-inject-sync`` drop                                       -> guest: ``io:4096``
5. ``viommu-inject-sync`` normal                                     -> guest: ``io``

Needs the set-up made by scripts/setup; skips without it except under CI=true (fails).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest

from viommu_backend.config import default_config_text, loads_config
from viommu_backend.guest.boot import KMSG_ALLOWED, BootSummary, HostContext, run_boot
from viommu_backend.guest.qemu import Marker

from tests.support.guest import leftover_processes

pytestmark = pytest.mark.e2e
BLK_SID = 0x100  # blk0 behind rp0: bus 1, devfn 0
SMMU = "arm-smmu-v3 8000200000.smmuv3"
EVENT_IOVA = 0x5EED0000  # what the injected event record names
F_TRANSLATION = 0x10
STEPS = ["event", "fault", "clear", "gerror", "sync-drop", "sync-normal"]

FAULT_ALLOWED = KMSG_ALLOWED + (
    (re.compile(r"I/O error, dev vda"), "the injected translation fault fails one read"),
    (re.compile(r"smmuv3: unexpected global error reported"), "injected GERROR"),
    (re.compile(r"smmuv3: GERROR MSI write aborted"), "injected GERROR (MSI_GERROR_ABT_ERR)"),
    (re.compile(r"smmuv3: CMD_SYNC timeout"), "injected CMD_SYNC drop"),
    (re.compile(r"operation not supported error, dev vda"),
     "injected CMD_SYNC drop: a request header read through a stale translation "
     "(test_dropped_cmd_sync_times_out_in_the_guest_and_recovers checks when)"),
)


async def mapped_pages(ctx: HostContext, sid: int, top: int = 1 << 32, pages: int = 64) -> list[int]:
    """IOVAs of the 4 KiB pages mapped for ``sid`` in the ``pages`` pages below ``top``
    (viommu-translate probes: no event, no cache fill)."""
    found = []
    for i in range(1, pages + 1):
        iova = top - i * 4096
        r = await ctx.execute("viommu-translate", {"sid": sid, "iova": iova})
        if "fault" not in r:
            found.append(iova)
    return found


async def wait_until(ctx: HostContext, cond, what: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        v = await ctx.execute("query-viommu")
        if cond(v):
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout waiting for {what}: {v.get('queues')} {v.get('gerror_active')}")
        await asyncio.sleep(0.1)


def evtq_drained(v: dict[str, Any]) -> bool:
    q = v["queues"]["EVTQ"]
    return q["prod"] == q["cons"]


class Host:
    """The host side of the run: one QMP action per guest ``wait-host``."""

    def __init__(self) -> None:
        self.qmp: dict[str, Any] = {}  # what the backend answered, by step

    async def __call__(self, m: Marker, ctx: HostContext) -> str | None:
        if m.name != "wait-host":
            return None
        n = m.data["n"]
        # whatever the previous step made the SMMU report, the driver has read it
        await wait_until(ctx, evtq_drained, "the driver to consume the event queue")
        if n >= len(STEPS):
            self.qmp["final"] = await ctx.execute("query-viommu")
            self.qmp["final-faults"] = await ctx.execute("query-viommu-faults")
            self.qmp["final-functions"] = await ctx.execute("query-viommu-functions")
            return "end"
        step, q = STEPS[n], {}
        self.qmp[step] = q
        if step == "event":
            q["before"] = await ctx.execute("query-viommu")
            q["inject"] = await ctx.execute("viommu-inject-event", {
                "type": "F_TRANSLATION", "sid": BLK_SID, "iova": EVENT_IOVA})
            q["after"] = await wait_until(ctx, evtq_drained, "the driver to read the injected event")
            return "io"
        if step == "fault":
            # the virtqueues (allocated at probe, at the top of the 32-bit IOVA space) stay
            # reachable; every per-request buffer below them faults, once, on a device write
            q["rings"] = rings = await mapped_pages(ctx, BLK_SID)
            assert rings, "no mapped IOVA below 4 GiB for the virtio-blk stream"
            q["before"] = await ctx.execute("query-viommu")
            q["inject"] = await ctx.execute("viommu-inject-fault", {
                "sid": BLK_SID, "iova": 0, "size": min(rings), "once": True, "write-only": True})
            q["armed"] = await ctx.execute("query-viommu-faults")
            return "io:4096:read"
        if step == "clear":
            q["faults"] = await ctx.execute("query-viommu-faults")
            q["after-fault"] = await ctx.execute("query-viommu")
            q["clear"] = await ctx.execute("viommu-clear-fault")
            return "io"
        if step == "gerror":
            q["inject"] = await ctx.execute("viommu-inject-gerror", {"error": "MSI_GERROR_ABT_ERR"})
            q["acked"] = await wait_until(ctx, lambda v: not v["gerror_active"],
                                          "the driver to acknowledge the GERROR")
            return "io"
        if step == "sync-drop":
            q["before"] = await ctx.execute("query-viommu")
            q["functions"] = await ctx.execute("query-viommu-functions")
            q["inject"] = await ctx.execute("viommu-inject-sync", {"mode": "drop"})
            return "io:4096"
        if step == "sync-normal":
            q["held"] = await ctx.execute("query-viommu")
            q["functions"] = await ctx.execute("query-viommu-functions")
            q["normal"] = await ctx.execute("viommu-inject-sync", {"mode": "normal"})
            q["after"] = await wait_until(ctx, lambda v: v["injected"]["sync"]["held"] is False,
                                          "the held CMD_SYNC to complete")
            return "io"
        raise AssertionError(step)


class Run:
    def __init__(self, summary: BootSummary, host: Host, log: list[str]) -> None:
        self.s, self.host, self.log = summary, host, log

    def step_markers(self, step: str, through: str | None = None) -> list[Marker]:
        """Markers from ``wait-host`` of ``step`` up to the ``host-step`` that ends
        ``through`` (default: the step itself)."""
        first, last = STEPS.index(step), STEPS.index(through or step)
        out, inside = [], False
        for m in self.s.markers:
            if m.name == "wait-host" and m.data.get("n") == first:
                inside = True
            if inside:
                out.append(m)
            if m.name == "host-step" and m.data.get("n") == last:
                break
        return out

    def kmsg(self, step: str, through: str | None = None) -> list[str]:
        return [m.data["text"] for m in self.step_markers(step, through) if m.name == "kmsg"]

    def io(self, step: str) -> list[dict[str, Any]]:
        return [m.data for m in self.step_markers(step) if m.name == "io"]

    def context(self) -> str:
        console = self.s.console_log.read_text()[-4000:] if self.s.console_log else ""
        return "\n".join(self.log) + f"\nconsole:\n{console}"


def event_records(texts: list[str]) -> list[tuple[int, list[int]]]:
    """``(id, [4 record words])`` for each "event 0x.. received:" the driver logged."""
    out = []
    for i, t in enumerate(texts):
        m = re.search(r"smmuv3: event 0x([0-9a-f]{2}) received:", t)
        if m:
            words = [int(w, 16) for w in re.findall(r"smmuv3:\s+0x([0-9a-f]{16})$", "\n".join(texts[i + 1:i + 5]), re.M)]
            out.append((int(m.group(1), 16), words))
    return out


@pytest.fixture(scope="module")
def run(guest_ready, tmp_path_factory) -> Run:  # noqa: F811
    tmp = tmp_path_factory.mktemp("faults")
    text = default_config_text()
    text = re.sub(r'(?m)^workload = ".*"', 'workload = "smmu,hotplug,host"', text)
    text = text.replace("timeout = 300", "timeout = 240")
    config = loads_config(text, "<test>")
    host, log = Host(), []
    s = asyncio.run(run_boot(config, progress=log.append, workdir=tmp / "run",
                             kmsg_allowed=FAULT_ALLOWED, on_marker=host))
    r = Run(s, host, log)
    assert leftover_processes(tmp / "run") == []
    assert s.ok, r.context()
    return r


def test_injected_event_is_logged_by_the_guest_driver(run):
    q = run.host.qmp["event"]
    assert q["inject"] == {"outcome": "written"}
    texts = run.kmsg("event")
    records = event_records(texts)
    assert records, f"no 'event received' in the guest log: {texts}\n{run.context()}"
    [(eid, words)] = records
    assert eid == F_TRANSLATION and len(words) == 4
    assert words[0] & 0xFF == F_TRANSLATION and words[0] >> 32 == BLK_SID
    assert words[2] == EVENT_IOVA
    # the backend counts it: one F_TRANSLATION record more, the injection noted
    before = q["before"]["counters"]["events"].get("F_TRANSLATION", 0)
    after = q["after"]["counters"]["events"].get("F_TRANSLATION", 0)
    assert after == before + 1
    assert q["after"]["injected"]["counts"]["event"] == 1
    # the stream is untouched: its I/O still works
    [io] = run.io("event")
    assert io["write_ok"] and io["read_ok"] and io["match"], io


def test_injected_translation_fault_fails_the_dma_and_clears(run):
    q = run.host.qmp["fault"]
    assert q["inject"]["id"] >= 1
    [armed] = q["armed"]
    assert armed["sid"] == BLK_SID and armed["size"] == min(q["rings"]) and armed["hits"] == 0
    # the guest's read failed: dd saw EIO, the block layer logged the I/O error
    [io] = run.io("fault")
    assert io["op"] == "read" and io["read_ok"] is False, io
    texts = run.kmsg("fault", "clear")
    assert any(re.search(r"I/O error, dev vda, sector 0 op 0x0:\(READ\)", t) for t in texts), texts
    # the SMMU recorded the fault and the arm-smmu-v3 driver reported it: F_TRANSLATION,
    # the virtio-blk StreamID, a write (RnW = 0), at an IOVA inside the armed range
    records = event_records(texts)
    assert records, f"no 'event received' in the guest log: {texts}"
    [(eid, words)] = records
    assert eid == F_TRANSLATION and words[0] >> 32 == BLK_SID
    assert not words[1] >> 35 & 1, "RnW should say write"
    assert 0 < words[2] < min(q["rings"])
    # the backend counted one fault hit and one more translation fault event
    c = run.host.qmp["clear"]
    [hit] = c["faults"]
    assert hit["hits"] == 1 and hit["active"] is False
    assert c["after-fault"]["counters"]["events"].get("F_TRANSLATION", 0) == \
        q["before"]["counters"]["events"].get("F_TRANSLATION", 0) + 1
    assert c["after-fault"]["translation"]["faults"] > q["before"]["translation"]["faults"]
    # cleared: I/O works again, data verified
    assert c["clear"] == {"cleared": 1}
    [io] = run.io("clear")
    assert io["write_ok"] and io["read_ok"] and io["match"], io
    assert run.host.qmp["final-faults"] == []


def test_injected_gerror_is_logged_and_the_smmu_keeps_working(run):
    q = run.host.qmp["gerror"]
    assert q["inject"]["raised"] is True
    texts = run.kmsg("gerror")
    assert any(re.search(r"smmuv3: unexpected global error reported \(0x[0-9a-f]*\), this could be serious", t)
               for t in texts), texts
    assert any("smmuv3: GERROR MSI write aborted" in t for t in texts), texts
    assert not q["acked"]["gerror_active"]
    assert q["acked"]["counters"]["gerrors"].get("MSI_GERROR_ABT_ERR", 0) >= 1
    [io] = run.io("gerror")
    assert io["write_ok"] and io["read_ok"] and io["match"], io


def test_dropped_cmd_sync_times_out_in_the_guest_and_recovers(run):
    texts = run.kmsg("sync-drop", "sync-normal")
    timeouts = [re.search(r"smmuv3: CMD_SYNC timeout at 0x([0-9a-f]+) \[hwprod 0x([0-9a-f]+), hwcons 0x([0-9a-f]+)\]", t)
                for t in texts]
    timeouts = [(int(m[1], 16), int(m[2], 16), int(m[3], 16)) for m in timeouts if m]
    assert timeouts, texts
    q = run.host.qmp["sync-normal"]
    held = q["held"]["injected"]
    assert held["counts"].get("sync-dropped", 0) == 1 and held["sync"]["held"] is True
    # the queue is wedged at the held CMD_SYNC: every later CMD_SYNC the driver waits for
    # times out with the SMMU's CONS pinned there (the held one's index, wrap bit aside)
    pinned = {cons for _, _, cons in timeouts}
    assert len(pinned) == 1, timeouts
    [cons] = pinned
    assert cons & 0xFFFF == held["sync"]["held-at"] & 0xFFFF
    assert all(at >= cons for at, _, _ in timeouts)
    # I/O during the drop: the write completes (mappings need no CMD_SYNC; its unmaps wait
    # out their 1 s timeouts).  The TLBIs of those unmaps sit behind the held CMD_SYNC and
    # never run, so the SMMU keeps the write's translations: when iommu-dma hands the read
    # an IOVA the write just freed (its per-CPU IOVA cache makes that a matter of timing),
    # the device meets the stale read-only translation, a permission fault, and the read
    # fails with EIO -- as on hardware whose command queue is wedged.  Or the read's
    # request header lands on such an IOVA: the device reads the header from the page
    # the stale translation still points at, finds no request type it knows and answers
    # VIRTIO_BLK_S_UNSUPP ("Operation not supported").  Either way the backend must
    # account for it, and only in this window.
    [io] = run.io("sync-drop")
    assert io["write_ok"], io
    drop = run.host.qmp["sync-drop"]

    def unsupp(functions: dict[str, Any]) -> int:
        return sum(f.get("virtio", {}).get("unsupp", 0) for f in functions.values())
    assert unsupp(drop["functions"]) == 0
    assert unsupp(run.host.qmp["final-functions"]) == unsupp(q["functions"])
    if not io["read_ok"]:
        def perm(v: dict[str, Any]) -> int:
            return v["counters"]["events"].get("F_PERMISSION", 0)
        if "Operation not supported" in io["error"]:
            assert unsupp(q["functions"]) >= 1, (io, q["functions"])
        else:
            assert perm(q["held"]) - perm(drop["before"]) >= 1, (io, q["held"]["counters"])
    else:
        assert unsupp(q["functions"]) == 0
    assert q["after"]["injected"]["sync"]["held"] is False
    # after mode normal the queue drains and I/O works, data verified
    [io] = run.io("sync-normal")
    assert io["write_ok"] and io["read_ok"] and io["match"], io
    final = run.host.qmp["final"]
    assert final["queues"]["CMDQ"]["prod"] == final["queues"]["CMDQ"]["cons"]
