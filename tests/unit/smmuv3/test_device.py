"""The SMMUv3 register model driven by register writes against real guest memory."""

from __future__ import annotations

from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import encode_command
from viommu_backend.smmuv3.events import Event, PageRequest, decode_event, decode_page_request
from viommu_backend.smmuv3.function import CLASS_CODE, MSIX_BAR, MSIX_VECTORS, SMMUv3Function
from viommu_backend.smmuv3.queues import Produced
from viommu_backend.vfio_user.device import PciIrq, PciRegion

from tests.support.smmuv3_harness import (CMDQ_ADDR, EVTQ_ADDR, MSI_ADDR, PRIQ_ADDR, RAM_BASE, RAM_SIZE,
                            Harness, make_memory, off)

GERR = regs.layout("GERROR")
CONS = regs.layout("CMDQ_CONS")


def test_commands_run_on_prod_write_and_cons_follows(registers):
    h = Harness(shared=registers == "shared")
    h.setup_queues()
    h.submit(encode_command("CFGI_STE", SID=3), encode_command("TLBI_NH_ASID", VMID=0, ASID=9),
             encode_command("CMD_SYNC"))
    assert h.r32("CMDQ_CONS") == h.prod == 3
    assert [c[0] for c in h.sink.calls] == ["stream_table_changed", "tlbi_nh_asid"]
    c = h.smmu.counters
    assert c.commands == {"CFGI_STE": 1, "TLBI_NH_ASID": 1, "CMD_SYNC": 1} and c.syncs == 1


def test_cfgi_cd_with_a_substream_counted(registers):
    h = Harness(shared=registers == "shared")
    h.setup_queues()
    h.submit(encode_command("CFGI_CD", SID=3, SSID=0), encode_command("CFGI_CD", SID=3, SSID=5),
             encode_command("CFGI_CD_ALL", SID=3), encode_command("CMD_SYNC"))
    assert [c[1]["ssid"] for c in h.sink.calls] == [0, 5, None]
    assert h.smmu.counters.cfgi_cd_ssids == 1
    assert h.smmu.counters.as_dict()["cfgi_cd_ssids"] == 1


def test_commands_wait_for_cmdqen_and_wrap_around(registers):
    h = Harness(cmdq_log2=2, shared=registers == "shared")  # 4 entries
    h.setup_queues()
    h.w32("CR0", 0)  # queue off: PROD writes are latched but nothing runs
    h.submit(encode_command("CFGI_STE", SID=1))
    assert h.sink.calls == [] and regs.layout("CMDQ_CONS").get(h.r32("CMDQ_CONS"), "RD") == 0
    h.w32("CR0", regs.layout("CR0").encode(CMDQEN=1))
    assert len(h.sink.calls) == 1
    for sid in range(2, 12):  # wraps the 4-entry ring several times
        h.submit(encode_command("CFGI_STE", SID=sid))
    assert [c[1]["sid"] for c in h.sink.calls] == list(range(1, 12))
    assert h.r32("CMDQ_CONS") == h.prod == 11 & 0b111


def test_cmd_sync_msi_write_lands_in_guest_memory(registers):
    h = Harness(shared=registers == "shared")
    h.setup_queues()
    # Linux: MSIADDR = the CMD_SYNC entry itself, MSIDATA = 0, then it polls word 0
    slot = h.cmd_addr(h.prod)
    h.submit(encode_command("CMD_SYNC", CS=1, MSH=3, MSIATTR=0xF, MSIADDR=slot))
    assert h.mem.read_u32(slot) == 0
    assert h.mem.read_u32(slot + 4) == 0
    h.submit(encode_command("CMD_SYNC", CS=1, MSIDATA=0xC0FFEE, MSIADDR=MSI_ADDR))
    assert h.mem.read_u32(MSI_ADDR) == 0xC0FFEE
    assert h.smmu.counters.msi_writes == 2 and h.irq.pulses == []


def test_cmd_sync_msi_outside_memory_raises_gerror_but_completes(registers):
    h = Harness(shared=registers == "shared")
    h.setup_queues()
    h.submit(encode_command("CMD_SYNC", CS=1, MSIADDR=0x1000))
    assert h.r32("CMDQ_CONS") == 1
    assert GERR.get(h.r32("GERROR") ^ h.r32("GERRORN"), "MSI_CMDQ_ABT_ERR") == 1


