"""The caching model of one SMMU (option ``cache``): which caches the translation path
keeps and how they are keyed.

- ``default``: a TLB of leaf translations tagged by domain (freeing a domain drops its
  entries), ``tlb_entries`` entries (8192), no walk caches; CDs cached per CD table
  (shared by the streams using it).
- ``aggressive``: as much as the architecture allows, every entry kept until an
  invalidation that covers it: the TLB keyed by StreamWorld, VMID, ASID and global
  (:class:`~viommu_backend.smmuv3.tlb.TLB` ``architectural``; a domain freed drops
  nothing), walk caches per stage and level
  (:class:`~viommu_backend.smmuv3.walkcache.WalkCache`), CDs keyed by (StreamID,
  SubstreamID) (:class:`~viommu_backend.smmuv3.tlb.CdCache`); unbounded unless
  ``tlb_entries`` / ``walk_cache_entries`` say otherwise.

In both, a stream's STE is decoded once and kept until CMD_CFGI_STE / STE_RANGE / ALL
covers it (or SMMUEN / the stream table base change), and the decoded configuration of a
(stream, substream) -- its translation context -- until a CFGI covering its STE or CD.
``cache_replacement`` "lru" / "fifo" picks what a full cache evicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

from viommu_backend.smmuv3.tlb import TLB, CdCache
from viommu_backend.smmuv3.walkcache import WalkCache

DEFAULT_TLB_ENTRIES = 8192
WORLD_NS = "NS"  # the tag of the guest's Non-secure StreamWorlds (EL2: vmid EL2_VMID)


@dataclass
class ConfigCounters:
    """The configuration caches: the decoded STEs and translation contexts."""

    context_hits: int = 0
    context_misses: int = 0
    ste_fetches: int = 0
    invalidated: int = 0  # contexts dropped by CFGI_* (and domain changes)


@dataclass
class CacheModel:
    name: str
    tlb: TLB
    cds: CdCache | None = None  # aggressive: CDs by (sid, ssid); default: HwptNested.cds
    walks: WalkCache | None = None
    config: ConfigCounters = field(default_factory=ConfigCounters)

    @classmethod
    def from_config(cls, cfg: Any) -> "CacheModel":
        """From an :class:`~viommu_backend.smmuv3.smmu_config.SmmuConfig`."""
        aggressive = cfg.cache == "aggressive"
        rep = cfg.cache_replacement
        entries = cfg.tlb_entries if cfg.tlb_entries >= 0 else \
            0 if aggressive else DEFAULT_TLB_ENTRIES
        tlb = TLB(entries, replacement=rep, architectural=aggressive)
        if not aggressive:
            return cls("default", tlb)
        return cls("aggressive", tlb, CdCache(replacement=rep),
                   WalkCache(cfg.walk_cache_entries, replacement=rep))

    @property
    def architectural(self) -> bool:
        return self.walks is not None

    def tag(self, domain: int, host_parent: int | None) -> Hashable:
        """The TLB / walk-cache tag of a context: its domain id (default), else its
        StreamWorld -- the host's stage 2 (a hidden one) being one per NEST_PARENT, as
        the host would give each its own VMID."""
        if not self.architectural:
            return domain
        return WORLD_NS if host_parent is None else ("host", host_parent)

    def stats(self) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {
            "model": self.name,
            "config": {"hits": c.context_hits, "misses": c.context_misses,
                       "ste-fetches": c.ste_fetches, "invalidated": c.invalidated}}
        if self.cds is not None:
            out["cd"] = self.cds.stats()
        if self.walks is not None:
            out["walk"] = self.walks.stats()
        return out
