"""PCI capability builders: PCI Express (v2), power management, MSI-X, MSI, and the
extended capabilities ATS, PRI and PASID.

Each capability is a table of :class:`~viommu_backend.bitfield.Register` (offsets relative
to the capability) installed into a :class:`~viommu_backend.pci.config_space.ConfigSpace`.
Capabilities with state beyond plain registers (MSI-X table/PBA, MSI pending bits, PRI
outstanding requests) are small classes holding the config space and their offset.
"""

from __future__ import annotations

import enum
from typing import Callable

from viommu_backend.bitfield import ALL_FIELDS, F, Layout, Register
from viommu_backend.pci.config_space import ConfigSpace, block


class CapId(enum.IntEnum):
    PM = 0x01
    MSI = 0x05
    VENDOR = 0x09
    PCIE = 0x10
    MSIX = 0x11


class ExtCapId(enum.IntEnum):
    ATS = 0x000F
    PRI = 0x0013
    PASID = 0x001B


class PciePortType(enum.IntEnum):
    ENDPOINT = 0x0
    LEGACY_ENDPOINT = 0x1
    RC_INTEGRATED_ENDPOINT = 0x9


# --- PCI Express capability (version 2, 0x3c bytes) ------------------------------------
PCIE_FLAGS = Layout("PCIE_FLAGS", 16, (
    F("VERSION", 3, 0), F("PORT_TYPE", 7, 4), F("SLOT", 8), F("IRQ_MSG_NUM", 13, 9)))
DEVCAP = Layout("DEVCAP", 32, (
    F("MPS_SUPPORTED", 2, 0, "max payload size: 128 << n"),
    F("PHANTOM", 4, 3), F("EXT_TAG", 5), F("L0S_LATENCY", 8, 6), F("L1_LATENCY", 11, 9),
    F("RBER", 15), F("SLOT_POWER_VALUE", 25, 18), F("SLOT_POWER_SCALE", 27, 26),
    F("FLR", 28, doc="function level reset capable")))
DEVCTL = Layout("DEVCTL", 16, (
    F("CERE", 0), F("NFERE", 1), F("FERE", 2), F("URRE", 3), F("RELAX_ORDER", 4),
    F("MPS", 7, 5), F("EXT_TAG", 8), F("PHANTOM", 9), F("AUX_PM", 10), F("NO_SNOOP", 11),
    F("MRRS", 14, 12), F("BCR_FLR", 15, doc="initiate FLR (reads 0)")))
DEVSTA = Layout("DEVSTA", 16, (
    F("CED", 0), F("NFED", 1), F("FED", 2), F("URD", 3), F("AUXPD", 4), F("TRPND", 5)))
LINKCAP = Layout("LINKCAP", 32, (
    F("SPEED", 3, 0), F("WIDTH", 9, 4), F("ASPM", 11, 10), F("L0S_EXIT", 14, 12),
    F("L1_EXIT", 17, 15), F("PORT_NUMBER", 31, 24)))
LINKCTL = Layout("LINKCTL", 16, (F("ASPM", 1, 0), F("RCB", 3), F("CCC", 6), F("ES", 7)))
LINKSTA = Layout("LINKSTA", 16, (F("SPEED", 3, 0), F("WIDTH", 9, 4)))
DEVCAP2 = Layout("DEVCAP2", 32, (
    F("COMP_TIMEOUT_RANGES", 3, 0), F("COMP_TIMEOUT_DIS", 4), F("ARI", 5),
    F("LTR", 11), F("OBFF", 19, 18),
    F("EETLPP", 21, doc="End-End TLP Prefix supported (a PASID travels in one)")))
DEVCTL2 = Layout("DEVCTL2", 16, (
    F("COMP_TIMEOUT", 3, 0), F("COMP_TIMEOUT_DIS", 4), F("IDO_REQ", 8), F("IDO_CMP", 9),
    F("LTR_EN", 10)))
LINKCAP2 = Layout("LINKCAP2", 32, (F("SPEEDS", 7, 1),))
LINKCTL2 = Layout("LINKCTL2", 16, (F("TARGET_SPEED", 3, 0),))

