"""STE / CD decode checks and stream table / CD table lookups."""

from __future__ import annotations

import pytest

from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3 import regs
from viommu_backend.smmuv3.cd import decode_cd, fetch_cd
from viommu_backend.smmuv3.smmu_config import (HTTU_ACCESS, HTTU_NONE, STALL_MODEL_FORCE,
                                               STALL_MODEL_STALL, STALL_MODEL_TERMINATE)
from viommu_backend.smmuv3.ste import ConfigFault, decode_ste, fetch_ste
from tests.support.walker_env import BASE, IPA_OFF, memory, nested_s2


def _bad(event, fn, *a, **kw):
    with pytest.raises(ConfigFault) as ei:
        fn(*a, **kw)
    assert ei.value.event == event, ei.value
    return ei.value


def test_ste_configs_and_reserved():
    assert decode_ste(b.make_ste(fl.STE_CONFIG_BYPASS)).config == "bypass"
    assert decode_ste(b.make_ste(fl.STE_CONFIG_ABORT)).config == "abort"
    _bad("C_BAD_STE", decode_ste, b.make_ste(fl.STE_CONFIG_BYPASS, v=0))
    for c in (1, 2, 3):
        _bad("C_BAD_STE", decode_ste, b.make_ste(c))
    cfg = decode_ste(b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=0x4000_0040, s1_cdmax=3,
                                s1_fmt=1, s1_dss=2))
    assert cfg.config == "s1" and cfg.s1.cd_ptr == 0x4000_0040 and cfg.s1.cdmax == 3
    assert cfg.s1.dss == fl.S1DSS_SSID0 and cfg.s2 is None
    _bad("C_BAD_STE", decode_ste, b.make_ste(fl.STE_CONFIG_S1, s1_cdmax=8), ssid_bits=4)
    _bad("C_BAD_STE", decode_ste, b.make_ste(fl.STE_CONFIG_S1, s1_cdmax=2, s1_fmt=3))


@pytest.mark.parametrize("gs,t0sz,sl0,level", [(12, 16, 2, 0), (12, 24, 1, 1), (12, 32, 0, 2),
                                               (14, 16, 2, 1), (16, 22, 1, 2), (16, 34, 0, 3)])
def test_ste_s2_valid(gs, t0sz, sl0, level):
    cfg = decode_ste(b.make_ste(fl.STE_CONFIG_S2, s2_t0sz=t0sz, s2_sl0=sl0,
                                s2_granule_shift=gs, s2_vmid=7, s2_ttb=0x4000_0000))
    assert cfg.s2.start_level == level and cfg.s2.vmid == 7 and cfg.s2.tg == 1 << gs


@pytest.mark.parametrize("kw", [dict(s2_t0sz=16, s2_sl0=0),  # 4K L2 start for 48 bits
                                dict(s2_t0sz=39, s2_sl0=2),  # 25 bits from level 0
                                dict(s2_t0sz=16, s2_sl0=3),  # reserved SL0
                                dict(s2_t0sz=10, s2_sl0=2),  # T0SZ too small
                                dict(s2_t0sz=16, s2_sl0=2, s2_ps_bits=52),  # PS > OAS 48
                                dict(S2AA64=0), dict(S2ENDI=1), dict(S2TG=3)])
def test_ste_s2_invalid(kw):
    _bad("C_BAD_STE", decode_ste, b.make_ste(fl.STE_CONFIG_S2, **kw))


_S2 = dict(s2_t0sz=24, s2_sl0=1, s2_ttb=0x4000_0000)


@pytest.mark.parametrize("model,ste,ok", [
    (STALL_MODEL_STALL, dict(config=fl.STE_CONFIG_S1, S1STALLD=1), True),
    (STALL_MODEL_TERMINATE, dict(config=fl.STE_CONFIG_S1, S1STALLD=1), False),
    (STALL_MODEL_FORCE, dict(config=fl.STE_CONFIG_S1, S1STALLD=1), False),
    (STALL_MODEL_STALL, dict(config=fl.STE_CONFIG_S2, S2S=1, **_S2), True),
    (STALL_MODEL_TERMINATE, dict(config=fl.STE_CONFIG_S2, S2S=1, **_S2), False),
    (STALL_MODEL_TERMINATE, dict(config=fl.STE_CONFIG_S2, **_S2), True),
    (STALL_MODEL_FORCE, dict(config=fl.STE_CONFIG_S2, **_S2), False),
    (STALL_MODEL_FORCE, dict(config=fl.STE_CONFIG_S2, S2S=1, **_S2), True),
])
def test_ste_stall_configuration_per_stall_model(model, ste, ok):
    """The ILLEGAL stall configurations of SMMUv3 5.5 (S1STALLD, S2S vs STALL_MODEL)."""
    words = b.make_ste(ste.pop("config"), **ste)
    if ok:
        assert decode_ste(words, stall_model=model).config in ("s1", "s2")
    else:
        _bad("C_BAD_STE", decode_ste, words, stall_model=model)


