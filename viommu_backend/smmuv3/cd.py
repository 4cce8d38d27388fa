"""Context descriptor decode and CD table lookup (linear / 2-level, SubstreamIDs, S1DSS).

For a nested stream the CD table pointers are IPAs: every CD table access is translated
through the stream's stage 2 first (faults there are reported as stage-2 faults of class CD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.smmu_config import (HTTU_ACCESS, HTTU_ACCESS_DIRTY,
                                               STALL_MODEL_FORCE, STALL_MODEL_STALL,
                                               STALL_MODEL_TERMINATE)
from viommu_backend.smmuv3.ste import ConfigFault, S1Context, S2Config, read_words
from viommu_backend.smmuv3.fields import FaultClass

S1_TSZ_MIN = 16
S1_TSZ_MAX = 39


@dataclass(frozen=True)
class S1Config:
    """Decoded stage-1 context descriptor (TTB0 half; TTB1 is decoded but not walked)."""

    granule_shift: int
    tsz: int
    ttb: int
    ips_bits: int  # effective output size: min(CD.IPS, SMMU OAS)
    asid: int
    epd0: bool = False
    epd1: bool = True
    affd: bool = False
    wxn: bool = False
    uwxn: bool = False
    pan: bool = False
    tbi: int = 0
    hd: bool = False
    ha: bool = False
    record: bool = False  # CD.R
    stall: bool = False  # CD.S
    abort_terminate: bool = False  # CD.A
    aset: bool = False
    t1sz: int = 0
    tg1_shift: int = 12
    ttb1: int = 0
    mair: int = 0

    @property
    def tg(self) -> int:
        return 1 << self.granule_shift

    @property
    def ia_bits(self) -> int:
        return 64 - self.tsz

    @property
    def start_level(self) -> int:
        return s1_start_level(self.granule_shift, self.tsz)


def s1_start_level(granule_shift: int, tsz: int) -> int:
    """Start level implied by the input size: enough levels to resolve 64-tsz bits."""
    stride = granule_shift - 3
    levels = -(-(64 - tsz - granule_shift) // stride)
    return 4 - levels


def decode_cd(words: np.ndarray | list[int], *, oas: int = 48, sid: int | None = None,
              ssid: int | None = None, stall_model: int = STALL_MODEL_STALL,
              s1stalld: bool = False, httu: int = HTTU_ACCESS_DIRTY) -> S1Config:
    """Decode a CD (8 x u64) or raise ``ConfigFault("C_BAD_CD")``.  ``stall_model`` is
    SMMU_IDR0.STALL_MODEL and ``s1stalld`` the STE.S1STALLD of the stream (CD.S legality),
    ``httu`` SMMU_IDR0.HTTU: HA / HD take effect only where it supports them."""
    val = 0
    for i, x in enumerate(list(words)[:8]):
        val |= int(x) << (64 * i)
    d = fl.CD.decode(val)

    def bad(why: str) -> ConfigFault:
        return ConfigFault("C_BAD_CD", why, sid=sid, ssid=ssid)

    if not d["V"]:
        raise bad("CD.V == 0")
    if not d["AA64"]:
        raise bad("AA64 == 0 (AArch32 tables not supported)")
    if d["ENDI"]:
        raise bad("big-endian tables not supported")
    gs = fl.TG0_SHIFT.get(d["TG0"])
    if gs is None and not d["EPD0"]:
        raise bad(f"reserved TG0 {d['TG0']}")
    if not d["EPD0"] and not S1_TSZ_MIN <= d["T0SZ"] <= S1_TSZ_MAX:
        raise bad(f"T0SZ {d['T0SZ']} out of range")
    ips = fl.PS_BITS.get(d["IPS"])
    if ips is None:
        raise bad(f"reserved IPS {d['IPS']}")
    if d["HD"] and not d["HA"]:
        raise bad("HD without HA")
    check_stall(d["S"], stall_model, s1stalld, bad)
    tg1 = fl.TG1_SHIFT.get(d["TG1"], 12)
    return S1Config(
        granule_shift=gs or 12, tsz=d["T0SZ"] if not d["EPD0"] else max(d["T0SZ"], 16),
        ttb=d["TTB0"], ips_bits=min(ips, oas), asid=d["ASID"], epd0=bool(d["EPD0"]),
        epd1=bool(d["EPD1"]), affd=bool(d["AFFD"]), wxn=bool(d["WXN"]), uwxn=bool(d["UWXN"]),
        pan=bool(d["PAN"]), tbi=d["TBI"], hd=bool(d["HD"]) and httu >= HTTU_ACCESS_DIRTY,
        ha=bool(d["HA"]) and httu >= HTTU_ACCESS,
        record=bool(d["R"]), stall=bool(d["S"]), abort_terminate=bool(d["A"]),
        aset=bool(d["ASET"]), t1sz=d["T1SZ"], tg1_shift=tg1, ttb1=d["TTB1"],
        mair=d["MAIR0"] | (d["MAIR1"] << 32))


def check_stall(s: int, stall_model: int, s1stalld: bool, bad) -> None:
    """CD.S against IDR0.STALL_MODEL and STE.S1STALLD: the ILLEGAL combinations of the
    SMMUv3 architecture, 5.5 "Fault configuration (A, R, S bits)"."""
    if s and stall_model == STALL_MODEL_TERMINATE:
        raise bad("CD.S with STALL_MODEL terminate")
    if s and stall_model == STALL_MODEL_STALL and s1stalld:
        raise bad("CD.S with STE.S1STALLD")
    if not s and stall_model == STALL_MODEL_FORCE:
        raise bad("CD.S == 0 with STALL_MODEL forcing stalls")


def _ipa_to_pa(mem, s2: S2Config | None, ipa: int, nbytes: int, *, sid, ssid) -> int:
    """Translate a CD-table IPA through S2 (read).  Raises a stage-2 ConfigFault."""
    if s2 is None:
        return ipa
    from viommu_backend.smmuv3.walker import walk_one  # walker imports this module

    r = walk_one(mem, None, s2, ipa, write=False)
    if r.fault:
        raise ConfigFault(fl.EventId(r.fault).name, f"S2 fault on CD fetch at IPA {ipa:#x}",
                          sid=sid, ssid=ssid, stage2=True, fault_class=FaultClass.CD,
                          ipa=ipa, level=r.level)
    # a CD is 64-byte aligned so it never crosses an S2 page
    return r.pa


def cd_address(mem, ctx: S1Context, index: int, s2: S2Config | None = None, *,
               sid: int | None = None) -> int:
    """Guest PA of CD number ``index`` (index < 2^S1CDMax checked by the caller)."""
    if ctx.cdmax == 0 or ctx.fmt == fl.S1FMT_LINEAR:
        ipa = ctx.cd_ptr + index * fl.CD_SIZE
        return _ipa_to_pa(mem, s2, ipa, fl.CD_SIZE, sid=sid, ssid=index)
    split = 6 if ctx.fmt == fl.S1FMT_4K_L2 else 10
    l1_ipa = ctx.cd_ptr + (index >> split) * 8
    l1_pa = _ipa_to_pa(mem, s2, l1_ipa, 8, sid=sid, ssid=index)
    l1 = int(read_words(mem, l1_pa, 1, "F_CD_FETCH", sid=sid, ssid=index)[0])
    if not fl.L1CD["V"].get(l1):
        raise ConfigFault("C_BAD_SUBSTREAMID", f"L1CD for ssid {index:#x} invalid",
                          sid=sid, ssid=index)
    ipa = fl.L1CD["L2Ptr"].get(l1) + (index & ((1 << split) - 1)) * fl.CD_SIZE
    return _ipa_to_pa(mem, s2, ipa, fl.CD_SIZE, sid=sid, ssid=index)


def cd_index(ctx: S1Context, ssid: int | None, *, sid: int | None = None) -> int | None:
    """Which CD serves a transaction with SubstreamID ``ssid`` (None = no PASID).

    Returns the CD index, or None for "stage 1 bypassed" (S1DSS=bypass); raises
    C_BAD_SUBSTREAMID / F_STREAM_DISABLED per the architecture."""
    if ssid is None:
        if ctx.cdmax == 0:
            return 0
        if ctx.dss == fl.S1DSS_BYPASS:
            return None
        if ctx.dss == fl.S1DSS_SSID0:
            return 0
        raise ConfigFault("F_STREAM_DISABLED", "non-substream traffic with S1DSS=terminate",
                          sid=sid)
    if ctx.cdmax == 0:
        raise ConfigFault("C_BAD_SUBSTREAMID", "substream on a stream with S1CDMax 0",
                          sid=sid, ssid=ssid)
    if ssid < 0 or ssid >= (1 << ctx.cdmax):
        raise ConfigFault("C_BAD_SUBSTREAMID", f"ssid {ssid:#x} > 2^S1CDMax", sid=sid, ssid=ssid)
    if ssid == 0 and ctx.dss == fl.S1DSS_SSID0:
        raise ConfigFault("C_BAD_SUBSTREAMID", "ssid 0 reserved by S1DSS=substream0",
                          sid=sid, ssid=ssid)
    return ssid


def fetch_cd_words(mem, ctx: S1Context, index: int, s2: S2Config | None = None, *,
                   sid: int | None = None) -> np.ndarray:
    addr = cd_address(mem, ctx, index, s2, sid=sid)
    return read_words(mem, addr, fl.CD_WORDS, "F_CD_FETCH", sid=sid, ssid=index)


def fetch_cd(mem, ctx: S1Context, ssid: int | None, s2: S2Config | None = None, *,
             oas: int = 48, sid: int | None = None, stall_model: int = STALL_MODEL_STALL,
             httu: int = HTTU_ACCESS_DIRTY) -> S1Config | None:
    """Resolve the CD for (stream, ssid): index selection, table lookup (nested: through
    ``s2``), decode.  None means stage 1 is bypassed (S1DSS=bypass, no PASID)."""
    index = cd_index(ctx, ssid, sid=sid)
    if index is None:
        return None
    return decode_cd(fetch_cd_words(mem, ctx, index, s2, sid=sid), oas=oas, sid=sid,
                     ssid=ssid, stall_model=stall_model, s1stalld=ctx.stalld, httu=httu)