PCIE_REGS = block(
    Register("PCIE_FLAGS", 0x02, 16, PCIE_FLAGS.fields),
    Register("DEVCAP", 0x04, 32, DEVCAP.fields),
    Register("DEVCTL", 0x08, 16, DEVCTL.fields,
           rw=("CERE", "NFERE", "FERE", "URRE", "RELAX_ORDER", "MPS", "EXT_TAG",
               "NO_SNOOP", "MRRS")),  # BCR_FLR made writable only with DEVCAP.FLR
    Register("DEVSTA", 0x0A, 16, DEVSTA.fields, rw1c=("CED", "NFED", "FED", "URD")),
    Register("LINKCAP", 0x0C, 32, LINKCAP.fields),
    Register("LINKCTL", 0x10, 16, LINKCTL.fields, rw=("ASPM", "RCB", "CCC", "ES")),
    Register("LINKSTA", 0x12, 16, LINKSTA.fields),
    Register("SLOTCAP", 0x14, 32), Register("SLOTCTL", 0x18, 16), Register("SLOTSTA", 0x1A, 16),
    Register("ROOTCTL", 0x1C, 16), Register("ROOTCAP", 0x1E, 16), Register("ROOTSTA", 0x20, 32),
    Register("DEVCAP2", 0x24, 32, DEVCAP2.fields),
    Register("DEVCTL2", 0x28, 16, DEVCTL2.fields, rw=("COMP_TIMEOUT", "COMP_TIMEOUT_DIS")),
    Register("DEVSTA2", 0x2A, 16),
    Register("LINKCAP2", 0x2C, 32, LINKCAP2.fields),
    Register("LINKCTL2", 0x30, 16, LINKCTL2.fields, rw=("TARGET_SPEED",)),
    Register("LINKSTA2", 0x32, 16),
    Register("SLOTCAP2", 0x34, 32), Register("SLOTCTL2", 0x38, 16), Register("SLOTSTA2", 0x3A, 16),
)
PCIE_CAP_SIZE = 0x3C


def add_pcie_cap(cfg: ConfigSpace, *, port_type: PciePortType = PciePortType.ENDPOINT,
                 flr: bool = False, mps_supported: int = 1, link_speed: int = 1,
                 link_width: int = 1, on_flr: Callable[[], None] | None = None) -> int:
    """A PCIe v2 capability for an endpoint (no slot, no root port registers).  With
    ``flr`` DevCap advertises FLR and a write of DevCtl.BCR_FLR calls ``on_flr``."""
    off = cfg.add_cap(CapId.PCIE, PCIE_CAP_SIZE)
    cfg.install(off, PCIE_REGS.values(), {
        "PCIE_FLAGS": {"VERSION": 2, "PORT_TYPE": port_type},
        "DEVCAP": {"MPS_SUPPORTED": mps_supported, "FLR": int(flr), "RBER": 1},
        "DEVCTL": {"MPS": 0, "MRRS": 2, "RELAX_ORDER": 1, "NO_SNOOP": 1},
        "LINKCAP": {"SPEED": link_speed, "WIDTH": link_width},
        "LINKSTA": {"SPEED": link_speed, "WIDTH": link_width},
        "DEVCAP2": {"COMP_TIMEOUT_RANGES": 0, "COMP_TIMEOUT_DIS": 1},
        "LINKCAP2": {"SPEEDS": (1 << link_speed) - 1},
        "LINKCTL2": {"TARGET_SPEED": link_speed},
    })
    if flr:
        devctl = off + PCIE_REGS["DEVCTL"].offset
        cfg.set_masks(devctl, 2, PCIE_REGS["DEVCTL"].wmask | DEVCTL["BCR_FLR"].mask)

        def flr_written(old: int, new: int) -> None:
            if DEVCTL.get(new, "BCR_FLR"):
                cfg.update_field(devctl, DEVCTL, "BCR_FLR", 0)  # self-clearing
                if on_flr is not None:
                    on_flr()

        cfg.watch(devctl, 2, flr_written)
    return off