def test_illegal_command_stops_queue_until_gerrorn_ack(registers):
    h = Harness(shared=registers == "shared")
    h.setup_queues()
    h.put(encode_command("CFGI_STE", SID=1))
    bad = h.prod
    h.put(bytes([0x7F]) + bytes(15), encode_command("CFGI_STE", SID=2))
    h.w32("CMDQ_PROD", h.prod)
    cons = h.r32("CMDQ_CONS")
    assert CONS.get(cons, "RD") == bad and CONS.get(cons, "ERR") == regs.CERROR_ILL
    gerror = h.r32("GERROR")
    assert GERR.get(gerror ^ h.r32("GERRORN"), "CMDQ_ERR") == 1
    assert [c[1]["sid"] for c in h.sink.calls] == [1]
    assert h.irq.levels["gerror"] is True
    # more commands while the error is active are not processed
    h.submit(encode_command("CFGI_STE", SID=3))
    assert len(h.sink.calls) == 1
    # the driver replaces the bad command with a CMD_SYNC and acknowledges
    h.mem.write(h.cmd_addr(bad), encode_command("CMD_SYNC"))
    h.w32("GERRORN", gerror)
    assert [c[1]["sid"] for c in h.sink.calls] == [1, 2, 3]
    assert CONS.get(h.r32("CMDQ_CONS"), "RD") == h.prod
    assert h.irq.levels["gerror"] is False


def test_gerror_toggles_only_once_while_active(registers):
    h = Harness(shared=registers == "shared")
    h.setup_queues()
    h.submit(bytes(16))
    g1 = h.r32("GERROR")
    h.smmu.raise_gerror("CMDQ_ERR")  # already active: no toggle
    assert h.r32("GERROR") == g1 and h.smmu.counters.gerrors == {"CMDQ_ERR": 1}
    h.w32("GERRORN", 0xFFFFFFFF)  # only active bits can be acknowledged
    assert h.r32("GERRORN") == g1


def test_cmdq_outside_guest_memory_is_cerror_abt(registers):
    h = Harness(shared=registers == "shared")
    h.setup_queues(cmdq_addr=RAM_BASE + RAM_SIZE)
    h.w32("CMDQ_PROD", 1)
    assert CONS.get(h.r32("CMDQ_CONS"), "ERR") == regs.CERROR_ABT
    assert GERR.get(h.r32("GERROR"), "CMDQ_ERR") == 1


def test_atc_inv_failure_reported_at_sync(registers):
    h = Harness(shared=registers == "shared")
    h.sink.atc_result = False
    h.setup_queues()
    h.submit(encode_command("ATC_INV", SID=1), encode_command("CMD_SYNC"))
    assert CONS.get(h.r32("CMDQ_CONS"), "ERR") == regs.CERROR_ATC_INV_SYNC
    assert CONS.get(h.r32("CMDQ_CONS"), "RD") == 1  # stopped at the CMD_SYNC


def test_event_record_written_and_wired_level(registers):
    h = Harness(shared=registers == "shared")
    h.setup_queues()
    ev = Event("F_PERMISSION", sid=0x100, ssid=1, addr=0xDEAD000, read=False)
    assert h.smmu.record_event(ev) is Produced.WRITTEN
    assert h.mem.read(EVTQ_ADDR, 32) == ev.encode()
    assert decode_event(h.mem.read(EVTQ_ADDR, 32))["INPUTADDR"] == 0xDEAD000
    assert h.bar.read(off("EVTQ_PROD"), 4) == 1
    assert h.irq.levels["evtq"] is True
    h.bar.write(off("EVTQ_CONS"), 4, 1)  # driver consumed it
    assert h.irq.levels["evtq"] is False
    assert h.smmu.counters.events == {"F_PERMISSION": 1}


def test_event_queue_overflow_through_registers(registers):
    h = Harness(evtq_log2=1, shared=registers == "shared")  # 2 entries
    h.setup_queues()
    for i in range(5):
        h.smmu.record_event(Event("F_TRANSLATION", sid=i))
    prod = h.bar.read(off("EVTQ_PROD"), 4)
    assert prod == (1 << 31) | 0b10  # full (wrap 1, idx 0) and OVFLG toggled
    assert [decode_event(h.mem.read(EVTQ_ADDR + 32 * i, 32))["STREAMID"] for i in (0, 1)] \
        == [0, 1]
    h.bar.write(off("EVTQ_CONS"), 4, prod)  # consume both + ack overflow
    h.smmu.record_event(Event("F_TRANSLATION", sid=9))
    assert h.bar.read(off("EVTQ_PROD"), 4) == (1 << 31) | 0b11


