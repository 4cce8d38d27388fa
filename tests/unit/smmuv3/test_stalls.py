"""The stall model end to end in-process: a real SMMUv3 (queues in guest RAM, commands
through CMDQ), the domain manager, and the DMA test engine behind it.  A stalled
transaction waits; CMD_RESUME Retry re-runs it, Abort / CMD_STALL_TERM terminate it;
STALL_MAX and an unwritable Event queue hold stalled transactions without a record until
they can retry (SMMUv3 architecture 3.12.2, 7.2.1, SMMU_IDR5.STALL_MAX)."""

from __future__ import annotations

from typing import Iterator

import pytest
from tests.support.pci_ctx import TestContext
from tests.support.smmuv3_harness import Harness

from viommu_backend.domains import DmaFault, DomainManager
from viommu_backend.endpoints.dma import TranslatedDma
from viommu_backend.endpoints.testdev import REGS, DmaErr, TestDevice
from viommu_backend.pci.config_space import COMMAND
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import RESP_ABORT, RESP_RETRY, encode_command
from viommu_backend.smmuv3.smmu_config import SmmuConfig
from viommu_backend.smmuv3.events import decode_event
from viommu_backend.smmuv3.fields import EventId
from viommu_backend.vfio_user.device import PciIrq, PciRegion

RAM = 0x4000_0000
RAM_SIZE = 4 << 20  # queues at RAM + 0 / 0x1_0000 / 0x2_0000 (smmuv3_harness)
STRTAB = RAM + 0x4_0000  # linear, 64 STEs
TABLES = RAM + 0x10_0000
DATA = RAM + 0x20_0000
SRC, DST = 0x10_0000, 0x20_0000  # IOVAs of the copies
SID, SID2 = 0x20, 0x21
OFF = {r.name: r.offset for r in REGS.registers}
STATUS = REGS.layouts["DMA_STATUS"]
CR0 = regs.layout("CR0")
INTX = int(PciIrq.INTX)


class StallEnv:
    """Guest RAM shared by an SMMUv3 (queues, stream table, CDs with CD.S=1 and page
    tables written by the builders, commands through CMDQ) and test engines behind it."""

    def __init__(self, config: SmmuConfig | None = None, *, evtq_log2: int = 3) -> None:
        self.ctx = TestContext(RAM, RAM_SIZE)
        self.mem = self.ctx.memory
        self.h = Harness(config, evtq_log2=evtq_log2)
        self.h.mem = self.mem  # the harness's SMMU reads this guest RAM
        self.smmu = self.h.smmu
        self.mgr = DomainManager(lambda: self.mem)
        self.mgr.attach_smmu(self.smmu)
        self.h.setup_queues()
        self.h.w64("STRTAB_BASE", STRTAB)
        self.h.w32("STRTAB_BASE_CFG", regs.layout("STRTAB_BASE_CFG").encode(FMT=0, LOG2SIZE=6))
        self.h.w32("CR0", CR0.encode(SMMUEN=1, CMDQEN=1, EVTQEN=1, PRIQEN=1))
        self.al = b.Allocator(TABLES, 1 << 20)
        self.next_data = DATA
        self.pts: dict[int, b.PageTable] = {}
        self.devs: dict[int, TestDevice] = {}

    def stream(self, sid: int, *, stall: bool = True) -> TestDevice:
        """``sid``: an S1 STE over one CD (CD.S = ``stall``) and a test engine using it."""
        pt = b.PageTable(self.mem, self.al)
        cd = self.al.alloc(64, 64)
        b.write_words(self.mem, cd, b.make_cd(pt.root, asid=sid, S=int(stall)))
        b.write_words(self.mem, STRTAB + sid * fl.STE_SIZE,
                      b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cd))
        self.h.submit(encode_command("CFGI_STE", SID=sid, LEAF=1), encode_command("CMD_SYNC"))
        dev = TestDevice(f"dma{sid:x}")
        dev.connected(self.ctx)
        dev.set_dma_port(TranslatedDma(dev, self.mgr, sid))
        dev.region_write(PciRegion.CONFIG, 4, COMMAND.encode(MEMORY=1, MASTER=1)
                         .to_bytes(2, "little"))
        self.pts[sid], self.devs[sid] = pt, dev
        return dev

    def map(self, sid: int, iova: int, npages: int = 1) -> int:
        """Map ``npages`` fresh data pages at ``iova`` (what a page fault handler does)."""
        pa = self.next_data
        self.next_data += npages << 12
        self.pts[sid].map_range(iova, pa, npages << 12)
        return pa

    # -- the guest driver's side ---------------------------------------------------------
    def events(self) -> list[dict]:
        """Consume every record in the Event queue (reading, then writing EVTQ_CONS)."""
        q, out = self.smmu.evtq, []
        while not q.empty():
            out.append(decode_event(q.read_entry(self.mem, q.cons)))
            self.h.w32("EVTQ_CONS", q.inc(q.cons) | (self.h.r32("EVTQ_PROD") & (1 << 31)))
        return out

    def resume(self, sid: int, stag: int, resp: int) -> None:
        self.h.submit(encode_command("RESUME", SID=sid, STAG=stag, RESP=resp),
                      encode_command("CMD_SYNC"))

    def stall_term(self, sid: int) -> None:
        self.h.submit(encode_command("STALL_TERM", SID=sid), encode_command("CMD_SYNC"))

    # -- the engine ----------------------------------------------------------------------
    def copy(self, sid: int, src: int, dst: int, n: int) -> None:
        dev = self.devs[sid]
        for name, v, size in (("DMA_SRC", src, 8), ("DMA_DST", dst, 8), ("DMA_LEN", n, 4),
                              ("DMA_CTRL", 0b11, 4)):  # GO, interrupt when done
            dev.region_write(0, OFF[name], v.to_bytes(size, "little"))
        self.ctx.run_soon()

    def status(self, sid: int) -> dict[str, int]:
        return STATUS.decode(self.reg(sid, "DMA_STATUS"))

    def reg(self, sid: int, name: str) -> int:
        return int.from_bytes(self.devs[sid].region_read(0, OFF[name], 4), "little")

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture
def env() -> Iterator[StallEnv]:
    e = StallEnv()
    yield e
    e.close()