def add_vendor_cap(cfg: ConfigSpace, body: bytes, wmask: bytes | None = None) -> int:
    """A vendor-specific capability (e.g. virtio's): ``body`` is everything after the
    ID/next header (its first byte is conventionally the capability length); ``wmask``
    (same length) makes bytes guest-writable (hook them with ``cfg.watch``)."""
    off = cfg.add_cap(CapId.VENDOR, 2 + len(body))
    cfg.init(off + 2, len(body), int.from_bytes(body, "little"))
    if wmask is not None:
        if len(wmask) != len(body):
            raise ValueError("wmask and body differ in length")
        cfg.wmask[off + 2:off + 2 + len(body)] = wmask
    return off


# --- power management (version 3, D0 and D3hot) ----------------------------------------
PMC = Layout("PMC", 16, (
    F("VERSION", 2, 0), F("PME_CLOCK", 3), F("IMM_READINESS", 4), F("DSI", 5),
    F("AUX_CURRENT", 8, 6), F("D1", 9), F("D2", 10), F("PME_SUPPORT", 15, 11)))
PMCSR = Layout("PMCSR", 16, (
    F("POWER_STATE", 1, 0), F("NO_SOFT_RESET", 3), F("PME_EN", 8),
    F("DATA_SELECT", 12, 9), F("DATA_SCALE", 14, 13), F("PME_STATUS", 15)))
PM_REGS = block(
    Register("PMC", 0x02, 16, PMC.fields),
    Register("PMCSR", 0x04, 16, PMCSR.fields, rw=("POWER_STATE",)),
    Register("PMCSR_BSE", 0x06, 8), Register("DATA", 0x07, 8),
)
PM_D0, PM_D3HOT = 0, 3


def add_pm_cap(cfg: ConfigSpace) -> int:
    """PM v3 supporting D0 and D3hot only (writes of D1/D2 are ignored), No_Soft_Reset
    set (D3hot -> D0 keeps the device's state)."""
    off = cfg.add_cap(CapId.PM, 8)
    cfg.install(off, PM_REGS.values(), {"PMC": {"VERSION": 3},
                                        "PMCSR": {"NO_SOFT_RESET": 1}})
    pmcsr = off + PM_REGS["PMCSR"].offset

    def pmcsr_written(old: int, new: int) -> None:
        if PMCSR.get(new, "POWER_STATE") not in (PM_D0, PM_D3HOT):
            cfg.update_field(pmcsr, PMCSR, "POWER_STATE", PMCSR.get(old, "POWER_STATE"))

    cfg.watch(pmcsr, 2, pmcsr_written)
    return off


# --- MSI-X -------------------------------------------------------------------------------
MSIX_CTRL = Layout("MSIX_CTRL", 16, (
    F("TABLE_SIZE", 10, 0, "N - 1"), F("FUNCTION_MASK", 14), F("ENABLE", 15)))
MSIX_BIR = Layout("MSIX_BIR", 32, (F("BIR", 2, 0), F("OFFSET", 31, 3, address=True)))
MSIX_REGS = block(
    Register("CTRL", 0x02, 16, MSIX_CTRL.fields, rw=("FUNCTION_MASK", "ENABLE")),
    Register("TABLE", 0x04, 32, MSIX_BIR.fields),
    Register("PBA", 0x08, 32, MSIX_BIR.fields),
)
MSIX_ENTRY = Layout("MSIX_ENTRY", 128, (
    F("ADDR", 63, 0, address=True), F("DATA", 31, 0, word=1),
    F("MASKED", 32, word=1), F("VCTRL_RSVD", 63, 33, word=1)))
MSIX_ENTRY_SIZE = 16
MSIX_VCTRL_OFF = 12
MSIX_MAX_VECTORS = 2048

Trigger = Callable[[int], bool]  # deliver vector n; False = no eventfd (stays pending)


