"""Scalar reference walker (test oracle): written for clarity, from the layouts in
:mod:`fields`, one descriptor at a time.  Must give exactly the results of
:func:`walker.walk` / :func:`walker.walk_one`, and leave guest memory the same (hardware
Access flag / dirty state updates, HTTU)."""

from __future__ import annotations

from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.cd import S1Config
from viommu_backend.smmuv3.fields import EventId, FaultClass
from viommu_backend.smmuv3.ste import S2Config, start_level_bits
from viommu_backend.smmuv3.walker import Translation


class _Fault(Exception):
    def __init__(self, event: EventId, level: int) -> None:
        self.event = event
        self.level = level


def _read(mem, addr: int, level: int) -> int:
    try:
        return mem.read_u64(addr)
    except Exception:  # GuestMemoryError: outside guest memory / not readable
        raise _Fault(EventId.F_WALK_EABT, level) from None


def _output_address(desc: int, granule_shift: int, oas: int) -> int:
    oa = fl.PTE_S1["OA"].get(desc) & ~((1 << granule_shift) - 1)
    if granule_shift == 16 and oas > 48:
        oa |= ((desc >> 12) & 0xF) << 48
    return oa


def _block_allowed(granule_shift: int, level: int) -> bool:
    allowed = {12: (1, 2), 14: (2,), 16: (2,)}
    return level in allowed[granule_shift]


def walk_stage(mem, *, granule_shift: int, start_level: int, ia_bits: int, oas: int, ttb: int,
               stage2: bool, va: int, write: bool, priv: bool, instr: bool,
               af_fault_disabled: bool, ha: bool = False, hd: bool = False, wxn: bool = False,
               pan: bool = False, disabled: bool = False, table_ipa_to_pa=None,
               protected_walk: bool = False, fwb: bool = False
               ) -> tuple[int, int, int, int, bool]:
    """One stage: returns (output address, leaf level, mapping size, perm, global) or raises
    _Fault.  ``table_ipa_to_pa(ipa, write)`` (nested) maps each table address through
    stage 2.  With ``ha`` / ``hd`` the leaf descriptor is updated in memory; when it changed
    before the update could be stored, the whole stage is walked again."""
    for _attempt in range(8):
        done = _walk_stage_once(
            mem, granule_shift=granule_shift, start_level=start_level, ia_bits=ia_bits,
            oas=oas, ttb=ttb, stage2=stage2, va=va, write=write, priv=priv, instr=instr,
            af_fault_disabled=af_fault_disabled, ha=ha, hd=hd, wxn=wxn, pan=pan,
            disabled=disabled, table_ipa_to_pa=table_ipa_to_pa,
            protected_walk=protected_walk, fwb=fwb)
        if done is not None:
            return done
    raise _Fault(EventId.F_WALK_EABT, 3)