@pytest.mark.parametrize("config", [fl.STE_CONFIG_S2, fl.STE_CONFIG_NESTED])
def test_ste_s2fwb_needs_idr3_fwb(config):
    """STE.S2FWB is RES0 without SMMU_IDR3.FWB: set on a translating stage 2 it is
    C_BAD_STE; with FWB advertised the STE is accepted and its stage 2 uses the FWB
    encoding.  A stage-1-only STE does not use the field."""
    words = b.make_ste(config, S2FWB=1, s1_ctx_ptr=0x4000_0040, **_S2)
    _bad("C_BAD_STE", decode_ste, words)
    assert decode_ste(words, fwb=True).s2.fwb
    assert not decode_ste(b.make_ste(config, s1_ctx_ptr=0x4000_0040, **_S2), fwb=True).s2.fwb
    assert decode_ste(b.make_ste(fl.STE_CONFIG_S1, S2FWB=1)).s2 is None


@pytest.mark.parametrize("model,s1stalld,s,ok", [
    (STALL_MODEL_STALL, False, 1, True), (STALL_MODEL_STALL, True, 1, False),
    (STALL_MODEL_STALL, True, 0, True), (STALL_MODEL_TERMINATE, False, 1, False),
    (STALL_MODEL_TERMINATE, False, 0, True), (STALL_MODEL_FORCE, False, 0, False),
    (STALL_MODEL_FORCE, False, 1, True)])
def test_cd_s_per_stall_model_and_s1stalld(model, s1stalld, s, ok):
    words = b.make_cd(0x4000_1000, S=s)
    if ok:
        assert decode_cd(words, stall_model=model, s1stalld=s1stalld).stall == bool(s)
    else:
        _bad("C_BAD_CD", decode_cd, words, stall_model=model, s1stalld=s1stalld)


def test_ha_hd_take_effect_only_with_idr0_httu():
    cd = b.make_cd(0x4000_1000, HA=1, HD=1)
    assert (decode_cd(cd).ha, decode_cd(cd).hd) == (True, True)
    assert (decode_cd(cd, httu=HTTU_ACCESS).ha, decode_cd(cd, httu=HTTU_ACCESS).hd) == (True, False)
    assert (decode_cd(cd, httu=HTTU_NONE).ha, decode_cd(cd, httu=HTTU_NONE).hd) == (False, False)
    ste = b.make_ste(fl.STE_CONFIG_S2, S2HA=1, S2HD=1, **_S2)
    s2 = decode_ste(ste).s2
    assert (s2.ha, s2.hd) == (True, True)
    s2 = decode_ste(ste, httu=HTTU_ACCESS).s2
    assert (s2.ha, s2.hd) == (True, False)
    s2 = decode_ste(ste, httu=HTTU_NONE).s2
    assert (s2.ha, s2.hd) == (False, False)


def test_cd_decode_and_checks():
    s1 = decode_cd(b.make_cd(0x4000_1000, granule_shift=16, tsz=20, ips_bits=52, asid=9),
                   oas=44)
    assert s1.tg == 1 << 16 and s1.tsz == 20 and s1.ips_bits == 44 and s1.asid == 9
    assert s1.ttb == 0x4000_1000 and s1.start_level == 1 and s1.record
    _bad("C_BAD_CD", decode_cd, b.make_cd(0, v=0))
    _bad("C_BAD_CD", decode_cd, b.make_cd(0, aa64=0))
    _bad("C_BAD_CD", decode_cd, b.make_cd(0, tsz=40))
    _bad("C_BAD_CD", decode_cd, b.make_cd(0, tsz=15))
    _bad("C_BAD_CD", decode_cd, b.make_cd(0, ENDI=1))
    w = b.make_cd(0)
    w[0] |= 3 << 6  # TG0 reserved
    _bad("C_BAD_CD", decode_cd, w)
    w = b.make_cd(0)
    w[0] |= 7 << 32  # IPS reserved
    _bad("C_BAD_CD", decode_cd, w)


def _stream(mem, strtab_base, cfg, sid):
    return decode_ste(fetch_ste(mem, strtab_base, cfg, sid), sid=sid)


