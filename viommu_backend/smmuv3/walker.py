"""VMSAv8-64 translation table walker: batched (numpy) and a scalar fast path.

``walk(mem, s1, s2, iovas, write=...)`` translates many input addresses at once: every
active element gathers its own descriptor at each level (one ``mem.gather_u64`` per level),
elements drop out as they reach a leaf or fault.  ``walk_one`` is the scalar fast path for
single translations (small DMAs never pay numpy call overhead).  Both give the same results
as :mod:`viommu_backend.smmuv3.oracle`.

Stages: ``s1`` only (S1 output is the PA), ``s2`` only (input is an IPA), or both (nested:
every S1 table address and the S1 output IPA go through S2; S2 faults are flagged
``stage2`` with the IPA and class TT (table walk) or IN (the transaction's address)).

Fault codes are SMMUv3 event ids (:class:`EventId`), 0 = translated.

Hardware translation table updates (HTTU; CD.HA/HD, STE.S2HA/S2HD): a leaf descriptor
with AF=0 gets AF=1 written back (HA) instead of an Access fault, and a write through a
writable-clean descriptor (DBM=1 with AP[2]=1 at stage 1 / S2AP[1]=0 at stage 2) marks it
dirty in memory (HD: AP[2] cleared / S2AP[1] set, AF set) and proceeds.  An update is
made only for an access that translates (SMMUv3 3.13.2 leaves it UNKNOWN for one that
takes a Permission fault), with :meth:`GuestMemory.update_u64` (re-check, then one 8-byte
store); a stage-1 update in a nested walk is a write through stage 2 (which must allow it
and may mark the stage-2 descriptor dirty in turn).  The batched walk hands elements that
need an update to the scalar path.  A translation is only ever returned with W for a
descriptor that is dirty in memory, so a TLB entry cached from a read of a clean one has
no W and a later write walks again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.cd import S1Config
from viommu_backend.smmuv3.fields import EventId, FaultClass
from viommu_backend.smmuv3.ste import S2Config, start_level_bits

F_TRANSLATION = int(EventId.F_TRANSLATION)
F_ADDR_SIZE = int(EventId.F_ADDR_SIZE)
F_ACCESS = int(EventId.F_ACCESS)
F_PERMISSION = int(EventId.F_PERMISSION)
F_WALK_EABT = int(EventId.F_WALK_EABT)
# internal to the batched walk: the element needs a hardware descriptor update, which the
# scalar path makes (never in a returned WalkResult)
_REWALK = 0xFE
# tries of a walk whose descriptor update found the descriptor changed under it
_UPDATE_TRIES = 8

TABLE_ATTR_MASK = fl.TBL_PXN | fl.TBL_UXN | fl.TBL_AP_NOEL0 | fl.TBL_AP_RO
_U64 = np.uint64


@dataclass(frozen=True)
class StageParams:
    """Per-stage constants derived once from an S1Config / S2Config."""

    stage2: bool
    gs: int
    stride: int
    start_level: int
    ia_bits: int
    oas: int
    ttb: int
    disabled: bool  # EPD0
    af_ok: bool  # AFFD: AF=0 does not fault (and is left alone)
    ha: bool  # hardware Access flag update (takes precedence over AFFD)
    hd: bool  # hardware dirty state update
    wxn: bool
    pan: bool
    hier: bool  # hierarchical table attributes apply
    ptw: bool
    levels: tuple[tuple[int, int, int], ...]  # (level, shift, index mask)
    oa_mask: int
    oa52: bool  # 64K granule with 52-bit OA: OA[51:48] in descriptor bits [15:12]
    device_bits: int = 0  # stage 2: leaf bits all zero for Device memory (S2PTW; S2FWB)

    def block_ok(self, level: int) -> bool:
        if self.gs == 12:
            return level in (1, 2)
        return level == 2

    @property
    def update(self) -> bool:
        """Does this stage update descriptors in memory (HTTU enabled)?"""
        return self.ha or self.hd


@lru_cache(maxsize=256)
def stage_params(cfg: S1Config | S2Config) -> StageParams:
    if isinstance(cfg, S2Config):
        gs, sl, ia, oas = cfg.granule_shift, cfg.start_level, cfg.ia_bits, cfg.ps_bits
        s2, disabled, af_ok, wxn, pan, hier, ptw = True, False, cfg.affd, False, \
            False, False, cfg.ptw
    else:
        gs, ia, oas = cfg.granule_shift, cfg.ia_bits, cfg.ips_bits
        sl = cfg.start_level
        s2, disabled, af_ok, wxn, pan, hier, ptw = False, cfg.epd0, cfg.affd, \
            cfg.wxn, cfg.pan, True, False
    stride = gs - 3
    levels = []
    for lvl in range(sl, 4):
        shift = gs + (3 - lvl) * stride
        bits = start_level_bits(gs, sl, ia) if lvl == sl else stride
        levels.append((lvl, shift, (1 << bits) - 1))
    oa_mask = ((1 << 48) - 1) & ~((1 << gs) - 1)
    ttb = cfg.ttb & ~((levels[0][2] + 1) * 8 - 1)
    return StageParams(s2, gs, stride, sl, ia, oas, ttb, disabled, af_ok, cfg.ha, cfg.hd, wxn,
                       pan, hier, ptw, tuple(levels), oa_mask, gs == 16 and oas > 48,
                       fl.S2_DEVICE_BITS[cfg.fwb] if s2 else 0)


# ------------------------------------------------------------------------------------------
# results

@dataclass
class WalkResult:
    """Per-input results (numpy arrays of equal length)."""

    pa: np.ndarray  # uint64 output address (valid where fault == 0)
    fault: np.ndarray  # uint8 EventId, 0 = ok
    level: np.ndarray  # int8: leaf level (ok) or faulting level
    stage2: np.ndarray  # bool: fault taken at stage 2
    fault_class: np.ndarray  # uint8 FaultClass for stage-2 faults
    ipa: np.ndarray  # uint64: faulting IPA (stage-2 faults) / intermediate address
    page_size: np.ndarray  # uint64: size of the mapping (nested: min of both stages)
    perm: np.ndarray  # uint8 PERM_R|W|X granted to this kind of access
    global_: np.ndarray  # bool: S1 leaf has nG == 0

    def __len__(self) -> int:
        return len(self.pa)

    @property
    def ok(self) -> np.ndarray:
        return self.fault == 0

    def fault_name(self, i: int) -> str | None:
        f = int(self.fault[i])
        return EventId(f).name if f else None

    def item(self, i: int) -> "Translation":
        return Translation(int(self.pa[i]), int(self.fault[i]), int(self.level[i]),
                           bool(self.stage2[i]), int(self.fault_class[i]), int(self.ipa[i]),
                           int(self.page_size[i]), int(self.perm[i]), bool(self.global_[i]))

    @classmethod
    def empty(cls, n: int) -> "WalkResult":
        return cls(np.zeros(n, _U64), np.zeros(n, np.uint8), np.full(n, -1, np.int8),
                   np.zeros(n, bool), np.zeros(n, np.uint8), np.zeros(n, _U64),
                   np.zeros(n, _U64), np.zeros(n, np.uint8), np.zeros(n, bool))


@dataclass(frozen=True, slots=True)
class Translation:
    """One translation result (scalar fast path / oracle)."""

    pa: int = 0
    fault: int = 0
    level: int = -1
    stage2: bool = False
    fault_class: int = 0
    ipa: int = 0
    page_size: int = 0
    perm: int = 0
    global_: bool = False

    @property
    def fault_name(self) -> str | None:
        return EventId(self.fault).name if self.fault else None


def _need(write: bool, instr: bool) -> int:
    return fl.PERM_X if instr else (fl.PERM_W if write else fl.PERM_R)


# ------------------------------------------------------------------------------------------
# scalar fast path

def _perm_s1(p: StageParams, d: int, tattr: int, priv: bool, write: bool) -> int:
    ap1 = d & fl.PTE_AP1
    ro = bool(d & fl.PTE_AP2) and not (p.hd and write and d & fl.PTE_DBM)
    if priv:
        r = not (p.pan and ap1)
        w = r and not ro and not tattr & fl.TBL_AP_RO
        x = not d & fl.PTE_PXN and not tattr & fl.TBL_PXN and not (ap1 and not ro)
    else:
        r = bool(ap1) and not tattr & fl.TBL_AP_NOEL0
        w = r and not ro and not tattr & fl.TBL_AP_RO
        x = not d & fl.PTE_UXN and not tattr & fl.TBL_UXN
    if p.wxn and w:
        x = False
    return (fl.PERM_R if r else 0) | (fl.PERM_W if w else 0) | (fl.PERM_X if x else 0)


def _perm_s2(p: StageParams, d: int, write: bool) -> int:
    r = bool(d & fl.PTE_S2AP_R)
    w = bool(d & fl.PTE_S2AP_W) or bool(p.hd and write and d & fl.PTE_DBM)
    x = not d & fl.PTE_S2_XN
    return (fl.PERM_R if r else 0) | (fl.PERM_W if w else 0) | (fl.PERM_X if x else 0)


_FAULT, _TABLE, _LEAF = 0, 1, 2


def _classify(p: StageParams, d: int, lvl: int, tattr: int, write: bool, priv: bool,
              need: int, ptw: bool) -> tuple[int, int, int, int]:
    """Decide what descriptor ``d`` read at ``lvl`` means: ``(fault, kind, perm, oa)`` with
    kind _FAULT (fault = EventId), _TABLE (oa = next table) or _LEAF (perm granted)."""
    if not d & 1:
        return F_TRANSLATION, _FAULT, 0, 0
    oa = d & p.oa_mask
    if p.oa52:
        oa |= ((d >> 12) & 0xF) << 48
    if d & 2 and lvl < 3:
        if oa >> p.oas:
            return F_ADDR_SIZE, _FAULT, 0, oa
        return 0, _TABLE, 0, oa
    if (lvl == 3 and not d & 2) or (lvl < 3 and not p.block_ok(lvl)):
        return F_TRANSLATION, _FAULT, 0, oa
    if oa >> p.oas:
        return F_ADDR_SIZE, _FAULT, 0, oa
    if not d & fl.PTE_AF and not p.af_ok and not p.ha:
        return F_ACCESS, _FAULT, 0, oa
    if p.stage2:
        perm = _perm_s2(p, d, write)
        if ptw and not d & p.device_bits:  # S2PTW: S1 table walk to Device memory
            return F_PERMISSION, _FAULT, 0, oa
    else:
        perm = _perm_s1(p, d, tattr, priv, write)
    if not perm & need:
        return F_PERMISSION, _FAULT, 0, oa
    return 0, _LEAF, perm, oa


def _hw_update(p: StageParams, d: int, write: bool) -> int:
    """Leaf descriptor ``d`` after the hardware updates an access that translated through
    it makes (``d`` itself when none): AF set (HA); for a write through a writable-clean
    descriptor (HD, DBM=1) the dirty state: AP[2] cleared (S1) / S2AP[1] set (S2), AF set."""
    new = d
    if p.ha and not d & fl.PTE_AF:
        new |= fl.PTE_AF
    if p.hd and write and d & fl.PTE_DBM:
        if p.stage2 and not d & fl.PTE_S2AP_W:
            new |= fl.PTE_S2AP_W | fl.PTE_AF
        elif not p.stage2 and d & fl.PTE_AP2:
            new = (new & ~fl.PTE_AP2) | fl.PTE_AF
    return new


def _stage_one(mem, p: StageParams, va: int, write: bool, priv: bool, instr: bool,
               s2p: StageParams | None, ptw: bool = False) -> Translation:
    """Walk one stage for one address.  With ``s2p`` (nested S1) table addresses are IPAs.
    A walk whose descriptor update found the descriptor changed walks again; after
    _UPDATE_TRIES such races the access takes F_WALK_EABT (as if the update's write
    had failed) rather than proceed without its update."""
    for _ in range(_UPDATE_TRIES):
        t = _stage_walk(mem, p, va, write, priv, instr, s2p, ptw)
        if t is not None:
            return t
    return _s_fault(p, F_WALK_EABT, p.levels[-1][0], va, ptw)


def _stage_walk(mem, p: StageParams, va: int, write: bool, priv: bool, instr: bool,
                s2p: StageParams | None, ptw: bool) -> Translation | None:
    """One walk of :func:`_stage_one`; None when a descriptor update lost a race."""
    if p.disabled or va >> p.ia_bits:
        return _s_fault(p, F_TRANSLATION, p.start_level, va, ptw)
    table = p.ttb
    if table >> p.oas:
        return _s_fault(p, F_ADDR_SIZE, p.start_level, va, ptw)
    tattr = 0
    need = _need(write, instr)
    for lvl, shift, mask in p.levels:
        dipa = daddr = table + (((va >> shift) & mask) << 3)
        if s2p is not None:
            t2 = _stage_one(mem, s2p, daddr, False, False, False, None, ptw=s2p.ptw)
            if t2.fault:
                return Translation(fault=t2.fault, level=t2.level, stage2=True,
                                   fault_class=FaultClass.TTD, ipa=daddr)
            daddr = t2.pa
        try:
            d = mem.read_u64(daddr)
        except Exception:  # GuestMemoryError: table outside guest memory
            return _s_fault(p, F_WALK_EABT, lvl, va, ptw)
        code, kind, perm, oa = _classify(p, d, lvl, tattr, write, priv, need, ptw)
        if code:
            return _s_fault(p, code, lvl, va, ptw)
        if kind == _TABLE:
            if p.hier:
                tattr |= d & TABLE_ATTR_MASK
            table = oa
            continue
        if p.update:
            new = _hw_update(p, d, write)
            if new != d:
                done = _write_back(mem, s2p, dipa, daddr, d, new)
                if done is False:
                    return None  # the descriptor changed under us: walk again
                if done is not True:
                    return done or _s_fault(p, F_WALK_EABT, lvl, va, ptw)
        size = 1 << shift
        pa = (oa & ~(size - 1)) | (va & (size - 1))
        return Translation(pa=pa, level=lvl, page_size=size, perm=perm,
                           global_=not p.stage2 and not d & fl.PTE_NG)
    raise AssertionError("unreachable")  # pragma: no cover


def _write_back(mem, s2p: StageParams | None, dipa: int, daddr: int, old: int,
                new: int) -> bool | Translation | None:
    """Store the updated descriptor ``new`` over ``old``.  A nested stage-1 descriptor is
    written through stage 2 (a write: its stage 2 must allow it, and may be marked dirty in
    turn).  True: stored; False: the descriptor had changed (nothing stored); a stage-2
    fault (class TT) translating the write; None: the write itself failed."""
    if s2p is not None:
        t2 = _stage_one(mem, s2p, dipa, True, False, False, None, ptw=s2p.ptw)
        if t2.fault:
            return Translation(fault=t2.fault, level=t2.level, stage2=True,
                               fault_class=FaultClass.TTD, ipa=dipa)
        daddr = t2.pa
    try:
        return mem.update_u64(daddr, old, new)
    except Exception:  # GuestMemoryError: the table is not writable guest RAM
        return None


def _s_fault(p: StageParams, code: int, lvl: int, va: int, ptw: bool) -> Translation:
    if p.stage2:
        return Translation(fault=code, level=lvl, stage2=True,
                           fault_class=FaultClass.TTD if ptw else FaultClass.IN, ipa=va)
    return Translation(fault=code, level=lvl)


def walk_one(mem, s1: S1Config | None, s2: S2Config | None, iova: int, *, write: bool,
             priv: bool = False, instr: bool = False) -> Translation:
    """Translate one address (scalar fast path)."""
    iova = int(iova)
    if s1 is None and s2 is None:
        return Translation(pa=iova, level=-1, page_size=1 << 12, perm=7, global_=True)
    p2 = stage_params(s2) if s2 is not None else None
    if s1 is None:
        return _stage_one(mem, p2, iova, write, priv, instr, None)
    t1 = _stage_one(mem, stage_params(s1), iova, write, priv, instr, p2)
    if t1.fault or p2 is None:
        return t1
    t2 = _stage_one(mem, p2, t1.pa, write, priv, instr, None)
    if t2.fault:
        return Translation(fault=t2.fault, level=t2.level, stage2=True,
                           fault_class=FaultClass.IN, ipa=t1.pa)
    return Translation(pa=t2.pa, level=t1.level, ipa=t1.pa,
                       page_size=min(t1.page_size, t2.page_size), perm=t1.perm & t2.perm,
                       global_=t1.global_)


def table_path(mem, s1: S1Config | None, s2: S2Config | None, iova: int
               ) -> list[tuple[str, int, int, int, int, int]]:
    """The table descriptors a walk of ``iova`` reads, for walk-cache fills:
    ``(stage, level, shift, input address, descriptor address, descriptor)`` per
    intermediate level ("s1" / "s2"; nested: also the stage-2 walks of the stage-1 table
    addresses and of the output IPA).  Walks an address that translated; stops at a
    fault."""
    out: list[tuple[str, int, int, int, int, int]] = []

    def stage(p: StageParams, va: int, s2p: StageParams | None) -> int | None:
        table = p.ttb
        for lvl, shift, mask in p.levels:
            daddr = table + (((va >> shift) & mask) << 3)
            if s2p is not None and (daddr := stage(s2p, daddr, None)) is None:
                return None
            try:
                d = mem.read_u64(daddr)
            except Exception:  # GuestMemoryError: changed since the walk
                return None
            code, kind, _, oa = _classify(p, d, lvl, 0, False, False, 0, False)
            if kind == _TABLE:
                out.append(("s2" if p.stage2 else "s1", lvl, shift, va, daddr, d))
                table = oa
                continue
            return (oa & ~((1 << shift) - 1)) | (va & ((1 << shift) - 1)) \
                if code == F_PERMISSION else None  # a leaf (nothing needed: no perm)
        return None

    p2 = stage_params(s2) if s2 is not None else None
    if s1 is None:
        if p2 is not None:
            stage(p2, iova, None)
        return out
    ipa = stage(stage_params(s1), iova, p2)
    if ipa is not None and p2 is not None:
        stage(p2, ipa, None)
    return out


# ------------------------------------------------------------------------------------------
# batched
#
# Each stage walk keeps the active elements' indices, input addresses and current table.
# Two things keep it close to one numpy pass per level:
# * grouping by table: when the inputs span few distinct level-L prefixes (a contiguous
#   IOVA range), levels 0..L are walked once per prefix (a small recursive walk) and the
#   per-prefix results / next tables are spread to the elements; in a nested walk each of
#   those tables is translated through stage 2 once, not once per element;
# * uniform descriptors: when every descriptor read at a level has the same bits apart from
#   its output address (all pages alike), it is classified once as a scalar.
# Loads index a uint64 view of the guest region (GuestMemory.u64_window) after one bounds
# check per level, falling back to GuestMemory.gather_u64 (per-element ok) otherwise.

_I64 = np.int64
_M64 = (1 << 64) - 1
_GROUP_MIN = 64  # smallest batch worth grouping by table
_GROUP_DIV = 8  # group at a level whose distinct prefixes are at most n / _GROUP_DIV


def _sel(ids: np.ndarray | None, sel: np.ndarray) -> np.ndarray:
    return sel if ids is None else ids[sel]


@dataclass(slots=True)
class _Active:
    """The elements of a batched stage walk still walking, and the tables they are at."""

    ids: np.ndarray | None  # their indices in the batch (None: all of it, in order)
    va: np.ndarray  # their input addresses
    tattr: int | np.ndarray  # hierarchical table attributes gathered so far
    table: int | np.ndarray | None  # current table: shared, per element, or None: tsrc
    tsrc: tuple[np.ndarray, np.ndarray] | None = None  # (tables, each element's row)
    idx: np.ndarray | None = None  # descriptor index in the table at this level

    def keep(self, sel: np.ndarray) -> bool:
        """Drop all but the elements ``sel``; False when none are left."""
        self.ids, self.va = _sel(self.ids, sel), self.va[sel]
        if self.idx is not None:
            self.idx = self.idx[sel]
        if isinstance(self.tattr, np.ndarray):
            self.tattr = self.tattr[sel]
        if isinstance(self.table, np.ndarray):
            self.table = self.table[sel]
        if self.tsrc is not None:
            self.tsrc = (self.tsrc[0], self.tsrc[1][sel])
        return len(sel) > 0


class _StageWalk:
    """A batched walk of one stage over ``va`` through ``p.levels[:stop + 1]``.

    With ``stop`` before the last level (a per-prefix walk), elements still on a table
    descriptor after level ``stop`` are flagged in ``cont`` with ``next_table`` (an IPA in a
    nested walk) and ``next_tattr``."""

    def __init__(self, mem, p: StageParams, va: np.ndarray, write: bool, priv: bool,
                 instr: bool, s2p: StageParams | None, ptw: bool = False,
                 stop: int | None = None) -> None:
        self.mem, self.p, self.va, self.s2p, self.ptw = mem, p, va, s2p, ptw
        self.write, self.priv, self.need = write, priv, _need(write, instr)
        self.instr = instr
        last = len(p.levels) - 1
        self.stop = last if stop is None else stop
        n = len(va)
        self.res = WalkResult.empty(n)
        self.cont = self.next_table = self.next_tattr = None
        if self.stop < last:
            self.cont = np.zeros(n, bool)
            self.next_table = np.zeros(n, _U64)
            self.next_tattr = np.zeros(n, _U64)
        # descriptor bits that must agree for a level to be classified once (all but the
        # output-address bits the stage's OAS allows)
        self.uniform_mask = ~(p.oa_mask & ((1 << p.oas) - 1)) & _M64

    # --- results ---------------------------------------------------------------------
    def fail(self, ids: np.ndarray | None, code: int, lvl: int) -> None:
        res, p = self.res, self.p
        t = slice(None) if ids is None else ids
        res.fault[t] = code
        res.level[t] = lvl
        if p.stage2:
            res.stage2[t] = True
            res.fault_class[t] = FaultClass.TTD if self.ptw else FaultClass.IN
            res.ipa[t] = self.va if ids is None else self.va[ids]

    def _fail_s2_table(self, ids, bad, r2: WalkResult, rows, daddr) -> None:
        """Stage-2 fault translating S1 descriptor addresses ``daddr`` (class TT)."""
        res = self.res
        t = _sel(ids, bad)
        res.fault[t] = r2.fault[rows]
        res.level[t] = r2.level[rows]
        res.stage2[t] = True
        res.fault_class[t] = FaultClass.TTD
        res.ipa[t] = daddr

    def _copy(self, ids, pk: np.ndarray, va_a: np.ndarray, rq: WalkResult, s: int) -> None:
        """Give elements the result of their level prefix ``pk`` (walked at ``rq``)."""
        res = self.res
        t = slice(None) if ids is None else ids

        def put(name: str):
            src = getattr(rq, name)
            v = src[0] if (src == src[0]).all() else src[pk]
            getattr(res, name)[t] = v
            return v

        for name in ("level", "stage2", "fault_class", "page_size", "perm", "global_"):
            put(name)
        f = put("fault")
        low = va_a & _U64((1 << s) - 1)
        pa = rq.pa[pk]
        if isinstance(f, np.ndarray):
            pa = np.where(f == 0, pa + low, pa)
        elif f == 0:
            pa += low
        res.pa[t] = pa
        if self.p.stage2:  # this stage's faults report the element's own input address
            if isinstance(f, np.ndarray):
                res.ipa[t] = np.where(f != 0, va_a, _U64(0))
            elif f:
                res.ipa[t] = va_a
        else:
            put("ipa")

    # --- walk ------------------------------------------------------------------------
    def run(self) -> "_StageWalk":
        p, va = self.p, self.va
        if len(va) == 0:
            return self
        if p.disabled:
            self.fail(None, F_TRANSLATION, p.start_level)
            return self
        ids, va_a = None, va
        vmin, vmax = int(va.min()), int(va.max())
        if p.ia_bits < 64 and vmax >> p.ia_bits:
            bad = (va >> _U64(p.ia_bits)) != 0
            self.fail(np.flatnonzero(bad), F_TRANSLATION, p.start_level)
            ids = np.flatnonzero(~bad)
            if len(ids) == 0:
                return self
            va_a = va[ids]
            vmin, vmax = int(va_a.min()), int(va_a.max())
        if p.ttb >> p.oas:
            self.fail(ids, F_ADDR_SIZE, p.start_level)
            return self
        j = self._group_level(len(va_a), vmin, vmax)
        if j < 0:
            self._levels(0, _Active(ids, va_a, 0, p.ttb))
            return self
        active = self._expand(j, ids, va_a, vmin, vmax)
        if active is not None:
            self._levels(j + 1, active)
        return self

    def _group_level(self, m: int, vmin: int, vmax: int) -> int:
        if m < _GROUP_MIN:
            return -1
        for i in range(self.stop, -1, -1):
            s = self.p.levels[i][1]
            if (vmax >> s) - (vmin >> s) + 1 <= m // _GROUP_DIV:
                return i
        return -1

    def _expand(self, j: int, ids, va_a: np.ndarray, vmin: int, vmax: int) -> _Active | None:
        """Walk levels ``0..j`` once per distinct prefix; spread the results.  Returns the
        elements still walking, or None."""
        p = self.p
        s = p.levels[j][1]
        pmin = vmin >> s
        k = (vmax >> s) - pmin + 1
        q = (np.arange(k, dtype=_U64) + _U64(pmin)) << _U64(s)
        sub = _StageWalk(self.mem, p, q, self.write, self.priv, self.instr, self.s2p,
                         self.ptw, stop=j).run()
        pk = va_a >> _U64(s)
        pk -= _U64(pmin)
        pk = pk.view(_I64)
        cont = sub.cont
        if cont is None:  # j is the last level: every prefix finished
            self._copy(ids, pk, va_a, sub.res, s)
            return None
        if not cont.all():
            ef = ~cont[pk]
            fin = np.flatnonzero(ef)
            if len(fin) == len(ef):
                self._copy(ids, pk, va_a, sub.res, s)
                return None
            if len(fin):
                self._copy(_sel(ids, fin), pk[fin], va_a[fin], sub.res, s)
                keep = np.flatnonzero(~ef)
                ids, va_a, pk = _sel(ids, keep), va_a[keep], pk[keep]
            # unused prefixes borrow a used table so the load bounds stay tight
            c0 = int(np.flatnonzero(cont)[0])
            sub.next_table[~cont] = sub.next_table[c0]
            sub.next_tattr[~cont] = sub.next_tattr[c0]
        ta = sub.next_tattr
        tattr = int(ta[0]) if (ta == ta[0]).all() else ta[pk]
        return _Active(ids, va_a, tattr, None, (sub.next_table, pk))

    def _load(self, table, tsrc, idx: np.ndarray, nbytes: int):
        """Descriptors at ``table + 8 * idx`` -> (values, ok or None when all ok)."""
        mem = self.mem
        if tsrc is not None:
            tab_k, pk = tsrc
            win = mem.u64_window(int(tab_k.min()), int(tab_k.max()) + nbytes)
            if win is not None:
                words, base = win
                w = ((tab_k - _U64(base)) >> _U64(3)).view(_I64)[pk]
                w += idx.view(_I64)
                return words.take(w, out=idx), None  # idx's buffer is free again
            table = tab_k[pk]
        elif isinstance(table, int):
            win = mem.u64_window(table, table + nbytes)
            if win is not None:
                words, base = win
                iw = idx.view(_I64)
                iw += (table - base) >> 3
                return words.take(iw, out=idx), None
        else:
            win = mem.u64_window(int(table.min()), int(table.max()) + nbytes)
            if win is not None:
                words, base = win
                w = table - _U64(base)
                w >>= _U64(3)
                w = w.view(_I64)
                w += idx.view(_I64)
                return words.take(w, out=idx), None
        d, ok = mem.gather_u64(table + (idx << _U64(3)))
        return d, (None if ok.all() else ok)

    def _levels(self, first: int, a: _Active) -> None:
        """Walk levels ``first..stop`` element by element."""
        s2p = self.s2p
        for li in range(first, self.stop + 1):
            lvl, shift, mask = self.p.levels[li]
            if len(a.va) == 0:
                return
            nbytes = (mask + 1) << 3
            a.idx = a.va >> _U64(shift)
            a.idx &= _U64(mask)
            loaded = None
            if s2p is not None:
                if nbytes > 1 << s2p.gs or (a.tsrc is None and not isinstance(a.table, int)):
                    loaded = self._load_each_through_s2(a)
                    if loaded is None:
                        return
                elif not self._tables_through_s2(a):
                    return
            d, ok = loaded or self._load(a.table, a.tsrc, a.idx, nbytes)
            a.tsrc = a.idx = None  # idx's buffer may now hold d
            if ok is None and not isinstance(a.tattr, np.ndarray):
                walking = self._level_uniform(a, d, lvl, shift)
                if walking is False:
                    return
                if walking:
                    continue
            self._level_general(a, d, ok, lvl, shift)
        if self.cont is not None and len(a.va):
            table = a.tsrc[0][a.tsrc[1]] if a.tsrc is not None else a.table
            t = slice(None) if a.ids is None else a.ids
            self.cont[t] = True
            self.next_table[t] = table
            self.next_tattr[t] = a.tattr

    def _load_each_through_s2(self, a: _Active):
        """Nested, tables spanning stage-2 pages: translate every descriptor address
        through stage 2 and load the descriptors -> (values, ok or None), or None when
        every element took a stage-2 fault."""
        if a.tsrc is not None:
            a.table, a.tsrc = a.tsrc[0][a.tsrc[1]], None
        daddr = a.table + (a.idx << _U64(3))
        s2p = self.s2p
        r2 = _StageWalk(self.mem, s2p, daddr, False, False, False, None, s2p.ptw).run().res
        f2 = r2.fault != 0
        pa2 = r2.pa
        if f2.any():
            bad = np.flatnonzero(f2)
            self._fail_s2_table(a.ids, bad, r2, bad, daddr[bad])
            keep = np.flatnonzero(~f2)
            pa2 = pa2[keep]
            if not a.keep(keep):
                return None
        d, ok = self.mem.gather_u64(pa2)
        return d, (None if ok.all() else ok)

    def _tables_through_s2(self, a: _Active) -> bool:
        """Nested, each table within one stage-2 page: translate each table once (a shared
        one, or one per prefix); False when every element took a stage-2 fault."""
        tab_k, pk = (np.array([a.table], _U64), None) if a.tsrc is None else a.tsrc
        s2p = self.s2p
        r2 = _StageWalk(self.mem, s2p, tab_k, False, False, False, None, s2p.ptw).run().res
        fk = r2.fault != 0
        if fk.any():
            fe = fk[pk] if pk is not None else np.ones(len(a.va), bool)
            bad = np.flatnonzero(fe)
            if len(bad):
                rows = pk[bad] if pk is not None else np.zeros(len(bad), _I64)
                self._fail_s2_table(a.ids, bad, r2, rows,
                                    tab_k[rows] + (a.idx[bad] << _U64(3)))
                if not a.keep(np.flatnonzero(~fe)):
                    return False
        if pk is None:
            a.table = int(r2.pa[0])
        else:
            a.tsrc = (r2.pa, a.tsrc[1])
        return True

    def _level_uniform(self, a: _Active, d: np.ndarray, lvl: int, shift: int) -> bool | None:
        """Every descriptor alike but for its output address: classify once.  None: they
        differ; True: all tables (``a`` moved on to them); False: the walk is done."""
        p = self.p
        u = np.bitwise_xor(d, d[0])  # bits that differ from the first descriptor
        if int(np.bitwise_or.reduce(u)) & self.uniform_mask:
            return None
        d0 = int(d[0])
        code, kind, perm, _ = _classify(p, d0, lvl, a.tattr, self.write, self.priv,
                                        self.need, self.ptw)
        if not code and kind == _LEAF and p.update and _hw_update(p, d0, self.write) != d0:
            code = _REWALK  # every element needs the update: scalar path
        if code:
            self.fail(a.ids, code, lvl)
            return False
        # u is free again; the output address (leaf: its bits above the size)
        keep = p.oa_mask if kind == _TABLE else p.oa_mask & ~((1 << shift) - 1)
        oa = np.bitwise_and(d, _U64(keep), out=u)
        if p.oa52:
            oa |= ((d >> _U64(12)) & _U64(0xF)) << _U64(48)
        if kind == _TABLE:
            if p.hier:
                a.tattr |= d0 & TABLE_ATTR_MASK
            a.table = oa
            return True
        self._leaf_uniform(a.ids, a.va, oa, d, lvl, shift, perm,
                           not p.stage2 and not d0 & fl.PTE_NG)
        return False

    def _level_general(self, a: _Active, d: np.ndarray, ok: np.ndarray | None, lvl: int,
                       shift: int) -> None:
        """Classify each descriptor on its own: faults and leaves finish, tables go on."""
        p, m = self.p, len(d)
        ids = np.arange(m) if a.ids is None else a.ids
        valid = (d & _U64(1)) != 0
        if ok is not None:
            valid &= ok
        is_tbl = valid & ((d & _U64(2)) != 0) if lvl < 3 else np.zeros(m, bool)
        oa = d & _U64(p.oa_mask)
        if p.oa52:
            oa |= ((d >> _U64(12)) & _U64(0xF)) << _U64(48)
        big = (oa >> _U64(p.oas)) != 0 if p.oas < 64 else np.zeros(m, bool)
        if ok is not None:
            self.fail(ids[~ok], F_WALK_EABT, lvl)
            inval = ok & ~valid
        else:
            inval = ~valid
        if lvl == 3:
            inval |= valid & ((d & _U64(2)) == 0)
        elif not p.block_ok(lvl):
            inval |= valid & ~is_tbl
        if inval.any():
            self.fail(ids[inval], F_TRANSLATION, lvl)
        good = valid & ~inval
        asz = good & big
        if asz.any():
            self.fail(ids[asz], F_ADDR_SIZE, lvl)
        good &= ~big
        leaf = good & ~is_tbl
        tattr = a.tattr
        if leaf.any():
            self._leaf_general(ids[leaf], a.va[leaf], d[leaf], oa[leaf],
                               tattr[leaf] if isinstance(tattr, np.ndarray) else tattr,
                               lvl, shift)
        nxt = np.flatnonzero(is_tbl & good)
        a.ids, a.va, a.table = ids[nxt], a.va[nxt], oa[nxt]
        if p.hier:
            a.tattr = (tattr[nxt] if isinstance(tattr, np.ndarray) else _U64(tattr)) | \
                (d[nxt] & _U64(TABLE_ATTR_MASK))

    def _leaf_uniform(self, ids, va_a, oa, scratch, lvl: int, shift: int, perm: int,
                      global_: bool) -> None:
        """``oa`` (this walk's own array) becomes the PA; ``scratch`` is free memory."""
        size = 1 << shift
        pa = oa  # already without the bits below ``size``
        pa |= np.bitwise_and(va_a, _U64(size - 1), out=scratch)
        res = self.res
        if ids is None:
            res.pa = pa
            t = slice(None)
        else:
            res.pa[ids] = pa
            t = ids
        res.level[t] = lvl
        res.page_size[t] = size
        res.perm[t] = perm
        res.global_[t] = global_

    def _leaf_general(self, li, va_l, dl, oal, ta, lvl: int, shift: int) -> None:
        p, res = self.p, self.res
        perm = _perm_np(p, dl, ta, self.priv, self.write)
        af_bad = np.zeros(len(dl), bool) if p.af_ok or p.ha else (dl & _U64(fl.PTE_AF)) == 0
        perm_bad = (perm & self.need) == 0
        if self.ptw:
            perm_bad |= (dl & _U64(p.device_bits)) == 0
        perm_bad &= ~af_bad
        if af_bad.any():
            self.fail(li[af_bad], F_ACCESS, lvl)
        if perm_bad.any():
            self.fail(li[perm_bad], F_PERMISSION, lvl)
        fine = ~(af_bad | perm_bad)
        if p.update:  # translated, but a descriptor update is due: the scalar path makes it
            upd = fine & _needs_update_np(p, dl, self.write)
            if upd.any():
                self.fail(li[upd], _REWALK, lvl)
                fine &= ~upd
        fi = li[fine]
        size = 1 << shift
        res.pa[fi] = (oal[fine] & _U64(_M64 & ~(size - 1))) | (va_l[fine] & _U64(size - 1))
        res.level[fi] = lvl
        res.page_size[fi] = size
        res.perm[fi] = perm[fine]
        if not p.stage2:
            res.global_[fi] = (dl[fine] & _U64(fl.PTE_NG)) == 0


def _needs_update_np(p: StageParams, d: np.ndarray, write: bool) -> np.ndarray:
    """Vector form of ``_hw_update(p, d, write) != d``."""
    upd = np.zeros(len(d), bool)
    if p.ha:
        upd |= (d & _U64(fl.PTE_AF)) == 0
    if p.hd and write:
        clean = (d & _U64(fl.PTE_S2AP_W)) == 0 if p.stage2 else (d & _U64(fl.PTE_AP2)) != 0
        upd |= clean & ((d & _U64(fl.PTE_DBM)) != 0)
    return upd


def _stage_np(mem, p: StageParams, va: np.ndarray, write: bool, priv: bool, instr: bool,
              s2p: StageParams | None, ptw: bool = False) -> WalkResult:
    return _StageWalk(mem, p, va, write, priv, instr, s2p, ptw).run().res


def _perm_np(p: StageParams, d: np.ndarray, tattr, priv: bool, write: bool) -> np.ndarray:
    R, W, X = _U64(fl.PERM_R), _U64(fl.PERM_W), _U64(fl.PERM_X)
    if p.stage2:
        r = (d & _U64(fl.PTE_S2AP_R)) != 0
        w = (d & _U64(fl.PTE_S2AP_W)) != 0
        if p.hd and write:
            w |= (d & _U64(fl.PTE_DBM)) != 0
        x = (d & _U64(fl.PTE_S2_XN)) == 0
    else:
        ta = np.asarray(tattr, dtype=_U64)
        ap1 = (d & _U64(fl.PTE_AP1)) != 0
        ro = (d & _U64(fl.PTE_AP2)) != 0
        if p.hd and write:
            ro &= (d & _U64(fl.PTE_DBM)) == 0
        tro = (ta & _U64(fl.TBL_AP_RO)) != 0
        if priv:
            r = ~ap1 if p.pan else np.ones(len(d), bool)
            x = ((d & _U64(fl.PTE_PXN)) == 0) & ((ta & _U64(fl.TBL_PXN)) == 0) & ~(ap1 & ~ro)
        else:
            r = ap1 & ((ta & _U64(fl.TBL_AP_NOEL0)) == 0)
            x = ((d & _U64(fl.PTE_UXN)) == 0) & ((ta & _U64(fl.TBL_UXN)) == 0)
        w = r & ~ro & ~tro
        if p.wxn:
            x &= ~w
    out = np.where(r, R, _U64(0)) | np.where(w, W, _U64(0)) | np.where(x, X, _U64(0))
    return out.astype(np.uint8)


def walk(mem, s1: S1Config | None, s2: S2Config | None, iovas: np.ndarray, *, write: bool,
         priv: bool = False, instr: bool = False) -> WalkResult:
    """Translate ``iovas`` (uint64 array) through S1, S2 or both (nested)."""
    va = np.ascontiguousarray(iovas, dtype=_U64)
    n = len(va)
    if s1 is None and s2 is None:
        res = WalkResult.empty(n)
        res.pa[:] = va
        res.page_size[:] = 1 << 12
        res.perm[:] = 7
        res.global_[:] = True
        return res
    p2 = stage_params(s2) if s2 is not None else None
    if s1 is None:
        res = _stage_np(mem, p2, va, write, priv, instr, None)
    else:
        p1 = stage_params(s1)
        res = _stage_np(mem, p1, va, write, priv, instr, p2)
        if p2 is not None:
            _nested_s2(mem, p2, res, write, priv, instr)
    if (s1 is not None and stage_params(s1).update) or (p2 is not None and p2.update):
        for i in np.flatnonzero(res.fault == _REWALK).tolist():  # descriptor updates
            t = walk_one(mem, s1, s2, int(va[i]), write=write, priv=priv, instr=instr)
            for name in WalkResult.__dataclass_fields__:
                getattr(res, name)[i] = getattr(t, name)
    return res


def _nested_s2(mem, p2: StageParams, r1: WalkResult, write: bool, priv: bool,
               instr: bool) -> None:
    """Second stage of a nested batch: the S1 output IPAs of ``r1`` through stage 2."""
    ok = np.flatnonzero(r1.fault == 0)
    if len(ok) == 0:
        return
    ipa = r1.pa[ok]
    r2 = _stage_np(mem, p2, ipa, write, priv, instr, None)
    f2 = r2.fault != 0
    bad = ok[f2]
    r1.fault[bad] = r2.fault[f2]
    r1.level[bad] = r2.level[f2]
    r1.stage2[bad] = True
    r1.fault_class[bad] = FaultClass.IN
    r1.ipa[bad] = ipa[f2]
    r1.pa[bad] = 0
    r1.perm[bad] = 0
    r1.page_size[bad] = 0
    r1.global_[bad] = False
    g = ok[~f2]
    r1.ipa[g] = ipa[~f2]
    r1.pa[g] = r2.pa[~f2]
    r1.page_size[g] = np.minimum(r1.page_size[g], r2.page_size[~f2])
    r1.perm[g] &= r2.perm[~f2]
