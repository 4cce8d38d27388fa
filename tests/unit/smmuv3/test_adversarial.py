"""Adversarial (property-based) tests of the SMMUv3 model: whatever the guest writes into
the command queue, the registers, the stream table, CDs or page tables, the model answers
with the architected response (CERROR / GERROR / an event / a named fault) and never
raises, never touches memory outside the GuestMemory regions, never grows a queue."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.smmuv3_harness import EVTQ_ADDR, RAM_BASE, RAM_SIZE, Harness, off
from viommu_backend.domains import DmaFault, DomainManager
from viommu_backend.memory import GuestMemoryError
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.commands import COMMANDS, LAYOUTS, OPCODES, encode_command
from viommu_backend.smmuv3.fields import EventId

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])

STRTAB = RAM_BASE + 0x8_0000  # linear, 2^6 STEs (4 KiB)
ST_LOG2 = 6
TABLES = RAM_BASE + 0x9_0000
TABLES_SIZE = RAM_SIZE - 0x9_0000
U64 = st.integers(0, 2**64 - 1)
FAULT_NAMES = {e.name for e in EventId} | {"ABORT", "BUS_ERROR"}
CERROR_ILL = regs.CERROR_ILL


def _cons_err(h: Harness) -> int:
    return h.r32("CMDQ_CONS") >> 24 & 0x7F


def _gerror_cmdq(h: Harness) -> bool:
    return bool(h.smmu.gerror_active("CMDQ_ERR"))


class Env:
    """Harness + a real DomainManager as the command sink, SMMUEN=1, linear stream table."""

    def __init__(self, *, evtq_log2: int = 3) -> None:
        self.h = Harness(evtq_log2=evtq_log2)
        self.smmu, self.mem = self.h.smmu, self.h.mem
        self.mgr = DomainManager(lambda: self.mem)
        self.mgr.attach_smmu(self.smmu)
        self.h.setup_queues()
        self.h.w64("STRTAB_BASE", STRTAB)
        self.h.w32("STRTAB_BASE_CFG", regs.layout("STRTAB_BASE_CFG").encode(FMT=0,
                                                                             LOG2SIZE=ST_LOG2))
        self.h.w32("CR0", regs.layout("CR0").encode(SMMUEN=1, CMDQEN=1, EVTQEN=1, PRIQEN=1))
        self.al = b.Allocator(TABLES, TABLES_SIZE)


# -- command queue ---------------------------------------------------------------------------
LEGAL_NAMES = sorted(n for n in OPCODES if not n.startswith(("TLBI_EL3", "TLBI_EL2")))
# field values the default SmmuConfig accepts: SSEC=0, CS/RESP != 3
_RESTRICT = {"SSEC": 0}


@st.composite
def legal_command(draw) -> bytes:
    name = draw(st.sampled_from(LEGAL_NAMES))
    lay = LAYOUTS[name]
    fv = {}
    for f in lay.fields:
        if f.name == "OPCODE":
            continue
        if f.name in _RESTRICT:
            fv[f.name] = _RESTRICT[f.name]
        elif f.name in ("CS", "RESP"):
            fv[f.name] = draw(st.integers(0, 2))
        elif f.name == "MSIADDR":  # an MSI target inside guest RAM, or none
            fv[f.name] = draw(st.sampled_from([0, RAM_BASE + 0x3_0000]))
        else:
            v = draw(st.integers(0, (1 << f.width) - 1))
            fv[f.name] = v << (f.lo % 64) if f.address else v
    return encode_command(name, **fv)


ILLEGAL_OPS = sorted(set(range(256)) - set(COMMANDS))


@st.composite
def illegal_command(draw) -> bytes:
    kind = draw(st.integers(0, 3))
    rest = draw(st.binary(min_size=16, max_size=16))
    raw = bytearray(rest)
    if kind == 0:  # undefined opcode
        raw[0] = draw(st.sampled_from(ILLEGAL_OPS))
    elif kind == 1:  # EL3 / EL2 TLBI on the NS queue without HYP
        raw[0] = draw(st.sampled_from([OPCODES[n] for n in OPCODES
                                       if n.startswith(("TLBI_EL3", "TLBI_EL2"))]))
    elif kind == 2:  # CMD_SYNC with reserved CS=3
        raw[0] = OPCODES["CMD_SYNC"]
        raw[1] |= 0x30
    else:  # SSec=1 on a command with that field
        raw[0] = draw(st.sampled_from([OPCODES[n] for n in ("CFGI_STE", "CFGI_CD",
                                                            "PREFETCH_CONFIG", "STALL_TERM")]))
        raw[1] |= 0x04
    return bytes(raw)


def _any_command():
    return st.one_of(legal_command(), illegal_command(), st.binary(min_size=16, max_size=16))


@SETTINGS
@given(cmds=st.lists(_any_command(), min_size=1, max_size=10), extra=legal_command())
def test_random_commands_never_raise_and_stop_on_illegal(cmds, extra):
    env = Env()
    h = env.h
    # published in batches of <= 8 (queue holds 16), all from one register write each
    for i in range(0, len(cmds), 8):
        h.submit(*cmds[i:i + 8])
        if _gerror_cmdq(h):
            break
    cons = env.smmu.cmdq.cons
    err = _cons_err(h)
    if _gerror_cmdq(h):
        assert err in (CERROR_ILL, regs.CERROR_ATC_INV_SYNC)
        stopped_at = env.smmu.cmdq.cons
        # a further PROD write does not move CONS while CMDQ_ERR is active
        h.submit(extra)
        assert env.smmu.cmdq.cons == stopped_at
        # the driver replaces the faulting command with a CMD_SYNC and acknowledges
        env.mem.write(h.cmd_addr(stopped_at), encode_command("CMD_SYNC"))
        h.w32("GERRORN", h.r32("GERROR"))
        assert env.smmu.cmdq.cons != stopped_at or env.smmu.cmdq.empty() \
            or _gerror_cmdq(h)
    else:
        assert err == 0
        assert env.smmu.cmdq.empty() and cons == h.prod


@SETTINGS
@given(pre=st.lists(legal_command(), max_size=5), bad=illegal_command(),
       post=st.lists(legal_command(), max_size=5))
def test_illegal_command_is_cerror_ill_and_stops_queue(pre, bad, post):
    env = Env()
    h = env.h
    # legal commands before it must not fail (no ATC failure: the manager accepts all)
    h.submit(*pre, bad, *post)
    q = env.smmu.cmdq
    assert _gerror_cmdq(h)
    assert _cons_err(h) == CERROR_ILL
    assert q.cons == len(pre)  # everything before ran, CONS stops at the bad one
    n_before = sum(env.smmu.counters.commands.values())
    h.w32("CMDQ_PROD", h.prod)  # a re-kick does nothing while the error is active
    assert q.cons == len(pre) and sum(env.smmu.counters.commands.values()) == n_before
    # acknowledge after fixing the entry: the rest runs
    env.mem.write(h.cmd_addr(len(pre)), encode_command("CMD_SYNC"))
    h.w32("GERRORN", h.r32("GERROR"))
    assert not _gerror_cmdq(h)
    assert q.empty() and q.cons == h.prod


# -- register file ---------------------------------------------------------------------------
_NAMED = [r.offset for r in regs.SMMU_REGS.registers]
OFFSETS = st.one_of(st.sampled_from(_NAMED), st.sampled_from([o + 4 for o in _NAMED]),
                    st.integers(0, regs.BAR_SIZE - 8))
ACCESS = st.tuples(OFFSETS, st.sampled_from([1, 2, 4, 8]), U64)


@SETTINGS
@given(writes=st.lists(ACCESS, min_size=1, max_size=30), sid=st.integers(0, 2**32 - 1),
       iova=U64)
def test_random_register_writes(writes, sid, iova):
    env = Env()
    smmu = env.smmu
    ids = {n: smmu.read(off(n), 4) for n in ("IDR0", "IDR1", "IDR5", "IIDR", "AIDR")}
    for offset, size, value in writes:
        smmu.write(offset, size, value & ((1 << 8 * size) - 1))
        v = smmu.read(offset, size)
        assert 0 <= v < 1 << 8 * size
    # consistency of what reads back
    for n, v in ids.items():
        assert smmu.read(off(n), 4) == v  # ID registers are read-only
    assert smmu.read(off("CR0ACK"), 4) == smmu.read(off("CR0"), 4)
    assert smmu.read(off("IRQ_CTRLACK"), 4) == smmu.read(off("IRQ_CTRL"), 4)
    assert smmu.read(off("GERROR"), 4) & ~regs.GERROR_IMPLEMENTED == 0
    for name in ("STRTAB_BASE", "CMDQ_BASE", "EVTQ_BASE"):
        o = off(name)
        assert smmu.read(o, 8) == smmu.read(o, 4) | smmu.read(o + 4, 4) << 32
    for q in (smmu.cmdq, smmu.evtq, smmu.priq):
        assert q.log2size <= q.max_log2size
    # whatever STRTAB_BASE / _CFG / GBPA / CR0 now say, a transaction gets an answer
    smmu.write(off("CR0"), 4, smmu.read(off("CR0"), 4) | 1)  # SMMUEN: walk the stream table
    r = env.mgr.translate(sid, None, np.array([iova], dtype=np.uint64), False)
    assert r.fault_name(0) in FAULT_NAMES | {None}
    smmu.write(off("STRTAB_BASE_CFG"), 4, smmu.read(off("STRTAB_BASE_CFG"), 4) ^ 0x10000)
    smmu.write(off("CR0"), 4, 0)
    smmu.write(off("CR0"), 4, 1)
    r = env.mgr.translate(sid, None, np.array([iova], dtype=np.uint64), True)
    assert r.fault_name(0) in FAULT_NAMES | {None}
    # the queue still works after the storm: re-initialise and run a CMD_SYNC
    smmu.write(off("CR0"), 4, 0)
    smmu.write(off("GERRORN"), 4, smmu.read(off("GERROR"), 4))
    env.h.prod = 0
    env.h.setup_queues()
    env.h.submit(encode_command("CMD_SYNC"))
    assert smmu.cmdq.cons == 1 and not _gerror_cmdq(env.h)


OUTSIDE = st.one_of(st.integers(0, RAM_BASE - 1),
                    st.integers(RAM_BASE + RAM_SIZE, (1 << 52) - 1))


@SETTINGS
@given(addr=OUTSIDE, log2=st.integers(0, 31))
def test_cmdq_base_outside_memory_is_cerror_abt(addr, log2):
    env = Env()
    h = env.h
    h.w32("CR0", 0)
    h.w64("CMDQ_BASE", (addr & ~0x1F & ((1 << 52) - 1)) | log2)
    h.w32("CMDQ_PROD", 0)
    h.w32("CMDQ_CONS", 0)
    h.w32("CR0", regs.layout("CR0").encode(CMDQEN=1, EVTQEN=1))
    q = env.smmu.cmdq
    if RAM_BASE <= q.base < RAM_BASE + RAM_SIZE:
        return  # alignment pulled it back into RAM
    h.w32("CMDQ_PROD", 1)
    assert _gerror_cmdq(h)
    assert _cons_err(h) == regs.CERROR_ABT
    assert q.cons == 0


@SETTINGS
@given(addr=OUTSIDE, log2=st.integers(0, 31), sid=st.integers(0, 63))
def test_evtq_base_outside_memory_is_evtq_abt_err(addr, log2, sid):
    env = Env()
    h = env.h
    h.w32("CR0", regs.layout("CR0").encode(SMMUEN=1, CMDQEN=1))
    h.w64("EVTQ_BASE", (addr & ((1 << 52) - 1)) | log2)
    h.w32("CR0", regs.layout("CR0").encode(SMMUEN=1, CMDQEN=1, EVTQEN=1))
    q = env.smmu.evtq
    if RAM_BASE <= q.base < RAM_BASE + RAM_SIZE:
        return
    # STE V=0: C_BAD_STE on every access
    with pytest.raises(DmaFault) as ei:
        env.mgr.dma_read(sid, None, 0x1000, 4)
    assert ei.value.event == "C_BAD_STE"
    assert env.smmu.gerror_active("EVTQ_ABT_ERR")
    assert q.prod == 0


# -- random STE / CD / page tables --------------------------------------------------------------
def _mutate(words: list[int], flips: list[tuple[int, int]]) -> list[int]:
    out = list(words)
    for w, bit in flips:
        out[w % len(out)] ^= 1 << bit
    return out


FLIPS = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 63)), max_size=6)
IOVAS = st.lists(st.one_of(U64, st.integers(0, 1 << 22)), min_size=1, max_size=12)


@st.composite
def stream_setup(draw):
    """A valid S1 / S2 / nested / bypass configuration, then random damage."""
    config = draw(st.sampled_from([fl.STE_CONFIG_S1, fl.STE_CONFIG_S2, fl.STE_CONFIG_NESTED,
                                   fl.STE_CONFIG_BYPASS, fl.STE_CONFIG_ABORT]))
    return dict(config=config, ste_flips=draw(FLIPS), cd_flips=draw(FLIPS),
                pte_damage=draw(st.lists(st.tuples(st.integers(0, 63), U64), max_size=6)),
                ste_random=draw(st.one_of(st.none(), st.lists(U64, min_size=8,
                                                              max_size=8))),
                cd_random=draw(st.one_of(st.none(), st.lists(U64, min_size=8, max_size=8))))


def _build(env: Env, s: dict, sid: int) -> list[int]:
    """Write the (damaged) structures; returns the page-table page addresses."""
    mem, al = env.mem, env.al
    pt = b.PageTable(mem, al)
    for i in range(8):
        pt.map(0x1000 * i, RAM_BASE + 0xA_0000 + 0x1000 * i)
    s2 = b.PageTable(mem, al, ia_bits=40, start_level=1, stage2=True)
    s2.map(RAM_BASE, RAM_BASE, 2 << 20)  # identity over the low 2 MiB of RAM
    s2.map(0, RAM_BASE + 0xA_0000, 2 << 20)
    cd_addr = al.alloc(64, 64)
    cd = s["cd_random"] or _mutate(b.make_cd(pt.root, asid=3), s["cd_flips"])
    b.write_words(mem, cd_addr, cd)
    ste = s["ste_random"] or _mutate(
        b.make_ste(s["config"], s1_ctx_ptr=cd_addr, s2_ttb=s2.root, s2_t0sz=24,
                   s2_sl0=b.s2_sl0_for(12, 1), s2_vmid=1), s["ste_flips"])
    b.write_words(mem, STRTAB + sid * 64, ste)
    # damage the page tables the walker will read (random descriptors in the tables)
    tables = sorted({pt.root, s2.root})
    for idx, val in s["pte_damage"]:
        mem.write_u64(tables[idx % len(tables)] + 8 * (idx % 512), val)
    env.h.submit(encode_command("CFGI_STE", SID=sid, LEAF=1), encode_command("CMD_SYNC"))
    return tables


class _Watch:
    """Records any GuestMemoryError raised by the memory object (even one caught inside)."""

    def __init__(self, env: Env) -> None:
        self.errors: list[GuestMemoryError] = []
        mem = env.mem
        for name in ("read", "write", "read_u64", "write_u64", "read_u32", "write_u32",
                     "view", "ndarray"):
            orig = getattr(mem, name)

            def wrapped(*a, _orig=orig, **kw):
                try:
                    return _orig(*a, **kw)
                except GuestMemoryError as e:
                    self.errors.append(e)
                    raise
            setattr(mem, name, wrapped)


def _check_result(env: Env, r, n: int) -> None:
    assert r.fault.shape == (n,)
    for i in range(n):
        name = r.fault_name(i)
        if name is not None:
            assert name in FAULT_NAMES
        else:
            pa = int(r.pa[i])
            assert 0 <= pa < 1 << 64


@SETTINGS
@given(s=stream_setup(), iovas=IOVAS, write=st.booleans(), ssid=st.sampled_from([None, 0, 1]),
       n=st.integers(1, 9000))
def test_random_tables_translate_or_named_fault(s, iovas, write, ssid, n):
    env = Env(evtq_log2=4)
    sid = 5
    _build(env, s, sid)
    watch = _Watch(env)
    mgr = env.mgr
    va = np.array(iovas, dtype=np.uint64)
    r = mgr.translate(sid, ssid, va, write)
    _check_result(env, r, len(va))
    # the scalar path agrees on fault / no fault for each address
    for i, a in enumerate(iovas[:4]):
        t = mgr.translate_one(sid, ssid, a, write)
        assert bool(t.fault) == bool(r.fault[i]) or mgr.injector is not None
        tr, _dom = mgr.probe(sid, ssid, a, write)
    # DMA: data or a DmaFault naming the event; never another exception
    try:
        if write:
            mgr.dma_write(sid, ssid, iovas[0], bytes(n % 64 + 1))
        else:
            data = mgr.dma_read(sid, ssid, iovas[0], n)
            assert len(data) == n
    except DmaFault as e:
        assert e.event in FAULT_NAMES
    assert not watch.errors or all(isinstance(e, GuestMemoryError) for e in watch.errors)
    # the walker must read through gather (bounds-checked) and never raise: any
    # GuestMemoryError was turned into a fault, not leaked
    ev = env.smmu.evtq
    assert 0 <= ev.count() <= ev.size


def test_undamaged_tables_translate():
    """The generator above starts from working structures (so damage is meaningful)."""
    for config in (fl.STE_CONFIG_S1, fl.STE_CONFIG_NESTED):
        env = Env()
        _build(env, dict(config=config, ste_flips=[], cd_flips=[], pte_damage=[],
                         ste_random=None, cd_random=None), 5)
        r = env.mgr.translate(5, None, np.array([0x1234, 0x9000], dtype=np.uint64), False)
        assert r.fault_name(0) is None and r.fault_name(1) == "F_TRANSLATION"
        assert int(r.pa[0]) == RAM_BASE + 0xA_1234


# -- event queue overflow ----------------------------------------------------------------------
@FEW
@given(nfaults=st.integers(1, 60), consume=st.integers(0, 8))
def test_event_flood_overflows_and_drops(nfaults, consume):
    env = Env(evtq_log2=3)  # 8 records
    ev = env.smmu.evtq
    for i in range(nfaults):
        with pytest.raises(DmaFault):
            env.mgr.dma_read(i % 64, None, 0x1000 * i, 4)  # V=0 STEs: C_BAD_STE
    written = min(nfaults, 8)
    assert ev.count() == written
    assert ev.dropped == nfaults - written
    ovflg = bool(env.h.smmu.read(off("EVTQ_PROD"), 4) >> 31)
    assert ovflg == (nfaults > 8)
    # memory outside the queue was never written
    assert env.mem.read(EVTQ_ADDR + 8 * 32, 32) == bytes(32)
    # the driver consumes some and acknowledges the overflow
    prod = env.h.smmu.read(off("EVTQ_PROD"), 4)
    cons = (ev.cons + consume) & ev.ptr_mask
    env.h.smmu.write(off("EVTQ_CONS"), 4, cons | (prod & (1 << 31)))
    assert not ev.overflow_active
    with pytest.raises(DmaFault):
        env.mgr.dma_read(1, None, 0x7000_0000, 4)
    assert ev.count() == min(8, written - consume + 1)
