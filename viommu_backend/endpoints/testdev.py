"""A small DMA test device: scratch/ID registers, a doorbell interrupt and a copy engine.

PCI identity 5555:0001, class ff0000 (unassigned vendor; no real device is impersonated).
BAR0 (4 KiB, 32-bit):

=======  ============  ===  ===================================================
offset   register      acc  meaning
=======  ============  ===  ===================================================
0x00     MAGIC         RO   0x7E57DE71
0x04     VERSION       RO   4 (2 added DMA_SSID, DMA_STATUS.EVENT, ATS/PRI/PASID;
                            3 added stalls: DMA_STATUS.STALLED, DMA_STALLS;
                            4 added DMA_REPEAT)
0x08     SCRATCH       RW   free for the guest
0x0C     DOORBELL      WO   write N: IRQ_STATUS.DOORBELL and interrupt vector N
0x10     IRQ_STATUS    W1C  DOORBELL(0), DMA_DONE(1); INTx level = any bit set
0x18     DMA_SRC       RW   64-bit source guest-physical address
0x20     DMA_DST       RW   64-bit destination guest-physical address
0x28     DMA_LEN       RW   bytes (at most DMA_MAX_LEN)
0x2C     DMA_CTRL      RW   GO(0) starts a copy (reads 0), IRQ(1) interrupt when done
0x30     DMA_STATUS    RO   BUSY(0) DONE(1) ERROR(2) STALLED(3) ERR_CODE[15:8]
                            (:class:`DmaErr`) EVENT[23:16]: SMMUv3 event type code of a
                            translation fault (0xFF: terminated without an event, STE abort)
0x34     DMA_COUNT     RO   completed copies
0x38     DMA_SSID      RW   SSID[19:0] SubstreamID (PASID) of the copy, VALID(31)
0x3C     DMA_STALLS    RO   stalls the engine has waited on since reset
0x40     DMA_REPEAT    RW   COUNT[15:0]: copies one GO runs, one after the other (0 is
                            1); BUSY until the last completes or one fails
0x800    MSI-X table (2 vectors: 0 doorbell default, 1 DMA completion); PBA at 0xC00
=======  ============  ===  ===================================================

With MSI-X (or MSI) enabled an event signals its vector; otherwise INTx follows
IRQ_STATUS as a level (behind an SMMU use INTx: QEMU delivers a vfio-user device's MSIs
untranslated).  The copy runs after the posted write that started it has been
handled (``ctx.call_soon``) and goes through the device's DMA port: guest-physical by
default, translated by the domain manager once the integrator installs a
``TranslatedDma`` with the function's StreamID (:meth:`TestDevice.set_dma_port`).  A
SubstreamID needs the PASID capability enabled and must fit its width.

A copy reads the whole source, then writes the whole destination.  When a translation
fault stalls at the SMMU (CD.S / STE.S2S: an I/O page fault) the engine waits with BUSY
and STALLED set; CMD_RESUME with Retry makes it run the whole copy again (idempotent; it
may stall again on a later page: every first touch of an unfaulted SVA buffer does),
CMD_RESUME with Abort / Terminate or CMD_STALL_TERM ends it with ERROR, ERR_CODE
TRANSLATION and EVENT the stalled fault's event code.  The completion interrupt
(DMA_CTRL.IRQ) comes when the copy finally completes or fails.  With DMA_REPEAT.COUNT
above 1 a GO runs that many copies of the same source to the same destination (each
one counted in DMA_COUNT, the event loop served between them); a fault or stall affects
the copy in progress as above, a failed one ends the series, and the completion
interrupt comes once, at its end.  A reset forgets a stalled
or queued copy (a later answer to its stall has no effect).

With PRI enabled (by the guest's driver, or by the host when it attaches the device to a
fault-capable domain) a copy whose translation fails without stalling sends a Page
Request for the faulting page (:mod:`viommu_backend.endpoints.pri`) and waits, BUSY: a
Success answer runs the whole copy again (once per page), anything else ends it with
ERROR, ERR_CODE TRANSLATION and EVENT the fault's event code.

Extended capabilities: ATS, PRI (32 outstanding requests) and PASID (20 bits; left out
with ``pasid=False``, config option ``pasid = false``).  The engine issues no ATS
translation requests.
"""

