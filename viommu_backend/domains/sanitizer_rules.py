"""The sanitizer's command-ordering, entry-update and device rules (SMMU option
``sanitize``; bookkeeping and reporting in :mod:`.sanitizer`).

The backend sees guest memory only when it reads it, so each rule is stated on what the
SMMU observes: commands as it consumes them, STEs / CDs as it fetches them, and the
endpoints' translations.

Driver rules (violations: reported, and with ``sanitize_fail`` they fail the run):

- ``missing-sync``: a CFGI / TLBI was consumed, and a translation it covers (the stream of a
  CFGI_STE / CFGI_CD, the VMID / ASID / address range of a TLBI) happened while the command
  queue stood drained (CONS == PROD: the driver had nothing more queued) and no CMD_SYNC had
  been consumed since.  The driver *relies on* an invalidation once the memory it protected
  is in use again: a DMA through the entry it invalidated.  Only a completed CMD_SYNC tells
  the driver that the invalidation took effect, and with the queue drained no CMD_SYNC is
  on its way.  (A translation between a TLBI and its CMD_SYNC in the same batch cannot
  happen: the queue is consumed in one go; a CMD_SYNC held by fault injection leaves the
  queue not drained.)  Each invalidation is reported once.  TLBI_S2_IPA covers stage-2-only
  streams by address (the IPA is the IOVA); for nested streams it covers nothing here.
- ``torn-ste`` / ``torn-cd``: consecutive fetched copies ``A`` -> ``B`` of an STE / CD in
  use, both valid (V=1), differ in a way no hitless sequence allows.  With the "used
  bits" of an entry (the fields its configuration makes the SMMU read: for an STE those
  of its Config's stages, for a CD all but the TTB0 walk fields when EPD0 is set), a
  hitless update writes the bits ``A`` ignores, then one "critical" qword in a single
  store, then clears the bits ``B`` ignores; so it can change bits used by both ``A`` and
  ``B`` in one qword only.  Torn: such bits changed in two or more qwords while the entry
  stayed valid (in whatever order the stores went, the SMMU might have fetched a mix of
  old and new).  The writes between two fetches are not seen one by one: a change that
  some order of stores makes hitless is not reported.  A breaking update goes
  through V=0 and is never torn.  STE.MEV, and STE.EATS between 0 and Trans when neither
  copy has EATS=S1Chk or S2S, may change in any step (the driver's own "update safe"
  bits).  STEs are fetched on every CFGI_STE / CFGI_ALL of a bound stream, CDs when a
  translation needs them and on every CFGI_CD / CFGI_CD_ALL (the SubstreamIDs seen) of a
  stream with a CD table; the driver issues one after each step of an update, so each
  step is seen.  A CD is one entry of one CD table (a stream whose STE now points to
  another table starts over).  CFGI_ALL and changes of SMMUEN / the stream table start over (the SMMU
  refetches everything; a reset guest rewrites its tables).

Device rule (reported apart, ``by: device``; never fails the run: the driver did nothing
wrong):

- ``use-after-unmap``: an endpoint's DMA to a page faults with F_TRANSLATION where the
  same (stream, substream) translated that page before and an invalidation covering it
  (TLBI by VMID / ASID / address) was consumed since: the driver unmapped and invalidated
  the page, the device still used it.  One report per access (its first such page and how
  many pages), each page once until it translates again;
  CFGI_STE / CFGI_CD of the stream forget its pages (its domain changed, not its map).

Counters (``no-match``; not violations: the architecture lets software invalidate
anything, and the stock driver does so on purpose, e.g. TLBI_NH_ASID of a freed domain):
invalidations that cannot match anything live, by kind:

- ``cfgi-ste-beyond-table``: CFGI_STE of a StreamID outside the stream table (beyond
  LOG2SIZE, or an invalid level-1 descriptor);
- ``cfgi-ste-invalid``: CFGI_STE of an STE that is invalid now and was not valid when the
  SMMU last fetched it (nothing valid could be cached);
- ``cfgi-cd-no-table``: CFGI_CD(_ALL) of a stream without a CD table (no bound stream with
  stage 1); ``cfgi-cd-beyond-table``: CFGI_CD of a SubstreamID >= 2^S1CDMax;
- ``tlbi-asid-unused``: TLBI_NH_ASID / TLBI_NH_VA of a (VMID, ASID) no cached context
  uses and no translation has used since its last full invalidation;
- ``tlbi-vmid-unused``: TLBI_S12_VMALL / TLBI_S2_IPA of a VMID no bound stream uses and no
  translation has used since its last full invalidation;
- ``tlbi-range-empty``: TLBI_NH_VA / TLBI_S2_IPA of a live tag whose range lies outside
  every address translated with that tag since its last full invalidation (kept as the
  lowest and highest address).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.cd import cd_index, fetch_cd_words
from viommu_backend.smmuv3.commands import CFGI_ALL_RANGE, Command
from viommu_backend.smmuv3.cmdq import tlbi_span
from viommu_backend.smmuv3.fields import EventId
from viommu_backend.smmuv3.ste import ConfigFault, S1Context, S2Config, fetch_ste
from viommu_backend.smmuv3.tlb import EL2_VMID, NO_ASID

if TYPE_CHECKING:
    from .manager import DomainManager
    from .sanitizer import Sanitizer
    from .translation import TranslationContext

PAGE_SHIFT = 12
Words = list[int]


# -- used bits (which fields an entry's configuration makes the SMMU read) ---------------------
def _masks(layout: Any, names: Iterable[str], nwords: int = 8) -> Words:
    """Per-qword masks of the named fields of ``layout``."""
    out = [0] * nwords
    for n in names:
        f = layout[n]
        out[f.word] |= f.mask >> (64 * f.word)
    return out


STE_S1_USED = _masks(fl.STE, ("S1Fmt", "S1ContextPtr", "S1CDMax", "S1DSS", "S1CIR", "S1COR",
                              "S1CSH", "S1STALLD", "STRW", "EATS", "MEV", "S2VMID"))
STE_S2_USED = _masks(fl.STE, ("S2FWB", "EATS", "SHCFG", "MEV", "S2VMID", "S2T0SZ", "S2SL0",
                              "S2IR0", "S2OR0", "S2SH0", "S2TG", "S2PS", "S2AA64", "S2ENDI",
                              "S2AFFD", "S2PTW", "S2HD", "S2HA", "S2S", "S2R", "S2TTB"))
STE_SHCFG = _masks(fl.STE, ("SHCFG",))
STE_MEV = _masks(fl.STE, ("MEV",))
STE_EATS = _masks(fl.STE, ("EATS",))
CD_EPD0_UNUSED = _masks(fl.CD, ("T0SZ", "TG0", "IR0", "OR0", "SH0", "TTB0"))
_ALL = (1 << 64) - 1


def _get(layout: Any, words: Words, name: str) -> int:
    f = layout[name]
    return f.get(words[f.word] << (64 * f.word))


def _or(a: Words, b: Words) -> Words:
    return [x | y for x, y in zip(a, b)]


def ste_used(words: Words) -> Words:
    """The bits of an STE its configuration makes the SMMU use."""
    used = _masks(fl.STE, ("V",))
    if not _get(fl.STE, words, "V"):
        return used
    used = _or(used, _masks(fl.STE, ("Config",)))
    cfg = _get(fl.STE, words, "Config")
    if cfg & 1:
        used = _or(used, STE_S1_USED)
        if _get(fl.STE, words, "S1DSS") == fl.S1DSS_BYPASS:
            used = _or(used, STE_SHCFG)
    if cfg & 2:
        used = _or(used, STE_S2_USED)
    if cfg == fl.STE_CONFIG_BYPASS:
        used = _or(used, STE_SHCFG)
    return used


def ste_safe(a: Words, b: Words) -> Words:
    """STE bits that may change in any step: MEV; EATS between 0 and Trans when neither
    copy has EATS=S1Chk (bit 1) or S2S."""
    safe = list(STE_MEV)
    s1chk = any(_get(fl.STE, w, "EATS") & 2 for w in (a, b))
    s2s = any(_get(fl.STE, w, "S2S") for w in (a, b))
    if not s1chk and not s2s:
        safe = _or(safe, STE_EATS)
    return safe


def cd_used(words: Words) -> Words:
    """The bits of a CD the SMMU uses: V; all of a valid CD but the TTB0 walk fields
    when EPD0 is set."""
    if not _get(fl.CD, words, "V"):
        return _masks(fl.CD, ("V",))
    if _get(fl.CD, words, "EPD0"):
        return [_ALL & ~m for m in CD_EPD0_UNUSED]
    return [_ALL] * len(words)


@dataclass(frozen=True)
class EntryKind:
    """How to judge the updates of one kind of entry (STE or CD)."""

    rule: str
    valid: Callable[[Words], bool]
    used: Callable[[Words], Words]
    safe: Callable[[Words, Words], Words] | None = None


STE_KIND = EntryKind("torn-ste", lambda w: bool(_get(fl.STE, w, "V")), ste_used, ste_safe)
CD_KIND = EntryKind("torn-cd", lambda w: bool(_get(fl.CD, w, "V")), cd_used)


def torn_qwords(kind: EntryKind, a: Words, b: Words) -> list[int]:
    """The used qwords a step ``a`` -> ``b`` changed, when both copies are valid and the
    step is not hitless (see the module docstring); [] otherwise."""
    if not kind.valid(a) or not kind.valid(b):
        return []
    ua, ub = kind.used(a), kind.used(b)
    sf = kind.safe(a, b) if kind.safe is not None else [0] * len(a)
    both = [i for i in range(len(a)) if (a[i] ^ b[i]) & ua[i] & ub[i] & ~sf[i]]
    return both if len(both) > 1 else []


# -- invalidations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Invalidation:
    """What a consumed CFGI / TLBI covers: a stream (``sid`` None: all) and substream
    (CFGI_CD; ``ssid`` None: all), or a VMID (None: all) / ASID (None: all) and an
    address range [lo, hi) (None: all; ``ipa``: the range is of IPAs)."""

    name: str
    sid: int | None = None
    ssid: int | None = None
    cfgi: bool = False
    vmid: int | None = None
    asid: int | None = None
    el2: bool = False
    lo: int | None = None
    hi: int | None = None
    ipa: bool = False

    def covers_tag(self, vmid: int, asid: int) -> bool:
        if self.cfgi:
            return False
        if self.el2 != (vmid == EL2_VMID):
            return False
        if self.vmid is not None and self.vmid != vmid:
            return False
        return self.asid is None or self.asid == asid

    def covers(self, sid: int, ssid: int | None, ctx: TranslationContext,
               pages: np.ndarray) -> bool:
        """Does it cover a translation of ``pages`` by (``sid``, ``ssid``) in ``ctx``?"""
        if self.cfgi:
            if self.sid is not None and self.sid != sid:
                return False
            return self.ssid is None or self.ssid == ssid or (self.ssid == 0 and ssid is None)
        if not self.covers_tag(ctx.vmid, ctx.asid):
            return False
        if self.ipa and ctx.stage != "s2":
            return False
        return self.lo is None or bool(np.any(self._in_range(pages)))

    def _in_range(self, pages: np.ndarray) -> np.ndarray:
        lo, hi = (self.lo or 0) >> PAGE_SHIFT, ((self.hi or 1) - 1) >> PAGE_SHIFT
        return (pages >= lo) & (pages <= hi)

    def page_range(self) -> range | None:
        if self.lo is None or self.hi is None:
            return None
        return range(self.lo >> PAGE_SHIFT, ((self.hi - 1) >> PAGE_SHIFT) + 1)


def invalidation_of(cmd: Command) -> Invalidation | None:
    """What ``cmd`` invalidates (None: not a CFGI / TLBI)."""
    n, f = cmd.name, cmd.fields
    if n == "CFGI_STE":
        return Invalidation(n, sid=f["SID"], cfgi=True)
    if n == "CFGI_STE_RANGE":
        return Invalidation(n, sid=None if f["RANGE"] >= CFGI_ALL_RANGE else f["SID"], cfgi=True)
    if n in ("CFGI_CD", "CFGI_CD_ALL"):
        return Invalidation(n, sid=f["SID"], ssid=f.get("SSID") if n == "CFGI_CD" else None,
                            cfgi=True)
    if not n.startswith("TLBI_") or n.startswith("TLBI_EL3"):
        return None
    el2 = n.startswith("TLBI_EL2")
    lo = hi = None
    if "ADDR" in f:
        addr, size = tlbi_span(cmd)
        lo = addr & ~((1 << PAGE_SHIFT) - 1) if size == 1 else addr
        hi = lo + max(size, 1 << PAGE_SHIFT)
    return Invalidation(n, vmid=None if el2 or n == "TLBI_NSNH_ALL" else f.get("VMID"),
                        asid=f.get("ASID") if n in _BY_ASID else None, el2=el2, lo=lo, hi=hi,
                        ipa=n == "TLBI_S2_IPA")


_BY_ASID = ("TLBI_NH_ASID", "TLBI_NH_VA", "TLBI_EL2_ASID", "TLBI_EL2_VA")


# -- per-stream state ----------------------------------------------------------------------------
@dataclass
class StreamUse:
    """What one (stream, substream) translated: its tag and its pages, those since
    invalidated (``gone``)."""

    vmid: int
    asid: int
    stage: str
    mapped: set[int] = field(default_factory=set)
    gone: set[int] = field(default_factory=set)

    def invalidate(self, inv: Invalidation) -> None:
        if not inv.covers_tag(self.vmid, self.asid) or (inv.ipa and self.stage != "s2"):
            return
        rng = inv.page_range()
        if rng is None:
            hit = set(self.mapped)
        elif len(rng) <= len(self.mapped):
            hit = self.mapped.intersection(rng)
        else:
            hit = {p for p in self.mapped if p in rng}
        self.mapped -= hit
        self.gone |= hit


@dataclass
class Hull:
    """Lowest and highest address translated with one tag since its last full
    invalidation."""

    lo: int
    hi: int


class SanitizerRules:
    """The rules above for one domain manager, reporting to its :class:`Sanitizer`.
    ``queue_drained()`` says whether the command queue is drained (CONS == PROD)."""

    def __init__(self, mgr: DomainManager, san: Sanitizer,
                 queue_drained: Callable[[], bool]) -> None:
        self.mgr = mgr
        self.san = san
        self.queue_drained = queue_drained
        self.unsynced: list[Invalidation] = []
        self.stes: dict[int, Words] = {}  # sid -> last fetched STE
        # (sid, CD table pointer, CD index) -> last fetched CD: copies of one entry only (a
        # stream moved to another CD table, e.g. a nested one, starts over)
        self.cds: dict[tuple[int, int, int], Words] = {}
        self.uses: dict[tuple[int, int | None], StreamUse] = {}
        self.tags: dict[tuple[int, int], Hull] = {}  # (vmid, asid) used since last flush

    # -- commands ------------------------------------------------------------------------
    def command(self, cmd: Command) -> None:
        """A command consumed (before it takes effect)."""
        if cmd.name == "CMD_SYNC":
            self.unsynced.clear()
            return
        inv = invalidation_of(cmd)
        if inv is None:
            return
        self._note("invalidations")
        self.unsynced.append(inv)
        if inv.cfgi:
            self._cfgi(cmd, inv)
        else:
            self._tlbi(inv)

    def _cfgi(self, cmd: Command, inv: Invalidation) -> None:
        for key in [k for k in self.uses if inv.sid is None or k[0] == inv.sid]:
            del self.uses[key]
        if cmd.name == "CFGI_STE":
            self._cfgi_ste_match(cmd["SID"])
        elif cmd.name in ("CFGI_CD", "CFGI_CD_ALL"):
            self._cfgi_cd(cmd["SID"], inv.ssid)

    def _cfgi_ste_match(self, sid: int) -> None:
        st = self.mgr.stream_table() if self.mgr.stream_table is not None else None
        mem = self.mgr.guest_memory
        if st is None or not st.enabled or mem is None:
            return
        cfg = {"FMT": st.fmt, "LOG2SIZE": st.log2size, "SPLIT": st.split}
        try:
            words = [int(w) for w in fetch_ste(mem, st.base, cfg, sid)]
        except ConfigFault as cf:
            if cf.event in ("C_BAD_STREAMID", "C_BAD_STE"):
                self.san.no_match("cfgi-ste-beyond-table", sid=sid)
            return
        last = self.stes.get(sid)
        if not words[0] & 1 and (last is None or not last[0] & 1):
            self.san.no_match("cfgi-ste-invalid", sid=sid)

    def _cfgi_cd(self, sid: int, ssid: int | None) -> None:
        dev = self.mgr.devices.get(sid)
        sc = None if dev is None else dev.ste
        if sc is None or sc.s1 is None:
            self.san.no_match("cfgi-cd-no-table", sid=sid, ssid=ssid)
            return
        ctx = sc.s1
        if ssid is not None and ssid >= (1 << ctx.cdmax) and not (ctx.cdmax == 0 and ssid == 0):
            self.san.no_match("cfgi-cd-beyond-table", sid=sid, ssid=ssid)
            return
        indexes = [ssid] if ssid is not None else [
            i for (s, ptr, i) in self.cds if s == sid and ptr == ctx.cd_ptr]
        for index in indexes:
            self._fetch_cd(sid, ctx, sc.s2, index)

    def cd_fetched(self, sid: int, ctx: S1Context, s2: S2Config | None,
                   ssid: int | None) -> None:
        """The SMMU fetched the CD ``ssid`` of the stream ``sid`` (CD table ``ctx``)."""
        index = cd_index(ctx, ssid, sid=sid)
        if index is not None:
            self._fetch_cd(sid, ctx, s2, index)

    def _fetch_cd(self, sid: int, ctx: S1Context, s2: S2Config | None, index: int) -> None:
        mem = self.mgr.memory
        if mem is None:
            return
        try:
            words = [int(w) for w in fetch_cd_words(mem, ctx, index, s2, sid=sid)]
        except ConfigFault:
            return
        self._observe(CD_KIND, self.cds, (sid, ctx.cd_ptr, index), words, sid=sid,
                      ssid=index, table=ctx.cd_ptr)

    def _tlbi(self, inv: Invalidation) -> None:
        self._count_tlbi_no_match(inv)
        for use in self.uses.values():
            use.invalidate(inv)
        if inv.lo is None:
            for tag in [t for t in self.tags if inv.covers_tag(*t)]:
                del self.tags[tag]

    def _count_tlbi_no_match(self, inv: Invalidation) -> None:
        if inv.el2 or inv.vmid is None:
            return
        if inv.name in ("TLBI_NH_ASID", "TLBI_NH_VA") and inv.asid is not None:
            if (inv.vmid, inv.asid) not in self._live_tags():
                self.san.no_match("tlbi-asid-unused", cmd=inv.name, vmid=inv.vmid,
                                  asid=inv.asid)
            elif inv.lo is not None:
                self._count_empty_range(inv, self.tags.get((inv.vmid, inv.asid)))
        elif inv.name in ("TLBI_S12_VMALL", "TLBI_S2_IPA"):
            if inv.vmid not in self._live_vmids():
                self.san.no_match("tlbi-vmid-unused", cmd=inv.name, vmid=inv.vmid)
            elif inv.lo is not None:
                self._count_empty_range(inv, self.tags.get((inv.vmid, NO_ASID)))

    def _count_empty_range(self, inv: Invalidation, hull: Hull | None) -> None:
        assert inv.lo is not None and inv.hi is not None
        if hull is None or inv.hi <= hull.lo or inv.lo > hull.hi:
            self.san.no_match("tlbi-range-empty", cmd=inv.name, vmid=inv.vmid, asid=inv.asid,
                              addr=inv.lo, size=inv.hi - inv.lo)

    def _live_tags(self) -> set[tuple[int, int]]:
        """(VMID, ASID) of every cached context and every tag used since its flush."""
        live = set(self.tags)
        return live | self.mgr.translator.cached_tags()

    def _live_vmids(self) -> set[int]:
        live = {v for v, _ in self.tags}
        for dev in self.mgr.devices.values():
            s2 = getattr(dev.hwpt, "s2", None)  # a paging domain's, or a nested one's parent's
            if s2 is not None:
                live.add(s2.vmid)
        return live

    # -- entries fetched -----------------------------------------------------------------
    def forget_entries(self) -> None:
        """Every stream's configuration is fetched anew (CFGI_ALL, SMMUEN, STRTAB)."""
        self.stes.clear()
        self.cds.clear()

    def ste_fetched(self, sid: int, words: Any) -> None:
        """The SMMU fetched the STE of ``sid`` (a bound stream)."""
        self._observe(STE_KIND, self.stes, sid, [int(w) for w in words], sid=sid)

    def _observe(self, kind: EntryKind, seen: dict, key: Any, words: Words,
                 **where: Any) -> None:
        last = seen.get(key)
        seen[key] = words
        if last is None or last == words:
            return
        self._note(kind.rule.replace("torn", "updates"))
        torn = torn_qwords(kind, last, words)
        if torn:
            self.san.report(kind.rule, **where, qwords=torn,
                            old=[hex(w) for w in last], new=[hex(w) for w in words])

    def _note(self, what: str) -> None:
        self.san.observed[what] = self.san.observed.get(what, 0) + 1

    # -- translations --------------------------------------------------------------------
    def translated(self, sid: int, ssid: int | None, ctx: TranslationContext,
                   va: np.ndarray, fault: np.ndarray) -> None:
        """Addresses ``va`` of (``sid``, ``ssid``) translated in ``ctx`` with fault codes
        ``fault`` (0: translated)."""
        if ctx.abort or ctx.identity or not len(va):
            return
        pages = va >> np.uint64(PAGE_SHIFT)
        self._use_tag(ctx, va)
        if self.unsynced and self.queue_drained():
            self._note("translations-after-unsynced")
            self._check_unsynced(sid, ssid, ctx, pages)
        self._check_unmapped(sid, ssid, ctx, pages, fault)

    def _use_tag(self, ctx: TranslationContext, va: np.ndarray) -> None:
        lo, hi = int(va.min()), int(va.max())
        hull = self.tags.get((ctx.vmid, ctx.asid))
        if hull is None:
            self.tags[(ctx.vmid, ctx.asid)] = Hull(lo, hi)
        else:
            hull.lo, hull.hi = min(hull.lo, lo), max(hull.hi, hi)

    def _check_unsynced(self, sid: int, ssid: int | None, ctx: TranslationContext,
                        pages: np.ndarray) -> None:
        for inv in [i for i in self.unsynced if i.covers(sid, ssid, ctx, pages)]:
            self.unsynced.remove(inv)
            self.san.report("missing-sync", cmd=inv.name, sid=sid, ssid=ssid,
                            iova=int(pages[0]) << PAGE_SHIFT, vmid=ctx.vmid, asid=ctx.asid)

    def _check_unmapped(self, sid: int, ssid: int | None, ctx: TranslationContext,
                        pages: np.ndarray, fault: np.ndarray) -> None:
        use = self.uses.get((sid, ssid))
        if use is None or (use.vmid, use.asid) != (ctx.vmid, ctx.asid):
            use = self.uses[(sid, ssid)] = StreamUse(ctx.vmid, ctx.asid, ctx.stage)
        ok = np.unique(pages[fault == 0]).tolist()
        use.mapped.update(ok)
        use.gone.difference_update(ok)
        missing = np.unique(pages[fault == int(EventId.F_TRANSLATION)]).tolist()
        if missing:
            self._note("translation-faults")
        gone = [p for p in missing if p in use.gone]
        if gone:
            use.gone.difference_update(gone)
            self.san.report("use-after-unmap", sid=sid, ssid=ssid, iova=gone[0] << PAGE_SHIFT,
                            pages=len(gone), vmid=ctx.vmid, asid=ctx.asid, stage=ctx.stage)