class MsixCap:
    """MSI-X capability plus its table and PBA (which live in a BAR).

    The owning function routes BAR accesses that fall into :meth:`table_range` /
    :meth:`pba_range` here.  :meth:`notify` delivers through ``trigger`` unless MSI-X is
    disabled, the function is masked or the vector is masked; then the PBA bit is set
    and the vector is delivered when the mask clears (or its eventfd appears).

    Who owns the table: a VFIO client may virtualize it (QEMU's vfio-pci keeps its own
    table and PBA and never forwards their accesses; it masks a vector by taking its
    eventfd away, as with kernel VFIO).  Until the client reads or writes the table or
    PBA through the BAR, ``client_table`` is True and the table here (masked at reset)
    does not gate delivery; from the first such access on, the table here is the one
    the guest programs and its mask bits apply."""

    def __init__(self, cfg: ConfigSpace, nvec: int, table_bar: int, table_off: int,
                 pba_bar: int, pba_off: int, trigger: Trigger) -> None:
        if not 1 <= nvec <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X vector count {nvec} out of 1..2048")
        if table_off % 8 or pba_off % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.cfg = cfg
        self.nvec = nvec
        self.table_bar, self.table_off = table_bar, table_off
        self.pba_bar, self.pba_off = pba_bar, pba_off
        self.pba_size = (nvec + 63) // 64 * 8
        self.trigger = trigger
        self.off = cfg.add_cap(CapId.MSIX, 12)
        cfg.install(self.off, MSIX_REGS.values(), {
            "CTRL": {"TABLE_SIZE": nvec - 1},
            "TABLE": MSIX_BIR.encode(BIR=table_bar, OFFSET=table_off),
            "PBA": MSIX_BIR.encode(BIR=pba_bar, OFFSET=pba_off),
        })
        self.table = bytearray(nvec * MSIX_ENTRY_SIZE)
        self.pending = [False] * nvec
        self.client_table = True  # see the class docstring
        self.reset()
        cfg.watch(self.off + MSIX_REGS["CTRL"].offset, 2, lambda old, new: self.deliver_pending())

    # -- state --------------------------------------------------------------------------
    def reset(self) -> None:
        self.table[:] = bytes(len(self.table))
        for v in range(self.nvec):  # vectors come out of reset masked
            self.table[v * MSIX_ENTRY_SIZE + MSIX_VCTRL_OFF] = 1
        self.pending = [False] * self.nvec

    @property
    def ctrl(self) -> int:
        return self.cfg.read(self.off + MSIX_REGS["CTRL"].offset, 2)

    @property
    def enabled(self) -> bool:
        return bool(MSIX_CTRL.get(self.ctrl, "ENABLE"))

    @property
    def function_masked(self) -> bool:
        return bool(MSIX_CTRL.get(self.ctrl, "FUNCTION_MASK"))

    def vector_masked(self, v: int) -> bool:
        """The Vector Control mask bit of ``v`` (never set while the client owns the
        table)."""
        if self.client_table:
            return False
        return bool(self.table[v * MSIX_ENTRY_SIZE + MSIX_VCTRL_OFF] & 1)

    def entry(self, v: int) -> dict[str, int]:
        raw = int.from_bytes(self.table[v * MSIX_ENTRY_SIZE:(v + 1) * MSIX_ENTRY_SIZE], "little")
        return MSIX_ENTRY.decode(raw)

    def table_range(self) -> range:
        return range(self.table_off, self.table_off + len(self.table))

    def pba_range(self) -> range:
        return range(self.pba_off, self.pba_off + self.pba_size)

    # -- delivery -----------------------------------------------------------------------
    def notify(self, v: int) -> bool:
        """Raise vector ``v``: True if delivered now, False if left pending (or MSI-X
        is disabled, in which case nothing is recorded)."""
        if not 0 <= v < self.nvec:
            raise ValueError(f"MSI-X vector {v} out of range (nvec {self.nvec})")
        if not self.enabled:
            return False
        if self.function_masked or self.vector_masked(v) or not self.trigger(v):
            self.pending[v] = True
            return False
        self.pending[v] = False
        return True

    def deliver_pending(self, vectors: range | None = None) -> None:
        if not self.enabled or self.function_masked:
            return
        for v in vectors if vectors is not None else range(self.nvec):
            if 0 <= v < self.nvec and self.pending[v] and not self.vector_masked(v):
                if self.trigger(v):
                    self.pending[v] = False

    # -- BAR accesses (offsets relative to the table / PBA start) ------------------------
    def table_read(self, off: int, size: int) -> int:
        self.client_table = False
        return int.from_bytes(self.table[off:off + size], "little")

    def table_write(self, off: int, size: int, value: int) -> None:
        self.client_table = False
        self.table[off:off + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        # reserved Vector Control bits stay 0
        for v in range(off // MSIX_ENTRY_SIZE, (off + size - 1) // MSIX_ENTRY_SIZE + 1):
            self.table[v * MSIX_ENTRY_SIZE + MSIX_VCTRL_OFF] &= 1
            self.table[v * MSIX_ENTRY_SIZE + MSIX_VCTRL_OFF + 1:
                       (v + 1) * MSIX_ENTRY_SIZE] = bytes(3)
            if self.pending[v] and not self.vector_masked(v):
                self.deliver_pending(range(v, v + 1))

    def pba_read(self, off: int, size: int) -> int:
        self.client_table = False
        bits = 0
        for v, p in enumerate(self.pending):
            if p:
                bits |= 1 << v
        return (bits >> (8 * off)) & ((1 << 8 * size) - 1)


# --- MSI ---------------------------------------------------------------------------------
MSI_CTRL = Layout("MSI_CTRL", 16, (
    F("ENABLE", 0), F("MMC", 3, 1, "multiple message capable (log2)"),
    F("MME", 6, 4, "multiple message enable (log2)"), F("ADDR64", 7), F("PVM", 8)))


class MsiCap:
    """MSI with 1..32 vectors, optional 64-bit address and per-vector masking."""

    def __init__(self, cfg: ConfigSpace, nvec: int, trigger: Trigger, *,
                 is64: bool = True, per_vector_mask: bool = True) -> None:
        if nvec not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI vector count must be a power of two up to 32")
        self.cfg, self.nvec, self.trigger = cfg, nvec, trigger
        regs = [Register("CTRL", 0x02, 16, MSI_CTRL.fields, rw=("ENABLE", "MME")),
                Register("ADDR_LO", 0x04, 32, rw=(ALL_FIELDS,))]
        o = 0x08
        if is64:
            regs.append(Register("ADDR_HI", o, 32, rw=(ALL_FIELDS,)))
            o += 4
        regs.append(Register("DATA", o, 16, rw=(ALL_FIELDS,)))
        o += 4
        if per_vector_mask:
            regs += [Register("MASK", o, 32, rw=(ALL_FIELDS,)), Register("PENDING", o + 4, 32)]
            o += 8
        self.regs = block(*regs)
        self.off = cfg.add_cap(CapId.MSI, o)
        cfg.install(self.off, regs, {"CTRL": {"MMC": nvec.bit_length() - 1,
                                              "ADDR64": int(is64), "PVM": int(per_vector_mask)}})
        ctrl = self.off + self.regs["CTRL"].offset
        cfg.set_masks(self.off + 4, 4, 0xFFFF_FFFC)  # address is dword aligned

        def ctrl_written(old: int, new: int) -> None:
            if MSI_CTRL.get(new, "MME") > MSI_CTRL.get(new, "MMC"):
                cfg.update_field(ctrl, MSI_CTRL, "MME", MSI_CTRL.get(new, "MMC"))
            self.deliver_pending()

        cfg.watch(ctrl, 2, ctrl_written)
        if per_vector_mask:
            cfg.watch(self.off + self.regs["MASK"].offset, 4,
                      lambda old, new: self.deliver_pending())

    def _reg(self, name: str) -> int:
        r = self.regs[name]
        return self.cfg.read(self.off + r.offset, r.size)

    @property
    def enabled(self) -> bool:
        return bool(MSI_CTRL.get(self._reg("CTRL"), "ENABLE"))

    @property
    def enabled_vectors(self) -> int:
        return 1 << MSI_CTRL.get(self._reg("CTRL"), "MME")

    def masked(self, v: int) -> bool:
        return "MASK" in self.regs and bool(self._reg("MASK") >> v & 1)

    def _set_pending(self, v: int, on: bool) -> None:
        if "PENDING" in self.regs:
            p = self._reg("PENDING")
            p = p | (1 << v) if on else p & ~(1 << v)
            self.cfg.poke(self.off + self.regs["PENDING"].offset, 4, p)

    def pending(self, v: int) -> bool:
        return "PENDING" in self.regs and bool(self._reg("PENDING") >> v & 1)

    def notify(self, v: int) -> bool:
        if not self.enabled or not 0 <= v < self.enabled_vectors:
            return False
        if self.masked(v) or not self.trigger(v):
            self._set_pending(v, True)
            return False
        self._set_pending(v, False)
        return True

    def deliver_pending(self) -> None:
        if not self.enabled:
            return
        for v in range(self.enabled_vectors):
            if self.pending(v) and not self.masked(v) and self.trigger(v):
                self._set_pending(v, False)


# --- ATS ---------------------------------------------------------------------------------
ATS_CAP = Layout("ATS_CAP", 16, (
    F("INV_QUEUE_DEPTH", 4, 0), F("PAGE_ALIGNED", 5), F("GLOBAL_INV", 6),
    F("RELAXED_ORDERING", 7)))
ATS_CTRL = Layout("ATS_CTRL", 16, (F("STU", 4, 0, "smallest translation unit, 4 KiB << n"),
                                    F("ENABLE", 15)))
ATS_REGS = block(Register("CAP", 0x04, 16, ATS_CAP.fields),
                 Register("CTRL", 0x06, 16, ATS_CTRL.fields, rw=("STU", "ENABLE")))


class AtsCap:
    def __init__(self, cfg: ConfigSpace, *, inv_queue_depth: int = 0,
                 page_aligned: bool = True, global_inv: bool = False) -> None:
        self.cfg = cfg
        self.off = cfg.add_ext_cap(ExtCapId.ATS, 1, 8)
        cfg.install(self.off, ATS_REGS.values(), {"CAP": {
            "INV_QUEUE_DEPTH": inv_queue_depth, "PAGE_ALIGNED": int(page_aligned),
            "GLOBAL_INV": int(global_inv)}})

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.field(self.off + 6, ATS_CTRL, "ENABLE"))

    @property
    def stu(self) -> int:
        return self.cfg.field(self.off + 6, ATS_CTRL, "STU")


# --- PRI ---------------------------------------------------------------------------------
PRI_CTRL = Layout("PRI_CTRL", 16, (F("ENABLE", 0), F("RESET", 1)))
PRI_STATUS = Layout("PRI_STATUS", 16, (
    F("RF", 0, doc="response failure"), F("UPRGI", 1, doc="unexpected PRG index"),
    F("STOPPED", 8), F("PASID_REQUIRED", 15, doc="PRG response PASID required")))
PRI_REGS = block(
    Register("CTRL", 0x04, 16, PRI_CTRL.fields, rw=("ENABLE", "RESET")),
    Register("STATUS", 0x06, 16, PRI_STATUS.fields, rw1c=("RF", "UPRGI")),
    Register("CAPACITY", 0x08, 32, doc="outstanding page request capacity"),
    Register("ALLOCATION", 0x0C, 32, rw=(ALL_FIELDS,), doc="outstanding page request allocation"),
)


class PriCap:
    """Page Request Interface: the endpoint model counts outstanding requests through
    :meth:`request` / :meth:`response`; Reset clears them, Stopped reflects them."""

    def __init__(self, cfg: ConfigSpace, capacity: int, *, pasid_required: bool = False) -> None:
        self.cfg = cfg
        self.capacity = capacity
        self.outstanding = 0
        self.on_reset: list[Callable[[], None]] = []
        self.off = cfg.add_ext_cap(ExtCapId.PRI, 1, 16)
        cfg.install(self.off, PRI_REGS.values(), {
            "STATUS": {"STOPPED": 1, "PASID_REQUIRED": int(pasid_required)},
            "CAPACITY": capacity})
        cfg.watch(self.off + 4, 2, self._ctrl_written)

    def _ctrl_written(self, old: int, new: int) -> None:
        if PRI_CTRL.get(new, "RESET"):
            self.cfg.update_field(self.off + 4, PRI_CTRL, "RESET", 0)  # reads 0
            if not PRI_CTRL.get(new, "ENABLE"):  # reset only takes effect when disabled
                self.outstanding = 0
                for fn in self.on_reset:
                    fn()
        self._update_stopped()

    def _update_stopped(self) -> None:
        stopped = int(not self.enabled and self.outstanding == 0)
        self.cfg.update_field(self.off + 6, PRI_STATUS, "STOPPED", stopped)

    def reset_state(self) -> None:
        self.outstanding = 0

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.field(self.off + 4, PRI_CTRL, "ENABLE"))

    @property
    def allocation(self) -> int:
        return self.cfg.read(self.off + 0x0C, 4)

    def status(self, name: str) -> int:
        return self.cfg.field(self.off + 6, PRI_STATUS, name)

    def can_request(self) -> bool:
        return self.enabled and self.outstanding < self.allocation

    def request(self) -> bool:
        """Account one page request; False when PRI is off or the allocation is used."""
        if not self.can_request():
            return False
        self.outstanding += 1
        self._update_stopped()
        return True

    def response(self, *, failure: bool = False, unexpected: bool = False) -> None:
        """A PRG response arrived (``failure``: Response Failure; ``unexpected``: its
        index matched no outstanding request)."""
        if unexpected:
            self.cfg.update_field(self.off + 6, PRI_STATUS, "UPRGI", 1)
            return
        self.outstanding = max(0, self.outstanding - 1)
        if failure:
            self.cfg.update_field(self.off + 6, PRI_STATUS, "RF", 1)
        self._update_stopped()

    def host_enable(self, reqs: int) -> None:
        """What a host kernel's pci_reset_pri() + pci_enable_pri() write when it turns
        I/O page faults on for the device: Reset, Allocation, Enable."""
        ctrl = self.off + PRI_REGS["CTRL"].offset
        self.cfg.write(ctrl, 2, PRI_CTRL.encode(RESET=1))
        self.cfg.write(self.off + PRI_REGS["ALLOCATION"].offset, 4, min(reqs, self.capacity))
        self.cfg.write(ctrl, 2, PRI_CTRL.encode(ENABLE=1))

    def host_disable(self) -> None:
        """pci_disable_pri(): Enable cleared."""
        self.cfg.write(self.off + PRI_REGS["CTRL"].offset, 2, 0)


