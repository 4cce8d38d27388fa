"""SMMUv3 feature configuration -> ID register values (IDR0-5, IIDR, AIDR)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs

STALL_MODEL_STALL = 0  # stall and terminate both supported
STALL_MODEL_TERMINATE = 1  # terminate only (no stalls)
STALL_MODEL_FORCE = 2  # stall forced (Linux: I/O page faults through iommufd)
HTTU_NONE = 0  # IDR0.HTTU: no hardware translation table updates
HTTU_ACCESS = 1  # hardware Access flag updates (CD.HA / STE.S2HA)
HTTU_ACCESS_DIRTY = 2  # ... and dirty state (CD.HD / STE.S2HD, DBM descriptors)
REGISTER_MODES = ("trapped", "shared")  # how BAR0 reaches the guest
CACHE_MODELS = ("default", "aggressive")
REPLACEMENTS = ("lru", "fifo")


@dataclass(frozen=True)
class SmmuConfig:
    """What the emulated SMMU advertises.  Defaults suit Linux's arm-smmu-v3 driver."""

    s1p: bool = True
    s2p: bool = True
    ttf: int = 2  # AArch64 tables only
    cohacc: bool = True
    btm: bool = False
    # Hardware Access flag and dirty state updates (IDR0.HTTU), as an SMMUv3.2 of the
    # MMU-600/700 class has.  Linux 6.12 sets CD.HA/HD only for iommufd dirty-tracking
    # domains (io-pgtable writes AF=1 itself and DBM only with dirty tracking), 7.x also in
    # SVA CDs: the stock driver's DMA domains never get a descriptor updated, so this
    # default changes nothing for them, while SVA / dirty tracking get what the CPU
    # (FEAT_HAFDBS) has.  0: none, 1: Access flag only.
    httu: int = HTTU_ACCESS_DIRTY
    ats: bool = True
    asid16: bool = True
    vmid16: bool = True
    msi: bool = True
    sev: bool = True
    pri: bool = True
    cd2l: bool = True
    two_level_strtab: bool = True
    stall_model: int = STALL_MODEL_STALL
    term_model: bool = False  # 0: terminated transactions can also RAZ/WI (no)
    ttendian: int = 2  # little-endian only
    hyp: bool = False
    sidsize: int = 16
    ssidsize: int = 20
    cmdqs: int = 19
    evtqs: int = 19
    priqs: int = 19
    ril: bool = True
    fwb: bool = False  # IDR3.FWB: stage 2 can force write-back cacheable (S2FWB)
    oas_bits: int = 48
    gran4k: bool = True
    gran16k: bool = True
    gran64k: bool = True
    vax: int = 0  # 48-bit VA
    stall_max: int = 64
    arch_minor: int = 2  # SMMUv3.2
    implementer: int = 0x555  # not a JEP106 code of a real vendor
    product_id: int = 0x806
    # not advertised: the driver sanitizer (viommu_backend.domains.sanitizer); with
    # sanitize_fail its violations are logged as errors (the run fails)
    sanitize: bool = False
    sanitize_fail: bool = False
    # not advertised: BAR0 as trapped accesses (each one a vfio-user message) or as shared
    # memory the guest maps (viommu_backend.smmuv3.shared_regs)
    registers: str = "trapped"
    # not advertised: the caching model (viommu_backend.domains.caching).  "default": a
    # TLB of leaf translations tagged by domain, LRU, ``tlb_entries`` entries;
    # "aggressive": every cache the architecture allows (STE / CD keyed by StreamID and
    # SubstreamID, per-stage per-level walk caches, a TLB keyed by VMID / ASID / global)
    # keeping each entry until an invalidation that covers it.  ``*_entries`` 0:
    # unbounded; tlb_entries -1: the model's own (8192 / unbounded)
    cache: str = "default"
    tlb_entries: int = -1
    walk_cache_entries: int = 0
    cache_replacement: str = "lru"  # or "fifo": what a full cache evicts first

    def __post_init__(self) -> None:
        if self.oas_bits not in fl.BITS_PS:
            raise ValueError(f"oas_bits {self.oas_bits} not one of {sorted(fl.BITS_PS)}")
        for name, hi in (("cmdqs", 19), ("evtqs", 19), ("priqs", 19)):
            if not 0 <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be 0..{hi}")
        if not 0 <= self.sidsize <= 32 or not 0 <= self.ssidsize <= 20:
            raise ValueError("sidsize 0..32, ssidsize 0..20")
        if self.stall_model not in (0, 1, 2):
            raise ValueError("stall_model must be 0, 1 or 2")
        if self.ttf not in (1, 2, 3):
            raise ValueError("ttf must be 1, 2 or 3")
        if self.registers not in REGISTER_MODES:
            raise ValueError(f"registers must be one of {', '.join(REGISTER_MODES)}")
        if self.httu not in (HTTU_NONE, HTTU_ACCESS, HTTU_ACCESS_DIRTY):
            raise ValueError("httu must be 0, 1 or 2")
        if not 0 <= self.stall_max <= 0xFFFF:
            raise ValueError("stall_max must be 0..65535")
        if self.cache not in CACHE_MODELS:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODELS)}")
        if self.cache_replacement not in REPLACEMENTS:
            raise ValueError(f"cache_replacement must be one of {', '.join(REPLACEMENTS)}")
        if self.tlb_entries < -1 or self.walk_cache_entries < 0:
            raise ValueError("tlb_entries must be >= -1, walk_cache_entries >= 0 "
                             "(0: unbounded)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SmmuConfig":
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown SMMU config keys: {sorted(bad)}")
        return cls(**d)

    # -- ID registers ----------------------------------------------------------------
    def idr0(self) -> int:
        return regs.IDR0.layout.encode(
            S2P=self.s2p, S1P=self.s1p, TTF=self.ttf, COHACC=self.cohacc, BTM=self.btm,
            HTTU=self.httu, HYP=self.hyp, ATS=self.ats, ASID16=self.asid16, MSI=self.msi,
            SEV=self.sev, PRI=self.pri, VMID16=self.vmid16, CD2L=self.cd2l,
            TTENDIAN=self.ttendian, STALL_MODEL=self.stall_model,
            TERM_MODEL=self.term_model, ST_LEVEL=1 if self.two_level_strtab else 0,
        )

    def idr1(self) -> int:
        return regs.IDR1.layout.encode(
            SIDSIZE=self.sidsize, SSIDSIZE=self.ssidsize, PRIQS=self.priqs if self.pri else 0,
            EVTQS=self.evtqs, CMDQS=self.cmdqs,
        )

    def idr3(self) -> int:
        return regs.IDR3.layout.encode(RIL=self.ril, FWB=self.fwb)

    def idr5(self) -> int:
        return regs.IDR5.layout.encode(
            OAS=fl.BITS_PS[self.oas_bits], GRAN4K=self.gran4k, GRAN16K=self.gran16k,
            GRAN64K=self.gran64k, VAX=self.vax, STALL_MAX=self.stall_max,
        )

    def iidr(self) -> int:
        return regs.IIDR.layout.encode(IMPLEMENTER=self.implementer, PRODUCTID=self.product_id)

    def aidr(self) -> int:
        return regs.AIDR.layout.encode(ARCHMAJORREV=0, ARCHMINORREV=self.arch_minor)

    def id_registers(self) -> dict[str, int]:
        return {"IDR0": self.idr0(), "IDR1": self.idr1(), "IDR2": 0, "IDR3": self.idr3(),
                "IDR4": 0, "IDR5": self.idr5(), "IIDR": self.iidr(), "AIDR": self.aidr()}