def test_events_dropped_when_queue_disabled_or_outside_memory(registers):
    h = Harness(shared=registers == "shared")
    assert h.smmu.record_event(Event("C_BAD_STE", sid=1)) is Produced.DISABLED
    h.setup_queues(evtq_addr=RAM_BASE + RAM_SIZE)
    assert h.smmu.record_event(Event("C_BAD_STE", sid=1)) is Produced.ABORT
    assert GERR.get(h.r32("GERROR"), "EVTQ_ABT_ERR") == 1


def test_priq_records(registers):
    h = Harness(shared=registers == "shared")
    h.setup_queues()
    req = PageRequest(sid=0x100, prg_index=5, addr=0x7000_0000, ssid=2, write=True)
    assert h.smmu.record_page_request(req) is Produced.WRITTEN
    d = decode_page_request(h.mem.read(PRIQ_ADDR, 16))
    assert (d["SID"], d["SSID"], d["SSV"], d["PRG_INDEX"], d["ADDR"], d["WRITE"]) == \
        (0x100, 2, 1, 5, 0x7000_0000, 1)
    assert h.bar.read(off("PRIQ_PROD"), 4) == 1 and h.irq.levels["priq"] is True


def test_irq_enable_gates_wired_interrupts(registers):
    h = Harness(shared=registers == "shared")
    h.setup_queues()
    h.w32("IRQ_CTRL", 0)
    h.smmu.record_event(Event("C_BAD_STE", sid=1))
    assert h.irq.levels.get("evtq", False) is False
    h.w32("IRQ_CTRL", regs.layout("IRQ_CTRL").encode(EVTQ_IRQEN=1))
    assert h.irq.levels["evtq"] is True


def test_msi_delivery_for_evtq_and_gerror(registers):
    h = Harness(shared=registers == "shared")
    h.setup_queues()
    h.w64("EVTQ_IRQ_CFG0", MSI_ADDR)
    h.w32("EVTQ_IRQ_CFG1", 0x1234)
    h.smmu.record_event(Event("C_BAD_STE", sid=1))
    assert h.mem.read_u32(MSI_ADDR) == 0x1234
    assert h.irq.levels.get("evtq", False) is False  # MSI replaces the wired line
    h.w64("GERROR_IRQ_CFG0", 0x10)  # not guest memory
    h.smmu.raise_gerror("SFM_ERR")
    active = h.r32("GERROR") ^ h.r32("GERRORN")
    assert GERR.get(active, "MSI_GERROR_ABT_ERR") == 1 and GERR.get(active, "SFM_ERR") == 1


def test_pci_function_combined_intx():
    fn = SMMUv3Function()
    ctx = _Ctx()
    fn.connected(ctx)
    assert fn.cfg.header("CLASS_CODE") == CLASS_CODE
    assert fn.region_info(PciRegion.BAR0).size == 0x20000
    w = lambda name, v: fn.region_write(0, off(name), v.to_bytes(4, "little"))
    fn.region_write(0, off("EVTQ_BASE"), (EVTQ_ADDR | 3).to_bytes(8, "little"))
    w("CR0", regs.layout("CR0").encode(EVTQEN=1))
    w("IRQ_CTRL", regs.layout("IRQ_CTRL").encode(EVTQ_IRQEN=1))
    assert int.from_bytes(fn.region_read(0, off("CR0ACK"), 4), "little") == 4
    fn.smmu.record_event(Event("F_TRANSLATION", sid=2))
    assert fn.intx_level and ctx.irqs == [(PciIrq.INTX, 0)]
    assert ctx.memory.read(EVTQ_ADDR, 1) == b"\x10"
    w("EVTQ_CONS", 1)
    assert not fn.intx_level


def test_pci_function_msix_vectors():
    fn = SMMUv3Function(msix=True)
    ctx = _Ctx()
    fn.connected(ctx)
    assert fn.msix is not None and fn.msix.nvec == len(MSIX_VECTORS)
    cap = fn.msix.off
    ctrl = int.from_bytes(fn.region_read(PciRegion.CONFIG, cap + 2, 2), "little")
    fn.region_write(PciRegion.CONFIG, cap + 2, (ctrl | 1 << 15).to_bytes(2, "little"))
    vec = MSIX_VECTORS["gerror"]
    fn.region_write(MSIX_BAR, vec * 16 + 12, (0).to_bytes(4, "little"))  # unmask
    fn.smmu.write(off("IRQ_CTRL"), 4, 1)
    fn.smmu.raise_gerror("SFM_ERR")
    assert ctx.irqs == [(PciIrq.MSIX, vec)] and not fn.intx_level