def _walk_stage_once(mem, *, granule_shift, start_level, ia_bits, oas, ttb, stage2, va,
                     write, priv, instr, af_fault_disabled, ha, hd, wxn, pan, disabled,
                     table_ipa_to_pa, protected_walk, fwb):
    if disabled or va >= (1 << ia_bits):
        raise _Fault(EventId.F_TRANSLATION, start_level)
    stride = granule_shift - 3
    top_bits = start_level_bits(granule_shift, start_level, ia_bits)
    table = ttb & ~((8 << top_bits) - 1)
    if table >= (1 << oas):
        raise _Fault(EventId.F_ADDR_SIZE, start_level)
    no_el0 = read_only = pxn_table = uxn_table = False
    level = start_level
    while True:
        shift = granule_shift + (3 - level) * stride
        bits = top_bits if level == start_level else stride
        index = (va >> shift) & ((1 << bits) - 1)
        desc_ipa = desc_addr = table + 8 * index
        if table_ipa_to_pa is not None:
            desc_addr = table_ipa_to_pa(desc_ipa, False)
        desc = _read(mem, desc_addr, level)
        if not fl.PTE_S1["Valid"].get(desc):
            raise _Fault(EventId.F_TRANSLATION, level)
        kind_bit = fl.PTE_S1["Type"].get(desc)
        oa = _output_address(desc, granule_shift, oas)
        if level < 3 and kind_bit == 1:  # table descriptor
            if oa >= (1 << oas):
                raise _Fault(EventId.F_ADDR_SIZE, level)
            if not stage2:
                tbl = fl.PTE_TABLE.decode(desc)
                no_el0 |= bool(tbl["APTable"] & 1)
                read_only |= bool(tbl["APTable"] & 2)
                pxn_table |= bool(tbl["PXNTable"])
                uxn_table |= bool(tbl["XNTable"])
            table = oa
            level += 1
            continue
        if level == 3 and kind_bit == 0:
            raise _Fault(EventId.F_TRANSLATION, level)
        if level < 3 and not _block_allowed(granule_shift, level):
            raise _Fault(EventId.F_TRANSLATION, level)
        if oa >= (1 << oas):
            raise _Fault(EventId.F_ADDR_SIZE, level)
        # AF == 0: an Access fault, unless hardware sets it (HA, which wins over AFFD) or
        # AF faults are disabled (AFFD)
        if not fl.PTE_S1["AF"].get(desc) and not ha and not af_fault_disabled:
            raise _Fault(EventId.F_ACCESS, level)
        dirty_ok = hd and write and bool(fl.PTE_S1["DBM"].get(desc))
        if stage2:
            d = fl.PTE_S2.decode(desc)
            # Device: MemAttr[3:2] == 0, or MemAttr[2] == 0 in the S2FWB encoding
            if protected_walk and not d["MemAttr"] & (0b0100 if fwb else 0b1100):
                raise _Fault(EventId.F_PERMISSION, level)
            can_r = bool(d["S2AP_R"])
            can_w = bool(d["S2AP_W"]) or dirty_ok
            can_x = not d["XN"]
        else:
            d = fl.PTE_S1.decode(desc)
            ap_ro = bool(d["AP2"]) and not dirty_ok
            if priv:
                can_r = not (pan and d["AP1"])
                can_x = not d["PXN"] and not pxn_table and not (d["AP1"] and not ap_ro)
            else:
                can_r = bool(d["AP1"]) and not no_el0
                can_x = not d["UXN"] and not uxn_table
            can_w = can_r and not ap_ro and not read_only
            if wxn and can_w:
                can_x = False
        perm = (fl.PERM_R * can_r) | (fl.PERM_W * can_w) | (fl.PERM_X * can_x)
        allowed = can_x if instr else (can_w if write else can_r)
        if not allowed:
            raise _Fault(EventId.F_PERMISSION, level)
        if not _update_leaf(mem, desc, desc_ipa, desc_addr, level, stage2=stage2, ha=ha,
                            dirty=dirty_ok, table_ipa_to_pa=table_ipa_to_pa):
            return None
        size = 1 << shift
        pa = (oa & ~(size - 1)) | (va & (size - 1))
        is_global = not stage2 and not fl.PTE_S1["nG"].get(desc)
        return pa, level, size, perm, is_global


def _update_leaf(mem, desc: int, desc_ipa: int, desc_addr: int, level: int, *,
                 stage2: bool, ha: bool, dirty: bool, table_ipa_to_pa) -> bool:
    """Make the hardware updates of a translated access in the leaf descriptor (read as
    ``desc`` from ``desc_addr``); False when it changed before the update was stored."""
    updated = _updated_descriptor(desc, stage2=stage2, ha=ha, dirty=dirty)
    if updated == desc:
        return True
    if table_ipa_to_pa is not None:  # a nested stage 1: the update writes through stage 2
        desc_addr = table_ipa_to_pa(desc_ipa, True)
    try:
        return mem.update_u64(desc_addr, desc, updated)
    except Exception:  # GuestMemoryError: the table is not writable
        raise _Fault(EventId.F_WALK_EABT, level) from None


