"""A guest for the domain-manager tests: its RAM (memfd), a linear stream table and
the tables it writes, and a DomainManager reading them."""

from __future__ import annotations

from viommu_backend.domains import DomainManager
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.device import StreamTableConfig
from viommu_backend.smmuv3.events import decode_event, decode_page_request


BASE = 0x4000_0000


SIZE = 16 << 20


STRTAB = BASE  # linear stream table, 256 STEs (16 KiB)


LOG2SIZE = 8


DATA = BASE + (8 << 20)  # data pages live in the upper half


class Env:
    """Guest memory + a linear stream table + a DomainManager reading it."""

    def __init__(self, *, enabled: bool = True, gbpa_abort: bool = False, **mgr_options) -> None:
        self.mem = b.make_memory(BASE, SIZE)
        self.al = b.Allocator(BASE + 0x10000, (8 << 20) - 0x10000)
        self.enabled = enabled
        self.gbpa_abort = gbpa_abort
        self.events: list[dict] = []
        self.prs: list[dict] = []
        self.mgr = DomainManager(lambda: self.mem, stream_table=self.st,
                                 on_event=lambda e: self.events.append(decode_event(e.encode())),
                                 on_page_request=lambda r: self.prs.append(
                                     decode_page_request(r.encode())), **mgr_options)

    def st(self) -> StreamTableConfig:
        return StreamTableConfig(self.enabled, STRTAB, regs.STRTAB_FMT_LINEAR, LOG2SIZE, 0, 16,
                                 self.gbpa_abort)

    def set_ste(self, sid: int, words: list[int], cfgi: bool = True) -> None:
        b.write_words(self.mem, STRTAB + sid * fl.STE_SIZE, words)
        if cfgi:
            self.mgr.stream_table_changed(sid)

    def s1_table(self) -> b.PageTable:
        return b.PageTable(self.mem, self.al)

    def cd(self, pt: b.PageTable, asid: int = 1, record: bool = True, **extra) -> int:
        addr = self.al.alloc(64, 64)
        words = b.make_cd(pt.root, asid=asid, **extra)
        value = sum(w << (64 * i) for i, w in enumerate(words))
        value = fl.CD.set(value, "R", int(record))
        b.write_words(self.mem, addr, b.words_of(fl.CD, value))
        return addr

    def s2_table(self, vmid: int, ipa_off: int = 0) -> tuple[b.PageTable, dict]:
        """An S2 identity-ish map: IPA [BASE+ipa_off, +SIZE) -> PA [BASE, +SIZE), 2 MiB blocks."""
        pt = b.PageTable(self.mem, self.al, ia_bits=40, start_level=1, stage2=True)
        for off in range(0, SIZE, 2 << 20):
            pt.map(BASE + ipa_off + off, BASE + off, 2 << 20)
        return pt, dict(s2_ttb=pt.root, s2_t0sz=24, s2_sl0=b.s2_sl0_for(12, 1), s2_vmid=vmid)

    def s1_ste(self, cd_addr: int, **kw) -> list[int]:
        return b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=cd_addr, **kw)


def data_page(i: int) -> int:
    return DATA + i * 4096
