"""SMMUv3 in-memory structure layouts: STE, CD, L1 descriptors, VMSAv8-64 descriptors.

Bit positions follow the Arm SMMUv3 architecture (STE/CD chapter) and VMSAv8-64 (Arm ARM
D8), as also used by Linux's arm-smmu-v3.h.  Positions are counted over the whole structure
(bit 64 = bit 0 of the second 64-bit word).  One declaration per structure serves decode,
encode (builders, tests) and display (QMP).
"""

from __future__ import annotations

from enum import IntEnum

from viommu_backend.bitfield import F, Layout


class EventId(IntEnum):
    """SMMUv3 event record type codes, the one table of them (events.py derives the names
    and checks its table of the fields each type carries against it); also the walker /
    decoder fault codes (0 = no fault)."""

    OK = 0x00
    F_UUT = 0x01
    C_BAD_STREAMID = 0x02
    F_STE_FETCH = 0x03
    C_BAD_STE = 0x04
    F_BAD_ATS_TREQ = 0x05
    F_STREAM_DISABLED = 0x06
    F_TRANSL_FORBIDDEN = 0x07
    C_BAD_SUBSTREAMID = 0x08
    F_CD_FETCH = 0x09
    C_BAD_CD = 0x0A
    F_WALK_EABT = 0x0B
    F_TRANSLATION = 0x10
    F_ADDR_SIZE = 0x11
    F_ACCESS = 0x12
    F_PERMISSION = 0x13
    F_TLB_CONFLICT = 0x20
    F_CFG_CONFLICT = 0x21
    E_PAGE_REQUEST = 0x24
    F_VMS_FETCH = 0x25


class FaultClass(IntEnum):
    """Event record CLASS field: which access a stage-2 fault happened on."""

    CD = 0  # fetching a CD (or CD table descriptor)
    TTD = 1  # a stage-1 translation table walk
    IN = 2  # the input/output address of the transaction itself


# -- STE (64 bytes) ---------------------------------------------------------------------
STE_CONFIG_ABORT = 0b000
STE_CONFIG_BYPASS = 0b100
STE_CONFIG_S1 = 0b101
STE_CONFIG_S2 = 0b110
STE_CONFIG_NESTED = 0b111

S1FMT_LINEAR = 0
S1FMT_4K_L2 = 1
S1FMT_64K_L2 = 2

S1DSS_TERMINATE = 0
S1DSS_BYPASS = 1
S1DSS_SSID0 = 2

STRW_NSEL1 = 0
STRW_EL2 = 2

STE = Layout("STE", 512, [
    F("V", 0, doc="valid"),
    F("Config", 3, 1, doc="0b000 abort, 0b100 bypass, 0b101 S1, 0b110 S2, 0b111 nested"),
    F("S1Fmt", 5, 4, doc="CD table format: 0 linear, 1 2-level 4K L2, 2 2-level 64K L2"),
    F("S1ContextPtr", 51, 6, address=True),
    F("S1CDMax", 63, 59, doc="log2 of the number of CDs"),
    # word 1
    F("S1DSS", 1, 0, word=1),
    F("S1CIR", 3, 2, word=1),
    F("S1COR", 5, 4, word=1),
    F("S1CSH", 7, 6, word=1),
    F("S2HWU59", 8, word=1),
    F("S2HWU60", 9, word=1),
    F("S2HWU61", 10, word=1),
    F("S2HWU62", 11, word=1),
    F("DRE", 12, word=1),
    F("CONT", 16, 13, word=1),
    F("DCP", 17, word=1),
    F("PPAR", 18, word=1),
    F("MEV", 19, word=1),
    F("S2FWB", 25, word=1),
    F("S1MPAM", 26, word=1),
    F("S1STALLD", 27, word=1),
    F("EATS", 29, 28, word=1),
    F("STRW", 31, 30, word=1),
    F("MemAttr", 35, 32, word=1),
    F("MTCFG", 36, word=1),
    F("ALLOCCFG", 40, 37, word=1),
    F("SHCFG", 45, 44, word=1),
    F("NSCFG", 47, 46, word=1),
    F("PRIVCFG", 49, 48, word=1),
    F("INSTCFG", 51, 50, word=1),
    # word 2
    F("S2VMID", 15, 0, word=2),
    F("S2T0SZ", 37, 32, word=2),
    F("S2SL0", 39, 38, word=2),
    F("S2IR0", 41, 40, word=2),
    F("S2OR0", 43, 42, word=2),
    F("S2SH0", 45, 44, word=2),
    F("S2TG", 47, 46, word=2),
    F("S2PS", 50, 48, word=2),
    F("S2AA64", 51, word=2),
    F("S2ENDI", 52, word=2),
    F("S2AFFD", 53, word=2),
    F("S2PTW", 54, word=2),
    F("S2HD", 55, word=2),
    F("S2HA", 56, word=2),
    F("S2S", 57, word=2),
    F("S2R", 58, word=2),
    # word 3
    F("S2TTB", 51, 4, word=3, address=True),
    # word 4/5: partition/monitoring (MPAM, unused by the model)
    F("PARTID", 15, 0, word=4),
    F("PMG", 23, 16, word=5),
])
STE_WORDS = 8
STE_SIZE = 64

