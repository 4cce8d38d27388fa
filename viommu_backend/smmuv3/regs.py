"""SMMUv3 programming interface: the register map (page 0 and page 1) as tables.

Each register names its guest-writable fields (``rw``); every other bit is read-only or
RES0, and the write masks derive from that (:attr:`~viommu_backend.bitfield.Register.wmask`).
The ID registers, the ACKs, STATUSR, GERROR and AGBPA are the SMMU's alone.

Offsets and bit positions follow the Arm SMMUv3 architecture (IHI 0070), as Linux's
``arm-smmu-v3.h`` and QEMU's ``smmuv3-internal.h`` encode them.  Page 1 registers
(EVTQ_PROD/CONS, PRIQ_PROD/CONS) are keyed by their full BAR offset (0x10000 + x).
"""

from __future__ import annotations

from viommu_backend.bitfield import ALL_FIELDS, F, Layout, Register, RegisterMap

PAGE_SIZE = 0x10000
PAGE1 = PAGE_SIZE
BAR_SIZE = 2 * PAGE_SIZE

_ALL = (ALL_FIELDS,)

# -- identification -----------------------------------------------------------------
IDR0 = Register("IDR0", 0x00, 32, (
    F("S2P", 0), F("S1P", 1), F("TTF", 3, 2, "1=AArch32 2=AArch64 3=both"),
    F("COHACC", 4), F("BTM", 5), F("HTTU", 7, 6), F("DORMHINT", 8), F("HYP", 9),
    F("ATS", 10), F("NS1ATS", 11), F("ASID16", 12), F("MSI", 13), F("SEV", 14),
    F("ATOS", 15), F("PRI", 16), F("VMW", 17), F("VMID16", 18), F("CD2L", 19),
    F("VATOS", 20), F("TTENDIAN", 22, 21), F("ATSRECERR", 23),
    F("STALL_MODEL", 25, 24, "0=stall+terminate 1=terminate only 2=stall forced"),
    F("TERM_MODEL", 26), F("ST_LEVEL", 28, 27, "0=linear 1=2-level"), F("RME_IMPL", 30),
))
IDR1 = Register("IDR1", 0x04, 32, (
    F("SIDSIZE", 5, 0), F("SSIDSIZE", 10, 6), F("PRIQS", 15, 11), F("EVTQS", 20, 16),
    F("CMDQS", 25, 21), F("ATTR_PERMS_OVR", 26), F("ATTR_TYPES_OVR", 27), F("REL", 28),
    F("QUEUES_PRESET", 29), F("TABLES_PRESET", 30), F("ECMDQ", 31),
))
IDR2 = Register("IDR2", 0x08, 32, (F("BA_VATOS", 9, 0),))
IDR3 = Register("IDR3", 0x0C, 32, (
    F("HAD", 2), F("PBHA", 3), F("XNX", 4), F("PPS", 5), F("MPAM", 7), F("FWB", 8),
    F("STT", 9), F("RIL", 10), F("BBML", 12, 11), F("E0PD", 13), F("PTWNNC", 14),
    F("DPT", 15),
))
IDR4 = Register("IDR4", 0x10, 32, ())
IDR5 = Register("IDR5", 0x14, 32, (
    F("OAS", 2, 0, "0=32 1=36 2=40 3=42 4=44 5=48 6=52 bits"), F("GRAN4K", 4),
    F("GRAN16K", 5), F("GRAN64K", 6), F("VAX", 11, 10), F("STALL_MAX", 31, 16),
))
IIDR = Register("IIDR", 0x18, 32, (
    F("IMPLEMENTER", 11, 0), F("REVISION", 15, 12), F("VARIANT", 19, 16),
    F("PRODUCTID", 31, 20),
))
AIDR = Register("AIDR", 0x1C, 32, (F("ARCHMINORREV", 3, 0), F("ARCHMAJORREV", 7, 4)))

# -- control ------------------------------------------------------------------------
_CR0_FIELDS = (F("SMMUEN", 0), F("PRIQEN", 1), F("EVTQEN", 2), F("CMDQEN", 3),
               F("ATSCHK", 4), F("VMW", 8, 6))
CR0 = Register("CR0", 0x20, 32, _CR0_FIELDS, rw=_ALL)
CR0ACK = Register("CR0ACK", 0x24, 32, _CR0_FIELDS)
CR1 = Register("CR1", 0x28, 32, (
    F("QUEUE_IC", 1, 0), F("QUEUE_OC", 3, 2), F("QUEUE_SH", 5, 4),
    F("TABLE_IC", 7, 6), F("TABLE_OC", 9, 8), F("TABLE_SH", 11, 10),
), rw=_ALL)
CR2 = Register("CR2", 0x2C, 32, (F("E2H", 0), F("RECINVSID", 1), F("PTM", 2)), rw=_ALL)
STATUSR = Register("STATUSR", 0x40, 32, (F("DORMANT", 0),))
_GBPA_FIELDS = (
    F("MEMATTR", 3, 0), F("MTCFG", 4), F("ALLOCCFG", 11, 8), F("SHCFG", 13, 12),
    F("PRIVCFG", 17, 16), F("INSTCFG", 19, 18), F("ABORT", 20), F("UPDATE", 31),
)
# every field RW; UPDATE is the handshake: a write with UPDATE=1 takes the others at once
GBPA = Register("GBPA", 0x44, 32, _GBPA_FIELDS, rw=_ALL)
AGBPA = Register("AGBPA", 0x48, 32, ())
_IRQ_CTRL_FIELDS = (F("GERROR_IRQEN", 0), F("PRIQ_IRQEN", 1), F("EVTQ_IRQEN", 2))
IRQ_CTRL = Register("IRQ_CTRL", 0x50, 32, _IRQ_CTRL_FIELDS, rw=_ALL)
IRQ_CTRLACK = Register("IRQ_CTRLACK", 0x54, 32, _IRQ_CTRL_FIELDS)

