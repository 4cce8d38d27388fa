"""The stall model over the real vfio-user sockets: the DMA test engine (its own
connection) copies into an unmapped IOVA of a stream whose CD stalls faults; the guest's
side reads the stall record from the Event queue in shared RAM, maps the page and answers
with CMD_RESUME through the command queue; the engine's retry completes and interrupts."""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest

from viommu_backend.endpoints.testdev import REGS
from viommu_backend.pci.config_space import COMMAND
from viommu_backend.smmuv3.commands import RESP_ABORT, RESP_RETRY, encode_command
from viommu_backend.smmuv3.events import decode_event
from viommu_backend.smmuv3.fields import EventId
from viommu_backend.vfio_user.client import VfioUserClient
from viommu_backend.vfio_user.device import PciIrq, PciRegion

from tests.support.viommu_rig import DATA, EVTQ, SID, smmu_rig

OFF = {r.name: r.offset for r in REGS.registers}
STATUS = REGS.layouts["DMA_STATUS"]
SRC, DST = 0x10_0000, 0x20_0000
DST_PA = DATA + 0x8000


@pytest.fixture
async def env(tmp_path) -> AsyncIterator[dict[str, Any]]:
    async with smmu_rig(tmp_path, client_name="stall-test", stall=True,
                        data=bytes(range(64))) as rig:
        ep = rig["ep"]
        await ep.region_write(PciRegion.CONFIG, 4, COMMAND.encode(MEMORY=1, MASTER=1)
                              .to_bytes(2, "little"))
        (rig["ep_intx"],) = await ep.set_irq_eventfds(PciIrq.INTX, 0, 1)
        yield rig


async def _reg(ep: VfioUserClient, name: str) -> int:
    return int.from_bytes(await ep.region_read(0, OFF[name], 4), "little")


async def _copy_and_stall(env: dict[str, Any]) -> dict[str, Any]:
    """Start a 64-byte copy to the unmapped DST; return the stall record it produces."""
    ep = env["ep"]
    for name, v, size in (("DMA_SRC", SRC, 8), ("DMA_DST", DST, 8), ("DMA_LEN", 64, 4),
                          ("DMA_CTRL", 0b11, 4)):
        await ep.region_write(0, OFF[name], v.to_bytes(size, "little"))
    await env["c"].wait_irq(env["intx"])  # the SMMU's event queue interrupt
    ev = decode_event(env["ram"].read(EVTQ, 32))
    assert ev["name"] == "F_TRANSLATION" and ev["STALL"] == 1 and ev["STREAMID"] == SID
    assert ev["INPUTADDR"] == DST and ev["RNW"] == 0
    st = STATUS.decode(await _reg(ep, "DMA_STATUS"))
    assert (st["BUSY"], st["STALLED"], st["DONE"]) == (1, 1, 0)
    return ev


async def test_stalled_copy_resumed_after_the_page_is_mapped(env):
    ev = await _copy_and_stall(env)
    env["pt"].map(DST, DST_PA)
    await env["g"].submit(encode_command("RESUME", SID=SID, STAG=ev["STAG"], RESP=RESP_RETRY),
                          encode_command("CMD_SYNC"))
    await env["ep"].wait_irq(env["ep_intx"])  # the engine's completion (INTx)
    st = STATUS.decode(await _reg(env["ep"], "DMA_STATUS"))
    assert (st["BUSY"], st["STALLED"], st["DONE"], st["ERROR"]) == (0, 0, 1, 0)
    assert env["ram"].read(DST_PA, 64) == bytes(range(64))
    t = (await env["qmp"].execute("query-viommu"))["translation"]
    assert (t["stalls"], t["stall_retries"], t["stall_aborts"]) == (1, 1, 0)


async def test_stalled_copy_aborted(env):
    ev = await _copy_and_stall(env)
    await env["g"].submit(encode_command("RESUME", SID=SID, STAG=ev["STAG"], RESP=RESP_ABORT),
                          encode_command("CMD_SYNC"))
    await env["ep"].wait_irq(env["ep_intx"])
    st = STATUS.decode(await _reg(env["ep"], "DMA_STATUS"))
    assert (st["BUSY"], st["DONE"], st["ERROR"]) == (0, 0, 1)
    assert st["EVENT"] == EventId.F_TRANSLATION
    t = (await env["qmp"].execute("query-viommu"))["translation"]
    assert (t["stalls"], t["stall_retries"], t["stall_aborts"]) == (1, 0, 1)
