"""The PRI queue and its interrupt with the stock arm-smmu-v3 driver (one boot).

Debian's ``cloud-arm64`` kernel is built without CONFIG_PCI_PRI, so its driver never sets
ARM_SMMU_FEAT_PRI and leaves the PRI queue off; the generic ``arm64`` flavour (same 6.12
kernel, CONFIG_PCI_PRI=y) allocates and enables it.  This test boots that flavour with the
virtio-blk endpoint hot-plugged (StreamID 0x100) and the guest workload ``host``:

0. host: ``viommu-inject-page-request`` for the virtio-blk stream -> the SMMU writes the
   PRIQ record and raises the (combined) interrupt; the driver's PRIQ thread reads it,
   logs "unexpected PRI request received" and, the request being the last of its group,
   answers CMD_PRI_RESP with DENY (= INVALID).  Then the guest runs ``io``.
1. host: final queries -> ``end``.

Needs the set-up made by scripts/setup (the arm64 image is built on demand from the same
package cache); skips without it except under CI=true (fails).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest

from viommu_backend.config import default_config_text, loads_config
from viommu_backend.guest.boot import BootSummary, HostContext, run_boot
from viommu_backend.guest.qemu import Marker

from tests.support.guest import leftover_processes

pytestmark = pytest.mark.e2e
BLK_SID = 0x100  # blk0 behind rp0: bus 1, devfn 0
PR_ADDR = 0xDEAD_B000  # the page the injected request asks for
PRG_INDEX = 0x42
# arm-smmu-v3 (6.x) arm_smmu_handle_ppr(): two dev_info lines, then CMD_PRI_RESP DENY
PPR_HEAD = re.compile(r"arm-smmu-v3 [0-9a-f]+\.smmuv3: unexpected PRI request received:")
PPR_LINE = re.compile(r"arm-smmu-v3 [0-9a-f]+\.smmuv3:\s+sid 0x([0-9a-f]{8})\.0x([0-9a-f]{5}): "
                      r"\[(\d+)(L?)\] (un)?privileged (R?)(W?)(X?) access at iova 0x([0-9a-f]{16})")


async def query_until(ctx: HostContext, cmd: str, cond, what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = await ctx.execute(cmd)
        if cond(v):
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout waiting for {what}: {v}")
        await asyncio.sleep(0.1)


def priq_drained(v: dict[str, Any]) -> bool:
    q = v["queues"]["PRIQ"]
    return q["prod"] == q["cons"]


class Host:
    """The host side of the run: one QMP action per guest ``wait-host``."""

    def __init__(self) -> None:
        self.qmp: dict[str, Any] = {}

    async def __call__(self, m: Marker, ctx: HostContext) -> str | None:
        if m.name != "wait-host":
            return None
        if m.data["n"] == 0:
            self.qmp["before"] = await ctx.execute("query-viommu")
            self.qmp["inject"] = await ctx.execute("viommu-inject-page-request", {
                "sid": BLK_SID, "addr": PR_ADDR, "write": True, "prg-index": PRG_INDEX})
            self.qmp["answered"] = await query_until(
                ctx, "query-viommu-page-requests",
                lambda v: bool(v) and all(p["state"] == "answered" for p in v),
                "the driver to answer the page request")
            self.qmp["after"] = await query_until(ctx, "query-viommu", priq_drained,
                                                  "the driver to consume the PRI queue")
            return "io"
        self.qmp["final"] = await ctx.execute("query-viommu")
        self.qmp["final-requests"] = await ctx.execute("query-viommu-page-requests")
        return "end"


class Run:
    def __init__(self, summary: BootSummary, host: Host, log: list[str]) -> None:
        self.s, self.host, self.log = summary, host, log

    def kmsg(self) -> list[str]:
        return [m.data["text"] for m in self.s.markers if m.name == "kmsg"]

    def step_kmsg(self) -> list[str]:
        """Kernel lines from the injection's ``wait-host`` to the next one."""
        out, inside = [], False
        for m in self.s.markers:
            if m.name == "wait-host":
                if inside:
                    break
                inside = m.data.get("n") == 0
            elif inside and m.name == "kmsg":
                out.append(m.data["text"])
        return out

    def io(self) -> list[dict[str, Any]]:
        return [m.data for m in self.s.markers if m.name == "io"]

    def context(self) -> str:
        console = self.s.console_log.read_text()[-4000:] if self.s.console_log else ""
        return "\n".join(self.log) + f"\nconsole:\n{console}"


