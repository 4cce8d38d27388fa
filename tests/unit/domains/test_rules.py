"""The rules the host's side keeps (iommufd / the iommu core): cache coherency decided at
allocation, DMA ownership of groups, fault-capable HWPTs, nesting."""

from __future__ import annotations

import pytest

from viommu_backend.domains import DmaFault, DomainError, FaultResponse, HwptNested
from viommu_backend.domains.objects import AUTO
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl

from tests.support.host_env import ABORT_STE, BYPASS, DATA, HostEnv, page


def errno_of(fn, *args, **kw) -> str:
    with pytest.raises(DomainError) as ei:
        fn(*args, **kw)
    return ei.value.errno


# -- cache coherency ------------------------------------------------------------------------------
@pytest.mark.parametrize("host_s2", [False, True])
def test_coherency_decided_at_allocation_from_the_first_device(host_s2):
    env = HostEnv(host_s2=host_s2)
    m = env.mgr
    for sid in (1, 2, 3):
        env.set_ste(sid, BYPASS)
    a = m.add_device(1)
    assert a.hwpt.enforce_cache_coherency is True
    loose = m.add_device(2, can_enforce_coherency=False)
    assert loose.hwpt is not a.hwpt and loose.hwpt.enforce_cache_coherency is False
    assert a.hwpt.enforce_cache_coherency is True  # never downgraded, never upgraded
    c = m.add_device(3)
    assert c.hwpt is a.hwpt  # a later compatible device reuses it
    assert errno_of(m.replace, 2, a.hwpt.id) == "EINVAL"  # incompatible: refused
    # the non-enforcing domain takes anyone (as iommufd allows)
    m.replace(3, loose.hwpt.id)
    assert c.hwpt is loose.hwpt
    q = m.coherency()
    assert q["noncoherent-dma"] is True and q["smmu-can-enforce"] is True
    assert {d["sid"]: d["enforced"] for d in q["devices"]} == {1: True, 2: False, 3: False}


def test_explicit_allocation_takes_coherency_from_its_device_or_the_first_attached():
    env = HostEnv()
    m = env.mgr
    env.set_ste(1, BYPASS)
    env.set_ste(2, BYPASS)
    m.add_device(1, can_enforce_coherency=False)
    m.add_device(2)
    assert m.hwpt_alloc(sid=1).enforce_cache_coherency is False
    assert m.hwpt_alloc(sid=2).enforce_cache_coherency is True
    later = m.hwpt_alloc(flags=["nest-parent"])
    assert later.enforce_cache_coherency is None  # decided by the first device attached
    m.attach(1, later.id)
    assert later.enforce_cache_coherency is False
    m.smmu_enforces_cc = False  # an SMMU without COHACC / S2FWB enforces nothing
    assert m.hwpt_alloc(sid=2).enforce_cache_coherency is False


def test_no_snoop_dma_in_an_enforcing_domain_is_performed_snooped():
    env = HostEnv()
    m = env.mgr
    env.set_ste(1, BYPASS)
    env.set_ste(2, BYPASS)
    m.add_device(1)
    m.add_device(2, can_enforce_coherency=False)
    assert m.no_snoop(1) is False and m.no_snoop(2) is True and m.no_snoop(2) is True
    q = m.coherency()
    assert (q["snoop-forced"], q["no-snoop"]) == (1, 2)
    m.detach(2)  # blocked: no DMA, nothing non-coherent left
    assert m.coherency()["noncoherent-dma"] is False


