"""Stream table lookup (linear / 2-level) and STE decode with the architected checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np

from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.smmu_config import (HTTU_ACCESS, HTTU_ACCESS_DIRTY, STALL_MODEL_FORCE,
                                               STALL_MODEL_STALL, STALL_MODEL_TERMINATE)
from viommu_backend.smmuv3.fields import EventId, FaultClass


class ConfigFault(Exception):
    """A configuration error or fetch abort while resolving a stream's configuration.

    ``event`` is the SMMUv3 event name (``C_BAD_STE``, ``F_CD_FETCH``, ...).  For a stage-2
    fault taken while fetching a CD through S2 (nested), ``stage2`` is set, ``fault_class``
    is ``FaultClass.CD`` and ``ipa`` holds the faulting IPA.
    """

    def __init__(self, event: str, detail: str = "", *, sid: int | None = None,
                 ssid: int | None = None, addr: int | None = None, stage2: bool = False,
                 fault_class: int = FaultClass.CD, ipa: int | None = None,
                 level: int | None = None) -> None:
        super().__init__(f"{event}: {detail}" if detail else event)
        self.event = event
        self.detail = detail
        self.sid = sid
        self.ssid = ssid
        self.addr = addr
        self.stage2 = stage2
        self.fault_class = fault_class
        self.ipa = ipa
        self.level = level

    @property
    def code(self) -> int:
        return int(EventId[self.event])


@dataclass(frozen=True)
class S2Config:
    """Decoded stage-2 parameters of an STE."""

    vmid: int
    granule_shift: int  # 12, 14, 16
    t0sz: int
    sl0: int
    start_level: int
    ps_bits: int  # effective output address size
    ttb: int
    affd: bool = False
    hd: bool = False
    ha: bool = False
    s2r: bool = False  # record faults
    s2s: bool = False  # stall faults
    ptw: bool = False  # protected table walk
    endi: bool = False
    fwb: bool = False  # S2FWB: stage-2 MemAttr in the FEAT_S2FWB encoding

    @property
    def tg(self) -> int:
        return 1 << self.granule_shift

    @property
    def ia_bits(self) -> int:
        return 64 - self.t0sz


@dataclass(frozen=True)
class S1Context:
    """The STE's stage-1 context: where the CD table is and how substreams map to CDs."""

    cd_ptr: int
    fmt: int
    cdmax: int
    dss: int
    stalld: bool = False
    cir: int = 0
    cor: int = 0
    csh: int = 0


ConfigKind = Literal["abort", "bypass", "s1", "s2", "nested"]


@dataclass(frozen=True)
class StreamConfig:
    config: ConfigKind
    s1: S1Context | None = None
    s2: S2Config | None = None
    eats: int = 0
    strw: int = 0
    mev: bool = False
    ppar: bool = False
    privcfg: int = 0
    instcfg: int = 0
    shcfg: int = 0
    s1stalld: bool = False


_CONFIGS: dict[int, ConfigKind] = {
    fl.STE_CONFIG_ABORT: "abort",
    fl.STE_CONFIG_BYPASS: "bypass",
    fl.STE_CONFIG_S1: "s1",
    fl.STE_CONFIG_S2: "s2",
    fl.STE_CONFIG_NESTED: "nested",
}


def s2_start_level(granule_shift: int, sl0: int) -> int | None:
    """Start level from STE.S2SL0 (VTCR_EL2.SL0 meaning); None for reserved encodings."""
    if granule_shift == 12:
        return {0: 2, 1: 1, 2: 0}.get(sl0)
    return {0: 3, 1: 2, 2: 1}.get(sl0)  # 16K, 64K (SL0=3: LPA2 only, not modelled)


def start_level_bits(granule_shift: int, level: int, ia_bits: int) -> int:
    """Index bits resolved by the start level table (> stride when concatenated)."""
    stride = granule_shift - 3
    return ia_bits - (granule_shift + (3 - level) * stride)


def s2_params_valid(granule_shift: int, t0sz: int, sl0: int) -> int | None:
    """Start level for a valid S2T0SZ/S2SL0/S2TG combination, else None."""
    if not 16 <= t0sz <= 39:
        return None
    level = s2_start_level(granule_shift, sl0)
    if level is None:
        return None
    bits = start_level_bits(granule_shift, level, 64 - t0sz)
    stride = granule_shift - 3
    if bits < 1 or bits > stride + 4:  # at most 16 concatenated tables
        return None
    return level