@pytest.fixture(scope="module")
def run(guest_ready, tmp_path_factory) -> Run:  # noqa: F811
    tmp = tmp_path_factory.mktemp("pri")
    text = default_config_text()
    text = re.sub(r'(?m)^flavour = ".*"', 'flavour = "arm64"', text)
    text = re.sub(r'(?m)^workload = ".*"', 'workload = "smmu,hotplug,host"', text)
    text = text.replace("timeout = 300", "timeout = 240")
    config = loads_config(text, "<test>")
    assert config.kernel.flavour == "arm64"
    host, log = Host(), []
    s = asyncio.run(run_boot(config, progress=log.append, workdir=tmp / "run", on_marker=host))
    r = Run(s, host, log)
    assert leftover_processes(tmp / "run") == []
    assert s.ok, r.context()
    return r


def test_driver_enables_the_pri_queue(run):
    # the driver found IDR0.PRI (ARM_SMMU_FEAT_PRI, bit 4) and allocated the PRI queue
    texts = run.kmsg()
    feats = [int(m[1], 16) for t in texts if (m := re.search(r"\(features 0x([0-9a-f]+)\)", t))]
    assert feats and feats[-1] & 1 << 4, texts
    assert any(re.search(r"smmuv3: allocated \d+ entries for priq", t) for t in texts), texts
    before = run.host.qmp["before"]
    assert before["CR0"]["PRIQEN"] == 1 and before["CR0ACK"]["PRIQEN"] == 1
    assert before["IRQ_CTRL"]["PRIQ_IRQEN"] == 1
    priq = before["queues"]["PRIQ"]
    assert int(priq["base"], 16) != 0 and priq["log2size"] >= 1
    assert priq["prod"] == priq["cons"]


def test_injected_page_request_is_logged_and_denied_by_the_guest_driver(run):
    q = run.host.qmp
    assert q["inject"] == {"prg-index": PRG_INDEX, "pending": True, "outcome": "written"}
    texts = run.step_kmsg()
    assert any(PPR_HEAD.search(t) for t in texts), f"{texts}\n{run.context()}"
    lines = [m for t in texts if (m := PPR_LINE.search(t))]
    assert len(lines) == 1, texts
    sid, ssid, grp, last, unpriv, r, w, x, iova = lines[0].groups()
    assert int(sid, 16) == BLK_SID and int(ssid, 16) == 0  # no PASID: IOMMU_NO_PASID
    assert int(grp) == PRG_INDEX and last == "L" and unpriv == "un"
    assert (r, w, x) == ("R", "W", "") and int(iova, 16) == PR_ADDR
    # the backend: the PRIQ record was consumed (PRIQ_CONS advanced by one) ...
    before, after = q["before"], q["after"]
    b, a = before["queues"]["PRIQ"], after["queues"]["PRIQ"]
    assert a["prod"] == a["cons"] != b["cons"]
    assert (a["cons"] - b["cons"]) % (2 << a["log2size"]) == 1
    assert after["counters"]["page_requests"] == before["counters"]["page_requests"] + 1
    # ... and one CMD_PRI_RESP came back: DENY, which completes the request INVALID
    pri_resp = lambda v: v["counters"]["commands"].get("PRI_RESP", 0)  # noqa: E731
    assert pri_resp(after) == pri_resp(before) + 1
    [pr] = q["answered"]
    assert pr["sid"] == BLK_SID and pr["prg-index"] == PRG_INDEX and pr["addr"] == PR_ADDR
    assert pr["state"] == "answered" and pr["response"] == "INVALID"
    assert after["injected"]["counts"]["page-request"] == 1
    assert after["injected"]["page-requests"] == {"pending": 0, "answered": 1}
    assert after["queues"]["CMDQ"]["prod"] == after["queues"]["CMDQ"]["cons"]
    assert not after["gerror_active"]


def test_endpoint_io_still_verifies_after_the_page_request(run):
    [io] = run.io()
    assert io["write_ok"] and io["read_ok"] and io["match"], io
    final = run.host.qmp["final"]
    assert final["counters"]["commands"].get("PRI_RESP", 0) == \
        run.host.qmp["after"]["counters"]["commands"].get("PRI_RESP", 0)
    assert [p["response"] for p in run.host.qmp["final-requests"]] == ["INVALID"]