class _Ctx:
    """DeviceContext stand-in: real GuestMemory, recorded interrupt triggers."""

    def __init__(self) -> None:
        self.memory = make_memory()
        self.irqs: list[tuple[int, int]] = []

    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        self.irqs.append((int(index), subindex))
        return True

    async def dma_read(self, addr: int, count: int) -> bytes:  # pragma: no cover
        raise NotImplementedError

    async def dma_write(self, addr: int, data: bytes) -> None:  # pragma: no cover
        raise NotImplementedError

    def call_soon(self, fn) -> None:  # pragma: no cover
        fn()


def test_linux_style_bring_up_sequence(registers):
    """The register sequence of arm_smmu_device_reset(): every ACK/poll completes at once."""
    import json

    h = Harness(shared=registers == "shared")
    cr0 = regs.layout("CR0")
    h.w32("CR0", 0)
    assert h.r32("CR0ACK") == 0
    gbpa = regs.layout("GBPA")
    h.w32("GBPA", gbpa.encode(ABORT=1, UPDATE=1))
    assert not gbpa.get(h.r32("GBPA"), "UPDATE")
    h.w32("CR1", 0xD75)
    h.w32("CR2", 0b110)
    h.w64("STRTAB_BASE", (1 << 62) | (RAM_BASE + 0x8_0000))
    h.w32("STRTAB_BASE_CFG", regs.layout("STRTAB_BASE_CFG").encode(FMT=1, SPLIT=8,
                                                                   LOG2SIZE=16))
    h.w64("CMDQ_BASE", (1 << 62) | CMDQ_ADDR | h.cmdq_log2)
    h.w32("CMDQ_PROD", 0)
    h.w32("CMDQ_CONS", 0)
    h.w32("CR0", cr0.encode(CMDQEN=1))
    assert h.r32("CR0ACK") == cr0.encode(CMDQEN=1)
    h.submit(encode_command("CFGI_ALL"), encode_command("CMD_SYNC"))
    h.submit(encode_command("TLBI_NSNH_ALL"), encode_command("CMD_SYNC"))
    assert h.r32("CMDQ_CONS") == 4
    h.w64("EVTQ_BASE", (1 << 62) | EVTQ_ADDR | h.evtq_log2)
    h.bar.write(off("EVTQ_PROD"), 4, 0)
    h.bar.write(off("EVTQ_CONS"), 4, 0)
    h.w64("PRIQ_BASE", (1 << 62) | PRIQ_ADDR | h.priq_log2)
    h.w32("CR0", cr0.encode(CMDQEN=1, EVTQEN=1, PRIQEN=1))
    h.w32("IRQ_CTRL", 0)
    assert h.r32("IRQ_CTRLACK") == 0
    h.w32("IRQ_CTRL", 0b111)
    assert h.r32("IRQ_CTRLACK") == 0b111
    h.w32("CR0", cr0.encode(CMDQEN=1, EVTQEN=1, PRIQEN=1, SMMUEN=1))
    assert h.smmu.enabled and h.smmu.stream_table.base == RAM_BASE + 0x8_0000
    assert h.smmu.stream_table.cfg == {"FMT": 1, "LOG2SIZE": 16, "SPLIT": 8}
    # GBPA update, CFGI_ALL, SMMUEN 0->1
    assert h.sink.calls.count(("stream_table_changed", {"sid": None})) == 3
    assert ("tlbi_nsnh_all", {}) in h.sink.calls
    assert h.r32("GERROR") == h.r32("GERRORN") == 0
    json.dumps(h.smmu.snapshot())  # QMP-ready


def test_cmdq_running_off_the_end_of_guest_memory_aborts_at_the_first_unreadable_entry(registers):
    """A 2 MiB queue over 1 MiB of RAM: the commands in RAM run, CONS stops at the first
    entry outside it with CERROR_ABT (the batched read falls back to entry by entry)."""
    h = Harness(shared=registers == "shared", cmdq_log2=17)
    h.setup_queues()
    last = RAM_SIZE // 16 - 1  # the last entry inside RAM
    h.w32("CR0", 0)
    h.w32("CMDQ_CONS", last)
    h.w32("CMDQ_PROD", last)
    h.w32("CR0", regs.layout("CR0").encode(CMDQEN=1))
    h.prod = last
    h.put(encode_command("CMD_SYNC"))
    h.w32("CMDQ_PROD", last + 2)  # the CMD_SYNC and one entry beyond RAM
    assert h.smmu.counters.syncs == 1
    cons = h.r32("CMDQ_CONS")
    assert CONS.get(cons, "ERR") == regs.CERROR_ABT and cons & 0xFFFFF == last + 1
    assert GERR.get(h.r32("GERROR"), "CMDQ_ERR") == 1