# Level-1 stream table descriptor (8 bytes)
L1STD = Layout("L1STD", 64, [
    F("Span", 4, 0, doc="L2 table holds 2^(Span-1) STEs; 0 = invalid"),
    F("L2Ptr", 51, 6, address=True),
])

# -- CD (64 bytes) -------------------------------------------------------------------------
CD = Layout("CD", 512, [
    F("T0SZ", 5, 0),
    F("TG0", 7, 6, doc="0 4K, 1 64K, 2 16K"),
    F("IR0", 9, 8),
    F("OR0", 11, 10),
    F("SH0", 13, 12),
    F("EPD0", 14),
    F("ENDI", 15),
    F("T1SZ", 21, 16),
    F("TG1", 23, 22, doc="1 16K, 2 4K, 3 64K"),
    F("IR1", 25, 24),
    F("OR1", 27, 26),
    F("SH1", 29, 28),
    F("EPD1", 30),
    F("V", 31),
    F("IPS", 34, 32),
    F("AFFD", 35),
    F("WXN", 36),
    F("UWXN", 37),
    F("TBI", 39, 38),
    F("PAN", 40),
    F("AA64", 41),
    F("HD", 42),
    F("HA", 43),
    F("S", 44),
    F("R", 45),
    F("A", 46),
    F("ASET", 47),
    F("ASID", 63, 48),
    # word 1
    F("NSCFG0", 0, word=1),
    F("HAD0", 1, word=1),
    F("TTB0", 51, 4, word=1, address=True),
    F("HWU0", 62, 59, word=1),
    # word 2
    F("NSCFG1", 0, word=2),
    F("HAD1", 1, word=2),
    F("TTB1", 51, 4, word=2, address=True),
    F("HWU1", 62, 59, word=2),
    # words 3, 4
    F("MAIR0", 31, 0, word=3),
    F("MAIR1", 63, 32, word=3),
    F("AMAIR0", 31, 0, word=4),
    F("AMAIR1", 63, 32, word=4),
    F("IMPDEF", 31, 0, word=5),
    F("PARTID", 15, 0, word=6),
    F("PMG", 23, 16, word=6),
])
CD_WORDS = 8
CD_SIZE = 64

# Level-1 CD table descriptor (8 bytes)
L1CD = Layout("L1CD", 64, [
    F("V", 0),
    F("L2Ptr", 51, 12, address=True),
])

# -- VMSAv8-64 translation table descriptors ----------------------------------------------------
# Stage-1 block/page descriptor.  OA field covers [47:12]; the granule decides which low
# bits are part of the address (4K: [47:12], 16K: [47:14], 64K: [47:16] + OA[51:48] in
# [15:12] with 52-bit PAs).
PTE_S1 = Layout("PTE_S1", 64, [
    F("Valid", 0),
    F("Type", 1, doc="1 = table (levels 0-2) or page (level 3); 0 = block"),
    F("AttrIndx", 4, 2),
    F("NS", 5),
    F("AP1", 6, doc="AP[1]: unprivileged access allowed"),
    F("AP2", 7, doc="AP[2]: read-only"),
    F("SH", 9, 8),
    F("AF", 10),
    F("nG", 11),
    F("OA", 47, 12, address=True),
    F("DBM", 51),
    F("Contiguous", 52),
    F("PXN", 53),
    F("UXN", 54),
    F("SW", 58, 55),
    F("PBHA", 62, 59),
])