_GERROR_FIELDS = (
    F("CMDQ_ERR", 0), F("EVTQ_ABT_ERR", 2), F("PRIQ_ABT_ERR", 3),
    F("MSI_CMDQ_ABT_ERR", 4), F("MSI_EVTQ_ABT_ERR", 5), F("MSI_PRIQ_ABT_ERR", 6),
    F("MSI_GERROR_ABT_ERR", 7), F("SFM_ERR", 8), F("CMDQP_ERR", 9), F("DPT_ERR", 10),
)
# the GERROR conditions the model raises: all but CMDQP_ERR (no ECMDQ) and DPT_ERR (no DPT)
GERROR_CONDITIONS: tuple[str, ...] = tuple(
    f.name for f in _GERROR_FIELDS if f.name not in ("CMDQP_ERR", "DPT_ERR"))
GERROR = Register("GERROR", 0x60, 32, _GERROR_FIELDS)
GERRORN = Register("GERRORN", 0x64, 32, _GERROR_FIELDS, rw=GERROR_CONDITIONS)
GERROR_IMPLEMENTED = GERRORN.wmask


def _irq_cfg(source: str, offset: int) -> tuple[Register, ...]:
    """``<source>_IRQ_CFG0`` (MSI address) at ``offset``, ``_CFG1`` (data) at +8 and
    ``_CFG2`` (memory attributes) at +0xC."""
    return (
        Register(f"{source}_IRQ_CFG0", offset, 64, (F("ADDR", 51, 2, address=True),), rw=_ALL),
        Register(f"{source}_IRQ_CFG1", offset + 0x8, 32, (F("DATA", 31, 0),), rw=_ALL),
        Register(f"{source}_IRQ_CFG2", offset + 0xC, 32, (F("MEMATTR", 3, 0), F("SH", 5, 4)),
                 rw=_ALL),
    )


STRTAB_BASE = Register("STRTAB_BASE", 0x80, 64, (F("ADDR", 51, 6, address=True), F("RA", 62)),
                       rw=_ALL)
STRTAB_BASE_CFG = Register("STRTAB_BASE_CFG", 0x88, 32, (
    F("LOG2SIZE", 5, 0), F("SPLIT", 10, 6), F("FMT", 17, 16, "0=linear 1=2-level"),
), rw=_ALL)
STRTAB_FMT_LINEAR = 0
STRTAB_FMT_2LVL = 1

# -- queues -------------------------------------------------------------------------
_QBASE_FIELDS = (F("LOG2SIZE", 4, 0), F("ADDR", 51, 5, address=True), F("RA", 62))
# WR/RD hold index + wrap bit: for LOG2SIZE n, bits [n-1:0] index, bit n wrap.
_PROD_FIELDS = (F("WR", 19, 0),)
# (the base registers, CMDQ_CONS and EVTQ_PROD / PRIQ_PROD take writes while the queue is
# disabled; CMDQ_CONS.ERR is the SMMU's)
CMDQ_BASE = Register("CMDQ_BASE", 0x90, 64, _QBASE_FIELDS, rw=_ALL)
CMDQ_PROD = Register("CMDQ_PROD", 0x98, 32, _PROD_FIELDS, rw=_ALL)
CMDQ_CONS = Register("CMDQ_CONS", 0x9C, 32, (F("RD", 19, 0), F("ERR", 30, 24)), rw=("RD",))


def _output_queue(q: str, offset: int) -> tuple[Register, ...]:
    """The event queue's or the PRI queue's registers (laid out alike): ``<q>_BASE`` at
    ``offset``, ``<q>_PROD`` / ``_CONS`` at +8 / +0xC in page 1, ``<q>_IRQ_CFG*`` at +0x10."""
    return (
        Register(f"{q}_BASE", offset, 64, (
            F("LOG2SIZE", 4, 0), F("ADDR", 51, 5, address=True), F("WA", 62)), rw=_ALL),
        Register(f"{q}_PROD", PAGE1 + offset + 0x8, 32, (F("WR", 19, 0), F("OVFLG", 31)),
                 rw=_ALL),
        Register(f"{q}_CONS", PAGE1 + offset + 0xC, 32, (F("RD", 19, 0), F("OVACKFLG", 31)),
                 rw=_ALL),
        *_irq_cfg(q, offset + 0x10),
    )


CERROR_NONE = 0
CERROR_ILL = 1
CERROR_ABT = 2
CERROR_ATC_INV_SYNC = 3

SMMU_REGS = RegisterMap([
    IDR0, IDR1, IDR2, IDR3, IDR4, IDR5, IIDR, AIDR,
    CR0, CR0ACK, CR1, CR2, STATUSR, GBPA, AGBPA, IRQ_CTRL, IRQ_CTRLACK,
    GERROR, GERRORN, *_irq_cfg("GERROR", 0x68),
    STRTAB_BASE, STRTAB_BASE_CFG,
    CMDQ_BASE, CMDQ_PROD, CMDQ_CONS,
    *_output_queue("EVTQ", 0xA0),
    *_output_queue("PRIQ", 0xC0),
])


def layout(name: str) -> Layout:
    """The field layout of register ``name``."""
    return SMMU_REGS.layouts[name]