def decode_ste(words: np.ndarray | list[int], *, oas: int = 48, ssid_bits: int = 20,
               sid: int | None = None, stall_model: int = STALL_MODEL_STALL,
               httu: int = HTTU_ACCESS_DIRTY, fwb: bool = False) -> StreamConfig:
    """Decode an STE (8 x u64), raising ``ConfigFault("C_BAD_STE")`` when it is invalid or
    ILLEGAL.  ``oas`` is the SMMU's output address size (SMMU_IDR5.OAS in bits),
    ``ssid_bits`` SMMU_IDR1.SSIDSIZE, ``stall_model`` SMMU_IDR0.STALL_MODEL; S2HA / S2HD
    take effect only where SMMU_IDR0.``httu`` supports them; S2FWB is RES0 unless
    SMMU_IDR3.``fwb`` (this model treats a set RES0 S2FWB of a translating stage 2 as
    ILLEGAL, so a driver that sets it without the feature sees C_BAD_STE)."""
    w = [int(x) for x in words]
    val = 0
    for i, x in enumerate(w[:8]):
        val |= x << (64 * i)
    d = fl.STE.decode(val)

    def bad(why: str) -> ConfigFault:
        return ConfigFault("C_BAD_STE", why, sid=sid)

    if not d["V"]:
        raise bad("STE.V == 0")
    kind = _CONFIGS.get(d["Config"])
    if kind is None:
        raise bad(f"reserved Config {d['Config']:#05b}")
    common = dict(eats=d["EATS"], strw=d["STRW"], mev=bool(d["MEV"]), ppar=bool(d["PPAR"]),
                  privcfg=d["PRIVCFG"], instcfg=d["INSTCFG"], shcfg=d["SHCFG"],
                  s1stalld=bool(d["S1STALLD"]))
    if kind in ("abort", "bypass"):
        return StreamConfig(kind, **common)
    if d["STRW"] not in (fl.STRW_NSEL1, fl.STRW_EL2):
        raise bad(f"reserved STRW {d['STRW']}")
    s1 = s2 = None
    if kind in ("s1", "nested"):
        if d["S1CDMax"] > ssid_bits:
            raise bad(f"S1CDMax {d['S1CDMax']} > SSIDSIZE {ssid_bits}")
        if d["S1CDMax"] and d["S1Fmt"] == 3:
            raise bad("reserved S1Fmt 3")
        if d["S1CDMax"] and d["S1DSS"] == 3:
            raise bad("reserved S1DSS 3")
        if d["S1ContextPtr"] >> oas:
            raise bad("S1ContextPtr beyond OAS")
        # stall configuration legal only where IDR0.STALL_MODEL allows it (SMMUv3
        # architecture, 5.5 "Fault configuration (A, R, S bits)")
        if d["S1STALLD"] and stall_model != STALL_MODEL_STALL:
            raise bad("S1STALLD with STALL_MODEL != 0")
        s1 = S1Context(cd_ptr=d["S1ContextPtr"], fmt=d["S1Fmt"] if d["S1CDMax"] else 0,
                       cdmax=d["S1CDMax"], dss=d["S1DSS"] if d["S1CDMax"] else 0,
                       stalld=bool(d["S1STALLD"]), cir=d["S1CIR"], cor=d["S1COR"],
                       csh=d["S1CSH"])
    if kind in ("s2", "nested"):
        if not d["S2AA64"]:
            raise bad("S2AA64 == 0 (AArch32 stage 2 not supported)")
        if d["S2ENDI"]:
            raise bad("big-endian stage-2 tables not supported")
        gs = fl.TG0_SHIFT.get(d["S2TG"])
        if gs is None:
            raise bad(f"reserved S2TG {d['S2TG']}")
        ps = fl.PS_BITS.get(d["S2PS"])
        if ps is None or ps > oas:
            raise bad(f"S2PS {d['S2PS']} invalid or beyond OAS {oas}")
        level = s2_params_valid(gs, d["S2T0SZ"], d["S2SL0"])
        if level is None:
            raise bad(f"inconsistent S2T0SZ {d['S2T0SZ']} / S2SL0 {d['S2SL0']} / TG {1 << gs}")
        if d["S2S"] and stall_model == STALL_MODEL_TERMINATE:
            raise bad("S2S without stall support (STALL_MODEL terminate)")
        if not d["S2S"] and stall_model == STALL_MODEL_FORCE:
            raise bad("S2S == 0 with STALL_MODEL forcing stalls")
        if d["S2FWB"] and not fwb:
            raise bad("S2FWB set but SMMU_IDR3.FWB == 0")
        s2 = S2Config(vmid=d["S2VMID"], granule_shift=gs, t0sz=d["S2T0SZ"], sl0=d["S2SL0"],
                      start_level=level, ps_bits=ps, ttb=d["S2TTB"], affd=bool(d["S2AFFD"]),
                      hd=bool(d["S2HD"]) and httu >= HTTU_ACCESS_DIRTY,
                      ha=bool(d["S2HA"]) and httu >= HTTU_ACCESS, s2r=bool(d["S2R"]),
                      s2s=bool(d["S2S"]), ptw=bool(d["S2PTW"]), endi=False,
                      fwb=bool(d["S2FWB"]))
    return StreamConfig(kind, s1=s1, s2=s2, **common)