# -- DMA ownership of groups -----------------------------------------------------------------------
def test_dma_ownership_of_groups():
    env = HostEnv()
    m = env.mgr
    ste = env.s1({0x1000: page(1)})
    for sid in (0x10, 0x11, 0x20):
        env.set_ste(sid, ste)
    d0, d1 = m.add_device(0x10, group="g"), m.add_device(0x11, group="g")
    other = m.add_device(0x20)
    default = d0.hwpt
    assert d1.hwpt is default  # one group, one domain
    m.claim(0x10, "dma-api")
    m.claim(0x11, "dma-api")  # the DMA API counts its users
    assert errno_of(m.claim, 0x10, "user") == "EBUSY"
    assert errno_of(m.detach, 0x11) == "EBUSY"  # the DMA API needs its default domain
    m.release(0x10, "dma-api")
    assert errno_of(m.claim, 0x11, "user") == "EBUSY"
    m.release(0x11, "dma-api")
    assert errno_of(m.release, 0x11, "dma-api") == "EINVAL"  # not held any more
    # a user claim takes the whole group off its default domain: blocked
    m.claim(0x11, "user")
    assert d0.hwpt is None and d1.hwpt is None and d0.binding is None
    with pytest.raises(DmaFault):
        m.dma_read(0x10, None, 0x1000, 4)
    assert errno_of(m.claim, 0x10, "dma-api") == "EBUSY"
    h = m.hwpt_alloc(flags=["nest-parent"], sid=0x10)
    m.attach(0x10, h.id)
    assert d0.binding is h and d1.binding is h  # all devices of a group share it
    m.claim(0x10, "user")
    m.release(0x10, "user")
    assert d0.binding is h  # still one user reference
    m.release(0x11, "user")
    assert d0.binding == AUTO and d1.binding == AUTO  # back to the default domain
    assert isinstance(d0.hwpt, HwptNested) and d0.hwpt is d1.hwpt
    # a user claim is refused while the group sits in a domain that is not its default
    m.attach(0x20, h.id)
    assert errno_of(m.claim, 0x20, "user") == "EBUSY"
    assert errno_of(m.claim, 0x20, "root") == "EINVAL"
    assert other.binding is h and m.groups.of(other.group_key).count == 0
    assert errno_of(m.attach, 0x99, h.id) == "ENOENT"  # not a bound stream


# -- fault-capable HWPTs --------------------------------------------------------------------------
def _faulting(env: HostEnv, sid: int) -> None:
    env.set_ste(sid, env.s1({0x5000: page(5)}))
    env.mgr.add_device(sid)


def test_fault_capable_hwpts_attach_replace_detach():
    env = HostEnv()
    m = env.mgr
    _faulting(env, 1)
    fq = m.alloc_fault_queue()
    fcap = m.hwpt_alloc(flags=["nest-parent"], fault_queue=fq.id, sid=1)
    plain = m.hwpt_alloc(flags=["nest-parent"], sid=1)
    m.ioas_unmap(page(5), 4096)
    m.attach(1, fcap.id)
    p1 = m.endpoint_page_request(1, None, 0x5000, write=False, prg_index=1)
    assert not p1.done and len(fq) == 1
    m.replace(1, fcap.id)  # to itself: nothing happens
    assert not p1.done
    assert errno_of(m.destroy, fq.id) == "EBUSY" and errno_of(m.destroy, fcap.id) == "EBUSY"
    m.replace(1, plain.id)  # away: what it left pending is answered INVALID
    assert p1.response is FaultResponse.INVALID and len(fq) == 0
    assert errno_of(m.fault_respond, fq.id, p1.cookie, "success") == "EINVAL"
    p2 = m.endpoint_page_request(1, None, 0x5000, write=False, prg_index=2)
    assert p2.response is FaultResponse.INVALID  # no host queue on this route
    m.replace(1, fcap.id)  # back to the fault-capable one
    p3 = m.endpoint_page_request(1, None, 0x5000, write=False, prg_index=3)
    heard = []
    m.faults.listeners.append(lambda q, pf: heard.append(pf))
    m.detach(1)
    assert p3.response is FaultResponse.INVALID and len(fq) == 0
    # nothing is delivered after the detach returned
    with pytest.raises(DmaFault):
        m.dma_read(1, None, 0x5000, 4)
    p4 = m.endpoint_page_request(1, None, 0x5000, write=False, prg_index=4)
    assert p4.response is not FaultResponse.SUCCESS and heard == [] and len(fq) == 0
    assert errno_of(m.fault_respond, fq.id, 999, "success") == "EINVAL"
    assert errno_of(m.fault_respond, fq.id, p3.cookie, "maybe") == "EINVAL"
    m.destroy(fcap.id)
    m.destroy(fq.id)
    assert errno_of(m.destroy, fq.id) == "ENOENT"


def test_destroying_a_fault_queue_with_records_answers_them_invalid():
    env = HostEnv()
    m = env.mgr
    fq = m.alloc_fault_queue()
    from viommu_backend.domains import PendingFault

    pf = fq.add(PendingFault("pri", 1, None, 7, 0x1000))
    m.destroy(fq.id)
    assert pf.response is FaultResponse.INVALID


