"""Hardware Access flag and dirty state updates (HTTU: CD.HA/HD, STE.S2HA/S2HD): the
batched walker, the scalar fast path and the oracle each run on the same starting memory
and must agree on the translations *and* on the descriptors they leave in memory."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from viommu_backend.memory import PROT_READ, PROT_WRITE, GuestMemory
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import oracle, regs
from viommu_backend.smmuv3.cd import decode_cd
from viommu_backend.smmuv3.smmu_config import SmmuConfig
from viommu_backend.smmuv3.fields import EventId
from viommu_backend.smmuv3.walker import walk, walk_one
from tests.support.walker_env import (BASE, IPA_OFF, S1_IA, S2_IA, nested_s1_builder, s1_config,
                        s2_config, s2_table)

OK, FAC, FP = 0, int(EventId.F_ACCESS), int(EventId.F_PERMISSION)
AF, AP2, DBM, S2W = fl.PTE_AF, fl.PTE_AP2, fl.PTE_DBM, fl.PTE_S2AP_W
PAGE = 0x1000
SIZE = 8 << 20  # guest RAM of these tests (each walker starts from a copy of all of it)


def memory():
    return b.make_memory(BASE, SIZE), b.Allocator(BASE, SIZE // 2)


def run_all(mem, s1, s2, iovas, *, write=False, priv=False, instr=False):
    """Each walker from the same memory: identical results and identical memory after.
    Returns (batched result, memory before, memory after)."""
    iovas = np.asarray(iovas, dtype=np.uint64)
    before = mem.read(BASE, SIZE)
    res = walk(mem, s1, s2, iovas, write=write, priv=priv, instr=instr)
    after = mem.read(BASE, SIZE)
    mem.write(BASE, before)
    ones = [walk_one(mem, s1, s2, va, write=write, priv=priv, instr=instr)
            for va in iovas.tolist()]
    assert mem.read(BASE, SIZE) == after, "scalar path left other descriptors"
    mem.write(BASE, before)
    refs = [oracle.translate(mem, s1, s2, va, write=write, priv=priv, instr=instr)
            for va in iovas.tolist()]
    assert mem.read(BASE, SIZE) == after, "oracle left other descriptors"
    for i, va in enumerate(iovas.tolist()):
        assert ones[i] == refs[i], (hex(va), ones[i], refs[i])
        assert res.item(i) == refs[i], (hex(va), res.item(i), refs[i])
    return res, before, after


def _s1(**leaf):
    mem, al = memory()
    pt = b.PageTable(mem, al, ia_bits=39)
    pt.map(PAGE, BASE + 0x10_0000, **leaf)
    return mem, pt


def test_ha_sets_af_in_memory_instead_of_an_access_fault():
    mem, pt = _s1(af=False)
    r, _, _ = run_all(mem, s1_config(pt), None, [PAGE])  # no HA: Access fault, untouched
    assert r.fault[0] == FAC and not pt.get_desc(PAGE, 3) & AF
    r, _, _ = run_all(mem, s1_config(pt, AFFD=1), None, [PAGE])  # AFFD: used as is
    assert r.fault[0] == OK and not pt.get_desc(PAGE, 3) & AF
    before = pt.get_desc(PAGE, 3)
    r, _, _ = run_all(mem, s1_config(pt, HA=1, AFFD=1), None, [PAGE])  # HA wins over AFFD
    assert r.fault[0] == OK and pt.get_desc(PAGE, 3) == before | AF


def test_hd_marks_writable_clean_dirty_on_write_only():
    mem, pt = _s1(read_only=True, dbm=True, af=False)
    s1 = s1_config(pt, HA=1, HD=1)
    clean = pt.get_desc(PAGE, 3)
    r, _, _ = run_all(mem, s1, None, [PAGE + 8])  # a read: AF only, stays clean
    assert r.fault[0] == OK and not r.perm[0] & fl.PERM_W
    assert pt.get_desc(PAGE, 3) == clean | AF
    r, _, _ = run_all(mem, s1, None, [PAGE + 8], write=True)
    assert r.fault[0] == OK and r.perm[0] & fl.PERM_W
    assert pt.get_desc(PAGE, 3) == (clean | AF) & ~AP2  # dirty: AP[2] cleared
    # without HD (HA only) the same write is a Permission fault and changes nothing
    mem2, pt2 = _s1(read_only=True, dbm=True)
    r, before, after = run_all(mem2, s1_config(pt2, HA=1), None, [PAGE], write=True)
    assert r.fault[0] == FP and before == after
    # DBM=0: truly read-only, even with HD
    mem3, pt3 = _s1(read_only=True)
    r, before, after = run_all(mem3, s1_config(pt3, HA=1, HD=1), None, [PAGE], write=True)
    assert r.fault[0] == FP and before == after


def test_no_update_for_an_access_that_faults():
    """AF=0 and a write to a read-only page: the Permission fault wins over the update
    (3.13.2 leaves AF UNKNOWN then; this model leaves it alone)."""
    mem, pt = _s1(read_only=True, af=False)
    r, before, after = run_all(mem, s1_config(pt, HA=1, HD=1), None, [PAGE], write=True)
    assert r.fault[0] == FP and before == after


def test_aptable_read_only_is_not_made_writable_by_hd():
    mem, pt = _s1(read_only=True, dbm=True)
    l2 = pt.desc_addr(PAGE, 2)
    mem.write_u64(l2, mem.read_u64(l2) | (2 << 61))  # APTable[1]: no write below
    r, before, after = run_all(mem, s1_config(pt, HA=1, HD=1), None, [PAGE], write=True)
    assert r.fault[0] == FP and before == after


def test_s2_ha_hd():
    mem, al = memory()
    pt = b.PageTable(mem, al, ia_bits=40, start_level=1, stage2=True)
    pt.map(PAGE, BASE + 0x10_0000, write=False, dbm=True, af=False)
    s2 = s2_config(pt, S2HA=1, S2HD=1)
    clean = pt.get_desc(PAGE, 3)
    r, _, _ = run_all(mem, None, s2, [PAGE])
    assert r.fault[0] == OK and pt.get_desc(PAGE, 3) == clean | AF
    r, _, _ = run_all(mem, None, s2, [PAGE], write=True)
    assert r.fault[0] == OK and pt.get_desc(PAGE, 3) == clean | AF | S2W  # S2AP[1] set
    r, before, after = run_all(mem, None, s2_config(pt, S2HA=1), [PAGE + 0x1000], write=True)
    assert r.fault[0] == 0x10 and before == after  # unmapped: F_TRANSLATION, nothing written


def test_nested_s1_update_is_a_write_through_stage2():
    """The S1 descriptor's update writes its IPA: a read-only stage 2 there faults (class
    TT); a writable-clean one with S2HD is marked dirty too."""
    mem, al = memory()
    s2pt = s2_table(mem, al, 12)
    s1pt = nested_s1_builder(mem, al, 12, 39)
    s1pt.map(PAGE, BASE + IPA_OFF + 0x20_0000, af=False)
    leaf_ipa = s1pt.desc_addr(PAGE, 3)
    leaf_page = leaf_ipa & ~0xFFF
    for ipa in range(BASE + IPA_OFF, BASE + IPA_OFF + 0x10_0000, PAGE):  # tables: read-only
        s2pt.map(ipa, ipa - IPA_OFF, write=False, dbm=ipa == leaf_page)
    s2pt.map(BASE + IPA_OFF + 0x20_0000, BASE + 0x20_0000)
    s1 = s1_config(s1pt, HA=1)
    r, before, after = run_all(mem, s1, s2_config(s2pt), [PAGE])
    assert r.fault[0] == FP and r.stage2[0] and r.fault_class[0] == fl.FaultClass.TTD
    assert r.ipa[0] == leaf_ipa and before == after
    s2 = s2_config(s2pt, S2HA=1, S2HD=1)
    r, _, _ = run_all(mem, s1, s2, [PAGE])
    assert r.fault[0] == OK and int(r.pa[0]) == BASE + 0x20_0000
    assert mem.read_u64(leaf_ipa - IPA_OFF) & AF  # the S1 leaf got its AF
    assert s2pt.get_desc(leaf_page, 3) & S2W  # ... through a now dirty S2 page


def test_update_to_read_only_table_memory_is_an_external_abort():
    mem = GuestMemory()
    b.make_memory(BASE, 0x10_0000, mem)
    builder = GuestMemory()  # a writable view of the same pages to build the tables in
    fd = os.memfd_create("ro-tables")
    os.ftruncate(fd, 0x10_0000)
    mem.add(BASE + 0x10_0000, 0x10_0000, PROT_READ, fd=fd)  # tables the SMMU may only read
    builder.add(BASE + 0x10_0000, 0x10_0000, PROT_READ | PROT_WRITE, fd=fd)
    os.close(fd)
    pt = b.PageTable(builder, b.Allocator(BASE + 0x10_0000, 0x10_0000), ia_bits=39)
    pt.map(PAGE, BASE, af=False)
    s1 = s1_config(pt, HA=1)
    for t in (walk_one(mem, s1, None, PAGE, write=False),
              walk(mem, s1, None, np.array([PAGE], np.uint64), write=False).item(0),
              oracle.translate(mem, s1, None, PAGE, write=False)):
        assert t.fault == EventId.F_WALK_EABT and t.level == 3


class Racing:
    """Guest memory where another agent changes a descriptor just before each of the
    first ``n`` hardware updates: writes ``value``, or (None) flips a software bit (55)."""

    def __init__(self, mem, addr: int, value: int | None, n: int) -> None:
        self.mem, self.addr, self.value, self.n = mem, addr, value, n

    def __getattr__(self, name):
        return getattr(self.mem, name)

    def update_u64(self, addr: int, expected: int, new: int) -> bool:
        if self.n:
            self.n -= 1
            v = self.value
            self.mem.write_u64(self.addr, self.mem.read_u64(self.addr) ^ (1 << 55)
                               if v is None else v)
        return self.mem.update_u64(addr, expected, new)


def test_a_descriptor_changed_under_the_update_is_walked_again():
    mem, pt = _s1(af=False)
    s1 = s1_config(pt, HA=1)
    leaf = pt.desc_addr(PAGE, 3)
    unmapped = Racing(mem, leaf, 0, 1)  # unmapped meanwhile: the re-walk faults
    assert walk_one(unmapped, s1, None, PAGE, write=False).fault == EventId.F_TRANSLATION
    assert mem.read_u64(leaf) == 0  # the update did not overwrite the unmap
    pt.map(PAGE, BASE + 0x10_0000, af=False)
    d = pt.get_desc(PAGE, 3)
    racing = Racing(mem, leaf, None, 100)  # keeps losing: after the tries, an abort
    assert walk_one(racing, s1, None, PAGE, write=False).fault == EventId.F_WALK_EABT
    assert oracle.translate(racing, s1, None, PAGE, write=False).fault == EventId.F_WALK_EABT
    assert not mem.read_u64(leaf) & AF
    mem.write_u64(leaf, d)
    r = walk(Racing(mem, leaf, None, 1), s1, None, np.array([PAGE], np.uint64), write=False)
    assert r.fault[0] == OK and mem.read_u64(leaf) == d ^ (1 << 55) | AF  # 2nd try stores


# -- batched == scalar == oracle, memory included, on random tables --------------------------
_settings = settings(max_examples=20, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


def _random_leaves(pt, rng, n: int) -> np.ndarray:
    """Pages and blocks with random AF / DBM / write permission; some unmapped addresses."""
    g = 1 << pt.gs
    vas = []
    for _ in range(n):
        va = int(rng.integers(0, (1 << pt.ia_bits) // g)) * g
        lvl = 2 if rng.integers(0, 4) == 0 and (pt.gs == 12 or pt.start_level <= 2) else 3
        size = 1 << pt.shift(lvl)
        attrs = {"af": bool(rng.integers(0, 2)), "dbm": bool(rng.integers(0, 2))}
        if pt.stage2:
            attrs["write"] = bool(rng.integers(0, 2))
        else:
            attrs["read_only"] = bool(rng.integers(0, 2))
        pa = BASE + int(rng.integers(0, SIZE // g)) * g
        pt.map(va & ~(size - 1), pa & ~(size - 1), size, **attrs)
        vas.append(va + int(rng.integers(0, g)))
    extra = rng.integers(0, 1 << pt.ia_bits, size=n // 2, dtype=np.uint64)
    return np.concatenate([np.array(vas * 2, np.uint64), extra])  # each leaf twice


@_settings
@given(seed=st.integers(0, 2**32 - 1), key=st.sampled_from(sorted(S1_IA)),
       write=st.booleans(), ha=st.booleans(), hd=st.booleans())
def test_s1_random_updates_agree(seed, key, write, ha, hd):
    rng = np.random.default_rng(seed)
    mem, al = memory()
    pt = b.PageTable(mem, al, granule_shift=key[0], ia_bits=S1_IA[key])
    vas = _random_leaves(pt, rng, 16)
    run_all(mem, s1_config(pt, HA=int(ha or hd), HD=int(hd)), None, vas, write=write)


@_settings
@given(seed=st.integers(0, 2**32 - 1), key=st.sampled_from(sorted(S2_IA)),
       write=st.booleans(), ha=st.booleans(), hd=st.booleans())
def test_s2_random_updates_agree(seed, key, write, ha, hd):
    rng = np.random.default_rng(seed)
    mem, al = memory()
    gs, sl = key
    pt = b.PageTable(mem, al, granule_shift=gs, ia_bits=S2_IA[key], start_level=sl,
                     stage2=True)
    vas = _random_leaves(pt, rng, 16)
    run_all(mem, None, s2_config(pt, S2HA=int(ha), S2HD=int(hd)), vas, write=write)


@_settings
@given(seed=st.integers(0, 2**32 - 1), gs=st.sampled_from([12, 14, 16]), write=st.booleans(),
       s1hd=st.booleans(), s2hd=st.booleans())
def test_nested_random_updates_agree(seed, gs, write, s1hd, s2hd):
    rng = np.random.default_rng(seed)
    mem, al = memory()
    s2pt = s2_table(mem, al, gs)
    s1pt = nested_s1_builder(mem, al, gs, {12: 39, 14: 47, 16: 42}[gs])
    vas = _random_leaves(s1pt, rng, 12)
    g = 1 << gs
    for ipa in range(BASE + IPA_OFF, al.next + IPA_OFF + g, g):  # the S1 tables' pages
        k = int(rng.integers(0, 8))  # some clean, some read-only: S1 updates through them
        s2pt.map(ipa, ipa - IPA_OFF, g, af=k != 0, write=k not in (1, 3), dbm=k in (1, 2))
    flags = rng.integers(0, 16, size=SIZE // g)
    for i in range(0, SIZE // g):  # where S1 outputs land: random AF / write / DBM, holes
        if flags[i] != 15:
            s2pt.map(BASE + i * g, BASE + i * g, g, af=bool(flags[i] & 1),
                     write=bool(flags[i] & 2), dbm=bool(flags[i] & 4))
    run_all(mem, s1_config(s1pt, HA=1, HD=int(s1hd)),
            s2_config(s2pt, S2HA=int(rng.integers(0, 2)), S2HD=int(s2hd)), vas, write=write)


def test_52_bit_oas_with_4k_granule_keeps_dbm_out_of_the_address():
    """An SVA pairing with `-cpu max` (52-bit PA): SMMU OAS 52, CD.IPS 52 as the driver
    writes for SVA, the kernel's 4K tables (OA[47:12]; bit 51 is DBM, not an address bit)."""
    assert regs.layout("IDR5").get(SmmuConfig(oas_bits=52).idr5(), "OAS") == 6
    mem, pt = _s1(read_only=True, dbm=True)
    s1 = decode_cd(b.make_cd(pt.root, tsz=64 - 39, ips_bits=52, HA=1, HD=1), oas=52)
    assert s1.ips_bits == 52
    r, _, _ = run_all(mem, s1, None, [PAGE + 0x10], write=True)
    assert r.fault[0] == OK and int(r.pa[0]) == BASE + 0x10_0010
    assert not pt.get_desc(PAGE, 3) & AP2
