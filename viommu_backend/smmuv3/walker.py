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
    af_ok: bool  # AFFD or HA: AF=0 does not fault
    hd: bool
    wxn: bool
    pan: bool
    hier: bool  # hierarchical table attributes apply
    ptw: bool
    levels: tuple[tuple[int, int, int], ...]  # (level, shift, index mask)
    oa_mask: int
    oa52: bool  # 64K granule with 52-bit OA: OA[51:48] in descriptor bits [15:12]

    def block_ok(self, level: int) -> bool:
        if self.gs == 12:
            return level in (1, 2)
        return level == 2


@lru_cache(maxsize=256)
def stage_params(cfg: S1Config | S2Config) -> StageParams:
    if isinstance(cfg, S2Config):
        gs, sl, ia, oas = cfg.granule_shift, cfg.start_level, cfg.ia_bits, cfg.ps_bits
        s2, disabled, af_ok, wxn, pan, hier, ptw = True, False, cfg.affd or cfg.ha, False, \
            False, False, cfg.ptw
    else:
        gs, ia, oas = cfg.granule_shift, cfg.ia_bits, cfg.ips_bits
        sl = cfg.start_level
        s2, disabled, af_ok, wxn, pan, hier, ptw = False, cfg.epd0, cfg.affd or cfg.ha, \
            cfg.wxn, cfg.pan, True, False
    stride = gs - 3
    levels = []
    for lvl in range(sl, 4):
        shift = gs + (3 - lvl) * stride
        bits = start_level_bits(gs, sl, ia) if lvl == sl else stride
        levels.append((lvl, shift, (1 << bits) - 1))
    oa_mask = ((1 << 48) - 1) & ~((1 << gs) - 1)
    ttb = cfg.ttb & ~((levels[0][2] + 1) * 8 - 1)
    return StageParams(s2, gs, stride, sl, ia, oas, ttb, disabled, af_ok, cfg.hd, wxn, pan,
                       hier, ptw, tuple(levels), oa_mask, gs == 16 and oas > 48)


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


def _stage_one(mem, p: StageParams, va: int, write: bool, priv: bool, instr: bool,
               s2p: StageParams | None, ptw: bool = False) -> Translation:
    """Walk one stage for one address.  With ``s2p`` (nested S1) table addresses are IPAs."""
    if p.disabled or va >> p.ia_bits:
        return _s_fault(p, F_TRANSLATION, p.start_level, va, ptw)
    table = p.ttb
    if table >> p.oas:
        return _s_fault(p, F_ADDR_SIZE, p.start_level, va, ptw)
    tattr = 0
    need = _need(write, instr)
    for lvl, shift, mask in p.levels:
        daddr = table + (((va >> shift) & mask) << 3)
        if s2p is not None:
            t2 = _stage_one(mem, s2p, daddr, False, False, False, None, ptw=s2p.ptw)
            if t2.fault:
                return Translation(fault=t2.fault, level=t2.level, stage2=True,
                                   fault_class=FaultClass.TT, ipa=daddr)
            daddr = t2.pa
        try:
            d = mem.read_u64(daddr)
        except Exception:  # GuestMemoryError: table outside guest memory
            return _s_fault(p, F_WALK_EABT, lvl, va, ptw)
        if not d & 1:
            return _s_fault(p, F_TRANSLATION, lvl, va, ptw)
        oa = d & p.oa_mask
        if p.oa52:
            oa |= ((d >> 12) & 0xF) << 48
        if d & 2 and lvl < 3:
            if oa >> p.oas:
                return _s_fault(p, F_ADDR_SIZE, lvl, va, ptw)
            if p.hier:
                tattr |= d & TABLE_ATTR_MASK
            table = oa
            continue
        if (lvl == 3 and not d & 2) or (lvl < 3 and not p.block_ok(lvl)):
            return _s_fault(p, F_TRANSLATION, lvl, va, ptw)
        if oa >> p.oas:
            return _s_fault(p, F_ADDR_SIZE, lvl, va, ptw)
        if not d & fl.PTE_AF and not p.af_ok:
            return _s_fault(p, F_ACCESS, lvl, va, ptw)
        if p.stage2:
            perm = _perm_s2(p, d, write)
            if ptw and not (d >> 4) & 3:  # S2PTW: S1 table walk to Device memory
                return _s_fault(p, F_PERMISSION, lvl, va, ptw)
        else:
            perm = _perm_s1(p, d, tattr, priv, write)
        if not perm & need:
            return _s_fault(p, F_PERMISSION, lvl, va, ptw)
        size = 1 << shift
        pa = (oa & ~(size - 1)) | (va & (size - 1))
        return Translation(pa=pa, level=lvl, page_size=size, perm=perm,
                           global_=not p.stage2 and not d & fl.PTE_NG)
    raise AssertionError("unreachable")  # pragma: no cover


def _s_fault(p: StageParams, code: int, lvl: int, va: int, ptw: bool) -> Translation:
    if p.stage2:
        return Translation(fault=code, level=lvl, stage2=True,
                           fault_class=FaultClass.TT if ptw else FaultClass.IN, ipa=va)
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


# ------------------------------------------------------------------------------------------
# batched