# -- nesting -----------------------------------------------------------------------------------------
def test_nested_never_combines_a_stage1_with_another_stage2():
    env = HostEnv(host_s2=False, httu=0)  # the guest owns both stages; no HTTU
    m = env.mgr
    s2pt = b.PageTable(env.mem, env.al, ia_bits=40, start_level=1, stage2=True)
    s2pt.map(DATA, DATA, 2 << 20)
    s1 = env.s1({0x1000: page(1)})
    nested = b.make_ste(fl.STE_CONFIG_NESTED, s1_ctx_ptr=fl.STE.decode(
        sum(w << (64 * i) for i, w in enumerate(s1)))["S1ContextPtr"],
        s2_ttb=s2pt.root, s2_t0sz=24, s2_sl0=b.s2_sl0_for(12, 1), s2_vmid=3)
    env.set_ste(1, nested)
    env.set_ste(2, s1)
    m.add_device(1)
    m.add_device(2)
    parent = m.hwpt_alloc(flags=["nest-parent"], sid=1)  # identity NEST_PARENT
    assert errno_of(m.hwpt_alloc, parent=parent.id, sid=1) == "EINVAL"  # S1 on guest S2
    ok = m.hwpt_alloc(parent=parent.id, sid=2)  # S1-only: nests on an identity parent
    assert isinstance(ok, HwptNested) and ok.parent is parent and ok.owner == "host"
    assert errno_of(m.hwpt_alloc, parent=ok.id, sid=2) == "EINVAL"  # not a paging domain
    plain = m.hwpt_alloc(sid=2)
    assert errno_of(m.hwpt_alloc, parent=plain.id, sid=2) == "EINVAL"  # not a NEST_PARENT
    assert errno_of(m.hwpt_alloc, parent=parent.id) == "EINVAL"  # whose stage 1?
    env.set_ste(3, ABORT_STE)
    m.add_device(3)
    assert errno_of(m.hwpt_alloc, parent=parent.id, sid=3) == "EINVAL"  # no stage 1
    assert errno_of(m.hwpt_alloc, flags=["sparkly"]) == "EINVAL"
    assert errno_of(m.hwpt_alloc, flags=["dirty-tracking"]) == "EOPNOTSUPP"  # no HTTU HD


def test_iova_to_phys_answers_for_paging_domains_only():
    env = HostEnv()
    m = env.mgr
    env.set_ste(1, env.s1({0x1000: page(1)}))
    d = m.add_device(1)
    parent = d.hwpt.parent
    pa = m.iova_to_phys(parent.id, page(1))
    assert pa == m.ioas.translate(page(1)) and pa != page(1)
    assert errno_of(m.iova_to_phys, d.hwpt.id, 0x1000) == "EOPNOTSUPP"
    assert m.iova_to_phys(m.blocking.id, 0x1000) is None
    m.ioas_unmap(page(1), 4096)
    assert m.iova_to_phys(parent.id, page(1)) is None
    assert errno_of(m.iova_to_phys, 12345, 0) == "ENOENT"
    assert errno_of(m.iova_to_phys, m.ioas.id, 0) == "EINVAL"  # not a HWPT


def test_object_list_shows_types_parents_refcounts_devices_flags_queues():
    env = HostEnv()
    m = env.mgr
    env.set_ste(1, env.s1({0x1000: page(1)}))
    d = m.add_device(1)
    fq = m.alloc_fault_queue()
    p = m.hwpt_alloc(flags=["nest-parent"], fault_queue=fq.id, sid=1)
    objs = {o["id"]: o for o in m.describe()["objects"]}
    assert objs[m.ioas.id]["type"] == "ioas"
    assert objs[fq.id] == {**objs[fq.id], "type": "fault", "refcount": 1, "pending": 0}
    assert objs[p.id]["flags"] == ["nest-parent", "enforce-cc"]
    assert objs[p.id]["fault-queue"] == fq.id and objs[p.id]["owner"] == "host"
    nested = objs[d.hwpt.id]
    assert nested["type"] == "hwpt_nested" and nested["parent"] == d.hwpt.parent.id
    assert nested["devices"] == [1] and "auto" in nested["flags"]
    assert objs[d.hwpt.parent.id]["refcount"] == 1  # held by its nested child
