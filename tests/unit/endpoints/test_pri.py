"""The DMA engine's page requests (PCIe PRI) under a hidden stage 2: a copy that hits a
page the host's stage 2 lacks waits for the host's answer and is retried on Success."""

from __future__ import annotations

from typing import Iterator

import pytest
from tests.support.endpoint_env import DATA, LOG2SIZE, RAM, RAM_SIZE, STRTAB, bus_master
from tests.support.pci_ctx import TestContext

from viommu_backend.domains import DomainManager, FaultResponse
from viommu_backend.endpoints.dma import TranslatedDma
from viommu_backend.endpoints.testdev import REGS, DmaErr, TestDevice
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.device import StreamTableConfig
from viommu_backend.smmuv3.fields import EventId

SID = 0x10  # inside the 256-entry stream table
OFF = {r.name: r.offset for r in REGS.registers}
STATUS = REGS.layouts["DMA_STATUS"]


class Rig:
    """Guest RAM, a bypass STE for the engine's stream, a manager owning stage 2."""

    def __init__(self) -> None:
        self.ctx = TestContext(RAM, RAM_SIZE)
        self.mem = self.ctx.memory
        b.write_words(self.mem, STRTAB + SID * fl.STE_SIZE, b.make_ste(fl.STE_CONFIG_BYPASS))
        self.mgr = DomainManager(lambda: self.mem, stream_table=lambda: StreamTableConfig(
            True, STRTAB, regs.STRTAB_FMT_LINEAR, LOG2SIZE, 0, 16, False),
            host_s2=True, host_layout="reversed")
        self.dev = TestDevice()
        self.dev.connected(self.ctx)
        bus_master(self.dev)
        self.dev.set_dma_port(TranslatedDma(self.dev, self.mgr, SID))
        self.mgr.add_device(SID, name="dma0")
        pri = self.dev.pri
        self.mgr.iopf_hooks[SID] = lambda on: pri.host_enable(16) if on else pri.host_disable()

    def host_fault_queue(self):
        """The host attaches the stream to a fault-capable NEST_PARENT."""
        fq = self.mgr.alloc_fault_queue()
        p = self.mgr.hwpt_alloc(flags=["nest-parent"], fault_queue=fq.id, sid=SID)
        self.mgr.replace(SID, p.id)
        return fq

    def copy(self, src: int, dst: int, n: int) -> None:
        for name, v, size in (("DMA_SRC", src, 8), ("DMA_DST", dst, 8), ("DMA_LEN", n, 4),
                              ("DMA_CTRL", 1, 4)):
            self.dev.region_write(0, OFF[name], v.to_bytes(size, "little"))
        self.ctx.run_soon()

    def status(self) -> dict[str, int]:
        return STATUS.decode(self.dev.regs["DMA_STATUS"])


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.ctx.close()


def test_host_attach_to_a_fault_capable_domain_turns_pri_on(rig):
    assert not rig.dev.pri.enabled
    rig.host_fault_queue()
    assert rig.dev.pri.enabled and rig.dev.pri.allocation == 16
    rig.mgr.detach(SID)
    assert not rig.dev.pri.enabled


def test_copy_waits_for_the_host_and_completes_after_success(rig):
    fq = rig.host_fault_queue()
    src, dst = DATA, DATA + 0x3000
    rig.mem.write(src, b"demand paged!" * 100)
    rig.mgr.ioas_unmap(dst, 0x1000)  # the host pages the destination out
    rig.copy(src, dst, 1300)
    assert rig.status()["BUSY"] == 1 and rig.dev.pri.outstanding == 1
    [pf] = list(fq)
    assert pf.kind == "pri" and pf.addr == dst and pf.write and pf.sid == SID
    rig.mgr.ioas_map(dst, 0x1000)  # paged back in
    rig.mgr.fault_respond(fq.id, pf.cookie, "success")
    rig.ctx.run_soon()  # the engine retries
    st = rig.status()
    assert st["DONE"] == 1 and st["ERROR"] == 0 and rig.dev.regs["DMA_COUNT"] == 1
    assert rig.mem.read(dst, 1300) == (b"demand paged!" * 100)
    assert rig.dev.pri.outstanding == 0 and rig.dev.page_requests.retries == 1
    assert rig.mgr.counters.host_page_requests == 1


def test_copy_ends_with_the_fault_when_the_host_refuses(rig):
    fq = rig.host_fault_queue()
    rig.mgr.ioas_unmap(DATA, 0x1000)
    rig.copy(DATA, DATA + 0x8000, 64)
    [pf] = list(fq)
    rig.mgr.fault_respond(fq.id, pf.cookie, "invalid")
    rig.ctx.run_soon()
    st = rig.status()
    assert st["ERROR"] == 1 and st["ERR_CODE"] == DmaErr.TRANSLATION
    assert st["EVENT"] == EventId.F_TRANSLATION and pf.response is FaultResponse.INVALID


def test_success_without_the_page_ends_the_copy(rig):
    fq = rig.host_fault_queue()
    rig.mgr.ioas_unmap(DATA, 0x1000)
    rig.copy(DATA, DATA + 0x8000, 64)
    rig.mgr.fault_respond(fq.id, list(fq)[0].cookie, "success")  # but never mapped it
    rig.ctx.run_soon()
    assert rig.status()["ERROR"] == 1 and len(fq) == 0  # no second request for it


def test_without_pri_the_copy_faults_at_once(rig):
    rig.mgr.ioas_unmap(DATA, 0x1000)
    rig.copy(DATA, DATA + 0x8000, 64)
    assert rig.status()["ERROR"] == 1 and rig.mgr.counters.page_requests == 0


def test_reset_abandons_a_waiting_copy(rig):
    fq = rig.host_fault_queue()
    rig.mgr.ioas_unmap(DATA, 0x1000)
    rig.copy(DATA, DATA + 0x8000, 64)
    rig.dev.reset()
    [pf] = list(fq)
    rig.mgr.ioas_map(DATA, 0x1000)
    rig.mgr.fault_respond(fq.id, pf.cookie, "success")
    rig.ctx.run_soon()
    assert rig.dev.regs["DMA_COUNT"] == 0 and rig.status()["DONE"] == 0
