"""The TLB against a plain reference model: random inserts, lookups and every
invalidation, with a small capacity so LRU eviction takes part.  The model keeps one
ordered dict of entries and applies each invalidation's rule entry by entry, as the
architecture states it; the TLB must hold exactly the same entries after every step."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from viommu_backend.smmuv3.tlb import EL2_VMID, NO_ASID, TLB

TAGS = ("a", "b")
VMIDS = (0, 1, EL2_VMID)
ASIDS = (3, 4, NO_ASID)
SIZES = (1 << 12, 1 << 21)


class Model:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.e: OrderedDict[tuple, dict] = OrderedDict()

    def insert(self, tag, vmid, asid, va, size, glob, stage, ipa) -> None:
        key = (tag, vmid, asid, size, va // size)
        if key in self.e:
            self.e.move_to_end(key)
        elif len(self.e) >= self.capacity:
            self.e.popitem(last=False)
        self.e[key] = {"va": va - va % size, "size": size, "glob": glob, "stage": stage,
                       "ipa": ipa - ipa % size if ipa >= 0 else -1}

    def lookup(self, tag, vmid, asid, va) -> bool:
        for size in sorted(SIZES):
            key = (tag, vmid, asid, size, va // size)
            if key in self.e:
                self.e.move_to_end(key)
                return True
        return False

    def drop(self, pred) -> None:
        for k in [k for k, v in self.e.items() if pred(k, v)]:
            del self.e[k]


ctx = st.tuples(st.sampled_from(TAGS), st.sampled_from(VMIDS), st.sampled_from(ASIDS))
page = st.integers(0, 15)
op = st.one_of(
    st.tuples(st.just("insert"), ctx, page, st.sampled_from(SIZES), st.booleans(),
              st.sampled_from(("s1", "s2", "nested")), page),
    st.tuples(st.just("lookup"), ctx, page),
    st.tuples(st.just("asid"), st.sampled_from(ASIDS), st.sampled_from(VMIDS)),
    st.tuples(st.just("nh_all"), st.sampled_from(VMIDS)),
    st.tuples(st.just("vmid"), st.sampled_from(VMIDS)),
    st.tuples(st.just("el2_all")),
    st.tuples(st.just("nsnh_all")),
    st.tuples(st.just("all")),
    st.tuples(st.just("tag"), st.sampled_from(TAGS)),
    st.tuples(st.just("va"), page, st.integers(1, 3), st.sampled_from(VMIDS),
              st.sampled_from((*ASIDS, None))),
    st.tuples(st.just("ipa"), page, st.integers(1, 3), st.sampled_from(VMIDS)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60), st.integers(2, 12))
def test_tlb_matches_reference_model(ops, capacity):
    t, m = TLB(capacity=capacity), Model(capacity)
    for o in ops:
        kind = o[0]
        if kind == "insert":
            (tag, vmid, asid), pg, size, glob, stage, ipg = o[1:]
            va, ipa = pg << 20, (ipg << 20) if stage != "s1" else -1
            t.insert(tag, vmid, asid, va, 0x4000_0000, size, 3, 3, glob, stage, ipa)
            m.insert(tag, vmid, asid, va, size, glob, stage, ipa)
        elif kind == "lookup":
            (tag, vmid, asid), pg = o[1:]
            assert (t.lookup(tag, vmid, asid, pg << 20) is not None) == \
                m.lookup(tag, vmid, asid, pg << 20)
        elif kind == "asid":
            asid, vmid = o[1:]
            t.inv_asid(asid, vmid)
            m.drop(lambda k, v: k[1] == vmid and k[2] == asid and v["stage"] != "s2"
                   and not v["glob"])
        elif kind == "nh_all":
            t.inv_nh_all(o[1])
            m.drop(lambda k, v: k[1] == o[1] and v["stage"] != "s2")
        elif kind == "vmid":
            t.inv_vmid(o[1])
            m.drop(lambda k, v: k[1] == o[1])
        elif kind == "el2_all":
            t.inv_el2_all()
            m.drop(lambda k, v: k[1] == EL2_VMID)
        elif kind == "nsnh_all":
            t.inv_nsnh_all()
            m.drop(lambda k, v: k[1] != EL2_VMID)
        elif kind == "all":
            t.inv_all()
            m.drop(lambda k, v: True)
        elif kind == "tag":
            t.inv_tag(o[1])
            m.drop(lambda k, v: k[0] == o[1])
        elif kind == "va":
            pg, n, vmid, asid = o[1:]
            start, end = pg << 20, (pg + n) << 20
            t.inv_va(start, end - start, vmid=vmid, asid=asid)
            m.drop(lambda k, v: k[1] == vmid and v["stage"] != "s2"
                   and (asid is None or k[2] == asid or v["glob"])
                   and v["va"] < end and start < v["va"] + v["size"])
        elif kind == "ipa":
            pg, n, vmid = o[1:]
            start, end = pg << 20, (pg + n) << 20
            t.inv_ipa(start, end - start, vmid=vmid)
            m.drop(lambda k, v: k[1] == vmid and v["stage"] != "s1" and v["ipa"] >= 0
                   and v["ipa"] < end and start < v["ipa"] + v["size"])
        assert len(t) == len(m.e), o
    # the same entries, in the same LRU order
    keys = [(c[0], c[1], c[2], 1 << sh, vpn) for (c, sh, vpn) in t._map]
    assert keys == list(m.e)