from __future__ import annotations

import enum

from typing import Any, Callable

from viommu_backend.bitfield import F, Register, RegisterMap
from viommu_backend.domains.objects import FaultResponse
from viommu_backend.endpoints.dma import DirectDma, DmaFault, DmaPort
from viommu_backend.endpoints.pri import PageRequester
from viommu_backend.pci.function import PciFunction

VENDOR_ID = 0x5555
DEVICE_ID = 0x0001
CLASS_CODE = 0xFF0000
MAGIC = 0x7E57DE71
VERSION = 4
BAR0_SIZE = 0x1000
MSIX_VECTORS = 2
MSIX_TABLE_OFF = 0x800
MSIX_PBA_OFF = 0xC00
DMA_MAX_LEN = 1 << 20
VEC_DOORBELL = 0
VEC_DMA = 1

REGS = RegisterMap([
    Register("MAGIC", 0x00, 32, reset=MAGIC),
    Register("VERSION", 0x04, 32, reset=VERSION),
    Register("SCRATCH", 0x08, 32),
    Register("DOORBELL", 0x0C, 32, (F("VECTOR", 15, 0),)),
    Register("IRQ_STATUS", 0x10, 32, (F("DOORBELL", 0), F("DMA_DONE", 1))),
    Register("DMA_SRC", 0x18, 64),
    Register("DMA_DST", 0x20, 64),
    Register("DMA_LEN", 0x28, 32),
    Register("DMA_CTRL", 0x2C, 32, (F("GO", 0), F("IRQ", 1))),
    Register("DMA_STATUS", 0x30, 32, (F("BUSY", 0), F("DONE", 1), F("ERROR", 2),
                                      F("STALLED", 3), F("ERR_CODE", 15, 8),
                                      F("EVENT", 23, 16))),
    Register("DMA_COUNT", 0x34, 32),
    Register("DMA_SSID", 0x38, 32, (F("SSID", 19, 0), F("VALID", 31))),
    Register("DMA_STALLS", 0x3C, 32),
    Register("DMA_REPEAT", 0x40, 32, (F("COUNT", 15, 0),)),
])
RW_REGS = ("SCRATCH", "DMA_SRC", "DMA_DST", "DMA_LEN", "DMA_CTRL", "DMA_SSID", "DMA_REPEAT")
PASID_WIDTH = 20
PRI_CAPACITY = 32


class DmaErr(enum.IntEnum):
    NONE = 0
    NO_BUS_MASTER = 1
    BAD_ADDRESS = 2
    TOO_LONG = 3
    TRANSLATION = 4  # the IOMMU refused it: DMA_STATUS.EVENT names the event
    PASID_DISABLED = 5  # SSID valid but PASID not enabled (or wider than supported)