def _source(env: StallEnv, sid: int, npages: int) -> bytes:
    data = bytes((i * 7 + 3) & 0xFF for i in range(npages << 12))
    env.mem.write(env.map(sid, SRC, npages), data)
    return data


def test_stall_waits_then_resume_retry_completes(env: StallEnv) -> None:
    env.stream(SID)
    data = _source(env, SID, 2)
    env.copy(SID, SRC, DST, len(data))
    # the write to the unmapped destination stalled: BUSY and STALLED, no completion yet
    st = env.status(SID)
    assert (st["BUSY"], st["STALLED"], st["DONE"], st["ERROR"]) == (1, 1, 0, 0)
    assert env.ctx.irqs == []
    (ev,) = env.events()
    assert ev["name"] == "F_TRANSLATION" and ev["STALL"] == 1 and ev["RNW"] == 0
    assert ev["STREAMID"] == SID and ev["INPUTADDR"] == DST
    # the fault handler maps the page and resumes: the copy runs again, stalls on page 2
    pa = env.map(SID, DST)
    env.resume(SID, ev["STAG"], RESP_RETRY)
    env.ctx.run_soon()
    (ev2,) = env.events()
    assert ev2["STALL"] == 1 and ev2["INPUTADDR"] == DST + 0x1000 and ev2["STAG"] != ev["STAG"]
    assert env.status(SID)["STALLED"] == 1
    pa2 = env.map(SID, DST + 0x1000)
    env.resume(SID, ev2["STAG"], RESP_RETRY)
    env.ctx.run_soon()
    st = env.status(SID)
    assert (st["BUSY"], st["STALLED"], st["DONE"], st["ERROR"]) == (0, 0, 1, 0)
    assert env.mem.read(pa, 4096) + env.mem.read(pa2, 4096) == data
    assert env.ctx.irqs == [(INTX, 0)]  # one completion interrupt, at the end
    assert env.reg(SID, "DMA_STALLS") == 2 and env.reg(SID, "DMA_COUNT") == 1
    c = env.mgr.counters
    assert (c.stalls, c.stall_retries, c.stall_aborts, c.stall_terms) == (2, 2, 0, 0)
    assert env.mgr.stats()["stalled"] == {"outstanding": 0, "held": 0}


