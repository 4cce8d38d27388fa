"""Guest command streams: the SMMUv3 model (with the real domain manager as its command
sink; one per process) enabled the way Linux's driver does it and brought back to a clean
state before each input (see :func:`_reset`), commands and an STE from the input written
into guest RAM, CMDQ_PROD written, then a translated DMA read by the stream.

Architected answers checked: commands are consumed up to PROD or CONS stops with
GERROR.CMDQ_ERR and CMDQ_CONS.ERR = CERROR_ILL at a command with an unknown opcode (an
unknown opcode is never consumed); the DMA through an STE with V == 0 faults with
C_BAD_STE; no exception, no error logged, no access outside guest RAM."""

from __future__ import annotations

from tests.fuzz.common import STATS, ErrorTrap, Finding, Reader, fenced_memory
from viommu_backend.domains import DomainManager
from viommu_backend.domains.results import DmaFault
from viommu_backend.endpoints.dma import fault_event
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import COMMANDS, encode_command
from viommu_backend.smmuv3.device import SMMUv3

RAM, RAM_SIZE = 0x4000_0000, 0x4_0000
CMDQ, EVTQ, STRTAB, TABLES = RAM, RAM + 0x1000, RAM + 0x2000, RAM + 0x8000
LOG2 = 5  # 32 commands
SID = 1
MEM = fenced_memory(RAM, RAM_SIZE)
TRAP = ErrorTrap()


def _bring_up() -> tuple[SMMUv3, DomainManager]:
    """The SMMU and domain manager, built once per process (enabled by :func:`_reset`)."""
    smmu = SMMUv3(memory=lambda: MEM)
    mgr = DomainManager(lambda: MEM)
    mgr.attach_smmu(smmu)
    mgr.add_device(SID)
    for name, value in (("CMDQ_BASE", CMDQ | LOG2), ("EVTQ_BASE", EVTQ | 4),
                        ("STRTAB_BASE", STRTAB),
                        ("STRTAB_BASE_CFG", regs.layout("STRTAB_BASE_CFG").encode(LOG2SIZE=4))):
        _write(smmu, name, value)
    return smmu, mgr