class TestDevice(PciFunction):
    __test__ = False  # not a pytest class

    def __init__(self, name: str = "testdev", *, dma: DmaPort | None = None, pasid: bool = True) -> None:
        super().__init__(name, VENDOR_ID, DEVICE_ID, CLASS_CODE, revision=1)
        self.add_bar(0, BAR0_SIZE, self)
        self.add_pcie_cap(flr=True)
        self.add_pm_cap()
        self.add_msix(MSIX_VECTORS, 0, MSIX_TABLE_OFF, 0, MSIX_PBA_OFF)
        self.add_ats()
        self.add_pri(PRI_CAPACITY)
        if pasid:  # without: no SubstreamIDs (e.g. functions of a multi-function device
            self.add_pasid(PASID_WIDTH)  # without ACS, where Linux cannot enable PASID)
        self.dma: DmaPort = dma if dma is not None else DirectDma(self)
        self.page_requests = PageRequester(self)
        self.last_fault: DmaFault | None = None
        self.regs: dict[str, int] = {}
        self._job = 0  # the copy in progress; a reset or a new GO moves on
        self._left = 0  # copies of the current GO's series still to complete
        self.on_reset.append(self._reset_regs)
        self._reset_regs()

    def _reset_regs(self) -> None:
        self.regs = {r.name: r.reset for r in REGS.registers}
        self._job += 1  # a queued or stalled copy is forgotten

    def set_dma_port(self, port: DmaPort) -> None:
        """Route the engine's DMA through ``port`` (e.g. ``TranslatedDma`` with the
        function's StreamID once the topology is known)."""
        self.dma = port

    # -- MmioHandler for BAR0 (registers are 32-bit words; 64-bit ones are two words) ----
    @staticmethod
    def _reg_at(word: int) -> Register | None:
        """The register holding the 32-bit word at ``word`` (either half of a 64-bit one)."""
        reg = REGS.at(word)
        if reg is None and (lo := REGS.at(word - 4)) is not None and lo.width == 64:
            reg = lo
        return reg

    def _word_read(self, off: int) -> int:
        reg = self._reg_at(off)
        if reg is None or reg.name == "DOORBELL":
            return 0
        v = self.regs[reg.name]
        return (v >> 32 if off != reg.offset else v) & 0xFFFF_FFFF

    def read(self, offset: int, size: int) -> int:
        out = 0
        for i, word in enumerate(range(offset & ~3, offset + size, 4)):
            out |= self._word_read(word) << (32 * i)
        shift = 8 * (offset & 3)
        return (out >> shift) & ((1 << 8 * size) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.write(offset, 4, value & 0xFFFF_FFFF)
            self.write(offset + 4, 4, value >> 32)
            return
        word = offset & ~3
        shift = 8 * (offset & 3)
        mask = ((1 << 8 * size) - 1) << shift
        reg = self._reg_at(word)
        # sub-word writes merge into RW registers; elsewhere the other bytes are 0
        old = self._word_read(word) if reg is not None and reg.name in RW_REGS else 0
        self._word_write(word, (old & ~mask) | ((value << shift) & mask))

    def _word_write(self, off: int, v: int) -> None:
        reg = self._reg_at(off)
        if reg is None:
            return
        name = reg.name
        if name in RW_REGS:
            if reg.width == 64:
                cur = self.regs[name]
                self.regs[name] = (cur & ~0xFFFF_FFFF | v) if off == reg.offset \
                    else (cur & 0xFFFF_FFFF) | (v << 32)
            else:
                self.regs[name] = v
        if name == "DOORBELL":
            self._raise_event("DOORBELL", reg.layout.get(v, "VECTOR"))
        elif name == "IRQ_STATUS":
            self.regs[name] &= ~v
            self._update_intx()
        elif name == "DMA_CTRL" and REGS.layouts["DMA_CTRL"].get(v, "GO"):
            self.regs[name] = REGS.layouts["DMA_CTRL"].set(v, "GO", 0)
            self._start_dma()

    # -- interrupts -----------------------------------------------------------------------
    def _irq_msg_enabled(self) -> bool:
        return bool((self.msix and self.msix.enabled) or (self.msi and self.msi.enabled))

    def _raise_event(self, bit: str, vector: int) -> None:
        self.regs["IRQ_STATUS"] = REGS.layouts["IRQ_STATUS"].set(self.regs["IRQ_STATUS"], bit, 1)
        if self._irq_msg_enabled():
            nvec = self.msix.nvec if self.msix and self.msix.enabled else \
                (self.msi.enabled_vectors if self.msi else 1)
            self.notify(vector % nvec)
        else:
            self._update_intx()

    def _update_intx(self) -> None:
        self.set_intx(self.regs["IRQ_STATUS"] != 0 and not self._irq_msg_enabled())

    # -- DMA engine -------------------------------------------------------------------
    def _status(self, **fields: int) -> None:
        self.regs["DMA_STATUS"] = REGS.layouts["DMA_STATUS"].encode(fields)

    def _busy(self) -> bool:
        return bool(REGS.layouts["DMA_STATUS"].get(self.regs["DMA_STATUS"], "BUSY"))

    def _soon(self, fn: Callable[[], Any]) -> None:
        if self.ctx is not None:
            self.ctx.call_soon(fn)
        else:
            fn()

    def _start_dma(self) -> None:
        if self._busy():
            return  # one copy at a time; GO while busy is ignored
        self._status(BUSY=1)
        self._left = max(1, REGS.layouts["DMA_REPEAT"].get(self.regs["DMA_REPEAT"], "COUNT"))
        self._job += 1
        job = self._job
        self._soon(lambda: self._run_job(job))

    def _run_job(self, job: int) -> None:
        if job == self._job:  # no reset or other copy since the GO that queued it
            self.page_requests.begin()
            self.run_dma()

    def run_dma(self) -> None:
        """Perform the programmed copy (normally scheduled by a GO write)."""
        if not self._busy():
            return  # reset while queued
        n = self.regs["DMA_LEN"]
        ssid_reg = REGS.layouts["DMA_SSID"].decode(self.regs["DMA_SSID"])
        ssid = ssid_reg["SSID"] if ssid_reg["VALID"] else None
        err, event = DmaErr.NONE, 0
        if n > DMA_MAX_LEN:
            err = DmaErr.TOO_LONG
        elif not self.bus_master_enabled:
            err = DmaErr.NO_BUS_MASTER
        elif ssid is not None and (self.pasid is None or not self.pasid.enabled
                                   or ssid >> self.pasid.max_width):
            err = DmaErr.PASID_DISABLED
        else:
            try:
                data = self.dma.read(self.regs["DMA_SRC"], n, ssid=ssid)
                self.dma.write(self.regs["DMA_DST"], data, ssid=ssid)
            except DmaFault as e:
                self.last_fault = e
                if e.pending is not None:
                    self._stalled(e)
                    return
                pf = self.page_requests.request(e, ssid)
                if pf is not None:
                    self._wait(e, pf)
                    return
                err = {"no_bus_master": DmaErr.NO_BUS_MASTER,
                       "translation": DmaErr.TRANSLATION}.get(e.reason, DmaErr.BAD_ADDRESS)
                event = e.event_code
        self._finish(err, event)

    def _stalled(self, fault: DmaFault) -> None:
        """The copy's transaction stalled at the SMMU: wait (BUSY, STALLED) for its answer."""
        self._status(BUSY=1, STALLED=1)
        self.regs["DMA_STALLS"] = (self.regs["DMA_STALLS"] + 1) & 0xFFFF_FFFF
        self._wait(fault, fault.pending)

    def _wait(self, fault: DmaFault, pf: Any) -> None:
        """Wait for the answer to a stall or a page request; then retry or fail."""
        job = self._job
        pf.add_done_callback(lambda pf: self._soon(
            lambda: self._answered(job, fault, self.page_requests.answered(pf))))

    def _answered(self, job: int, fault: DmaFault, response: FaultResponse | None) -> None:
        if job != self._job or not self._busy():
            return  # reset since: the answer finds no transaction waiting
        if response is FaultResponse.SUCCESS:  # CMD_RESUME Retry: run the copy again
            self._status(BUSY=1)
            self.run_dma()
        else:  # terminated (CMD_RESUME Abort / Terminate, CMD_STALL_TERM, detach)
            self._finish(DmaErr.TRANSLATION, fault.event_code)

    def _finish(self, err: DmaErr, event: int) -> None:
        if err:
            self._status(ERROR=1, ERR_CODE=err, EVENT=event)
        else:
            self.regs["DMA_COUNT"] = (self.regs["DMA_COUNT"] + 1) & 0xFFFF_FFFF
            self._left -= 1
            if self._left > 0:  # the series goes on, still BUSY, after other work is served
                job = self._job
                self._soon(lambda: self._run_job(job))
                return
            self._status(DONE=1)
        if REGS.layouts["DMA_CTRL"].get(self.regs["DMA_CTRL"], "IRQ"):
            self._raise_event("DMA_DONE", VEC_DMA)