def _stage_np(mem, p: StageParams, va: np.ndarray, write: bool, priv: bool, instr: bool,
              s2p: StageParams | None, ptw: bool = False) -> WalkResult:
    n = len(va)
    res = WalkResult.empty(n)
    fclass = FaultClass.TT if ptw else FaultClass.IN

    def fail(idx: np.ndarray, code: int, lvl: int) -> None:
        res.fault[idx] = code
        res.level[idx] = lvl
        if p.stage2:
            res.stage2[idx] = True
            res.fault_class[idx] = fclass
            res.ipa[idx] = va[idx]

    if p.disabled:
        fail(np.arange(n), F_TRANSLATION, p.start_level)
        return res
    act: np.ndarray | None = None  # None = all elements, else indices into va
    va_a = va
    if p.ia_bits < 64:
        bad = (va >> _U64(p.ia_bits)) != 0
        if bad.any():
            fail(np.flatnonzero(bad), F_TRANSLATION, p.start_level)
            act = np.flatnonzero(~bad)
            va_a = va[act]
    if p.ttb >> p.oas:
        fail(act if act is not None else np.arange(n), F_ADDR_SIZE, p.start_level)
        return res
    table: np.ndarray | int = p.ttb
    tattr: np.ndarray | int = 0
    need = _need(write, instr)
    oa_mask = _U64(p.oa_mask)
    for lvl, shift, mask in p.levels:
        if len(va_a) == 0:
            break
        ids = act if act is not None else np.arange(len(va_a))
        daddr = table + (((va_a >> _U64(shift)) & _U64(mask)) << _U64(3))
        if s2p is not None:
            r2 = _stage_np(mem, s2p, daddr, False, False, False, None, ptw=s2p.ptw)
            f2 = r2.fault != 0
            if f2.any():
                bad_ids = ids[f2]
                res.fault[bad_ids] = r2.fault[f2]
                res.level[bad_ids] = r2.level[f2]
                res.stage2[bad_ids] = True
                res.fault_class[bad_ids] = FaultClass.TT
                res.ipa[bad_ids] = daddr[f2]
                keep = ~f2
                ids, va_a, daddr = ids[keep], va_a[keep], r2.pa[keep]
                if not isinstance(table, int):
                    table = table[keep]
                if not isinstance(tattr, int):
                    tattr = tattr[keep]
                act = ids
            else:
                daddr = r2.pa
        d = None
        if isinstance(table, int) and s2p is None:
            # every element reads the same table: index a zero-copy view of it instead of
            # a general gather (upper levels of a walk over a contiguous IOVA range)
            try:
                tv = mem.ndarray(table, 8 * (mask + 1), np.dtype("<u8"))
            except Exception:  # not one readable fd-backed region: per-element gather
                tv = None
            if tv is not None:
                d = tv[(va_a >> _U64(shift)) & _U64(mask)].astype(_U64, copy=False)
                ok = np.ones(len(d), bool)
        if d is None:
            d, ok = mem.gather_u64(daddr)
        valid = ((d & _U64(1)) != 0) & ok
        is_tbl = valid & ((d & _U64(2)) != 0) if lvl < 3 else np.zeros(len(d), bool)
        oa = d & oa_mask
        if p.oa52:
            oa |= ((d >> _U64(12)) & _U64(0xF)) << _U64(48)
        if p.oas < 64:
            big = (oa >> _U64(p.oas)) != 0
        else:  # pragma: no cover
            big = np.zeros(len(d), bool)
        if is_tbl.all() and not big.any():  # common: everybody descends
            if p.hier:
                tattr = tattr | (d & _U64(TABLE_ATTR_MASK))
            table = oa
            if len(oa) and oa[0] == oa[-1] and (oa == oa[0]).all():
                table = int(oa[0])
            continue
        # --- some elements leave the walk at this level
        if not ok.all():
            fail(ids[~ok], F_WALK_EABT, lvl)
        inval = ok & ~valid
        if lvl == 3:
            inval |= valid & ((d & _U64(2)) == 0)
        elif not p.block_ok(lvl):
            inval |= valid & ~is_tbl
        if inval.any():
            fail(ids[inval], F_TRANSLATION, lvl)
        good = valid & ~inval
        asz = good & big
        if asz.any():
            fail(ids[asz], F_ADDR_SIZE, lvl)
        good &= ~big
        leaf = good & ~is_tbl
        if leaf.any():
            li = ids[leaf]
            dl = d[leaf]
            ta = tattr[leaf] if not isinstance(tattr, int) else tattr
            perm = _perm_np(p, dl, ta, priv, write)
            af_bad = np.zeros(len(dl), bool) if p.af_ok else (dl & _U64(fl.PTE_AF)) == 0
            perm_bad = (perm & need) == 0
            if ptw:
                perm_bad |= ((dl >> _U64(4)) & _U64(3)) == 0
            perm_bad &= ~af_bad
            if af_bad.any():
                fail(li[af_bad], F_ACCESS, lvl)
            if perm_bad.any():
                fail(li[perm_bad], F_PERMISSION, lvl)
            fine = ~(af_bad | perm_bad)
            fi = li[fine]
            size = 1 << shift
            res.pa[fi] = (oa[leaf][fine] & _U64(~(size - 1) & (2**64 - 1))) | \
                (va_a[leaf][fine] & _U64(size - 1))
            res.level[fi] = lvl
            res.page_size[fi] = size
            res.perm[fi] = perm[fine]
            if not p.stage2:
                res.global_[fi] = (dl[fine] & _U64(fl.PTE_NG)) == 0
        nxt = is_tbl & good
        act = ids[nxt]
        va_a = va_a[nxt]
        table = oa[nxt]
        if p.hier:
            tattr = (tattr[nxt] if not isinstance(tattr, int) else tattr) | \
                (d[nxt] & _U64(TABLE_ATTR_MASK))
    return res


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
        return _stage_np(mem, p2, va, write, priv, instr, None)
    r1 = _stage_np(mem, stage_params(s1), va, write, priv, instr, p2)
    if p2 is None:
        return r1
    ok = np.flatnonzero(r1.fault == 0)
    if len(ok) == 0:
        return r1
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
    return r1