def _write(smmu: SMMUv3, name: str, value: int) -> None:
    r = regs.SMMU_REGS[name]
    smmu.write(r.offset, r.width // 8, value)


def _read(smmu: SMMUv3, name: str) -> int:
    r = regs.SMMU_REGS[name]
    return smmu.read(r.offset, r.width // 8)


def _reset(smmu: SMMUv3) -> None:
    """Bring the SMMU back to a clean state between inputs as a driver does: stop the
    command queue, acknowledge global errors, drain the event queue, rewind the command
    queue and invalidate every cached configuration and TLB entry (CFGI_ALL,
    TLBI_NSNH_ALL, CMD_SYNC); the queue is rewound again for the input.  A reset that
    does not take is a finding."""
    _write(smmu, "CR0", CMDQ_STOPPED)
    _write(smmu, "GERRORN", _read(smmu, "GERROR"))
    _write(smmu, "EVTQ_CONS", _read(smmu, "EVTQ_PROD"))  # consumed (and overflow acked)
    MEM.write(RAM, bytes(0x9000))
    MEM.write(CMDQ, INVALIDATE_ALL)
    _rewind_cmdq(smmu)
    _write(smmu, "CMDQ_PROD", len(INVALIDATE_ALL) // 16)
    cons = regs.layout("CMDQ_CONS").get(_read(smmu, "CMDQ_CONS"), "RD")  # ERR: stale
    if cons != len(INVALIDATE_ALL) // 16 or smmu.gerror_active():
        raise Finding(f"reset failed: CMDQ_CONS.RD {cons:#x}, GERROR {smmu.gerror_active():#x}")
    _write(smmu, "CR0", CMDQ_STOPPED)
    MEM.write(CMDQ, bytes(len(INVALIDATE_ALL)))
    _rewind_cmdq(smmu)


def _rewind_cmdq(smmu: SMMUv3) -> None:
    """PROD = CONS = 0 (CONS takes writes only while CMDQEN = 0), then CMDQEN = 1."""
    _write(smmu, "CMDQ_PROD", 0)
    _write(smmu, "CMDQ_CONS", 0)
    _write(smmu, "CR0", ENABLED)


INVALIDATE_ALL = b"".join(encode_command(n) for n in ("CFGI_ALL", "TLBI_NSNH_ALL", "CMD_SYNC"))
CMDQ_STOPPED = regs.layout("CR0").encode(SMMUEN=1, EVTQEN=1)
ENABLED = regs.layout("CR0").encode(SMMUEN=1, CMDQEN=1, EVTQEN=1)
SMMU, MGR = _bring_up()


def one_input(data: bytes) -> None:
    STATS["inputs"] += 1
    r = Reader(data)
    smmu, mgr = SMMU, MGR
    _reset(smmu)
    sink_errors = smmu.counters.sink_errors
    ste = r.take(64)
    MEM.write(STRTAB + SID * 64, ste)
    MEM.write(TABLES, r.take(256))  # a CD / tables the STE may point at
    prod = r.int(1) & ((2 << LOG2) - 1)
    cmds = r.rest()[:16 << LOG2]
    MEM.write(CMDQ, cmds)
    smmu.write(regs.SMMU_REGS["CMDQ_PROD"].offset, 4, prod)
    cons_reg = smmu.read(regs.SMMU_REGS["CMDQ_CONS"].offset, 4)
    cons = cons_reg & ((2 << LOG2) - 1)
    err = regs.layout("CMDQ_CONS").get(cons_reg, "ERR")
    failed = bool(smmu.gerror_active("CMDQ_ERR"))
    n = done = 0
    n, done = prod, cons
    for i in range(done):
        if (MEM.read(CMDQ + 16 * (i % (1 << LOG2)), 1)[0]) not in COMMANDS:
            raise Finding(f"command {i} with unknown opcode consumed")
    if failed:
        if err not in (regs.CERROR_ILL, regs.CERROR_ABT, regs.CERROR_ATC_INV_SYNC):
            raise Finding(f"CMDQ_ERR with CERROR {err}")
        op = MEM.read(CMDQ + 16 * (cons % (1 << LOG2)), 1)[0]
        if op not in COMMANDS and err != regs.CERROR_ILL:
            raise Finding(f"unknown opcode {op:#x} stopped with CERROR {err}, not ILL")
        STATS[f"CERROR_{err}"] += 1
    elif done != n:
        raise Finding(f"CONS {done} != PROD {n} without CMDQ_ERR")
    else:
        STATS["consumed"] += n
    TRAP.check()
    if smmu.counters.sink_errors != sink_errors:
        raise Finding("command sink failed")
    _dma(mgr, ste)
    TRAP.check()


def _dma(mgr: DomainManager, ste: bytes) -> None:
    try:
        mgr.dma_read(SID, None, 0x10_0000, 8)
        STATS["dma_ok"] += 1
    except DmaFault as e:
        ev = fault_event(e) or "ABORT"
        STATS[ev] += 1
        if not ste[0] & 1 and ev != "C_BAD_STE":
            raise Finding(f"DMA through an STE with V == 0 gave {ev}, not C_BAD_STE")


def seeds() -> list[bytes]:
    ste = b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=TABLES)
    ste_b = b"".join(w.to_bytes(8, "little") for w in ste)
    cd = b"".join(w.to_bytes(8, "little") for w in b.make_cd(TABLES + 0x1000))
    out = []
    for names in (("CFGI_ALL", "CMD_SYNC"), ("TLBI_NH_ALL", "TLBI_NSNH_ALL", "CMD_SYNC"),
                  ("CFGI_STE", "CFGI_CD", "TLBI_NH_ASID", "TLBI_NH_VA", "CMD_SYNC")):
        cmds = b"".join(encode_command(n) for n in names)
        out.append(ste_b + cd.ljust(256, b"\0") + bytes([len(names)]) + cmds)
    return out
