"""A guest (its RAM, a linear stream table, stage-1 tables it writes) and a DomainManager
with a hidden stage 2 reading it: the guest sees a stage-1-only SMMU, the host owns
stage 2 over host memory laid out ``reversed`` (IPA -> PA is a page permutation)."""

from __future__ import annotations

from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl

from tests.support.domain_env import BASE, DATA, LOG2SIZE, SIZE, STRTAB, Env

__all__ = ["BASE", "DATA", "LOG2SIZE", "SIZE", "STRTAB", "HostEnv", "page"]


class HostEnv(Env):
    def __init__(self, *, host_s2: bool = True, layout: str = "reversed", **kw) -> None:
        super().__init__(host_s2=host_s2, host_layout=layout, **kw)

    def s1(self, maps: dict[int, int], *, asid: int = 1, **cd) -> list[int]:
        """An S1 STE whose CD maps each IOVA page -> IPA page (tables in guest RAM)."""
        pt = b.PageTable(self.mem, self.al)
        for iova, ipa in maps.items():
            pt.map(iova, ipa)
        addr = self.al.alloc(64, 64)
        b.write_words(self.mem, addr, b.make_cd(pt.root, asid=asid, **cd))
        return b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=addr)


def page(i: int) -> int:
    return DATA + i * 4096


BYPASS = b.make_ste(fl.STE_CONFIG_BYPASS)
ABORT_STE = b.make_ste(fl.STE_CONFIG_ABORT)