@pytest.mark.parametrize("how", ["abort", "stall_term"])
def test_abort_or_stall_term_fails_the_copy_with_the_event(env: StallEnv, how: str) -> None:
    env.stream(SID)
    _source(env, SID, 1)
    env.copy(SID, SRC, DST, 64)
    (ev,) = env.events()
    env.map(SID, DST)  # even once mapped, a terminated transaction stays terminated
    if how == "abort":
        env.resume(SID, ev["STAG"], RESP_ABORT)
    else:
        env.stall_term(SID)
    env.ctx.run_soon()
    st = env.status(SID)
    assert (st["BUSY"], st["STALLED"], st["DONE"], st["ERROR"]) == (0, 0, 0, 1)
    assert st["ERR_CODE"] == DmaErr.TRANSLATION and st["EVENT"] == EventId.F_TRANSLATION
    assert env.ctx.irqs == [(INTX, 0)]
    assert env.mem.read(DATA + 0x1000, 64) == bytes(64)  # nothing was written
    c = env.mgr.counters
    assert (c.stall_aborts, c.stall_terms) == ((1, 0) if how == "abort" else (0, 1))
    # the STAG is free again; a RESUME for it now has no effect
    env.resume(SID, ev["STAG"], RESP_RETRY)
    assert c.stall_retries == 0 and env.mgr.stats()["stalled"]["outstanding"] == 0


def test_reset_while_stalled_cancels_the_copy(env: StallEnv) -> None:
    env.stream(SID)
    _source(env, SID, 1)
    env.copy(SID, SRC, DST, 64)
    (ev,) = env.events()
    env.devs[SID].reset()
    assert env.reg(SID, "DMA_STATUS") == 0
    dst = env.map(SID, DST)
    env.resume(SID, ev["STAG"], RESP_RETRY)  # the SMMU retries; the engine forgot it
    env.ctx.run_soon()
    assert env.reg(SID, "DMA_STATUS") == 0 and env.ctx.irqs == []
    assert env.mem.read(dst, 64) == bytes(64) and env.mgr.counters.stall_retries == 1
    # the engine works again afterwards (bus mastering back on after the reset)
    env.devs[SID].region_write(PciRegion.CONFIG, 4, COMMAND.encode(MEMORY=1, MASTER=1)
                               .to_bytes(2, "little"))
    env.copy(SID, SRC, DST, 64)
    assert env.status(SID)["DONE"] == 1 and env.mem.read(dst, 64) == env.mem.read(DATA, 64)


def test_stall_max_holds_the_next_stall_without_a_record() -> None:
    env = StallEnv(SmmuConfig(stall_max=1))
    try:
        for sid in (SID, SID2):
            env.stream(sid)
            _source(env, sid, 1)
        env.copy(SID, SRC, DST, 64)
        env.copy(SID2, SRC, DST, 64)
        (ev,) = env.events()  # only one stall record may be outstanding
        assert ev["STREAMID"] == SID and ev["STALL"] == 1
        assert env.status(SID2)["STALLED"] == 1  # held: waiting, but not recorded
        c = env.mgr.counters
        assert (c.stalls, c.stalls_held) == (1, 1)
        assert env.mgr.stats()["stalled"] == {"outstanding": 1, "held": 1}
        env.resume(SID, ev["STAG"], RESP_ABORT)  # the slot frees: SID2 retries and records
        env.ctx.run_soon()
        (ev2,) = env.events()
        assert ev2["STREAMID"] == SID2 and ev2["STALL"] == 1 and c.stalls == 2
        assert env.status(SID)["ERROR"] == 1 and env.status(SID2)["STALLED"] == 1
        env.map(SID2, DST)
        env.resume(SID2, ev2["STAG"], RESP_RETRY)
        env.ctx.run_soon()
        assert env.status(SID2)["DONE"] == 1
    finally:
        env.close()


def test_full_event_queue_holds_the_stall_until_there_is_room() -> None:
    env = StallEnv(evtq_log2=1)  # two records
    try:
        env.stream(SID2, stall=False)  # terminating faults (CD.R) fill the queue
        for i in range(2):
            env.copy(SID2, 0x70_0000 + (i << 12), DST, 8)
        assert env.smmu.evtq.full()
        env.stream(SID)
        _source(env, SID, 1)
        env.copy(SID, SRC, DST, 64)
        # the stall is neither recorded nor lost: no overflow, the transaction waits
        assert env.smmu.evtq.count() == 2 and not env.smmu.evtq.overflow_active
        assert env.status(SID)["STALLED"] == 1 and env.mgr.counters.stalls_held == 1
        evs = env.events()  # the driver makes room: the held transaction retries
        assert [e["STALL"] for e in evs] == [0, 0]
        env.ctx.run_soon()
        (ev,) = env.events()
        assert ev["STREAMID"] == SID and ev["STALL"] == 1 and ev["INPUTADDR"] == DST
        env.map(SID, DST)
        env.resume(SID, ev["STAG"], RESP_RETRY)
        env.ctx.run_soon()
        assert env.status(SID)["DONE"] == 1
    finally:
        env.close()


