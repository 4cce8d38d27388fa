"""Bit positions of the STE / CD / descriptor layouts (Arm SMMUv3, Linux arm-smmu-v3.h)."""

from viommu_backend.smmuv3 import fields as fl


def _pos(layout, name):
    f = layout[name]
    return (f.hi, f.lo)


def test_ste_positions():
    assert _pos(fl.STE, "Config") == (3, 1)
    assert _pos(fl.STE, "S1ContextPtr") == (51, 6)
    assert _pos(fl.STE, "S1CDMax") == (63, 59)
    assert _pos(fl.STE, "S1DSS") == (65, 64)
    assert _pos(fl.STE, "S1STALLD") == (91, 91)
    assert _pos(fl.STE, "EATS") == (93, 92)
    assert _pos(fl.STE, "STRW") == (95, 94)
    assert _pos(fl.STE, "SHCFG") == (109, 108)
    assert _pos(fl.STE, "S2VMID") == (143, 128)
    assert _pos(fl.STE, "S2T0SZ") == (165, 160)
    assert _pos(fl.STE, "S2SL0") == (167, 166)
    assert _pos(fl.STE, "S2TG") == (175, 174)
    assert _pos(fl.STE, "S2PS") == (178, 176)
    assert _pos(fl.STE, "S2AA64") == (179, 179)
    assert _pos(fl.STE, "S2R") == (186, 186)
    assert _pos(fl.STE, "S2TTB") == (243, 196)


def test_cd_positions():
    assert _pos(fl.CD, "T0SZ") == (5, 0)
    assert _pos(fl.CD, "TG0") == (7, 6)
    assert _pos(fl.CD, "EPD0") == (14, 14)
    assert _pos(fl.CD, "EPD1") == (30, 30)
    assert _pos(fl.CD, "V") == (31, 31)
    assert _pos(fl.CD, "IPS") == (34, 32)
    assert _pos(fl.CD, "AA64") == (41, 41)
    assert _pos(fl.CD, "R") == (45, 45)
    assert _pos(fl.CD, "ASID") == (63, 48)
    assert _pos(fl.CD, "TTB0") == (115, 68)
    assert _pos(fl.CD, "MAIR0") == (223, 192)


def test_descriptor_bits_and_l1():
    assert fl.PTE_AF == 1 << 10 and fl.PTE_NG == 1 << 11
    assert fl.PTE_AP1 == 1 << 6 and fl.PTE_AP2 == 1 << 7
    assert fl.PTE_PXN == 1 << 53 and fl.PTE_UXN == 1 << 54 and fl.PTE_CONT == 1 << 52
    assert fl.TBL_AP_NOEL0 == 1 << 61 and fl.TBL_AP_RO == 1 << 62
    assert fl.L1STD["L2Ptr"].mask == ((1 << 52) - 1) & ~0x3F
    assert fl.L1CD["L2Ptr"].mask == ((1 << 52) - 1) & ~0xFFF
    assert fl.TG0_SHIFT == {0: 12, 1: 16, 2: 14} and fl.TG1_SHIFT[2] == 12


def test_roundtrip_encode_decode():
    v = fl.CD.encode(T0SZ=25, TG0=2, V=1, IPS=5, AA64=1, ASID=0xBEEF, TTB0=0x1234_5000)
    d = fl.CD.decode(v)
    assert (d["T0SZ"], d["TG0"], d["ASID"], d["TTB0"]) == (25, 2, 0xBEEF, 0x1234_5000)
    assert fl.STE.describe(fl.STE.encode(V=1, Config=fl.STE_CONFIG_S2), nonzero=True) == \
        {"V": 1, "Config": 6}