def _updated_descriptor(desc: int, *, stage2: bool, ha: bool, dirty: bool) -> int:
    """The leaf descriptor after the hardware updates of an access that translated: AF
    set (HA); for a write with DBM under HD, marked dirty (S1 AP[2]=0, S2 S2AP[1]=1) if it
    was clean, with AF set."""
    layout = fl.PTE_S2 if stage2 else fl.PTE_S1
    out = desc
    if ha:
        out = layout.set(out, "AF", 1)
    if dirty:
        if stage2 and not layout["S2AP_W"].get(desc):
            out = layout.set(layout.set(out, "S2AP_W", 1), "AF", 1)
        elif not stage2 and layout["AP2"].get(desc):
            out = layout.set(layout.set(out, "AP2", 0), "AF", 1)
    return out


def _s2_kwargs(s2: S2Config) -> dict:
    return dict(granule_shift=s2.granule_shift, start_level=s2.start_level,
                ia_bits=s2.ia_bits, oas=s2.ps_bits, ttb=s2.ttb, stage2=True,
                af_fault_disabled=s2.affd, ha=s2.ha, hd=s2.hd, fwb=s2.fwb)


def translate(mem, s1: S1Config | None, s2: S2Config | None, iova: int, *, write: bool,
              priv: bool = False, instr: bool = False) -> Translation:
    if s1 is None and s2 is None:
        return Translation(pa=iova, level=-1, page_size=1 << 12, perm=7, global_=True)
    if s1 is None:
        try:
            pa, lvl, size, perm, _ = walk_stage(mem, va=iova, write=write, priv=priv,
                                                instr=instr, **_s2_kwargs(s2))
        except _Fault as f:
            return Translation(fault=int(f.event), level=f.level, stage2=True,
                               fault_class=int(FaultClass.IN), ipa=iova)
        return Translation(pa=pa, level=lvl, page_size=size, perm=perm)

    s2_fault: list[Translation] = []

    def table_ipa_to_pa(ipa: int, write: bool) -> int:
        try:
            return walk_stage(mem, va=ipa, write=write, priv=False, instr=False,
                              protected_walk=s2.ptw, **_s2_kwargs(s2))[0]
        except _Fault as f:
            s2_fault.append(Translation(fault=int(f.event), level=f.level, stage2=True,
                                        fault_class=int(FaultClass.TTD), ipa=ipa))
            raise

    try:
        ipa, lvl, size, perm, glob = walk_stage(
            mem, granule_shift=s1.granule_shift, start_level=s1.start_level,
            ia_bits=s1.ia_bits, oas=s1.ips_bits, ttb=s1.ttb, stage2=False, va=iova,
            write=write, priv=priv, instr=instr, af_fault_disabled=s1.affd, ha=s1.ha,
            hd=s1.hd, wxn=s1.wxn, pan=s1.pan, disabled=s1.epd0,
            table_ipa_to_pa=table_ipa_to_pa if s2 is not None else None)
    except _Fault as f:
        if s2_fault:
            return s2_fault[0]
        return Translation(fault=int(f.event), level=f.level)
    if s2 is None:
        return Translation(pa=ipa, level=lvl, page_size=size, perm=perm, global_=glob)
    try:
        pa, _, size2, perm2, _ = walk_stage(mem, va=ipa, write=write, priv=priv,
                                            instr=instr, **_s2_kwargs(s2))
    except _Fault as f:
        return Translation(fault=int(f.event), level=f.level, stage2=True,
                           fault_class=int(FaultClass.IN), ipa=ipa)
    return Translation(pa=pa, level=lvl, ipa=ipa, page_size=min(size, size2),
                       perm=perm & perm2, global_=glob)