PTE_S2 = Layout("PTE_S2", 64, [
    F("Valid", 0),
    F("Type", 1),
    F("MemAttr", 5, 2),
    F("S2AP_R", 6),
    F("S2AP_W", 7),
    F("SH", 9, 8),
    F("AF", 10),
    F("OA", 47, 12, address=True),
    F("DBM", 51),
    F("Contiguous", 52),
    F("XN0", 53, doc="FEAT_XNX"),
    F("XN", 54),
    F("SW", 58, 55),
])

PTE_TABLE = Layout("PTE_TABLE", 64, [
    F("Valid", 0),
    F("Type", 1),
    F("NLTA", 47, 12, address=True, doc="next-level table address (granule aligned)"),
    F("PXNTable", 59),
    F("XNTable", 60, doc="UXNTable at stage 1"),
    F("APTable", 62, 61, doc="bit 0: no unprivileged access, bit 1: no write"),
    F("NSTable", 63),
])

# The generic layout (a union) used for display by QMP
PTE = PTE_S1

# raw bit positions used by the walkers (taken from the layouts above)
PTE_VALID = PTE_S1["Valid"].mask
PTE_TYPE = PTE_S1["Type"].mask
PTE_AP1 = PTE_S1["AP1"].mask
PTE_AP2 = PTE_S1["AP2"].mask
PTE_AF = PTE_S1["AF"].mask
PTE_NG = PTE_S1["nG"].mask
PTE_DBM = PTE_S1["DBM"].mask
PTE_CONT = PTE_S1["Contiguous"].mask
PTE_PXN = PTE_S1["PXN"].mask
PTE_UXN = PTE_S1["UXN"].mask
PTE_S2AP_R = PTE_S2["S2AP_R"].mask
PTE_S2AP_W = PTE_S2["S2AP_W"].mask
PTE_S2_XN = PTE_S2["XN"].mask
PTE_S2_MEMATTR = PTE_S2["MemAttr"]
# descriptor bits of a stage-2 MemAttr that are all zero for Device memory, by STE.S2FWB:
# MemAttr[3:2] == 0 in the Armv8.0 encoding (stage 2 combined with stage 1, the stronger
# wins); MemAttr[2] == 0 in the FEAT_S2FWB encoding, where MemAttr[2] == 1 is Normal
# (0b101 Non-cacheable, 0b110 forced Write-Back whatever stage 1 says, 0b111 stage 1's)
S2_DEVICE_BITS = {False: 0b1100 << PTE_S2_MEMATTR.lo, True: 0b0100 << PTE_S2_MEMATTR.lo}
TBL_PXN = PTE_TABLE["PXNTable"].mask
TBL_UXN = PTE_TABLE["XNTable"].mask
TBL_AP_NOEL0 = 1 << PTE_TABLE["APTable"].lo
TBL_AP_RO = 2 << PTE_TABLE["APTable"].lo
OA_MASK_48 = PTE_S1["OA"].mask  # bits [47:12]

# CD.TG0 / STE.S2TG encodings -> granule shift; CD.TG1 encoding differs
TG0_SHIFT = {0: 12, 1: 16, 2: 14}
TG1_SHIFT = {2: 12, 3: 16, 1: 14}
# CD.IPS / STE.S2PS / SMMU_IDR5.OAS encodings -> address bits
PS_BITS = {0: 32, 1: 36, 2: 40, 3: 42, 4: 44, 5: 48, 6: 52}
BITS_PS = {v: k for k, v in PS_BITS.items()}

# access permission bits in walk results
PERM_R = 1
PERM_W = 2
PERM_X = 4