# --- PASID -------------------------------------------------------------------------------
PASID_CAP = Layout("PASID_CAP", 16, (F("EXEC", 1), F("PRIV", 2), F("MAX_WIDTH", 12, 8)))
PASID_CTRL = Layout("PASID_CTRL", 16, (F("ENABLE", 0), F("EXEC", 1), F("PRIV", 2)))


class PasidCap:
    def __init__(self, cfg: ConfigSpace, max_width: int = 20, *, exec_perm: bool = False,
                 priv: bool = False) -> None:
        if not 1 <= max_width <= 20:
            raise ValueError("PASID width must be 1..20")
        self.cfg = cfg
        self.off = cfg.add_ext_cap(ExtCapId.PASID, 1, 8)
        rw = ("ENABLE",) + (("EXEC",) if exec_perm else ()) + (("PRIV",) if priv else ())
        regs = (Register("CAP", 0x04, 16, PASID_CAP.fields),
                Register("CTRL", 0x06, 16, PASID_CTRL.fields, rw=rw))
        cfg.install(self.off, regs, {"CAP": {"EXEC": int(exec_perm), "PRIV": int(priv),
                                             "MAX_WIDTH": max_width}})

    @property
    def max_width(self) -> int:
        return self.cfg.field(self.off + 4, PASID_CAP, "MAX_WIDTH")

    def control(self, name: str) -> bool:
        return bool(self.cfg.field(self.off + 6, PASID_CTRL, name))

    @property
    def enabled(self) -> bool:
        return self.control("ENABLE")