def test_disabled_event_queue_holds_the_stall_until_enabled(env: StallEnv) -> None:
    env.stream(SID)
    _source(env, SID, 1)
    env.h.w32("CR0", CR0.encode(SMMUEN=1, CMDQEN=1, PRIQEN=1))  # EVTQEN=0
    env.copy(SID, SRC, DST, 64)
    assert env.status(SID)["STALLED"] == 1 and env.smmu.evtq.empty()
    env.h.w32("CR0", CR0.encode(SMMUEN=1, CMDQEN=1, EVTQEN=1, PRIQEN=1))
    env.ctx.run_soon()
    (ev,) = env.events()
    assert ev["STALL"] == 1 and env.mgr.counters.stalls == 1
    env.stall_term(SID)  # terminates it like a recorded one
    env.ctx.run_soon()
    assert env.status(SID)["ERROR"] == 1 and env.mgr.counters.stall_terms == 1


def test_every_first_touch_stalls_until_the_buffer_is_faulted_in(env: StallEnv) -> None:
    """An SVA-like copy into 20 untouched pages with an 8-entry Event queue: the batched
    walk stalls on every page; what does not fit in the queue is held and records later.
    The handler maps each faulting page and resumes, until the copy completes."""
    env.stream(SID)
    npages = 20
    data = _source(env, SID, npages)
    env.copy(SID, SRC, DST, len(data))
    faulted: list[int] = []
    for _ in range(10):
        evs = env.events()
        env.ctx.run_soon()  # held transactions retry once the queue drained
        evs += env.events()
        if not evs:
            break
        for ev in evs:
            assert ev["STALL"] == 1 and ev["name"] == "F_TRANSLATION"
            faulted.append(ev["INPUTADDR"])
            env.map(SID, ev["INPUTADDR"])
            env.resume(SID, ev["STAG"], RESP_RETRY)
        env.ctx.run_soon()
    assert env.status(SID)["DONE"] == 1
    assert sorted(faulted) == [DST + (i << 12) for i in range(npages)]  # each page once
    c = env.mgr.counters
    assert c.stalls == c.stall_retries == npages  # recorded once each
    assert c.stalls_held >= npages - 8  # held at least once: did not fit the first time
    out = b"".join(env.mgr.dma_read(SID, None, DST + (i << 12), 4096) for i in range(npages))
    assert out == data


def test_stage2_fault_stalls_per_s2s(env: StallEnv) -> None:
    """An S2-only stream with STE.S2S: a stage-2 fault stalls (event S2=1, the IPA), the
    auto-allocated stage-2 domain holds it, CMD_RESUME Retry lets the DMA through."""
    s2 = b.PageTable(env.mem, env.al, ia_bits=40, start_level=1, stage2=True)
    b.write_words(env.mem, STRTAB + SID * fl.STE_SIZE,
                  b.make_ste(fl.STE_CONFIG_S2, s2_ttb=s2.root, s2_t0sz=24,
                             s2_sl0=b.s2_sl0_for(12, 1), s2_vmid=3, S2S=1))
    env.h.submit(encode_command("CFGI_STE", SID=SID, LEAF=1), encode_command("CMD_SYNC"))
    with pytest.raises(DmaFault) as ei:
        env.mgr.dma_write(SID, None, DST, b"stage two")
    pf = ei.value.pending
    assert pf is not None and pf.kind == "stall" and not pf.done
    assert env.mgr.device(SID).hwpt.fault is not None  # the guest-programmed S2 domain's
    (ev,) = env.events()
    assert ev["name"] == "F_TRANSLATION" and ev["S2"] == 1 and ev["STALL"] == 1
    assert ev["IPA"] == DST
    s2.map(DST, DATA)
    env.resume(SID, ev["STAG"], RESP_RETRY)
    assert pf.response is not None and pf.response.name == "SUCCESS"
    env.mgr.dma_write(SID, None, DST, b"stage two")  # the endpoint's retry
    assert env.mem.read(DATA, 9) == b"stage two"