def test_stream_table_linear_and_two_level():
    mem, al = memory()
    lin = al.alloc(64 * 16, 64)
    b.write_words(mem, lin + 5 * 64, b.make_ste(fl.STE_CONFIG_BYPASS))
    cfg = {"FMT": 0, "LOG2SIZE": 4}
    assert _stream(mem, lin, cfg, 5).config == "bypass"
    _bad("C_BAD_STE", _stream, mem, lin, cfg, 6)  # zeroed STE: V=0
    _bad("C_BAD_STREAMID", fetch_ste, mem, lin, cfg, 16)
    _bad("F_STE_FETCH", fetch_ste, mem, 0x1000, cfg, 1)
    # 2-level, split 6 (64 STEs per L2), register value form
    l1 = al.alloc(8 * 4, 64)
    l2 = al.alloc(64 * 64, 64)
    reg = regs.STRTAB_BASE_CFG.layout.encode(FMT=1, LOG2SIZE=8, SPLIT=6)
    mem.write_u64(l1 + 8 * 2, fl.L1STD.encode(Span=7, L2Ptr=l2))
    b.write_words(mem, l2 + 3 * 64, b.make_ste(fl.STE_CONFIG_ABORT))
    assert _stream(mem, l1, reg, 2 * 64 + 3).config == "abort"
    _bad("C_BAD_STE", fetch_ste, mem, l1, reg, 64 + 3)  # Span 0
    mem.write_u64(l1 + 8 * 2, fl.L1STD.encode(Span=2, L2Ptr=l2))  # 2 STEs
    _bad("C_BAD_STE", fetch_ste, mem, l1, reg, 2 * 64 + 3)
    mem.write_u64(l1 + 8 * 2, fl.L1STD.encode(Span=7, L2Ptr=0x10_0000_0000))
    _bad("F_STE_FETCH", fetch_ste, mem, l1, reg, 2 * 64 + 3)
    _bad("C_BAD_STREAMID", fetch_ste, mem, l1, reg, 256)


def _ctx(ptr, cdmax=0, fmt=0, dss=0):
    return decode_ste(b.make_ste(fl.STE_CONFIG_S1, s1_ctx_ptr=ptr, s1_cdmax=cdmax,
                                 s1_fmt=fmt, s1_dss=dss)).s1


def test_cd_table_linear_ssid_and_dss():
    mem, al = memory()
    tbl = al.alloc(64 * 16, 64)
    for i in range(16):
        b.write_words(mem, tbl + 64 * i, b.make_cd(0x4000_0000, asid=100 + i))
    assert fetch_cd(mem, _ctx(tbl), None).asid == 100
    _bad("C_BAD_SUBSTREAMID", fetch_cd, mem, _ctx(tbl), 1)
    assert fetch_cd(mem, _ctx(tbl, 4, dss=1), 7).asid == 107
    assert fetch_cd(mem, _ctx(tbl, 4, dss=1), None) is None  # S1 bypass
    assert fetch_cd(mem, _ctx(tbl, 4, dss=2), None).asid == 100
    _bad("C_BAD_SUBSTREAMID", fetch_cd, mem, _ctx(tbl, 4, dss=2), 0)
    _bad("F_STREAM_DISABLED", fetch_cd, mem, _ctx(tbl, 4, dss=0), None)
    _bad("C_BAD_SUBSTREAMID", fetch_cd, mem, _ctx(tbl, 4, dss=1), 16)
    _bad("F_CD_FETCH", fetch_cd, mem, _ctx(0x2000, 4, dss=1), 3)
    b.write_words(mem, tbl + 64 * 5, b.make_cd(0, v=0))
    _bad("C_BAD_CD", fetch_cd, mem, _ctx(tbl, 4, dss=1), 5)


@pytest.mark.parametrize("fmt,split", [(1, 6), (2, 10)])
def test_cd_table_two_level(fmt, split):
    mem, al = memory()
    l1 = al.alloc(8 * 16, 64)
    l2 = al.alloc(64 << split, 4096)
    ssid = (3 << split) | 5
    mem.write_u64(l1 + 8 * 3, fl.L1CD.encode(V=1, L2Ptr=l2))
    b.write_words(mem, l2 + 64 * 5, b.make_cd(0x4000_0000, asid=77))
    ctx = _ctx(l1, 14, fmt=fmt, dss=1)
    assert fetch_cd(mem, ctx, ssid).asid == 77
    _bad("C_BAD_SUBSTREAMID", fetch_cd, mem, ctx, (2 << split) | 5)  # L1CD.V = 0


def test_nested_cd_fetch_through_s2():
    mem, al = memory()
    _, s2 = nested_s2(mem, al, 12)
    tbl = al.alloc(64 * 4, 64)
    b.write_words(mem, tbl + 64, b.make_cd(0x4000_0000, asid=42))
    ctx = _ctx(tbl + IPA_OFF, 2, dss=1)  # the STE holds an IPA
    assert fetch_cd(mem, ctx, 1, s2).asid == 42
    f = _bad("F_TRANSLATION", fetch_cd, mem, _ctx(0x1000, 2, dss=1), 1, s2)
    assert f.stage2 and f.fault_class == fl.FaultClass.CD and f.ipa == 0x1040
    assert BASE  # memory is where walker_env put it
