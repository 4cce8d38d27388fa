"""A guest (its RAM, a linear stream table, stage-1 tables it writes) and a DomainManager
with a hidden stage 2 reading it: the guest sees a stage-1-only SMMU, the host owns
stage 2 over host memory laid out ``reversed`` (IPA -> PA is a page permutation)."""

from __future__ import annotations

from viommu_backend.domains import DomainManager
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.device import StreamTableConfig
from viommu_backend.smmuv3.events import decode_event, decode_page_request

BASE = 0x4000_0000
SIZE = 16 << 20
STRTAB = BASE  # linear stream table, 256 STEs
LOG2SIZE = 8
DATA = BASE + (8 << 20)  # data pages in the upper half


class HostEnv:
    def __init__(self, *, host_s2: bool = True, layout: str = "reversed",
                 enabled: bool = True, gbpa_abort: bool = False, **mgr_options) -> None:
        self.mem = b.make_memory(BASE, SIZE)  # the guest's physical space (IPA)
        self.al = b.Allocator(BASE + 0x10000, (8 << 20) - 0x10000)
        self.enabled = enabled
        self.gbpa_abort = gbpa_abort
        self.events: list[dict] = []
        self.prs: list[dict] = []
        self.mgr = DomainManager(lambda: self.mem, stream_table=self.st,
                                 on_event=lambda e: self.events.append(decode_event(e.encode())),
                                 on_page_request=lambda r: self.prs.append(
                                     decode_page_request(r.encode())),
                                 host_s2=host_s2, host_layout=layout, **mgr_options)

    def st(self) -> StreamTableConfig:
        return StreamTableConfig(self.enabled, STRTAB, fl.STRTAB_FMT_LINEAR, LOG2SIZE, 0, 16,
                                 self.gbpa_abort)

    def set_ste(self, sid: int, words: list[int], cfgi: bool = True) -> None:
        b.write_words(self.mem, STRTAB + sid * fl.STE_SIZE, words)
        if cfgi:
            self.mgr.stream_table_changed(sid)

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