def _cfg_fields(cfg: int | Mapping[str, int]) -> tuple[int, int, int]:
    if isinstance(cfg, Mapping):
        return int(cfg.get("FMT", 0)), int(cfg.get("LOG2SIZE", 0)), int(cfg.get("SPLIT", 0))
    d = regs.STRTAB_BASE_CFG.layout.decode(int(cfg))
    return d["FMT"], d["LOG2SIZE"], d["SPLIT"]


def read_words(mem, addr: int, nwords: int, event: str, **kw) -> np.ndarray:
    """Read ``nwords`` little-endian u64 from guest memory, or raise a fetch ConfigFault."""
    n = 8 * nwords
    if addr < 0 or not mem.contains(addr, n):
        raise ConfigFault(event, f"{addr:#x} not in guest memory", addr=addr, **kw)
    try:
        data = mem.read(addr, n)
    except Exception as e:  # GuestMemoryError: raced with an unmap
        raise ConfigFault(event, str(e), addr=addr, **kw) from e
    return np.frombuffer(bytes(data), dtype="<u8").astype(np.uint64)


def ste_address(mem, strtab_base: int, cfg: int | Mapping[str, int], sid: int) -> int:
    """Guest address of the STE for ``sid`` (reads the L1 descriptor for 2-level tables)."""
    fmt, log2size, split = _cfg_fields(cfg)
    base = regs.STRTAB_BASE.layout["ADDR"].get(int(strtab_base))
    if sid < 0 or sid >= (1 << log2size):
        raise ConfigFault("C_BAD_STREAMID", f"sid {sid:#x} beyond 2^{log2size}", sid=sid)
    if fmt == regs.STRTAB_FMT_LINEAR:
        return base + sid * fl.STE_SIZE
    if fmt != regs.STRTAB_FMT_2LVL:
        raise ConfigFault("C_BAD_STREAMID", f"reserved STRTAB_BASE_CFG.FMT {fmt}", sid=sid)
    split = min(split, log2size)
    l1 = int(read_words(mem, base + (sid >> split) * 8, 1, "F_STE_FETCH", sid=sid)[0])
    span = fl.L1STD["Span"].get(l1)
    if span == 0:
        raise ConfigFault("C_BAD_STE", "L1 stream table descriptor invalid (Span 0)", sid=sid)
    if span > split + 1:
        raise ConfigFault("C_BAD_STE", f"L1 Span {span} > SPLIT+1", sid=sid)
    l2idx = sid & ((1 << split) - 1)
    if l2idx >= (1 << (span - 1)):
        raise ConfigFault("C_BAD_STE", f"sid {sid:#x} beyond L2 span", sid=sid)
    return fl.L1STD["L2Ptr"].get(l1) + l2idx * fl.STE_SIZE


def fetch_ste(mem, strtab_base: int, cfg: int | Mapping[str, int], sid: int) -> np.ndarray:
    """The 8 words of the STE for ``sid``: linear or 2-level lookup.  ``strtab_base`` is
    SMMU_STRTAB_BASE (or the bare address), ``cfg`` SMMU_STRTAB_BASE_CFG (int or a dict of
    its fields FMT/LOG2SIZE/SPLIT).  Raises ConfigFault C_BAD_STREAMID / F_STE_FETCH /
    C_BAD_STE."""
    addr = ste_address(mem, strtab_base, cfg, sid)
    return read_words(mem, addr, fl.STE_WORDS, "F_STE_FETCH", sid=sid)
