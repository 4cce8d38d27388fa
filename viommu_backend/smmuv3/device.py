"""The SMMUv3 register model: CR0/ACK, GBPA, IRQ_CTRL, GERROR, stream table base,
the three queues, command processing, event / PRI record production and interrupts.

Sans-IO: the model sees 32/64-bit register accesses (``read``/``write``), a guest memory
object (bounds-checked) and an :class:`IrqSink`; it never blocks.  Command processing runs
synchronously on the CMDQ_PROD write (all state is in memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.cmdq import NullCommandSink, check_sink, dispatch
from viommu_backend.smmuv3.commands import (CS_IRQ, CS_SEV, Command, IllegalCommand,
                                            decode_command)
from viommu_backend.smmuv3.smmu_config import SmmuConfig
from viommu_backend.smmuv3.events import Event, PageRequest
from viommu_backend.smmuv3.queues import (CommandQueue, Memory, OutputQueue, Produced,
                                          QueueMemoryError)
from viommu_backend.trace import Tracer

log = logging.getLogger(__name__)

_CR0 = regs.layout("CR0")
_GERR = regs.layout("GERROR")
_IRQC = regs.layout("IRQ_CTRL")
_GBPA = regs.layout("GBPA")
_STCFG = regs.layout("STRTAB_BASE_CFG")

# interrupt sources (names used by IrqSink and the PCI function's MSI-X vectors)
IRQ_EVTQ = "evtq"
IRQ_PRIQ = "priq"
IRQ_GERROR = "gerror"
IRQ_CMD_SYNC = "cmd_sync"
IRQ_SOURCES = (IRQ_EVTQ, IRQ_PRIQ, IRQ_CMD_SYNC, IRQ_GERROR)


class IrqSink(Protocol):
    """Where the SMMU's wired interrupts go (the PCI function: INTx "combined" or
    MSI-X vectors).  ``set_level`` reports a source's level when it changes;
    ``pulse`` an edge-only source (CMD_SYNC completion with CS=IRQ and no MSI address)."""

    def set_level(self, source: str, level: bool) -> None: ...

    def pulse(self, source: str) -> None: ...


class NullIrqSink:
    def set_level(self, source: str, level: bool) -> None:
        pass

    def pulse(self, source: str) -> None:
        pass


@dataclass(frozen=True)
class StreamTableConfig:
    """What the domain manager needs to find STEs (valid while ``enabled``)."""

    enabled: bool  # CR0.SMMUEN
    base: int
    fmt: int  # regs.STRTAB_FMT_LINEAR / STRTAB_FMT_2LVL
    log2size: int
    split: int
    sidsize: int
    gbpa_abort: bool  # with SMMUEN=0: abort (True) or bypass all transactions

    @property
    def cfg(self) -> dict[str, int]:
        """STRTAB_BASE_CFG fields, as ``ste.fetch_ste(mem, base, cfg, sid)`` takes them."""
        return {"FMT": self.fmt, "LOG2SIZE": self.log2size, "SPLIT": self.split}


@dataclass
class SMMUv3Counters:
    """What one SMMU counted: commands, events, GERRORs, MSIs (``query-viommu``)."""

    commands: dict[str, int]
    events: dict[str, int]
    gerrors: dict[str, int]
    syncs: int = 0
    cfgi_cd_ssids: int = 0  # CMD_CFGI_CD with a SubstreamID != 0 (PASID CDs)
    msi_writes: int = 0
    page_requests: int = 0
    sink_errors: int = 0
    mmio_reads: dict[str, int] = field(default_factory=dict)  # trapped reads by register

    def as_dict(self) -> dict:
        return {"commands": dict(self.commands), "events": dict(self.events),
                "gerrors": dict(self.gerrors), "syncs": self.syncs,
                "cfgi_cd_ssids": self.cfgi_cd_ssids,
                "msi_writes": self.msi_writes, "page_requests": self.page_requests,
                "sink_errors": self.sink_errors, "mmio_reads": dict(self.mmio_reads)}


class SMMUv3:
    """One SMMUv3 register block (page 0 + page 1 of BAR0)."""

    def __init__(self, config: SmmuConfig | None = None, *, sink: object | None = None,
                 irq: IrqSink | None = None,
                 memory: Callable[[], Memory | None] | None = None) -> None:
        self.config = config or SmmuConfig()
        self.sink: object = sink if sink is not None else NullCommandSink()
        check_sink(self.sink)
        self.irq: IrqSink = irq or NullIrqSink()
        self._memory = memory or (lambda: None)
        self.ids = self.config.id_registers()
        self.counters = SMMUv3Counters({}, {}, {})
        self.on_event: list[Callable[[Event], None]] = []  # observers (QMP VIOMMU_* events)
        # see each command consumed, before it takes effect (the driver sanitizer)
        self.command_observers: list[Callable[[Command], None]] = []
        # called when the Event queue becomes writable again (the domain manager's held
        # stalled transactions retry, see evtq_writable)
        self.on_evtq_available: list[Callable[[], None]] = []
        self.injector: Any = None  # fault_injection.FaultInjector (QMP injection hook)
        self.trace: Tracer = Tracer()  # the Backend installs its shared one
        # registers in shared memory (shared_regs.SharedRegisters, which installs itself
        # here): its publish is called before every interrupt / MSI, so the driver reads
        # the state that raised it
        self.page: Any = None
        self.reset()

    # -- state -------------------------------------------------------------------------
    def reset(self) -> None:
        c = self.config
        self.cr0 = 0
        self.cr1 = 0
        self.cr2 = 0
        self.gbpa = 0  # ABORT=0: bypass while SMMUEN=0 (the architected reset is IMPDEF)
        self.irq_ctrl = 0
        self.gerror = 0
        self.gerrorn = 0
        self.irq_cfg = {IRQ_GERROR: [0, 0, 0], IRQ_EVTQ: [0, 0, 0], IRQ_PRIQ: [0, 0, 0]}
        self.strtab_base = 0
        self.strtab_base_cfg = 0
        self.cmdq = CommandQueue("CMDQ", 16, c.cmdqs)
        self.evtq = OutputQueue("EVTQ", 32, c.evtqs)
        self.priq = OutputQueue("PRIQ", 16, c.priqs)
        self._atc_failed = False
        self._levels = {s: False for s in IRQ_SOURCES}
        self._in_cmdq = False
        self.cmd_sync_held: int | None = None  # CONS of a CMD_SYNC held by fault injection
        self._sync_pass_at: int | None = None
        for s in (IRQ_EVTQ, IRQ_PRIQ, IRQ_GERROR):
            self.irq.set_level(s, False)

    @property
    def memory(self) -> Memory | None:
        return self._memory()

    def set_memory_provider(self, provider: Callable[[], Memory | None]) -> None:
        self._memory = provider

    def cr0_bit(self, name: str) -> bool:
        return bool(_CR0.get(self.cr0, name))

    @property
    def enabled(self) -> bool:
        return self.cr0_bit("SMMUEN")

    @property
    def stream_table(self) -> StreamTableConfig:
        lay = regs.layout("STRTAB_BASE")
        return StreamTableConfig(
            enabled=self.enabled, base=lay.get(self.strtab_base, "ADDR"),
            fmt=_STCFG.get(self.strtab_base_cfg, "FMT"),
            log2size=min(_STCFG.get(self.strtab_base_cfg, "LOG2SIZE"), self.config.sidsize),
            split=_STCFG.get(self.strtab_base_cfg, "SPLIT"), sidsize=self.config.sidsize,
            gbpa_abort=bool(_GBPA.get(self.gbpa, "ABORT")))

    # -- register access ----------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """MMIO read of ``size`` bytes (4 or 8; others are assembled from 4-byte reads)."""
        value = self._read(offset, size)
        if self.trace.on_reg:
            self._trace_reg("r", offset, size, value)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if self.trace.on_reg:  # before the effects (commands, IRQs) it causes
            self._trace_reg("w", offset, size, value)
        self._write(offset, size, value)

    def _trace_reg(self, op: str, offset: int, size: int, value: int) -> None:
        reg = regs.SMMU_REGS.at(offset)
        if reg is not None:
            name = reg.name
        else:
            hi = regs.SMMU_REGS.at(offset - 4)
            name = f"{hi.name}+4" if hi is not None and hi.width == 64 else None
        self.trace.record("reg", op=op, offset=offset, reg=name, size=size, value=value)

    def _read(self, offset: int, size: int) -> int:
        if size == 8:
            reg = regs.SMMU_REGS.at(offset)
            if reg is not None and reg.width == 64:
                self.counters.mmio_reads[reg.name] = self.counters.mmio_reads.get(reg.name, 0) + 1
                return self._read_reg(reg.name)
            return self._read(offset, 4) | self._read(offset + 4, 4) << 32
        if size in (1, 2):  # not architected; give the containing word's bytes
            word = self._read(offset & ~3, 4)
            shift = 8 * (offset & 3)
            return (word >> shift) & ((1 << 8 * size) - 1)
        reg = regs.SMMU_REGS.at(offset)
        if reg is not None:
            self.counters.mmio_reads[reg.name] = self.counters.mmio_reads.get(reg.name, 0) + 1
            return self._read_reg(reg.name) & 0xFFFFFFFF
        hi = regs.SMMU_REGS.at(offset - 4)
        if hi is not None and hi.width == 64:  # upper half of a 64-bit register
            return self._read_reg(hi.name) >> 32
        return 0  # reserved: RAZ

    def _write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            reg = regs.SMMU_REGS.at(offset)
            if reg is not None and reg.width == 64:
                self._write_reg(reg.name, value)
                return
            self._write(offset, 4, value & 0xFFFFFFFF)
            self._write(offset + 4, 4, value >> 32)
            return
        if size != 4:
            return  # sub-word writes are not architected: ignore
        reg = regs.SMMU_REGS.at(offset)
        if reg is not None:
            if reg.width == 64:
                old = self._read_reg(reg.name)
                self._write_reg(reg.name, (old & ~0xFFFFFFFF) | value)
            else:
                self._write_reg(reg.name, value)
            return
        hi = regs.SMMU_REGS.at(offset - 4)
        if hi is not None and hi.width == 64:
            old = self._read_reg(hi.name)
            self._write_reg(hi.name, (old & 0xFFFFFFFF) | (value << 32))
        # else reserved: WI

    def register_value(self, name: str) -> int:
        """What register ``name`` reads as (no counting, no trace)."""
        return self._read_reg(name)

    def _read_reg(self, name: str) -> int:
        if name in self.ids:
            return self.ids[name]
        match name:
            case "CR0" | "CR0ACK":
                return self.cr0
            case "CR1":
                return self.cr1
            case "CR2":
                return self.cr2
            case "STATUSR" | "AGBPA":
                return 0
            case "GBPA":
                return self.gbpa
            case "IRQ_CTRL" | "IRQ_CTRLACK":
                return self.irq_ctrl
            case "GERROR":
                return self.gerror
            case "GERRORN":
                return self.gerrorn
            case "STRTAB_BASE":
                return self.strtab_base
            case "STRTAB_BASE_CFG":
                return self.strtab_base_cfg
            case "CMDQ_BASE":
                return self.cmdq.base_reg
            case "CMDQ_PROD":
                return self.cmdq.prod_reg
            case "CMDQ_CONS":
                return self.cmdq.cons_reg
            case "EVTQ_BASE":
                return self.evtq.base_reg
            case "EVTQ_PROD":
                return self.evtq.prod_reg
            case "EVTQ_CONS":
                return self.evtq.cons_reg
            case "PRIQ_BASE":
                return self.priq.base_reg
            case "PRIQ_PROD":
                return self.priq.prod_reg
            case "PRIQ_CONS":
                return self.priq.cons_reg
        src, idx = _irq_cfg_reg(name)
        return self.irq_cfg[src][idx]

    def _write_reg(self, name: str, value: int) -> None:
        mask = regs.SMMU_REGS[name].wmask
        if not mask:
            return  # read-only register
        value &= mask
        match name:
            case "CR0":
                self._write_cr0(value)
            case "CR1":
                self.cr1 = value
            case "CR2":
                self.cr2 = value
            case "GBPA":
                # the update completes at once: UPDATE reads back 0
                if value & _GBPA["UPDATE"].mask:
                    self.gbpa = value & ~_GBPA["UPDATE"].mask
                    if not self.enabled:
                        self._notify_sink("stream_table_changed", sid=None)
            case "IRQ_CTRL":
                self.irq_ctrl = value
                self._update_irqs()
            case "GERRORN":
                self._write_gerrorn(value)
            case "STRTAB_BASE":
                self.strtab_base = value
            case "STRTAB_BASE_CFG":
                self.strtab_base_cfg = value
            case "CMDQ_BASE":
                if not self.cr0_bit("CMDQEN"):
                    self.cmdq.base_reg = value
            case "CMDQ_PROD":
                self.cmdq.write_prod(value)
                self.process_cmdq()
            case "CMDQ_CONS":
                if not self.cr0_bit("CMDQEN"):
                    self.cmdq.write_cons(value)
            case "EVTQ_BASE":
                if not self.cr0_bit("EVTQEN"):
                    self.evtq.base_reg = value
            case "EVTQ_PROD":
                if not self.cr0_bit("EVTQEN"):
                    self.evtq.write_prod(value)
            case "EVTQ_CONS":
                self.evtq.write_cons(value)
                self._update_irqs()
                self._evtq_maybe_available()
            case "PRIQ_BASE":
                if not self.cr0_bit("PRIQEN"):
                    self.priq.base_reg = value
            case "PRIQ_PROD":
                if not self.cr0_bit("PRIQEN"):
                    self.priq.write_prod(value)
            case "PRIQ_CONS":
                self.priq.write_cons(value)
                self._update_irqs()
            case _:
                src, idx = _irq_cfg_reg(name)
                self.irq_cfg[src][idx] = value

    def _write_cr0(self, value: int) -> None:
        if not self.config.pri:
            value = _CR0.set(value, "PRIQEN", 0)
        old = self.cr0
        self.cr0 = value  # CR0ACK follows at once (Linux polls it)
        changed = old ^ value
        if changed & _CR0["SMMUEN"].mask:
            # the stream table base/config are latched now; every stream is re-decoded
            self._notify_sink("stream_table_changed", sid=None)
        if changed & (_CR0["EVTQEN"].mask | _CR0["PRIQEN"].mask):
            self._update_irqs()
        if changed & value & _CR0["EVTQEN"].mask:
            self._evtq_maybe_available()
        if value & _CR0["CMDQEN"].mask and changed & _CR0["CMDQEN"].mask:
            self.process_cmdq()

    # -- GERROR ---------------------------------------------------------------------------
    def gerror_active(self, name: str | None = None) -> int:
        active = (self.gerror ^ self.gerrorn) & regs.GERROR_IMPLEMENTED
        return active if name is None else active & _GERR[name].mask

    def raise_gerror(self, name: str) -> None:
        """Toggle GERROR.<name> unless that error is already active."""
        bit = _GERR[name].mask
        if self.gerror_active(name):
            return
        self.gerror ^= bit
        self.counters.gerrors[name] = self.counters.gerrors.get(name, 0) + 1
        log.debug("GERROR %s", name)
        if self.trace.on_gerror:
            if name == "CMDQ_ERR":
                self.trace.record("gerror", name=name, cerror=self.cmdq.err, cons=self.cmdq.cons)
            else:
                self.trace.record("gerror", name=name)
        if _IRQC.get(self.irq_ctrl, "GERROR_IRQEN") and self._msi_enabled(IRQ_GERROR):
            self._send_msi(IRQ_GERROR)
        self._update_irqs()

    def _write_gerrorn(self, value: int) -> None:
        was_cmdq_err = self.gerror_active("CMDQ_ERR")
        was_evtq_abt = self.gerror_active("EVTQ_ABT_ERR")
        # software may only toggle bits whose error is active; other changes are ignored
        active = self.gerror_active()
        self.gerrorn = (self.gerrorn & ~active) | (value & active)
        self._update_irqs()
        if was_evtq_abt and not self.gerror_active("EVTQ_ABT_ERR"):
            self._evtq_maybe_available()
        if was_cmdq_err and not self.gerror_active("CMDQ_ERR"):
            self.process_cmdq()  # resume from CONS (the driver fixed the command there)

    # -- interrupts -----------------------------------------------------------------------
    def _msi_enabled(self, source: str) -> bool:
        return self.config.msi and regs.layout("EVTQ_IRQ_CFG0").get(
            self.irq_cfg[source][0], "ADDR") != 0

    def _send_msi(self, source: str) -> None:
        """The MSI write of *_IRQ_CFG1 to *_IRQ_CFG0 (a 32-bit store to guest memory)."""
        addr = self.irq_cfg[source][0]
        data = self.irq_cfg[source][1]
        if self.trace.on_irq:
            self.trace.record("irq", source=source, kind="msi", addr=addr, data=data)
        if not self._msi_write(addr, data):
            self.raise_gerror({IRQ_GERROR: "MSI_GERROR_ABT_ERR", IRQ_EVTQ: "MSI_EVTQ_ABT_ERR",
                               IRQ_PRIQ: "MSI_PRIQ_ABT_ERR"}[source])

    def _msi_write(self, addr: int, data: int) -> bool:
        self._publish()
        mem = self.memory
        if mem is None:
            return False
        try:
            mem.write(addr, (data & 0xFFFFFFFF).to_bytes(4, "little"))
        except Exception:  # GuestMemoryError, unwritable region
            return False
        self.counters.msi_writes += 1
        return True

    def _wired_levels(self) -> dict[str, bool]:
        ic = self.irq_ctrl
        return {
            IRQ_EVTQ: bool(_IRQC.get(ic, "EVTQ_IRQEN")) and self.cr0_bit("EVTQEN")
            and not self._msi_enabled(IRQ_EVTQ) and self.evtq.pending(),
            IRQ_PRIQ: bool(_IRQC.get(ic, "PRIQ_IRQEN")) and self.cr0_bit("PRIQEN")
            and not self._msi_enabled(IRQ_PRIQ) and self.priq.pending(),
            IRQ_GERROR: bool(_IRQC.get(ic, "GERROR_IRQEN"))
            and not self._msi_enabled(IRQ_GERROR) and bool(self.gerror_active()),
        }

    def _publish(self) -> None:
        if self.page is not None:
            self.page.publish()

    def _update_irqs(self) -> None:
        self._publish()
        for src, level in self._wired_levels().items():
            if self._levels[src] != level:
                self._levels[src] = level
                if self.trace.on_irq:
                    self.trace.record("irq", source=src, kind="level", level=level)
                self.irq.set_level(src, level)

    # -- command queue -------------------------------------------------------------------
    def process_cmdq(self) -> None:
        """Consume commands from CONS to PROD.  Stops at an error (CONS.ERR, GERROR.CMDQ_ERR)
        until the driver acknowledges it through GERRORN."""
        if self._in_cmdq:  # a sink call that wrote CMDQ_PROD re-entrantly
            return
        self._in_cmdq = True
        try:
            self._run_cmdq()
        finally:
            self._in_cmdq = False

    def _run_cmdq(self) -> None:
        q = self.cmdq
        if not self.cr0_bit("CMDQEN") or self.gerror_active("CMDQ_ERR") \
                or self.cmd_sync_held is not None:
            return
        mem = self.memory
        n, size = q.count(), q.entry_size
        try:  # the commands up to PROD in one read (an SMMU may read ahead of CONS)
            batch: bytes | None = q.read_entries(mem, q.cons, n) if n else b""
        except QueueMemoryError:
            batch = None  # entry by entry: the first that cannot be read aborts
        for k in range(n):
            if batch is not None:
                raw = batch[k * size:(k + 1) * size]
            else:
                try:
                    raw = q.read_entry(mem, q.cons)
                except QueueMemoryError:
                    self._cmdq_error(regs.CERROR_ABT)
                    return
            try:
                cmd = decode_command(raw)
                if cmd.name == "CMD_SYNC" and self._hold_cmd_sync(q.cons):
                    return  # not consumed: CONS stays at the CMD_SYNC, no completion
                err = self._execute(cmd, mem)
            except IllegalCommand as exc:
                log.debug("CMDQ illegal command at %#x: %s", q.cons, exc)
                if self.trace.on_cmd:
                    self.trace.record("cmd", name="ILLEGAL", index=q.cons, error=str(exc),
                                      raw=raw.hex())
                err = regs.CERROR_ILL
            if err:
                self._cmdq_error(err)
                return
            q.cons = q.inc(q.cons)

    def _cmdq_error(self, err: int) -> None:
        self.cmdq.err = err
        self.raise_gerror("CMDQ_ERR")

    def _execute(self, cmd: Command, mem: Memory | None) -> int:
        n = cmd.name
        if self.injector is not None and self.injector.drop_invalidation(cmd):
            return 0  # as though the driver had not sent it
        self.counters.commands[n] = self.counters.commands.get(n, 0) + 1
        if self.trace.on_cmd:
            self.trace.record("cmd", name=n, index=self.cmdq.cons, fields=cmd.fields)
        self._observe(cmd)
        if n == "CMD_SYNC":
            return self._cmd_sync(cmd)
        if n == "CFGI_CD" and cmd["SSID"]:
            self.counters.cfgi_cd_ssids += 1
        if n.startswith("PREFETCH"):
            return 0
        try:
            ok = dispatch(cmd, self.sink, self.config)
        except IllegalCommand:
            raise
        except Exception:  # a bug in the sink must not take the server down
            log.exception("command sink failed on %s", n)
            self.counters.sink_errors += 1
            return 0
        if not ok:
            self._atc_failed = True
        return 0

    def _observe(self, cmd: Command) -> None:
        for fn in self.command_observers:
            try:
                fn(cmd)
            except Exception:  # an observer must not take the command queue down
                log.exception("command observer failed on %s", cmd.name)
                self.counters.sink_errors += 1

    def _cmd_sync(self, cmd: Command) -> int:
        self.counters.syncs += 1
        if self._atc_failed:
            self._atc_failed = False
            return regs.CERROR_ATC_INV_SYNC
        cs = cmd["CS"]
        if cs == CS_IRQ:
            if self.config.msi and cmd["MSIADDR"]:
                if self.trace.on_irq:
                    self.trace.record("irq", source=IRQ_CMD_SYNC, kind="msi",
                                      addr=cmd["MSIADDR"], data=cmd["MSIDATA"])
                if not self._msi_write(cmd["MSIADDR"], cmd["MSIDATA"]):
                    self.raise_gerror("MSI_CMDQ_ABT_ERR")
            else:
                if self.trace.on_irq:
                    self.trace.record("irq", source=IRQ_CMD_SYNC, kind="pulse")
                self._publish()
                self.irq.pulse(IRQ_CMD_SYNC)
        elif cs == CS_SEV:
            pass  # no PEs to wake: the driver polls
        return 0

    # -- fault injection hooks (viommu_backend.fault_injection) ----------------------------
    def _hold_cmd_sync(self, cons: int) -> bool:
        if self._sync_pass_at == cons:  # the one just released
            self._sync_pass_at = None
            return False
        if self.injector is None or not self.injector.hold_cmd_sync():
            return False
        self.cmd_sync_held = cons
        return True

    def release_cmd_sync(self) -> None:
        """Complete the CMD_SYNC held by fault injection and resume the command queue."""
        if self.cmd_sync_held is None:
            return
        self._sync_pass_at, self.cmd_sync_held = self.cmd_sync_held, None
        self.process_cmdq()

    # -- event / PRI production ------------------------------------------------------------
    def evtq_writable(self) -> bool:
        """Can an event record be written now?  The Event queue is writable when it is
        enabled, not full and has no unacknowledged EVTQ_ABT_ERR (SMMUv3 architecture
        7.2.1).  Stall records wait for it (the domain manager holds their transactions)."""
        return self.cr0_bit("EVTQEN") and not self.evtq.full() \
            and not self.gerror_active("EVTQ_ABT_ERR")

    def _evtq_maybe_available(self) -> None:
        if self.on_evtq_available and self.evtq_writable():
            for fn in list(self.on_evtq_available):
                fn()

    def record_event(self, ev: Event) -> Produced:
        """Write an event record (what the domain manager calls on a fault)."""
        self.counters.events[ev.name] = self.counters.events.get(ev.name, 0) + 1
        for fn in list(self.on_event):
            fn(ev)
        if not self.cr0_bit("EVTQEN"):
            if self.trace.on_event:
                self._trace_record("event", ev, Produced.DISABLED)
            return Produced.DISABLED
        result = self.evtq.produce(self.memory, ev.encode())
        if self.trace.on_event:  # before the interrupt it raises
            self._trace_record("event", ev, result)
        self._after_produce(self.evtq, result, IRQ_EVTQ, "EVTQ_ABT_ERR", "EVTQ_IRQEN")
        return result

    def record_page_request(self, req: PageRequest) -> Produced:
        self.counters.page_requests += 1
        if not self.cr0_bit("PRIQEN"):
            if self.trace.on_priq:
                self._trace_record("priq", req, Produced.DISABLED)
            return Produced.DISABLED
        result = self.priq.produce(self.memory, req.encode())
        if self.trace.on_priq:
            self._trace_record("priq", req, result)
        self._after_produce(self.priq, result, IRQ_PRIQ, "PRIQ_ABT_ERR", "PRIQ_IRQEN")
        return result

    def _trace_record(self, cat: str, rec: Event | PageRequest, result: Produced) -> None:
        fields = {k: getattr(rec, k) for k in rec.__dataclass_fields__}
        name = fields.pop("name", "E_PAGE_REQUEST" if cat == "priq" else None)
        self.trace.record(cat, name=name, outcome=result.value, fields=fields)

    def _after_produce(self, q: OutputQueue, result: Produced, src: str, abt: str,
                       irqen: str) -> None:
        if result is Produced.ABORT:
            self.raise_gerror(abt)
        elif _IRQC.get(self.irq_ctrl, irqen) and self._msi_enabled(src) and \
                result in (Produced.WRITTEN, Produced.OVERFLOW):
            self._send_msi(src)
        self._update_irqs()

    # -- display (QMP query-viommu) -----------------------------------------------------------
    def snapshot(self) -> dict:
        out: dict = {}
        for reg in regs.SMMU_REGS.registers:
            value = self._read_reg(reg.name)
            out[reg.name] = reg.describe(value)
        out["queues"] = {
            q.name: {"base": hex(q.base), "log2size": q.log2size, "prod": q.prod_reg,
                     "cons": q.cons_reg, "entries": q.count()}
            for q in (self.cmdq, self.evtq, self.priq)}
        out["queues"]["EVTQ"].update(overflows=self.evtq.overflows, dropped=self.evtq.dropped)
        out["queues"]["PRIQ"].update(overflows=self.priq.overflows, dropped=self.priq.dropped)
        out["gerror_active"] = self.gerror_active()
        out["irq_levels"] = dict(self._levels)
        out["counters"] = self.counters.as_dict()
        out["registers"] = {"mode": self.config.registers,
                            **(self.page.stats.as_dict() if self.page is not None else {})}
        if self.injector is not None:
            out["injected"] = self.injector.snapshot()
        return out

    # -- helpers ---------------------------------------------------------------------------
    def _notify_sink(self, method: str, **kw: object) -> None:
        call = getattr(self.sink, method)  # present: check_sink at construction
        try:
            call(**kw)
        except Exception:
            log.exception("command sink %s failed", method)
            self.counters.sink_errors += 1


def _irq_cfg_reg(name: str) -> tuple[str, int]:
    prefix, _, idx = name.rpartition("_IRQ_CFG")
    return {"GERROR": IRQ_GERROR, "EVTQ": IRQ_EVTQ, "PRIQ": IRQ_PRIQ}[prefix], int(idx)
